"""Recipes of stages: base -> depth up-scaled -> continued, beside controls, in one run directory.

Each stage must start from the parameters the recipe says (checked against losses computed
directly), a rerun must skip finished stages, a run killed inside a stage must resume there with
the losses of an uninterrupted run, and the summary, the plot, the TensorBoard events and the HF
export must be what they claim."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import solarjax
from solarjax import data as data_lib
from solarjax.errors import ConfigError
from solarjax.train import recipe as recipe_lib
from solarjax.train.config import load_job, recipe_config_from_dict
from solarjax.train.trainer import read_metrics

from killing import sigkill_after_checkpoint
from test_train import TINY, corpus  # noqa: F401  (the corpus fixture)

ROOT = Path(__file__).resolve().parent.parent
CONTINUED = {"optim": {"learning_rate": 5e-3, "warmup_steps": 1}}


def _recipe_dict(tmp_path, corpus, base_steps=6, up_steps=4, **top):
    return {
        # An MLP wide enough that layers are worth some FLOPs beside the 32000-row lm_head.
        "model": {**TINY, "num_layers": 4, "intermediate_size": 2048},
        "run_dir": str(tmp_path / "run"), "export": "upscaled",
        "data": {"sources": [str(corpus)], "seq_len": 64, "num_proc": 1, "cache_dir": str(tmp_path / "cache"),
                 "validation_fraction": 0.1},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 2}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "global_batch": 4, "log_every": 1, "eval_every": 2, "eval_batches": 2, "checkpoint_every": 2,
        "sample_prompts": ["alpha"], "sample_tokens": 3,
        "stages": {
            "base": {"steps": base_steps},
            "upscaled": {"init": {"from": "base", "upscale": {"n": 4, "m": 1}}, "steps": up_steps, **CONTINUED},
            "control": {"init": {"from": "base"}, "steps": up_steps, **CONTINUED},
            "control_equal_flops": {"init": {"from": "base"}, "match_flops": "upscaled", **CONTINUED},
        }, **top}


def _direct_eval_loss(params, config, trainer_cfg) -> float:
    """The held-out loss as Trainer.evaluate defines it at a stage's first and last step, computed
    here with numpy over every held-out window: next-token cross entropy where the next token is in
    the same document (not across a boundary, not on padding)."""
    nll, count = _window_nll(params, config, trainer_cfg)
    return nll.sum() / count.sum()


def _window_nll(params, config, trainer_cfg, model_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out window, one window at a time: the summed loss and the number of tokens it counts."""
    val = data_lib.load_data(trainer_cfg.data, model_dir=model_dir).validation
    assert len(val) > trainer_cfg.global_batch * trainer_cfg.eval_batches  # so that "every window" is tested
    nll, count = np.zeros(len(val)), np.zeros(len(val))
    for i in range(len(val)):
        b = data_lib.stack_sequences([val.sequence(i)])
        z = np.asarray(solarjax.logits(config, params, b["tokens"], b["positions"], b["segment_ids"]), np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        seg = b["segment_ids"]
        for t in range(seg.shape[1] - 1):
            if seg[0, t] > 0 and seg[0, t + 1] == seg[0, t]:
                nll[i] -= logp[0, t, b["tokens"][0, t + 1]]
                count[i] += 1
    return nll, count


def _batch_loss(params, config, b) -> float:
    """The mean next-token loss of a batch within documents, with numpy."""
    z = np.asarray(solarjax.logits(config, params, b["tokens"], b["positions"], b["segment_ids"]), np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    seg = b["segment_ids"]
    scored = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
    picked = np.take_along_axis(logp[:, :-1], b["tokens"][:, 1:, None], -1)[..., 0]
    return float(-(picked * scored).sum() / scored.sum())


def _one_device_mesh():
    return solarjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.slow
def test_recipe_runs_stages_in_order_from_the_right_parameters(tmp_path, corpus, capsys):  # noqa: F811
    recipe = recipe_config_from_dict(_recipe_dict(tmp_path, corpus))
    summary = recipe_lib.run_recipe(recipe, _one_device_mesh())
    run = tmp_path / "run"
    stages = summary["stages"]
    assert list(stages) == ["base", "upscaled", "control", "control_equal_flops"]
    assert [stages[s]["layers"] for s in stages] == [4, 6, 4, 4]

    # The up-scaled stage starts from base's final parameters grown by SOLAR's rule (n=4, m=1: base
    # layers [0, 3) + [1, 4)), gathered here with numpy: its first eval is that model's loss.
    base_config, base_params = solarjax.load_model(run / "base" / "final")
    grown = jax.tree.map(np.asarray, base_params)
    grown["layers"] = jax.tree.map(lambda a: np.concatenate([a[0:3], a[1:4]]), grown["layers"])
    up_cfg = recipe.stage("upscaled").train
    expected = _direct_eval_loss(grown, base_config.replace(num_layers=6), up_cfg)
    np.testing.assert_allclose(summary["upscaled_loss_at_init"], expected, rtol=1e-5)
    # The controls start from base itself: their first eval is base's last (logged as such, not
    # computed again), and their first step's loss is base's final parameters' on their first batch.
    np.testing.assert_allclose(_direct_eval_loss(base_params, base_config, up_cfg), summary["base_loss"], rtol=1e-5)
    assert stages["control"]["eval_loss_at_init"] == stages["control_equal_flops"]["eval_loss_at_init"] \
        == summary["base_loss"]
    for stage in ("control", "control_equal_flops", "upscaled"):
        first = read_metrics(run / stage / "metrics.jsonl")[0]
        assert first["step"] == 0 and first.get("inherited_from") == (None if stage == "upscaled" else "base at step 6")
    control_cfg = recipe.stage("control").train
    batch = data_lib.load_data(control_cfg.data).batches(4, control_cfg.data.seed).batch(0)
    step_1 = next(r for r in read_metrics(run / "control" / "metrics.jsonl") if r["step"] == 1 and "loss" in r)
    np.testing.assert_allclose(step_1["loss"], _batch_loss(base_params, base_config, batch), rtol=1e-5)

    # Equal tokens for the control; equal model FLOPs (6 per multiplying weight + attention) for the other.
    T, tokens_per_step = 64, 4 * 64
    def flops_per_token(layers):
        c = base_config.replace(num_layers=layers)
        weights = solarjax.param_count(c) - c.vocab_size * c.hidden_size  # the input embedding is a gather
        return 6 * weights + 12 * layers * c.num_heads * c.head_dim * T
    assert stages["control"]["tokens"] == stages["upscaled"]["tokens"] == 4 * tokens_per_step
    assert stages["control_equal_flops"]["steps"] == round(4 * flops_per_token(6) / flops_per_token(4)) > 4
    assert stages["upscaled"]["flops"] == 4 * tokens_per_step * flops_per_token(6)

    # summary.json: every key, each equal to what the stage's metrics.jsonl says.
    saved = json.loads((run / "summary.json").read_text())
    for key, stage, which in [("base_loss", "base", -1), ("upscaled_loss_at_init", "upscaled", 0),
                              ("upscaled_loss_final", "upscaled", -1), ("base_continued_loss_final", "control", -1),
                              ("base_continued_equal_flops_loss_final", "control_equal_flops", -1)]:
        evals = [r["eval_loss"] for r in read_metrics(run / stage / "metrics.jsonl") if "eval_loss" in r]
        assert saved[key] == evals[which], key
    assert {"upscaled_ahead_at_equal_tokens", "upscaled_ahead_at_equal_flops"} <= set(saved)
    # The paired comparison: both arms' final parameters on every held-out window, 2000 paired
    # bootstrap resamples of the windows (seed 0); its difference is the table's, to float rounding.
    arms = {stage: _window_nll(*reversed(solarjax.load_model(run / stage / "final")), up_cfg)
            for stage in ("upscaled", "control", "control_equal_flops")}
    for control, final_key in (("control", "base_continued_loss_final"),
                               ("control_equal_flops", "base_continued_equal_flops_loss_final")):
        (a, n), (b, _) = arms["upscaled"], arms[control]
        picks = np.random.default_rng(0).integers(0, len(n), (2000, len(n)))
        boot = np.sort((a[picks].sum(1) - b[picks].sum(1)) / n[picks].sum(1))
        pair = f"upscaled - {control}"
        np.testing.assert_allclose(saved["paired_difference"][pair], (a.sum() - b.sum()) / n.sum(), atol=1e-6)
        np.testing.assert_allclose(saved["paired_difference"][pair], saved["upscaled_loss_final"] - saved[final_key],
                                   atol=2e-6)
        np.testing.assert_allclose(saved["paired_interval"][pair], [np.percentile(boot, 2.5), np.percentile(boot, 97.5)],
                                   atol=1e-6)
    assert saved["paired_windows"] == len(a)
    for s in saved["stages"].values():
        assert s["samples"][0]["prompt"] == "alpha" and {"tokens", "flops", "parameters"} <= set(s)
    err = capsys.readouterr().err
    interval = saved["paired_interval"]["upscaled - control"]
    assert "at equal tokens: upscaled" in err and f"95% paired interval {interval[0]:+.4f} .. {interval[1]:+.4f})" in err
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _tensorboard_scalars(run / "upscaled")["eval/loss"] == [
        (r["step"], pytest.approx(r["eval_loss"])) for r in read_metrics(run / "upscaled" / "metrics.jsonl")
        if "eval_loss" in r]

    # run_dir/hf is the up-scaled model's final parameters: transformers computes the same logits.
    config, params = solarjax.load_model(run / "upscaled" / "final")
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32).eval()
    tokens = np.array([[1, 415, 2936, 9060, 285, 1142, 28705, 13]])
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(solarjax.logits(config, params, tokens)), theirs, atol=1e-4)
    assert (run / "hf" / "tokenizer.model").is_file()

    # The same command again: every stage is finished, so no Trainer is even built.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was run again")
    recipe_lib.Trainer, real = no_training, recipe_lib.Trainer
    try:
        again = recipe_lib.run_recipe(recipe, _one_device_mesh())
    finally:
        recipe_lib.Trainer = real
    assert again["upscaled_loss_final"] == summary["upscaled_loss_final"]
    assert capsys.readouterr().err.count("finished earlier, skipped") == 4


def _tensorboard_scalars(run_dir: Path) -> dict[str, list]:
    """Reads tensorboardX's event files (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow
def test_a_recipe_on_a_model_with_its_own_tokenizer_and_no_periodic_evals(tmp_path, corpus):  # noqa: F811
    """A base from an HF directory whose tokenizer has 300 tokens (Mistral's ids would not fit), and
    eval_every 0: every stage is still evaluated at its ends, and the paired comparison scores the
    windows the stages were evaluated on, tokenized by the model's own tokenizer, through each
    stage's eval step. (It tokenized with Mistral's and stopped after training every stage; and
    with eval_every 0 it ended in a TypeError.)"""
    from hf_models import make_bpe_tokenizer, make_hf_model, save_hf_model
    hf_dir = save_hf_model(make_hf_model("llama", vocab_size=320, bos_token_id=300, eos_token_id=[301, 304],
                                         num_hidden_layers=4), tmp_path / "hf")
    make_bpe_tokenizer(hf_dir)
    d = _recipe_dict(tmp_path, corpus, eval_every=0, export=None, sample_prompts=[])
    d.pop("model")
    d["stages"] = {"base": {"init": {"from": str(hf_dir)}, "steps": 2},
                   "upscaled": {"init": {"from": "base", "upscale": {"n": 4, "m": 1}}, "steps": 2, **CONTINUED},
                   "control": {"init": {"from": "base"}, "steps": 2, **CONTINUED}}
    recipe = recipe_config_from_dict(d)
    summary = recipe_lib.run_recipe(recipe, _one_device_mesh())
    assert summary["upscaled_loss_final"] is not None and summary["base_continued_loss_final"] is not None
    assert "upscaled_ahead_at_equal_tokens" in summary
    held_out = data_lib.load_data(recipe.stage("control").train.data, model_dir=str(hf_dir)).validation
    assert summary["paired_windows"] == len(held_out)
    np.testing.assert_allclose(summary["paired_difference"]["upscaled - control"],
                               summary["upscaled_loss_final"] - summary["base_continued_loss_final"], atol=2e-6)
    # The windows' losses are the final parameters' on the model's own tokens, computed here directly.
    config, params = solarjax.load_model(tmp_path / "run" / "control" / "final")
    nll, count = _window_nll(params, config, recipe.stage("control").train, model_dir=str(hf_dir))
    with np.load(tmp_path / "run" / "control" / recipe_lib.WINDOWS_FILE) as saved:
        np.testing.assert_allclose(saved["loss:"], nll, rtol=2e-5)
        np.testing.assert_array_equal(saved["tokens:"], count)


@pytest.mark.slow
def test_a_recipe_killed_inside_a_stage_resumes_there_exactly(tmp_path, corpus):  # noqa: F811
    def job(name):
        # Killed once step 10's checkpoint exists: 10 steps (~5 s) left in which to kill it.
        d = _recipe_dict(tmp_path / name, corpus, base_steps=4, up_steps=20, checkpoint_every=5, eval_every=10,
                         export=None)
        d["stages"] = {k: d["stages"][k] for k in ("base", "upscaled")}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(d))
        return [sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / f"{name}.yaml")]

    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one device, as the mesh says
    # The uninterrupted run goes on beside the killed and the resumed one (on the other core).
    with open(tmp_path / "straight.err", "w") as err:
        straight = subprocess.Popen(job("straight"), stderr=err, env=env)
    try:
        at = sigkill_after_checkpoint(job("killed"), env, tmp_path / "killed" / "run" / "upscaled" / "checkpoints", 10,
                                      timeout=240)
        assert 10 <= at < 20
        assert (tmp_path / "killed" / "run" / "base" / "done.json").is_file()
        assert not (tmp_path / "killed" / "run" / "upscaled" / "done.json").exists()
        # SIGKILL left the recipe's and the stage's locks behind; the dead pid must not block the rerun.
        assert (tmp_path / "killed" / "run" / "run.lock").is_file()
        assert (tmp_path / "killed" / "run" / "upscaled" / "run.lock").is_file()

        resumed = subprocess.run(job("killed"), capture_output=True, text=True, timeout=300, env=env)
        straight.wait(timeout=300)
    finally:
        straight.kill()  # nothing if it has finished; no process left behind if anything above failed
    assert straight.returncode == 0, (tmp_path / "straight.err").read_text()[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 1/2 base: finished earlier, skipped" in resumed.stderr
    assert resumed.stderr.count("taking over the lock: its holder, pid") == 2  # the recipe's and the stage's
    assert not (tmp_path / "killed" / "run" / "run.lock").exists()
    assert f"resumed from its checkpoint of step {at}" in resumed.stderr  # not started over
    for stage in ("base", "upscaled"):
        a = read_metrics(tmp_path / "straight" / "run" / stage / "metrics.jsonl")
        b = read_metrics(tmp_path / "killed" / "run" / stage / "metrics.jsonl")
        pick = lambda records: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records  # noqa: E731
                                if "loss" in r or "eval_loss" in r]
        assert pick(a) == pick(b), stage
    assert json.loads((tmp_path / "killed" / "run" / "summary.json").read_text())["upscaled_loss_final"] == \
        json.loads((tmp_path / "straight" / "run" / "summary.json").read_text())["upscaled_loss_final"]


@pytest.mark.parametrize("change, message", [
    (lambda s: s["upscaled"]["init"].update({"from": "control"}), "stage 'control' does not run before 'upscaled'"),
    (lambda s: s["control_equal_flops"].update({"match_flops": "nope"}), "match_flops: 'nope' is not a stage"),
    (lambda s: s["base"].update({"run_dir": "x"}), "stages.base.run_dir: a stage runs in"),
    (lambda s: s["base"].update({"stepz": 3}), "stages.base: config: unknown key 'stepz'"),
    (lambda s: s.update({"two words": {}}), "stage name 'two words' must be a plain identifier"),
    (lambda s: s["upscaled"]["init"].update({"from": "bsae"}),
     "stages.upscaled.init.from: 'bsae' is neither a stage of this recipe (stages: base, upscaled"),
    (lambda s: s["upscaled"].update({"objective": "dpo", "dpo": {"reference": "bsae"}}),
     "stages.upscaled.dpo.reference: 'bsae' is neither a stage of this recipe"),
])
def test_recipe_config_errors_name_the_stage(tmp_path, change, message):
    d = _recipe_dict(tmp_path, tmp_path)
    change(d["stages"])
    with pytest.raises(ConfigError) as e:
        recipe_config_from_dict(d)
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("stages.upscaeld.init.from=base", "override 'stages.upscaeld.init.from=base': 'upscaeld' is not a stage of "),
    ("stages.bsae.steps=3", "'bsae' is not a stage of "),
    ("export=upscaeld", "export: 'upscaeld' is not a stage (stages: base, upscaled, control, control_equal_flops)"),
    ("stages.control_equal_flops.match_flops=upscaeld", "match_flops: 'upscaeld' is not a stage"),
])
def test_a_mistyped_stage_name_is_refused_not_added(override, message):
    """A typo in a stage name must not quietly add a stage trained from scratch."""
    with pytest.raises(ConfigError) as e:
        load_job(ROOT / "configs" / "demo.yaml", [override])
    assert message in str(e.value) and "stages: base, upscaled, control, control_equal_flops" in str(e.value)


def test_demo_config_is_solars_recipe():
    job = load_job(ROOT / "configs" / "demo.yaml")
    assert [s.name for s in job.stages] == ["base", "upscaled", "control", "control_equal_flops"]
    assert job.stage("base").train.init.source is None and job.export == "upscaled"
    up = job.stage("upscaled").train
    assert job.stage("upscaled").from_stage == "base" and up.init.upscale["n"] == job.stage("base").train.model.num_layers
    control = job.stage("control").train
    # Honest arms: same data (order and held-out set), same schedule shape, same token count.
    assert control.data == up.data and control.optim == up.optim and control.steps == up.steps
    # Two domains of the built-in corpus, each with its own held-out set, so the table shows forgetting.
    assert [(s.name, s.path) for s in up.data.named_sources()] == [("code", ("builtin:code",)),
                                                                   ("prose", ("builtin:prose",))]
    assert up.data.named_validation and up.data.validation_fraction > 0
