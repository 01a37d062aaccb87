"""Sampling with a KV cache: one jitted prefill, then a jitted lax.while_loop that decodes every token,
so Python runs once per request, not once per token (the command is solarjax.cli.sample).

Prompts of different lengths are left-padded to one bucketed length; padding has segment 0, so no
real token attends to it, and each prompt's positions start at 0. The cache holds prompt + output,
and the sliding window, when the model has one, is applied by masking within it. With dynamic RoPE
scaling each cached key keeps the frequencies of the step that wrote it (model.rope_frequencies),
as in transformers' generate.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solarjax.errors import SolarjaxError
from solarjax.model.config import ModelConfig
from solarjax.model.decoder import Decoder, abstract_params, init_cache
from solarjax.sharding import constrain, host_value


class SamplingError(SolarjaxError):
    """A sampling option or prompt is out of range; the message names it."""


MAX_EOS_IDS = 8  # stop ids travel as a fixed-size array (padded with -1): no recompile per model


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 is off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")


def sample_logits(logits_BV, rng, temperature, top_k, top_p):
    """Next tokens [B]: greedy when temperature is 0, else temperature, then top-k, then top-p
    (the order HF applies them). The scalars are traced: changing them does not recompile."""
    def greedy(_):
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sample(_):
        V = logits_BV.shape[-1]
        scaled = logits_BV / jnp.maximum(temperature, 1e-6)
        desc = -jnp.sort(-scaled, axis=-1)
        kth = desc[:, jnp.clip(top_k - 1, 0, V - 1)][:, None]
        scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
        desc = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # smallest prefix whose mass reaches top_p
        cutoff = jnp.take_along_axis(desc, jnp.maximum(keep.sum(-1, keepdims=True) - 1, 0), axis=-1)
        scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(config: ModelConfig, max_new: int, params, tokens_BP, positions_BP, segments_BP, rng, temperature,
             top_k, top_p, eos_E):
    """Runs the prompts through the model into a fresh cache and samples each row's first token."""
    B, P = tokens_BP.shape
    stacked = "layers" in params
    cache = init_cache(config, B, P + max_new, stacked)
    logits_B1V, cache = Decoder(config, not stacked).apply({"params": params}, tokens_BP, positions_BP, segments_BP,
                                                           cache, last_only=True)
    rng, key = jax.random.split(rng)
    first_B = sample_logits(logits_B1V[:, 0], key, temperature, top_k, top_p)
    return cache, first_B, rng


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(config: ModelConfig, max_new: int, params, cache, first_B, lengths_B, caps_B, rng, temperature, top_k,
            top_p, eos_E):
    """The decode loop: returns generated tokens [B, max_new] (0 after a row's EOS or its cap of
    new tokens, caps_B) and the number of tokens produced per row before the loop stopped."""
    model = Decoder(config, decode_layout="layers" not in params)
    B = first_B.shape[0]
    out_BN = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first_B)

    def cond(state):
        i, _, _, _, done_B, _ = state
        return (i < max_new) & ~jnp.all(done_B)

    def body(state):
        i, cache, out_BN, last_B, done_B, rng = state
        # A row past its cap runs on masked; its positions stop at the limit (dynamic RoPE's
        # frequencies follow the batch's largest position).
        positions_B1 = jnp.minimum(lengths_B + i - 1, config.position_limit - 1)[:, None]
        segments_B1 = jnp.where(done_B, 0, 1)[:, None].astype(jnp.int32)
        logits_B1V, cache = model.apply({"params": params}, last_B[:, None], positions_B1, segments_B1, cache)
        rng, key = jax.random.split(rng)
        next_B = jnp.where(done_B, 0, sample_logits(logits_B1V[:, 0], key, temperature, top_k, top_p))
        done_B = done_B | _is_eos(next_B, eos_E) | (i + 1 >= caps_B)
        return i + 1, cache, out_BN.at[:, i].set(next_B), next_B, done_B, rng

    state = (jnp.int32(1), cache, out_BN, first_B, _is_eos(first_B, eos_E) | (caps_B <= 1), rng)
    steps, _, out_BN, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out_BN, steps


def _is_eos(tokens_B, eos_E):
    return (tokens_B[:, None] == eos_E[None, :]).any(axis=-1)


def decode_params(config, params) -> dict:
    """Training-layout parameters in the decode layout (Decoder(decode_layout=True), see xla_cpu):
    the stacked layers split into layers_0..layers_{L-1} and each weight's axes reordered as that
    layout declares them, matched by logical axis name. Costs one copy of the weights; under a mesh
    the copy keeps each weight's sharding by name."""
    names = lambda tree: jax.tree.map(lambda p: p.names, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    train = names(abstract_params(config))
    decode = names(abstract_params(config, decode_layout=True))

    def relayout(a, t, d):
        return constrain(a.transpose([t.index(n) for n in d]), d)

    out = {}
    for key, value in params.items():
        if key != "layers":
            out[key] = jax.tree.map(relayout, value, train[key], decode[key])
            continue
        for i in range(config.num_layers):  # t[1:]: a layer's axes without the leading "layers"
            out[f"layers_{i}"] = jax.tree.map(lambda a, t, d: relayout(a[i], t[1:], d), value, train[key],
                                              decode[f"layers_{i}"])
    return out


_decode_params = jax.jit(decode_params, static_argnums=0)


_TOLD_PAST_TRAINED: set = set()  # models already told about, so a loop of requests says it once


def say_if_past_trained_length(config: ModelConfig, positions: int, what: str) -> None:
    """One line (once per model) when `what` reaches `positions` positions, past
    max_position_embeddings, the length the model was trained for, though within what its RoPE
    scaling allows (config.position_limit): past that, quality is the scaling's promise."""
    if positions > config.max_position_embeddings and config not in _TOLD_PAST_TRAINED:
        _TOLD_PAST_TRAINED.add(config)
        s = config.rope
        print(f"note: {what} reaches {positions} positions, past the model's max_position_embeddings "
              f"{config.max_position_embeddings}; its {s['rope_type']} RoPE scaling (factor {s['factor']:g}) "
              f"allows {config.position_limit}", file=sys.stderr)


def left_pad(prompts: list[list[int]], length: int | None = None):
    """(tokens, positions, segments), int32 [B, length]: prompts right-aligned, padding with token 0
    and segment 0, positions from 0 at each prompt's first token."""
    length = length or max(len(p) for p in prompts)
    tokens, positions, segments = (np.zeros((len(prompts), length), np.int32) for _ in range(3))
    for b, p in enumerate(prompts):
        tokens[b, length - len(p):] = p
        positions[b, length - len(p):] = np.arange(len(p))
        segments[b, length - len(p):] = 1
    return tokens, positions, segments


def _bucket(n: int) -> int:
    """Prompt lengths round up to 16, 32, 64, ...: few shapes, so few compilations."""
    return max(16, 1 << (n - 1).bit_length())


def generate(config: ModelConfig, params, prompts: list[list[int]], sampling: Sampling = Sampling(),
             eos_ids: int | list[int] | None = None) -> list[dict]:
    """Generates for a batch of token-id prompts, stopping a row at any of `eos_ids` (the
    tokenizer's `eos_ids`; None: run to max_new_tokens). Returns, per prompt, {"token_ids":
    generated ids (through the EOS if one came), "timing": {"prefill_s", "decode_s",
    "decode_tokens_per_s"}}, timed after compilation. Each row gets the new tokens that fit the
    model's positions (config.position_limit) with its prompt, said in one line when fewer than asked."""
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else [int(e) for e in eos_ids]
    if len(eos_ids) > MAX_EOS_IDS:
        raise SamplingError(f"{len(eos_ids)} EOS ids given; at most {MAX_EOS_IDS} are supported")
    if not prompts:
        raise SamplingError("no prompts given")
    limit = config.position_limit
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise SamplingError(f"prompt {i} is empty")
        if len(p) > limit:
            raise SamplingError(f"prompt {i} has {len(p)} tokens, more than the model's maximum of "
                                f"{limit} positions")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise SamplingError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
    lengths = np.array([len(p) for p in prompts], np.int32)
    # Each row's prompt + new tokens fit the model's positions (vLLM's rule), whatever the others' lengths.
    caps = np.clip(limit - lengths, 1, sampling.max_new_tokens).astype(np.int32)
    short = np.flatnonzero(caps < sampling.max_new_tokens)
    if len(short):
        i = short[0]
        more = f" (and {len(short) - 1} more prompts)" if len(short) > 1 else ""
        print(f"note: prompt {i} gets {caps[i]} of the {sampling.max_new_tokens} new tokens asked{more}: it has "
              f"{lengths[i]} tokens and the model's positions end at {limit}", file=sys.stderr)
    say_if_past_trained_length(config, int((lengths + caps).max()), "this request")
    max_new = int(caps.max())
    tokens, positions, segments = left_pad(prompts, _bucket(int(lengths.max())))
    if jax.default_backend() == "cpu" and "layers" in params:
        # The decode layout (decode_params) halves XLA:CPU's time per decoded token
        # (bench/b3_b4_decode.py); one copy of the weights up front pays for itself within a token or two.
        params = _decode_params(config, params)
    knobs = (np.float32(sampling.temperature), np.int32(sampling.top_k), np.float32(sampling.top_p),
             np.array(eos_ids + [-1] * (MAX_EOS_IDS - len(eos_ids)), np.int32))
    prefill_args = (params, tokens, positions, segments, jax.random.key(sampling.seed), *knobs)
    prefill = _prefill.lower(config, max_new, *prefill_args).compile()
    cache, first, rng = prefill_shapes = jax.eval_shape(lambda: _prefill(config, max_new, *prefill_args))
    decode = _decode.lower(config, max_new, params, cache, first, lengths, caps, rng, *knobs).compile()
    del prefill_shapes
    # Timed after compilation: what a second request of the same shape costs.
    t0 = time.perf_counter()
    cache, first, rng = jax.block_until_ready(prefill(*prefill_args))
    t1 = time.perf_counter()
    out, steps = jax.block_until_ready(decode(params, cache, first, lengths, caps, rng, *knobs))
    t2 = time.perf_counter()
    out, steps = host_value(out), host_value(steps)
    prefill_s, decode_s = t1 - t0, t2 - t1
    results, generated = [], 0
    for row, cap in zip(np.asarray(out), caps):
        ids = row.tolist()
        stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        if stop is not None:
            ids = ids[:stop + 1]
        else:
            ids = ids[:min(int(steps), int(cap))]
        generated += len(ids)
        results.append({"token_ids": ids})
    timing = {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens_per_s": generated / decode_s}
    for r in results:
        r["timing"] = timing
    return results
