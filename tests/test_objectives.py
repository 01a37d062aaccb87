"""Objectives: SFT's assistant-token mask and loss, and DPO's loss and rewards, equal the same
quantities computed independently with transformers (its tokenizer, its chat template, its model's
log-probs); the packer never splits an example; SFT and DPO runs killed with SIGKILL resume exactly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

import solarjax
from solarjax import data as data_lib
from solarjax.data import records
from solarjax.data.config import DataConfig
from solarjax.errors import ConfigError
from solarjax.train.config import train_config_from_dict
from solarjax.train.trainer import Trainer, read_metrics

from hf_models import make_bpe_tokenizer, make_hf_model, save_hf_model
from killing import sigkill_after_checkpoint

SYSTEM = {"role": "system", "content": "You are terse."}
# (record as stored, the conversation it means); the three SFT layouts, one file format each.
SFT = {
    "conv.jsonl": [
        ({"messages": [SYSTEM, {"role": "user", "content": "Name a prime."},
                       {"role": "assistant", "content": "7, and def f(x): return x"},
                       {"role": "user", "content": "Another?"}, {"role": "assistant", "content": " 11 "}]}, None),
        ({"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]}, None)],
    "alpaca.json": [
        ({"instruction": "Add them.", "input": "2 and 3", "output": "5"},
         [{"role": "user", "content": "Add them.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
        ({"instruction": "Greet.", "input": "", "output": "Hello there."},
         [{"role": "user", "content": "Greet."}, {"role": "assistant", "content": "Hello there."}])],
    "pc.parquet": [
        ({"prompt": "Capital of France?", "completion": "Paris."},
         [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}])],
}
PAIRS = [  # (record, prompt messages, chosen text, rejected text)
    ({"prompt": "Pick a color.", "chosen": "Blue.", "rejected": "I will not."},
     [{"role": "user", "content": "Pick a color."}], "Blue.", "I will not."),
    ({"prompt": [SYSTEM, {"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "five, def g(): pass"}]},
     [SYSTEM, {"role": "user", "content": "2+2?"}], "4", "five, def g(): pass"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]},  # UltraFeedback's
     [{"role": "user", "content": "Hi"}], "Hello!", "Go away"),
]
ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(vocab_size=320, hidden_size=32, intermediate_size=64, head_dim=8, num_hidden_layers=2,
             bos_token_id=300, eos_token_id=304)


def _write(folder, name, rows):
    path = folder / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A policy and a different reference: tiny random Llamas with a Llama-3 tokenizer and template."""
    root = tmp_path_factory.mktemp("objectives")
    policy = save_hf_model(make_hf_model("llama", seed=0, **MODEL), root / "policy")
    reference = save_hf_model(make_hf_model("llama", seed=1, **MODEL), root / "reference")
    for d in (policy, reference):
        make_bpe_tokenizer(d)
    sft = root / "sft"
    sft.mkdir()
    files = [_write(sft, name, [r for r, _ in rows]) for name, rows in SFT.items()]
    pairs = _write(root, "pairs.jsonl", [r for r, *_ in PAIRS])
    more = _write(root, "more_pairs.jsonl", [r for r, *_ in PAIRS] * 3)  # more rows than a batch
    return {"root": root, "policy": policy, "reference": reference, "sft": files, "pairs": pairs, "more_pairs": more}


def _conversations():
    return [m if m is not None else r["messages"] for rows in SFT.values() for r, m in rows]


def _their_assistant_labels(tok, messages):
    """transformers' ids of the conversation, and labels: -100 but on what each assistant message
    adds beyond the conversation before it with the generation prompt."""
    render = lambda m, gen=False: tok.apply_chat_template(m, add_generation_prompt=gen, tokenize=True,
                                                          return_dict=False)
    ids = render(messages)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            a, b = len(render(messages[:i], True)), len(render(messages[:i + 1]))
            labels[a:b] = ids[a:b]
    return ids, labels


def _cfg_dict(tmp_path, models, objective, sources, **over) -> dict:
    d = {"init": {"from": str(models["policy"])}, "objective": objective,
         "data": {"sources": [str(s) for s in sources], "seq_len": 128, "num_proc": 1,
                  "cache_dir": str(models["root"] / "cache")},
         "optim": {"learning_rate": 1e-2, "warmup_steps": 0}, "mesh": {"data": 1, "fsdp": 2, "tensor": 1},
         "run_dir": str(tmp_path / "run"), "steps": 4, "global_batch": 2, "log_every": 1, "eval_every": 0,
         "checkpoint_every": 2}
    for key, value in over.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return d


def _cfg(tmp_path, models, objective, sources, **over):
    return train_config_from_dict(_cfg_dict(tmp_path, models, objective, sources, **over))


def _mesh(n=2):
    return solarjax.make_mesh(1, n, 1, devices=jax.devices()[:n])


def test_sft_mask_is_exactly_each_assistant_turn(models):
    """Every example's mask equals the labels built with transformers' template from prefixes, and
    each masked span reads as the reply plus <|eot_id|>: no header, no generation prompt, no shift."""
    theirs = transformers.AutoTokenizer.from_pretrained(models["policy"])
    d = data_lib.load_data(DataConfig(sources=tuple(map(str, models["sft"])), seq_len=128, num_proc=1,
                                      cache_dir=str(models["root"] / "cache")), model_dir=models["policy"], layout="sft")
    cache = d.train.cache
    conversations = _conversations()
    assert cache.n_docs == len(conversations)  # records in the order of their sources
    for doc, messages in enumerate(conversations):
        ids, labels = _their_assistant_labels(theirs, messages)
        ours = cache.doc(doc).tolist()
        mask = cache.mask[cache.offsets[doc]:cache.offsets[doc + 1]]
        assert ours == ids
        np.testing.assert_array_equal(mask, [int(x != -100) for x in labels])
        spans = theirs.decode([t for t, m in zip(ours, mask) if m])
        assert spans == "".join(m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant")


def test_sft_loss_of_one_step_equals_transformers(tmp_path, models):
    """Loss = the mean over every assistant token of the global batch (2 rows on 2 devices), with
    HF's model given labels -100 outside the assistant tokens."""
    trainer = Trainer(_cfg(tmp_path, models, "sft", models["sft"], steps=1, **{"data.seq_len": 136}), _mesh())
    assert len(trainer.data.train) == 2 and trainer.data.train.examples == 5  # all in the first batch
    record = trainer.run()
    theirs = transformers.AutoTokenizer.from_pretrained(models["policy"])
    model = transformers.AutoModelForCausalLM.from_pretrained(models["policy"], attn_implementation="eager")
    total, count = 0.0, 0
    for messages in _conversations():
        ids, labels = _their_assistant_labels(theirs, messages)
        with torch.no_grad():
            out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(x != -100 for x in labels[1:])
        total, count = total + float(out.loss) * n, count + n
    assert record["tokens"] == count
    np.testing.assert_allclose(record["loss"], total / count, rtol=2e-5)


def _their_pair_logps(model, tok, prompt, response):
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True,
                                  return_dict=False)
    assert ids[:len(head)] == head
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(head), len(ids)))


@pytest.mark.slow
def test_dpo_first_step_equals_the_formula_with_transformers_logprobs(tmp_path, models):
    beta = 0.5
    over = {"data.seq_len": 140, "steps": 1}  # the 3 pairs (80, 109 and 59 tokens) in 2 rows
    trainer = Trainer(_cfg(tmp_path / "a", models, "dpo", [models["pairs"]],
                           **over, **{"dpo.beta": beta, "dpo.reference": str(models["reference"])}), _mesh())
    assert len(trainer.data.train) == 2 and trainer.data.train.examples == 3
    record = trainer.run()
    tok = transformers.AutoTokenizer.from_pretrained(models["policy"])
    policy, ref = (transformers.AutoModelForCausalLM.from_pretrained(models[k], attn_implementation="eager")
                   for k in ("policy", "reference"))
    rewards = []
    for _, prompt, chosen, rejected in PAIRS:
        rewards.append([beta * (_their_pair_logps(policy, tok, prompt, r) - _their_pair_logps(ref, tok, prompt, r))
                        for r in (chosen, rejected)])
    rewards = np.array(rewards)
    margin = rewards[:, 0] - rewards[:, 1]
    assert record["pairs"] == 3
    np.testing.assert_allclose(record["loss"], np.mean(np.log1p(np.exp(-margin))), rtol=1e-4)
    np.testing.assert_allclose(record["reward_margin"], margin.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(record["chosen_reward"], rewards[:, 0].mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(record["rejected_reward"], rewards[:, 1].mean(), rtol=1e-4, atol=1e-6)
    assert record["reward_accuracy"] == pytest.approx(2 / 3) and np.mean(margin > 0) == pytest.approx(2 / 3)
    # The default reference is the initial policy: log 2, no reward, at the first step.
    same = Trainer(_cfg(tmp_path / "b", models, "dpo", [models["pairs"]], **over), _mesh()).run()
    np.testing.assert_allclose(same["loss"], math.log(2), rtol=1e-6)
    assert same["reward_margin"] == same["chosen_reward"] == same["rejected_reward"] == 0


class _Cache:  # what PackedExamples reads of a TokenCache
    def __init__(self, lengths, masks):
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.arange(self.offsets[-1]) % 60000 + 1  # every token tells where it came from
        self.mask = np.concatenate(masks).astype(np.uint8)


def _kept_targets(packed):
    for i in range(len(packed)):
        row = packed.sequence(i)
        for s in range(1, row["segment_ids"].max() + 1):
            yield row["loss_mask"][row["segment_ids"] == s].any()


@pytest.mark.parametrize("pairs", [False, True])
def test_the_packer_never_splits_an_example(pairs):
    rng = np.random.default_rng(0)
    T, n = 64, 300
    lengths = rng.integers(2, 90, n * (2 if pairs else 1))  # some longer than a row
    masks = [np.r_[np.zeros(min(L - 1, 40)), np.ones(L - min(L - 1, 40))] for L in lengths]
    cache = _Cache(lengths, masks)
    packed = data_lib.PackedExamples(cache, np.arange(n), T, pairs=pairs)
    seen = {}
    for i in range(len(packed)):
        row = packed.sequence(i)
        segs = row["segment_ids"]
        assert (np.diff(segs[segs > 0]) >= 0).all() and (segs[segs > 0] > 0).all()
        for s in range(1, segs.max() + 1):
            at = np.flatnonzero(segs == s)
            assert (np.diff(at) == 1).all() and (row["positions"][at] == np.arange(len(at))).all()
            doc = int(np.searchsorted(cache.offsets, row["tokens"][at[0]] - 1, side="right")) - 1
            start = cache.offsets[doc]
            assert row["tokens"][at[0]] - 1 == start  # an example starts at its own first token
            np.testing.assert_array_equal(row["tokens"][at], cache.tokens[start:start + len(at)])
            np.testing.assert_array_equal(row["loss_mask"][at], cache.mask[start:start + len(at)])
            assert doc not in seen
            seen[doc] = (i, s, len(at))
        assert (segs > 0).sum() == (segs > 0)[:(segs > 0).sum()].sum()  # padding only at the end
    kept = sorted(seen)
    if pairs:  # chosen (odd segment) and rejected (the next one) of a pair share a row
        for doc in kept[::2]:
            (i, s, _), (j, t, _) = seen[doc], seen[doc + 1]
            assert doc % 2 == 0 and i == j and s % 2 == 1 and t == s + 1
    long = sum(1 for u in range(n) if lengths[u * (2 if pairs else 1):(u + 1) * (2 if pairs else 1)].sum() > T)
    assert packed.truncated == long > 0 and len(kept) == (n - packed.dropped) * (2 if pairs else 1)
    assert (packed.dropped > 0) == pairs  # a pair cut to its prompt has nothing left to learn: dropped
    assert all(row_mask_has_target for row_mask_has_target in _kept_targets(packed))
    for doc, (_, _, m) in seen.items():  # truncated only when it had to be, keeping its start
        assert m == lengths[doc] or sum(lengths[doc - doc % 2:doc - doc % 2 + 2] if pairs else [lengths[doc]]) > T


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_run_killed_with_sigkill_resumes_exactly(tmp_path, models, objective):
    """train.py killed with SIGKILL (no handler runs, no last save) once it has saved a checkpoint of
    step >= 2, then the same command: a new process restores that checkpoint, rebuilds the data
    position and DPO's reference (from init.from), and ends with every step's loss and metrics (DPO's
    rewards) and final parameters bit-identical to an uninterrupted run."""
    sources = models["sft"] if objective == "sft" else [models["more_pairs"]]
    steps = 20  # after step 2's checkpoint, ~2 s of steps and saves in which to kill it (a busy machine is slower)
    over = {"data.seq_len": 64, "steps": steps, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}
    config = tmp_path / "killed.yaml"
    config.write_text(json.dumps(_cfg_dict(tmp_path / "killed", models, objective, sources, **over)))
    job = [sys.executable, str(ROOT / "train.py"), "--config", str(config)]
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0",  # one device, as the mesh says
           # The resumed process reads the killed one's compiled programs from disk (XLA's output
           # for the same program; no state of the run): 2-3 s less.
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run = tmp_path / "killed" / "run"
    at = sigkill_after_checkpoint(job, env, run / "checkpoints", 2, timeout=120)
    assert 2 <= at < steps and not (run / "final").exists()

    # The same command, and meanwhile (on the other core) the uninterrupted run as the reference.
    with open(tmp_path / "resumed.err", "w") as err:
        resumed = subprocess.Popen(job, stderr=err, env=env)
    try:
        straight = Trainer(_cfg(tmp_path / "straight", models, objective, sources, **over), _mesh(1))
        straight.run()
        resumed.wait(timeout=120)
    finally:
        resumed.kill()  # nothing if it has finished; no process left behind if anything above failed
    stderr = (tmp_path / "resumed.err").read_text()
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from its checkpoint of step {at}" in stderr  # not started over
    timing = {"tokens_per_s", "model_tflops_per_s", "mfu"}
    metrics = lambda p: [{k: v for k, v in r.items() if k not in timing}  # noqa: E731
                         for r in read_metrics(p / "run" / "metrics.jsonl")]
    assert len(straight.data.train) > 2  # batches differ: resuming needs the data position
    expected = metrics(tmp_path / "straight")
    assert [r["step"] for r in expected] == list(range(1, steps + 1))
    if objective == "dpo":
        assert {"reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy"} <= set(expected[0])
    assert metrics(tmp_path / "killed") == expected
    _, final = solarjax.load_model(run / "final")
    for a, b in zip(jax.tree.leaves(straight.state["params"]), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_records_errors_name_the_record(models, tmp_path):
    tok = solarjax.tokenizer.load_tokenizer(models["policy"])
    with pytest.raises(records.RecordError, match=r"x record 3: not an SFT record.*it has \['text'\]"):
        records.sft_messages({"text": "hi", "prompt": None}, "x record 3")
    # A template that rewrites the earlier turns (here: the last user turn is upper-cased when the
    # generation prompt follows) has no defined assistant tokens: refused, naming the record.
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper if add_generation_prompt and "
                   "loop.last else m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok = solarjax.tokenizer.load_tokenizer(models["policy"], bad)
    with pytest.raises(records.RecordError, match=r"r 0: the chat template's rendering of assistant message 1 does "
                                                  r"not extend the rendering before it"):
        records.sft_example(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "r 0")
    with pytest.raises(ConfigError, match="objective must be one of lm, sft, dpo, got 'ppo'"):
        train_config_from_dict({"model": {"preset": "tiny"}, "objective": "ppo"})


def test_data_chat_template_replaces_the_models_and_travels_with_the_export(models, tmp_path):
    """data.chat_template: the file's template renders the records, survives pickling (datasets
    workers), and is written into an export as chat_template.jinja, which transformers then uses."""
    import pickle
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|start_header_id|>{{ m['role'] }}: {{ m['content'] }}<|eot_id|>"
                        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant: {% endif %}")
    tok = solarjax.tokenizer.load_tokenizer(models["policy"], template)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = records.sft_example(pickle.loads(pickle.dumps(tok)), chat, "r")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "yo<|eot_id|>"
    out = tmp_path / "export"
    out.mkdir()
    tok.save(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.apply_chat_template(chat, tokenize=True, return_dict=False) == ids
    assert tok.fingerprint() != solarjax.tokenizer.load_tokenizer(models["policy"]).fingerprint()


def test_a_recipe_stage_sets_its_own_objective_and_reference():
    from solarjax.train.config import load_job, recipe_config_from_dict

    from test_train import ROOT
    demo = load_job(ROOT / "configs" / "instruct_demo.yaml")
    sft, dpo = (demo.stage(n).train for n in ("sft", "dpo"))
    assert (sft.objective, dpo.objective) == ("sft", "dpo") and dpo.init.source.endswith("instruct_demo/sft/final")
    assert dpo.data == sft.data and dpo.data.chat_template.endswith("solar_instruct.jinja")
    d = {"model": {"preset": "tiny"}, "run_dir": "/r", "objective": "sft",
         "stages": {"a": {}, "b": {"objective": "dpo", "init": {"from": "a"}, "dpo": {"beta": 0.2, "reference": "a"}}}}
    b = recipe_config_from_dict(d).stage("b").train
    assert (b.objective, b.dpo.beta, b.dpo.reference) == ("dpo", 0.2, "/r/a/final")
    d["stages"] = {"a": {"dpo": {"reference": "b"}}, "b": {}}
    with pytest.raises(ConfigError, match="stages.a.dpo.reference: stage 'b' does not run before 'a'"):
        recipe_config_from_dict(d)
    with pytest.raises(ConfigError, match=r"dpo.beta must be > 0, got -1"):
        train_config_from_dict({"model": {"preset": "tiny"}, "dpo": {"beta": -1}})


def test_each_objective_with_options_has_its_section():
    """The section named after the objective is of its options class: what `cfg.objective_options`
    and the YAML's sections rely on."""
    import dataclasses

    from solarjax.train.config import TrainConfig
    from solarjax.train.objectives import OBJECTIVES
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, objective in OBJECTIVES.items():
        if objective.options is not None:
            assert isinstance(fields[name].default, objective.options), name
            assert not objective.reference or hasattr(objective.options(), "reference"), name
    cfg = train_config_from_dict({"model": {"preset": "tiny"}, "objective": "dpo", "dpo": {"beta": 0.3}})
    assert cfg.objective_options == OBJECTIVES["dpo"].options(beta=0.3)
    assert train_config_from_dict({"model": {"preset": "tiny"}}).objective_options is None


@pytest.mark.slow
def test_dpo_microbatches_give_the_whole_batch_mean(models):
    """Pairs averaged over the whole batch, not per group: 4 rows holding unequal numbers of pairs
    in 2 groups on 2 devices give the loss, rewards and step of the batch at once."""
    import jax.numpy as jnp

    from solarjax.train.config import OptimConfig
    from solarjax.train.objectives import OBJECTIVES, DPOConfig, real_pairs_BP
    from solarjax.train.optim import make_optimizer, schedule
    from solarjax.train.step import jit_train_step, new_state
    d = data_lib.load_data(DataConfig(sources=(str(models["more_pairs"]),), seq_len=128, num_proc=1,
                                      cache_dir=str(models["root"] / "cache")), model_dir=models["policy"], layout="pairs")
    batch = data_lib.stack_sequences([d.train.sequence(i) for i in range(4)])
    per_row = np.asarray(real_pairs_BP(jax.tree.map(jnp.asarray, batch)).sum(1))
    assert per_row[0::2].sum() != per_row[1::2].sum(), per_row  # the groups (rows r % 2) differ
    mesh = solarjax.make_mesh(2, 1, 1, jax.devices()[:2])
    config, params = solarjax.load_model(models["policy"], mesh=mesh)
    _, reference = solarjax.load_model(models["reference"], mesh=mesh)
    opt_cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1.0)  # see test_optim
    opt = make_optimizer(opt_cfg, 10)
    results = {}
    for k in (1, 2):
        step = jit_train_step(config, opt, schedule(opt_cfg, 10), mesh, chunk=16, microbatches=k,
                              objective=OBJECTIVES["dpo"], options=DPOConfig(beta=0.5))
        with jax.set_mesh(mesh):
            state = jax.jit(lambda p: new_state(opt, p))(jax.tree.map(jnp.copy, params))
            new, metrics = step(state, batch, reference)
        results[k] = (jax.device_get(metrics), jax.device_get(new["params"]))
    assert results[1][0]["pairs"] == per_row.sum() == results[2][0]["pairs"]
    for name in ("loss", "grad_norm", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        np.testing.assert_allclose(results[2][0][name], results[1][0][name], rtol=1e-5, atol=1e-7, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[2][1], results[1][1])
