"""Cross entropy over the vocabulary without float32 [B, T, V] logits, forward and backward.

The vocabulary projection and its softmax are most of a small model's step (at width 128 with
Mistral's 32000 ids, ~1.0 s of a 1.3 s CPU step), and their [B, T, V] float32 logits are the
largest temporaries of a large one. `cross_entropy_sum` walks the sequence in chunks: each chunk's
logits are made, reduced to the loss, and turned at once into the chunk's gradients
(softmax - one-hot, then dx = dz W^T and dW += x^T dz), so the backward pass only scales what the
forward pass already computed. Same three products as autodiff through full logits (no recompute),
one exp per logit instead of several passes over a 262 MB array.

The gradients are exact only for a loss that is this weighted sum times a scalar (the LM and SFT
means are); objectives that weigh tokens differently after the fact (e.g. DPO's per-sequence sums)
differentiate ordinary logits instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _by_chunk(a, chunk: int):
    """[B, T, ...] -> [T/chunk, B, chunk, ...]: the scan walks the sequence, so the batch axis keeps
    its (data-parallel) sharding inside every step."""
    B, T = a.shape[:2]
    return jnp.moveaxis(a.reshape((B, T // chunk, chunk) + a.shape[2:]), 1, 0)


def _chunk(x_BcD, w_DV, labels_Bc, weights_Bc, with_grads: bool):
    logits_BcV = jnp.matmul(x_BcD, w_DV, preferred_element_type=jnp.float32)
    top_Bc1 = logits_BcV.max(-1, keepdims=True)
    exp_BcV = jnp.exp(logits_BcV - top_Bc1)
    total_Bc1 = exp_BcV.sum(-1, keepdims=True)
    hit_BcV = jnp.arange(w_DV.shape[1]) == labels_Bc[..., None]
    nll_Bc = (top_Bc1 + jnp.log(total_Bc1))[..., 0] - jnp.where(hit_BcV, logits_BcV, 0).sum(-1)
    loss = jnp.where(weights_Bc != 0, nll_Bc * weights_Bc, 0).sum()  # a 0 weight on an inf nll stays 0
    if not with_grads:
        return loss, None, None
    dz_BcV = ((exp_BcV / total_Bc1 - hit_BcV) * weights_Bc[..., None]).astype(x_BcD.dtype)
    dx_BcD = jnp.matmul(dz_BcV, w_DV.T, preferred_element_type=jnp.float32).astype(x_BcD.dtype)
    dw_DV = jnp.einsum("BcD,BcV->DV", x_BcD, dz_BcV, preferred_element_type=jnp.float32)
    return loss, dx_BcD, dw_DV


def _scan(x_BTD, w_DV, labels_BT, weights_BT, chunk: int, with_grads: bool):
    B, T, D = x_BTD.shape
    if T % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {T}")

    def step(dw_DV, xs):
        x_BcD, labels_Bc, weights_Bc = xs
        loss, dx_BcD, dw_c = _chunk(x_BcD, w_DV, labels_Bc, weights_Bc, with_grads)
        return (dw_DV + dw_c if with_grads else None), (loss, dx_BcD)

    dw_DV = jnp.zeros(w_DV.shape, jnp.float32) if with_grads else None
    dw_DV, (losses, dx) = jax.lax.scan(
        step, dw_DV, (_by_chunk(x_BTD, chunk), _by_chunk(labels_BT, chunk), _by_chunk(weights_BT, chunk)))
    if not with_grads:
        return losses.sum(), None
    return losses.sum(), (jnp.moveaxis(dx, 0, 1).reshape(B, T, D), dw_DV.astype(w_DV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cross_entropy_sum(x_BTD, w_DV, labels_BT, weights_BT, chunk: int):
    """sum over (b, t) of weights[b, t] * -log softmax(x[b, t] @ W)[labels[b, t]], in float32.

    x_BTD: final hidden states (after the last norm), in the compute dtype; w_DV: the output
    projection; chunk: positions per scan step (must divide T). Differentiable in x and W only.
    """
    return _scan(x_BTD, w_DV, labels_BT, weights_BT, chunk, with_grads=False)[0]


def _forward(x_BTD, w_DV, labels_BT, weights_BT, chunk):
    loss, grads = _scan(x_BTD, w_DV, labels_BT, weights_BT, chunk, with_grads=True)
    return loss, (grads, labels_BT, weights_BT)


def _backward(chunk, residuals, g):
    (dx_BTD, dw_DV), labels_BT, weights_BT = residuals
    zeros = lambda a: jnp.zeros(a.shape, jax.dtypes.float0) if jnp.issubdtype(a.dtype, jnp.integer) else jnp.zeros_like(a)
    return (g * dx_BTD).astype(dx_BTD.dtype), (g * dw_DV).astype(dw_DV.dtype), zeros(labels_BT), zeros(weights_BT)


cross_entropy_sum.defvjp(_forward, _backward)


def chunk_length(seq_len: int, local_batch: int, rows: int) -> int:
    """Positions per loss chunk: the longest divisor of seq_len whose chunk holds at most `rows`
    tokens of one device's batch (at least 1)."""
    best = 1
    for c in range(1, seq_len + 1):
        if seq_len % c == 0 and c * max(local_batch, 1) <= rows:
            best = c
    return best


def token_logprobs(x_BTD, w_DV, labels_BT, chunk: int):
    """log softmax(x[b, t] @ W)[labels[b, t]] for every position, float32 [B, T], by chunks.

    For losses that are not a weighted token sum (DPO's per-sequence sums go through a sigmoid), so
    ordinary autodiff: each chunk is rematerialized in the backward pass, which keeps the logits
    to one chunk's [B, chunk, V] at a time at the cost of recomputing them once.
    """
    B, T, _ = x_BTD.shape
    if T % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {T}")

    @jax.checkpoint
    def one(x_BcD, labels_Bc):
        logits_BcV = jnp.matmul(x_BcD, w_DV, preferred_element_type=jnp.float32)
        picked_Bc = jnp.take_along_axis(logits_BcV, labels_Bc[..., None], -1)[..., 0]
        return picked_Bc - jax.nn.logsumexp(logits_BcV, -1)

    _, logp_CBc = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None,
                               (_by_chunk(x_BTD, chunk), _by_chunk(labels_BT, chunk)))
    return jnp.moveaxis(logp_CBc, 0, 1).reshape(B, T)
