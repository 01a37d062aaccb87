"""XLA:CPU specializations of the model's matrix products, chosen by backend; model.py writes each
product as the einsum it is (`dense`), and this module decides how it runs.

- Training and scoring on CPU: one 2-D matmul per projection, whatever the weight's rank. XLA:CPU
  copied multi-axis operands (o_proj [H, E, D]) and their gradients into matrices at every call,
  and ran the SiLU backward as a transposing loop (bench/b1_b2_train.py: ~7.9 -> ~6.0 s a step).
- Decoding on CPU (the sampler): the decode layout. XLA:CPU's GEMM (YNNPACK) packs its right
  operand on every call, so x @ W re-packs every weight at every decoded token. Stored [*out, *in]
  and computed as W @ x^T, the few decoded rows go on the right and the weight streams through as
  stored: 1.6x faster at 16 rows (bench/gemm_shapes.py: 36 -> 16 ms for [16, 2048] x [2048, 5632]).
  Optimization barriers stop XLA from rewriting it back into x @ W^T. The layers are also kept as
  separate weights (layers_0..): XLA:CPU copies each layer's slice of a stacked weight on every scan
  step. `sample.decode_params` makes this layout from the training one.
- Everywhere else: jnp.einsum as written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from solarjax.sharding import platform


def parse(eq: str) -> tuple[str, str, str, str]:
    """'BTD,DHE->BTHE' -> (x letters, w letters, out letters, contracted letters)."""
    inputs, out = eq.replace(" ", "").split("->")
    x, w = inputs.split(",")
    contracted = "".join(c for c in w if c not in out)
    if not (x.endswith(contracted) and w.startswith(contracted) and out == x[:len(x) - len(contracted)] + w[len(contracted):]):
        raise ValueError(f"dense equation {eq!r} must contract x's trailing axes with w's leading ones")
    return x, w, out, contracted


def decode_order(w: str, contracted: str) -> str:
    """The weight's axes as the decode layout stores them: outputs first, then inputs."""
    return w[len(contracted):] + contracted


def dense(eq: str, x: jax.Array, w: jax.Array, decode_layout: bool = False, out_dtype=None) -> jax.Array:
    """einsum(eq, x, w) with x's trailing axes contracted against w's leading ones, w as stored:
    in eq's order, or in decode_order when decode_layout."""
    xs, ws, out, contracted = parse(eq)
    n = int(np.prod(x.shape[len(xs) - len(contracted):]))
    lead = x.shape[:len(xs) - len(contracted)]
    if decode_layout:
        out_dims = w.shape[:len(ws) - len(contracted)]
        x2t = jax.lax.optimization_barrier(x.reshape(-1, n).T)
        y = jax.lax.optimization_barrier(jnp.matmul(w.reshape(-1, n), x2t, preferred_element_type=out_dtype)).T
        return y.reshape(lead + out_dims)
    if platform() == "cpu":
        y = jnp.matmul(x.reshape(-1, n), w.reshape(n, -1), preferred_element_type=out_dtype)
        return y.reshape(lead + w.shape[len(contracted):])
    return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)
