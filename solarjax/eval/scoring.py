"""Scoring Tasks (solarjax.eval.tasks) as lm-evaluation-harness does it: few-shot contexts and the
harness's token split, log-likelihoods of continuations in padded batches on the mesh, greedy
generation for GSM8K, the metrics (acc, acc_norm, mc2, exact match), and `evaluate`, which runs
tasks and reports MMLU's subjects together. The rules are listed in solarjax.cli.evaluate (the CLI's
help) and docs/architecture.md, "Evaluation"; the Trainer's eval_tasks call `evaluate` too.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from solarjax.eval.sample import Sampling, generate, say_if_past_trained_length
from solarjax.eval.tasks import Task, TaskError
from solarjax.model.config import ModelConfig
from solarjax.model.decoder import Decoder
from solarjax.sharding import global_from_host, host_value, make_mesh

FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed
FEWSHOT_DELIMITER = "\n\n"


# ---------------------------------------------------------------------------------------------
# Contexts and tokens, by the harness's rules


def fewshot_prefixes(task: Task) -> list[str]:
    """Per eval doc: the description and the solved few-shot examples, each followed by "\\n\\n".
    One random.Random(FEWSHOT_SEED) draws for the docs in order, as the harness's sampler does."""
    if task.num_fewshot == 0:
        return [task.description] * len(task.docs)
    rnd, k, spec = random.Random(FEWSHOT_SEED), task.num_fewshot, task.spec
    out = []
    for doc in task.docs:
        if spec.first_n:
            shots = task.pool[:k]
        elif spec.draw_extra:
            shots = [s for s in rnd.sample(task.pool, k + 1) if s.raw != doc.raw][:k]
        else:
            shots = rnd.sample(task.pool, k)
        out.append(task.description + "".join(s.example(spec.delimiter) + FEWSHOT_DELIMITER for s in shots))
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing whitespace of the context joins the continuation; the context
    is encoded alone and with the continuation, and the continuation's tokens are the joint
    encoding's past the context's. An empty context is the BOS (or EOS) token alone; so is one of
    whitespace only, which the harness would leave with no token to predict the first from (it
    reads the logits at position -1)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        cont = tokenizer.encode(continuation, bos=False, eos=False)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    # The harness adds no special tokens to a string that already starts with the BOS text.
    bos = False if context.startswith(tokenizer.special_tokens.get("bos_token") or "\0") else None
    whole = tokenizer.encode(context + continuation, bos=bos, eos=False)
    ctx = tokenizer.encode(context, bos=bos, eos=False)
    return ctx, whole[len(ctx):]


# ---------------------------------------------------------------------------------------------
# Batched scoring on the mesh


@functools.partial(jax.jit, static_argnums=0)
def _score(config: ModelConfig, params, tokens_BT, starts_B, targets_BC, mask_BC):
    """Summed log-probabilities of each row's continuation [B], and whether every continuation token
    is the argmax (the harness's is_greedy). A row's continuation is predicted at positions
    starts[b] .. starts[b] + C - 1 (masked to its length): only those hidden states are projected
    onto the vocabulary, so no [B, T, V] logits are made. Rows are right-padded: attention is causal,
    so the padding after a row's tokens changes none of their logits."""
    x_BTD, head_DV = Decoder(config).apply({"params": params}, tokens_BT, hidden=True)
    C = targets_BC.shape[1]
    at_BC = jnp.minimum(starts_B[:, None] + jnp.arange(C), tokens_BT.shape[1] - 1)
    x_BCD = jnp.take_along_axis(x_BTD, at_BC[..., None], axis=1)
    logits_BCV = jnp.einsum("BCD,DV->BCV", x_BCD, head_DV, preferred_element_type=jnp.float32)
    logp_BCV = jax.nn.log_softmax(logits_BCV, axis=-1)
    target_logp_BC = jnp.take_along_axis(logp_BCV, targets_BC[..., None], axis=-1)[..., 0]
    greedy_BC = jnp.argmax(logits_BCV, axis=-1) == targets_BC
    return jnp.where(mask_BC, target_logp_BC, 0.0).sum(-1), (greedy_BC | ~mask_BC).all(-1)


def _bucket(n: int, cap: int) -> int:
    """Lengths round up to 32, 64, 128, ... (at most cap): one compile each."""
    return min(max(32, 1 << (n - 1).bit_length()), cap)


class Scorer:
    """Log-likelihoods of (context tokens, continuation tokens) pairs in padded batches of
    `batch_size` rows per length bucket, on `mesh`'s devices (rows over data x fsdp)."""

    def __init__(self, config: ModelConfig, params, mesh, batch_size: int = 8):
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        self.config, self.params, self.mesh = config, params, mesh
        self.batch_size = -(-batch_size // rows) * rows  # whole rows per device
        self.sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # rows; any rank
        self.compiled: dict[tuple[int, int], object] = {}  # (T, C) -> the compiled _score
        self.stats = {"scored_tokens": 0, "score_s": 0.0, "compile_s": 0.0, "generated_tokens": 0, "generate_s": 0.0}

    def _compiled(self, T: int, C: int):
        if (T, C) not in self.compiled:
            t0 = time.perf_counter()
            spec = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharding)  # noqa: E731
            B = self.batch_size
            self.compiled[T, C] = _score.lower(self.config, self.params, spec(B, T), spec(B), spec(B, C),
                                               spec(B, C, dtype=jnp.bool_)).compile()
            self.stats["compile_s"] += time.perf_counter() - t0
        return self.compiled[T, C]

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
        L = self.config.position_limit
        rows = []
        for ctx, cont in pairs:
            if not ctx:  # the first continuation token would be predicted from position -1
                raise TaskError("a request with no context tokens cannot be scored; give it the BOS token "
                                "(encode_pair does)")
            if len(cont) > L:
                raise TaskError(f"a continuation of {len(cont)} tokens is longer than the model's {L} positions")
            whole = (ctx + cont)[-(L + 1):]  # left-truncated to the model's length, as the harness does
            rows.append((whole, len(cont)))
        if rows:
            say_if_past_trained_length(self.config, max(len(w) - 1 for w, _ in rows), desc or "scoring")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: memory fails early
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        B = self.batch_size
        with tqdm(total=len(rows), desc=desc, unit="req", disable=None, leave=False) as bar:
            i = 0
            while i < len(order):
                T = _bucket(len(rows[order[i]][0]) - 1, L)
                group = [j for j in order[i:i + B] if _bucket(len(rows[j][0]) - 1, L) == T]
                C = _bucket(max(rows[j][1] for j in group), T)  # most continuations are short: one C per T
                tokens, starts = np.zeros((B, T), np.int32), np.zeros((B,), np.int32)
                targets, mask = np.zeros((B, C), np.int32), np.zeros((B, C), bool)
                for r, j in enumerate(group):
                    whole, n_cont = rows[j]
                    n = len(whole) - 1
                    tokens[r, :n] = whole[:-1]
                    starts[r] = n - n_cont
                    targets[r, :n_cont], mask[r, :n_cont] = whole[n - n_cont + 1:], True
                fn = self._compiled(T, C)
                t0 = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    sums, greedy = fn(self.params, *(global_from_host(a, self.sharding) for a in (tokens, starts, targets, mask)))
                sums, greedy = host_value(sums), host_value(greedy)
                self.stats["score_s"] += time.perf_counter() - t0
                self.stats["scored_tokens"] += int(sum(len(rows[j][0]) - 1 for j in group))
                for r, j in enumerate(group):
                    out[j] = (float(sums[r]), bool(greedy[r]))
                i += len(group)
                bar.update(len(group))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], desc: str = "") -> list[list[int]]:
        """Greedy completions (the sampler), longest prompts first, `batch_size` at a time."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int] | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="req", disable=None, leave=False) as bar:
            for s in range(0, len(order), self.batch_size):
                group = order[s:s + self.batch_size]
                t0 = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    results = generate(self.config, self.params, [prompts[j] for j in group],
                                       Sampling(max_new_tokens=max_new_tokens), eos_ids)
                self.stats["generate_s"] += time.perf_counter() - t0  # compile included: one per bucket
                for j, r in zip(group, results):
                    out[j] = r["token_ids"]
                    self.stats["generated_tokens"] += len(r["token_ids"])
                bar.update(len(group))
        return out


# ---------------------------------------------------------------------------------------------
# Metrics


def mc2(logprobs: list[float], labels) -> float:
    """TruthfulQA mc2: the probability mass of the true answers, normalized over all answers
    (softmax of the summed log-likelihoods; shifted by the max, which the harness's exp/sum
    does not do, so that very long answers do not underflow to 0/0)."""
    ll = np.asarray(logprobs, np.float64)
    p = np.exp(ll - ll.max())
    return float(p[np.asarray(labels) == 1].sum() / p.sum())


GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml's `until`; the model's EOS text is added
_GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def extract_answer(completion: str, flexible: bool = False) -> str:
    """The harness's gsm8k filters: strict takes the first "#### N"; flexible the last number-like
    match. "[invalid]" when nothing matches."""
    matches = (GSM8K_FLEXIBLE if flexible else GSM8K_STRICT).findall(completion)
    if not matches:
        return "[invalid]"
    m = matches[-1] if flexible else matches[0]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "[invalid]")
    return m.strip()


def gsm8k_clean(text: str) -> str:
    """exact_match's normalisation in gsm8k.yaml: drop commas, dollars, everything through "#### ",
    a final period; lower case."""
    for pattern in _GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def cut_at_stop(text: str, stops) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


# ---------------------------------------------------------------------------------------------
# Running tasks


def run_task(task: Task, scorer: Scorer, tokenizer, items: list | None = None, limit: int | None = None,
             max_gen_tokens: int = 256) -> dict:
    """Scores one Task; returns {metric: mean, "n": docs}, appending per-item records to `items`."""
    docs = task.docs[:limit] if limit else task.docs
    task = dataclasses.replace(task, docs=docs)
    prefixes = fewshot_prefixes(task)
    spec = task.spec
    if "exact_match" in spec.metrics:
        return _run_generative(task, prefixes, scorer, tokenizer, items, max_gen_tokens)
    pairs, owners = [], []
    for d, (doc, prefix) in enumerate(zip(docs, prefixes)):
        for context, continuation in doc.requests(prefix, spec.delimiter):
            pairs.append(encode_pair(tokenizer, context, continuation))
            owners.append(d)
    scores = scorer.loglikelihoods(pairs, desc=task.name)
    per_doc: list[list[float]] = [[] for _ in docs]
    for d, (ll, _) in zip(owners, scores):
        per_doc[d].append(ll)
    totals = {m: 0.0 for m in spec.metrics}
    for index, (doc, lls) in enumerate(zip(docs, per_doc)):
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(np.asarray(lls) / np.asarray(doc.norm_lengths(), np.float64)))
        item = {"task": task.name, "index": index, "logprobs": lls, "pred": pred, "pred_norm": pred_norm,
                "gold": doc.gold}
        values = {"acc": float(pred == doc.gold), "acc_norm": float(pred_norm == doc.gold)}
        if "mc2" in spec.metrics:
            values["mc2"] = item["mc2"] = mc2(lls, doc.labels)
            item["labels"] = list(doc.labels)
        for m in spec.metrics:
            totals[m] += values[m]
        if items is not None:
            items.append(item)
    return {**{m: v / max(len(docs), 1) for m, v in totals.items()}, "n": len(docs)}


def _run_generative(task, prefixes, scorer, tokenizer, items, max_gen_tokens) -> dict:
    L = scorer.config.position_limit
    if max_gen_tokens >= L:
        raise TaskError(f"--max-gen-tokens {max_gen_tokens} must be below the model's {L} positions")
    prompts = []
    for doc, prefix in zip(task.docs, prefixes):
        ids = tokenizer.encode(prefix + doc.query, eos=False)
        prompts.append(ids[-(L - max_gen_tokens):])  # left-truncated as the harness does
    outputs = scorer.generate(prompts, max_gen_tokens, tokenizer.eos_ids, desc=task.name)
    eos_text = tokenizer.special_tokens.get("eos_token")
    stops = (*GSM8K_STOP, *([eos_text] if eos_text else []))
    strict = flexible = 0
    for index, (doc, ids) in enumerate(zip(task.docs, outputs)):
        completion = cut_at_stop(tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids],
                                                  skip_special_tokens=True), stops)
        extracted, extracted_flexible = extract_answer(completion), extract_answer(completion, flexible=True)
        gold = gsm8k_clean(doc.gold)
        ok, ok_flexible = gsm8k_clean(extracted) == gold, gsm8k_clean(extracted_flexible) == gold
        strict, flexible = strict + ok, flexible + ok_flexible
        if items is not None:
            items.append({"task": task.name, "index": index, "completion": completion, "extracted": extracted,
                          "extracted_flexible": extracted_flexible, "gold": doc.gold, "exact_match": float(ok),
                          "exact_match_flexible": float(ok_flexible)})
    n = max(len(task.docs), 1)
    return {"exact_match": strict / n, "exact_match_flexible": flexible / n, "n": len(task.docs)}


def evaluate(config: ModelConfig, params, tokenizer, tasks: list[Task], mesh=None, batch_size: int = 8,
             limit: int | None = None, max_gen_tokens: int = 256, items: list | None = None) -> dict:
    """{"results": {task: {metric: value, "n": docs}}, "timing": {...}} for Tasks from load_task.
    MMLU's subjects are reported together as "mmlu": acc over all questions (the harness's group,
    weighted by size) and acc_subject_mean (the Open LLM Leaderboard v1's mean over subjects)."""
    mesh = mesh if mesh is not None else make_mesh()
    scorer = Scorer(config, params, mesh, batch_size)
    results, groups = {}, {}
    for task in tasks:
        r = run_task(task, scorer, tokenizer, items, limit, max_gen_tokens)
        if task.group:
            groups.setdefault(task.group, {})[task.name] = r
        else:
            results[task.name] = r
    for group, members in groups.items():
        n = sum(r["n"] for r in members.values())
        results[group] = {"acc": sum(r["acc"] * r["n"] for r in members.values()) / max(n, 1),
                          "acc_subject_mean": float(np.mean([r["acc"] for r in members.values()])), "n": n,
                          "subjects": {k.removeprefix(group + "_"): r["acc"] for k, r in members.items()}}
    s = scorer.stats
    timing = {"compile_s": s["compile_s"], "score_s": s["score_s"], "scored_tokens": s["scored_tokens"],
              "tokens_per_s": s["scored_tokens"] / s["score_s"] if s["score_s"] else None,
              "batch_size": scorer.batch_size}
    if s["generated_tokens"]:
        timing.update(generate_s=s["generate_s"], generated_tokens=s["generated_tokens"],
                      generated_tokens_per_s=s["generated_tokens"] / s["generate_s"])
    return {"results": results, "timing": timing}
