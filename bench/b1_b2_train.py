"""Benchmarks B1 and B2: training throughput on CPU, solarjax's jitted train step (the trainer's
own, with its AdamW chain) beside HF transformers MistralForCausalLM + torch.optim.AdamW, on the
bench-small model with the very same random weights, batch 4 x 512 tokens, float32; and the model
FLOP utilisation, model FLOPs/s over the machine's practical peak (a large float32 matmul timed in
the same run). Model FLOPs per token are the trainer's (and B6's) count: 6 per weight that
multiplies (not the embedding table, a gather) plus PaLM's attention term.

  python bench/b1_b2_train.py [--steps 6] [--runs 3]
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bench_small import best_time, models
from solarjax.config import OptimConfig
from solarjax.optim import make_optimizer
from solarjax.trainer import loss_and_count, model_flops_per_token

B, T = 4, 512


def matmul_peak(n=2048, repeats=5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / best_time(lambda: f(a).block_until_ready(), repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    config, params, hf_model = models("mistral")
    hf_model.train()
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (B, T)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones((B, T), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
    opt_cfg = OptimConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0)
    opt = make_optimizer(opt_cfg, 1000)

    @jax.jit
    def step(params, state):
        (loss, _), grads = jax.value_and_grad(lambda p: loss_and_count(config, p, batch), has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state, loss

    state = opt.init(params)
    torch_opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ids = torch.as_tensor(tokens, dtype=torch.long)

    def torch_step():
        torch_opt.zero_grad(set_to_none=True)
        loss = hf_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch_opt.step()
        return loss.item()

    params, state, first_jax = step(params, state)  # compile + first step (same weights on both sides)
    first_torch = torch_step()
    print(f"first-step loss: solarjax {float(first_jax):.5f}, HF {first_torch:.5f}", file=sys.stderr)
    ours, theirs = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        for _ in range(args.steps):
            params, state, loss = step(params, state)
        jax.block_until_ready(loss)
        ours.append(B * T * args.steps / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(args.steps):
            torch_step()
        theirs.append(B * T * args.steps / (time.perf_counter() - t))
    o, h = statistics.median(ours), statistics.median(theirs)
    peak = matmul_peak()
    fpt = model_flops_per_token(config, T)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}", file=sys.stderr)
    print("| id | solarjax tokens/s (min-max) | HF + torch AdamW tokens/s (min-max) | ratio |")
    print("|---|---|---|---|")
    print(f"| B1 | {o:.0f} ({min(ours):.0f}-{max(ours):.0f}) | {h:.0f} ({min(theirs):.0f}-{max(theirs):.0f}) "
          f"| {o / h:.2f} |")
    print(f"\nB2: {fpt / 1e6:.1f} MFLOP/token * {o:.0f} tokens/s = {fpt * o / 1e9:.1f} GFLOP/s; practical peak "
          f"(2048^3 float32 matmul) {peak / 1e9:.1f} GFLOP/s -> MFU {100 * fpt * o / peak:.0f}% "
          f"(HF: {100 * fpt * h / peak:.0f}%)")

if __name__ == "__main__":
    main()
