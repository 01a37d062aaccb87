"""Training objectives: what a batch holds and what the train step minimises.

An objective is a batch layout (which rows solarjax.data builds) plus a loss function
`loss(ctx, params, batch, reference) -> (loss, metrics)`. The jitted step, sharding, checkpoints,
resume, eval, samples and recipes are the trainer's and the same for all of them. `metrics` holds
the objective's means over its unit (`count`: "tokens" or "pairs"), plus that count, so eval can
weigh batches and TensorBoard shows every metric.

- lm:  next-token cross entropy over every position whose next token is in the same document.
- sft: the same over the tokens the record's mask marks (the assistant turns, solarjax.records):
       the mean over all of them in the global batch. Both go through loss.cross_entropy_sum, whose
       gradients are exact for a weighted token sum times a scalar.
- dpo: -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), averaged over the pairs, with
       log-probabilities summed over each response's tokens, for the policy and a frozen
       reference. Nonlinear in per-sequence sums, so it differentiates per-token log-probs
       (loss.token_logprobs) by ordinary autodiff.

A pair objective is one function of the policy's (and reference's) per-sequence sums, e.g. SimPO:
    def simpo(pol, ref, opts):
        margin = opts.beta * (pol.chosen / pol.chosen_n - pol.rejected / pol.rejected_n) - opts.gamma
        return -jax.nn.log_sigmoid(margin), {"reward_accuracy": margin > 0}
    OBJECTIVES["simpo"] = pair_objective("simpo", simpo, reference=False)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from solarjax import loss as loss_lib
from solarjax.config import ModelConfig
from solarjax.model import Decoder


@dataclasses.dataclass(frozen=True)
class Context:
    """What a loss needs besides parameters and a batch; hashable, so the step closes over it."""
    config: ModelConfig
    chunk: int | None = None  # positions per step of the chunked vocabulary loss; None: the whole row
    unroll: int = 1  # layers per scan iteration (compile_for_topology's FLOP count)
    options: object = None  # the objective's config section (DPOConfig for dpo)


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    layout: str  # data layout: "text" (documents cut into windows), "sft" (examples), "pairs" (chosen/rejected)
    loss: Callable  # (ctx, params, batch, reference) -> (scalar loss, {count: n, metric: mean, ...})
    count: str = "tokens"  # the unit means are over; eval weighs batches by it
    reference: bool = False  # the step gets a frozen reference model's parameters as a third argument
    per_token: bool = True  # the loss is a mean token cross entropy, so eval reports a perplexity too

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("tokens", "segment_ids", "positions") + (() if self.layout == "text" else ("loss_mask",))


# ---------------------------------------------------------------------------------------------
# Token objectives: a weighted mean of next-token cross entropy


def _next(a_BT):
    """a shifted left by one, 0 after the last position: the labels move, not the hidden states
    (slicing would copy them)."""
    return jnp.pad(a_BT[:, 1:], ((0, 0), (0, 1)))


def same_document_BT(batch):
    """Positions whose next token is in the same document (and not padding)."""
    seg_BT = batch["segment_ids"]
    next_seg_BT = _next(seg_BT)
    return (next_seg_BT == seg_BT) & (next_seg_BT > 0)


def token_mean(ctx: Context, params, batch, weights_BT):
    """(sum of weights * next-token nll / number of weighted positions, that number)."""
    tokens_BT = batch["tokens"]
    x_BTD, head_DV = Decoder(ctx.config, scan_unroll=ctx.unroll).apply(
        {"params": params}, tokens_BT, batch["positions"], batch["segment_ids"], hidden=True)
    count = weights_BT.sum()
    total = loss_lib.cross_entropy_sum(x_BTD, head_DV, _next(tokens_BT), weights_BT.astype(jnp.float32),
                                       ctx.chunk or tokens_BT.shape[1])
    return total / jnp.maximum(count, 1), count


def lm_loss(ctx: Context, params, batch, reference=None):
    loss, count = token_mean(ctx, params, batch, same_document_BT(batch))
    return loss, {"tokens": count}


def sft_loss(ctx: Context, params, batch, reference=None):
    """Only next tokens the mask marks (an assistant's): packed examples never share a segment,
    so same_document keeps a prediction inside its example."""
    loss, count = token_mean(ctx, params, batch, same_document_BT(batch) & (_next(batch["loss_mask"]) > 0))
    return loss, {"tokens": count}


# ---------------------------------------------------------------------------------------------
# Pair objectives: functions of per-sequence log-probability sums


class SequenceLogps(NamedTuple):
    """Per pair slot of a row, [B, P] with P = T // 2: summed response log-probs and token counts."""
    chosen: jax.Array
    rejected: jax.Array
    chosen_n: jax.Array
    rejected_n: jax.Array


def sequence_logps(ctx: Context, params, batch) -> SequenceLogps:
    """Response log-probabilities summed per sequence. Pair k of a row is segments 2k-1 (chosen)
    and 2k (rejected) (data.PackedExamples); a slot with no pair sums to 0 over 0 tokens."""
    tokens_BT, seg_BT = batch["tokens"], batch["segment_ids"]
    B, T = tokens_BT.shape
    x_BTD, head_DV = Decoder(ctx.config, scan_unroll=ctx.unroll).apply(
        {"params": params}, tokens_BT, batch["positions"], seg_BT, hidden=True)
    logp_BT = loss_lib.token_logprobs(x_BTD, head_DV, _next(tokens_BT), ctx.chunk or T)
    weights_BT = same_document_BT(batch) & (_next(batch["loss_mask"]) > 0)
    # The log-prob of token t+1 sits at position t, in t's segment (the same as t+1's where weighted).
    per_segment = jax.vmap(lambda v_T, s_T: jax.ops.segment_sum(v_T, s_T, num_segments=T + 1))
    sums_BS = per_segment(jnp.where(weights_BT, logp_BT, 0.0), seg_BT)
    counts_BS = per_segment(weights_BT.astype(jnp.int32), seg_BT)
    P = T // 2
    return SequenceLogps(sums_BS[:, 1::2][:, :P], sums_BS[:, 2::2][:, :P],
                         counts_BS[:, 1::2][:, :P], counts_BS[:, 2::2][:, :P])


def dpo(policy: SequenceLogps, reference: SequenceLogps, options):
    """Rafailov et al. 2023, eq. 7: per pair loss and metrics (rewards are beta * log-ratios)."""
    chosen = options.beta * (policy.chosen - reference.chosen)
    rejected = options.beta * (policy.rejected - reference.rejected)
    return -jax.nn.log_sigmoid(chosen - rejected), {
        "reward_accuracy": chosen > rejected, "reward_margin": chosen - rejected,
        "chosen_reward": chosen, "rejected_reward": rejected}


def pair_objective(name: str, pair_loss: Callable, reference: bool = True) -> Objective:
    """An Objective from a per-pair loss: pair_loss(policy, reference or None, options) ->
    (loss per pair slot [B, P], {metric: per pair slot}); here they are averaged over real pairs."""
    def loss(ctx: Context, params, batch, reference_params=None):
        policy = sequence_logps(ctx, params, batch)
        ref = None
        if reference:
            ref = jax.tree.map(jax.lax.stop_gradient, sequence_logps(ctx, reference_params, batch))
        losses_BP, metrics = pair_loss(policy, ref, ctx.options)
        real_BP = (policy.chosen_n > 0) & (policy.rejected_n > 0)
        n = real_BP.sum()
        mean = lambda v_BP: jnp.where(real_BP, v_BP, 0).astype(jnp.float32).sum() / jnp.maximum(n, 1)
        return mean(losses_BP), {"pairs": n, **{k: mean(v) for k, v in metrics.items()}}
    return Objective(name, "pairs", loss, count="pairs", reference=reference, per_token=False)


OBJECTIVES: dict[str, Objective] = {
    "lm": Objective("lm", "text", lm_loss),
    "sft": Objective("sft", "sft", sft_loss),
    "dpo": pair_objective("dpo", dpo),
}


def get(name: str) -> Objective:
    return OBJECTIVES[name]  # the config has checked the name
