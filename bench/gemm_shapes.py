"""Diagnostic behind B1 and B4: how fast XLA:CPU and torch multiply the bench-small model's
matrices (float32, this machine), each product alone: the ceiling a training or decode step can
reach. Training: N = 2048 tokens, forward x @ W and backward dy @ W^T, x^T @ dy. Decoding: 16 rows
through 8 layers' up/down weights (not in cache), as x @ W and as the sampler's W @ x^T.

  python bench/gemm_shapes.py
"""


import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_small import best_time

from solarjax.model.xla_cpu import dense


def training_shapes(n=2048):
    # name, einsum, operand shapes, FLOPs
    cases = [("x @ W, [N,512]x[512,1536]", "mk,kn->mn", (n, 512), (512, 1536), 2 * n * 512 * 1536),
             ("x @ W, [N,1536]x[1536,512]", "mk,kn->mn", (n, 1536), (1536, 512), 2 * n * 512 * 1536),
             ("x @ W, lm_head [N,512]x[512,32000]", "mk,kn->mn", (n, 512), (512, 32000), 2 * n * 512 * 32000),
             ("dy @ W^T, [N,1536]x[512,1536]^T", "mn,kn->mk", (n, 1536), (512, 1536), 2 * n * 512 * 1536),
             ("dy @ W^T, lm_head", "mn,kn->mk", (n, 32000), (512, 32000), 2 * n * 512 * 32000),
             ("x^T @ dy, [N,512]^T x [N,1536]", "mk,mn->kn", (n, 512), (n, 1536), 2 * n * 512 * 1536),
             ("x^T @ dy, lm_head", "mk,mn->kn", (n, 512), (n, 32000), 2 * n * 512 * 32000),
             ("square, 2048^3", "mk,kn->mn", (2048, 2048), (2048, 2048), 2 * 2048 ** 3)]
    print("| training product | XLA GFLOP/s | torch GFLOP/s |\n|---|---|---|")
    for name, eq, sa, sb, flops in cases:
        a, b = np.random.randn(*sa).astype(np.float32), np.random.randn(*sb).astype(np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        f = jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y))
        t_xla = best_time(lambda: f(ja, jb).block_until_ready())
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        t_torch = best_time(lambda: torch.einsum(eq, ta, tb))
        print(f"| {name} | {flops / t_xla / 1e9:.0f} | {flops / t_torch / 1e9:.0f} |")


def decode_shapes(layers=8, d=512, f=1536, rows=16):
    rng = np.random.RandomState(0)
    ups = [rng.randn(d, f).astype(np.float32) for _ in range(layers)]  # 8 x 2 x 3 MB, past L2
    downs = [rng.randn(f, d).astype(np.float32) for _ in range(layers)]
    x = rng.randn(rows, d).astype(np.float32)

    def x_w(x, ups, downs):
        for u, w in zip(ups, downs):
            x = x + (x @ u) @ w
        return x

    def w_xt(x, ups_t, downs_t):  # weights [out, in]: the sampler's decode layout
        for u, w in zip(ups_t, downs_t):
            x = x + dense("ND,DF->NF", dense("ND,DF->NF", x, u, True), w, True)
        return x

    flops = layers * 2 * 2 * rows * d * f
    jx, args_xw = jnp.asarray(x), ([jnp.asarray(u) for u in ups], [jnp.asarray(w) for w in downs])
    args_wx = ([jnp.asarray(u.T.copy()) for u in ups], [jnp.asarray(w.T.copy()) for w in downs])
    f_xw, f_wx = jax.jit(x_w), jax.jit(w_xt)
    t_xw = best_time(lambda: f_xw(jx, *args_xw).block_until_ready())
    t_wx = best_time(lambda: f_wx(jx, *args_wx).block_until_ready())
    tu, td = [torch.from_numpy(u) for u in ups], [torch.from_numpy(w) for w in downs]
    t_torch = best_time(lambda: x_w(torch.from_numpy(x), tu, td))
    print(f"\n| decode, {rows} rows, {layers} layers' up and down | GFLOP/s |\n|---|---|")
    print(f"| XLA, x @ W | {flops / t_xw / 1e9:.0f} |\n| XLA, W @ x^T (decode layout) | {flops / t_wx / 1e9:.0f} |")
    print(f"| torch, x @ W | {flops / t_torch / 1e9:.0f} |")


if __name__ == "__main__":
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    training_shapes()
    decode_shapes()
