"""Training objectives: what a batch holds and what the train step minimises.

An objective is a batch layout (which rows solarjax.data builds), its units (target tokens or
pairs, counted from the batch alone) and `sums(ctx, params, batch, reference)`: the loss and its
metrics summed over the units. The train step divides by the whole global batch's units, so the
loss is the mean over all of them however the rows are split (devices, microbatches, eval batches).
The jitted step and its sharding (solarjax.train.step), checkpoints, resume, eval, samples and recipes
(solarjax.train.trainer, solarjax.train.recipe) are the same for all objectives.

- lm:  next-token cross entropy over every position whose next token is in the same document.
- sft: the same over the tokens the record's mask marks (the assistant turns, solarjax.data.records):
       the mean over all of them in the global batch. Both go through loss.cross_entropy_sum, whose
       gradients are exact for a weighted token sum times a scalar.
- dpo: -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), averaged over the pairs, with
       log-probabilities summed over each response's tokens, for the policy and a frozen
       reference. Nonlinear in per-sequence sums, so it differentiates per-token log-probs
       (loss.token_logprobs) by ordinary autodiff.

Each objective owns its options: a frozen dataclass (DPOConfig for dpo) that the YAML section
named after the objective builds (`dpo: {beta: 0.1}`), which the loss gets as ctx.options. A pair
objective is one function of the policy's (and reference's) per-sequence sums, e.g. SimPO (with
a SimPOConfig holding beta and gamma, and a `simpo: SimPOConfig` field in config.TrainConfig):
    def simpo(pol, ref, opts):
        margin = opts.beta * (pol.chosen / pol.chosen_n - pol.rejected / pol.rejected_n) - opts.gamma
        return -jax.nn.log_sigmoid(margin), {"reward_accuracy": margin > 0}
    OBJECTIVES["simpo"] = pair_objective("simpo", simpo, options=SimPOConfig, reference=False)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from solarjax.errors import ConfigError
from solarjax.model.config import ModelConfig
from solarjax.model.decoder import Decoder
from solarjax.train import loss as loss_lib


@dataclasses.dataclass(frozen=True)
class Context:
    """What a loss needs besides parameters and a batch; hashable, so the step closes over it."""
    config: ModelConfig
    chunk: int | None = None  # positions per step of the chunked vocabulary loss; None: the whole row
    unroll: int = 1  # layers per scan iteration (compile_for_topology's FLOP count)
    options: object = None  # the objective's config section (DPOConfig for dpo)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimization (objective: dpo): the YAML's `dpo:` section."""
    beta: float = 0.1  # reward = beta * (log p_policy - log p_reference) of a response
    reference: str | None = None  # HF dir or solarjax checkpoint (in a recipe: a stage); None: the initial policy

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta!r}")


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    layout: str  # data layout: "text" (documents cut into windows), "sft" (examples), "pairs" (chosen/rejected)
    units: Callable  # batch -> how many units (target tokens, pairs) it has, from the batch alone
    sums: Callable  # (ctx, params, batch, reference) -> {"loss": sum over the units, metric: sum, ...}
    count: str = "tokens"  # the units' name in the metrics
    # The step gets a frozen reference model's parameters as a third argument; the options then
    # have a `reference` field: where they come from (None: the initial policy).
    reference: bool = False
    per_token: bool = True  # the loss is a mean token cross entropy, so eval reports a perplexity too
    options: type | None = None  # the class of its config section, named after the objective (DPOConfig)
    # (ctx, params, batch) -> {"loss": [B] per row, count: [B]}: what a paired comparison of two
    # models over the same held-out windows needs (recipes); None where rows are not its units.
    rows: Callable | None = None

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("tokens", "segment_ids", "positions") + (() if self.layout == "text" else ("loss_mask",))

    def mean(self, ctx: "Context", params, batch, reference=None):
        """(mean loss, {count: units, metric: mean}) over one batch."""
        units = self.units(batch)
        sums = self.sums(ctx, params, batch, reference)
        per_unit = 1.0 / jnp.maximum(units, 1).astype(jnp.float32)
        return sums["loss"] * per_unit, {self.count: units, **{k: v * per_unit for k, v in sums.items() if k != "loss"}}


# ---------------------------------------------------------------------------------------------
# Token objectives: a weighted sum of next-token cross entropy


def _next(a_BT):
    """a shifted left by one, 0 after the last position: the labels move, not the hidden states
    (slicing would copy them)."""
    return jnp.pad(a_BT[:, 1:], ((0, 0), (0, 1)))


def same_document_BT(batch):
    """Positions whose next token is in the same document (and not padding)."""
    seg_BT = batch["segment_ids"]
    next_seg_BT = _next(seg_BT)
    return (next_seg_BT == seg_BT) & (next_seg_BT > 0)


def marked_BT(batch):
    """Positions whose next token the record's mask marks (an assistant's, a response's); packed
    examples never share a segment, so same_document keeps a prediction inside its example."""
    return same_document_BT(batch) & (_next(batch["loss_mask"]) > 0)


def _hidden(ctx: Context, params, batch):
    """(final hidden states [B, T, D], output projection [D, V]) of the batch's rows."""
    return Decoder(ctx.config, scan_unroll=ctx.unroll).apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], hidden=True)


def token_nll_sum(ctx: Context, params, batch, weights_BT):
    """sum of weights * next-token nll, through the chunked loss (exact gradients for a token sum)."""
    tokens_BT = batch["tokens"]
    x_BTD, head_DV = _hidden(ctx, params, batch)
    return loss_lib.cross_entropy_sum(x_BTD, head_DV, _next(tokens_BT), weights_BT.astype(jnp.float32),
                                      ctx.chunk or tokens_BT.shape[1])


def token_nll_rows(ctx: Context, params, batch, weights_BT):
    """Per row: sum of weights * next-token nll, float32 [B], by the chunked log-probabilities."""
    tokens_BT = batch["tokens"]
    x_BTD, head_DV = _hidden(ctx, params, batch)
    logp_BT = loss_lib.token_logprobs(x_BTD, head_DV, _next(tokens_BT), ctx.chunk or tokens_BT.shape[1])
    w_BT = weights_BT.astype(jnp.float32)
    return -jnp.where(w_BT != 0, logp_BT * w_BT, 0).sum(1)


def token_objective(name: str, layout: str, weights: Callable) -> Objective:
    """Mean next-token cross entropy over the positions weights(batch) marks, in the global batch."""
    return Objective(name, layout, units=lambda batch: weights(batch).sum(),
                     sums=lambda ctx, params, batch, reference=None: {
                         "loss": token_nll_sum(ctx, params, batch, weights(batch))},
                     rows=lambda ctx, params, batch: {"loss": token_nll_rows(ctx, params, batch, weights(batch)),
                                                      "tokens": weights(batch).sum(1)})


# ---------------------------------------------------------------------------------------------
# Pair objectives: functions of per-sequence log-probability sums


class SequenceLogps(NamedTuple):
    """Per pair slot of a row, [B, P] with P = T // 2: summed response log-probs and token counts."""
    chosen: jax.Array
    rejected: jax.Array
    chosen_n: jax.Array
    rejected_n: jax.Array


def _per_pair(values_BT, seg_BT):
    """Sums over each segment, as [B, P] chosen (segments 2k-1) and rejected (2k) slots."""
    T = seg_BT.shape[1]
    sums_BS = jax.vmap(lambda v_T, s_T: jax.ops.segment_sum(v_T, s_T, num_segments=T + 1))(values_BT, seg_BT)
    return sums_BS[:, 1::2][:, :T // 2], sums_BS[:, 2::2][:, :T // 2]


def real_pairs_BP(batch):
    """Pair slots that hold a pair: both responses have a token to score."""
    chosen_n, rejected_n = _per_pair(marked_BT(batch).astype(jnp.int32), batch["segment_ids"])
    return (chosen_n > 0) & (rejected_n > 0)


def sequence_logps(ctx: Context, params, batch) -> SequenceLogps:
    """Response log-probabilities summed per sequence. Pair k of a row is segments 2k-1 (chosen)
    and 2k (rejected) (data.PackedExamples); a slot with no pair sums to 0 over 0 tokens."""
    tokens_BT, seg_BT = batch["tokens"], batch["segment_ids"]
    x_BTD, head_DV = _hidden(ctx, params, batch)
    logp_BT = loss_lib.token_logprobs(x_BTD, head_DV, _next(tokens_BT), ctx.chunk or tokens_BT.shape[1])
    weights_BT = marked_BT(batch)
    # The log-prob of token t+1 sits at position t, in t's segment (the same as t+1's where weighted).
    chosen, rejected = _per_pair(jnp.where(weights_BT, logp_BT, 0.0), seg_BT)
    return SequenceLogps(chosen, rejected, *_per_pair(weights_BT.astype(jnp.int32), seg_BT))


def dpo(policy: SequenceLogps, reference: SequenceLogps, options):
    """Rafailov et al. 2023, eq. 7: per pair loss and metrics (rewards are beta * log-ratios)."""
    chosen = options.beta * (policy.chosen - reference.chosen)
    rejected = options.beta * (policy.rejected - reference.rejected)
    return -jax.nn.log_sigmoid(chosen - rejected), {
        "reward_accuracy": chosen > rejected, "reward_margin": chosen - rejected,
        "chosen_reward": chosen, "rejected_reward": rejected}


def pair_objective(name: str, pair_loss: Callable, options: type | None = None, reference: bool = True) -> Objective:
    """An Objective from a per-pair loss: pair_loss(policy, reference or None, options) ->
    (loss per pair slot [B, P], {metric: per pair slot}); summed here over the real pairs."""
    def sums(ctx: Context, params, batch, reference_params=None):
        policy = sequence_logps(ctx, params, batch)
        ref = None
        if reference:
            ref = jax.tree.map(jax.lax.stop_gradient, sequence_logps(ctx, reference_params, batch))
        losses_BP, metrics = pair_loss(policy, ref, ctx.options)
        real_BP = real_pairs_BP(batch)
        total = lambda v_BP: jnp.where(real_BP, v_BP, 0).astype(jnp.float32).sum()
        return {"loss": total(losses_BP), **{k: total(v) for k, v in metrics.items()}}
    return Objective(name, "pairs", units=lambda batch: real_pairs_BP(batch).sum(), sums=sums, count="pairs",
                     reference=reference, per_token=False, options=options)


OBJECTIVES: dict[str, Objective] = {
    "lm": token_objective("lm", "text", same_document_BT),
    "sft": token_objective("sft", "sft", marked_BT),
    "dpo": pair_objective("dpo", dpo, options=DPOConfig),
}


def get(name: str) -> Objective:
    return OBJECTIVES[name]  # the config has checked the name
