"""The training job: configs parse, loss falls, resume is exact, sharded equals single-device,
init from HF with depth up-scaling, NaN detection, stop on SIGTERM and resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import solarjax
from solarjax.errors import ConfigError
from solarjax.eval import sample
from solarjax.train.config import RecipeConfig, load_job, load_train_config, train_config_from_dict
from solarjax.train.trainer import CheckpointError, NonFiniteLossError, Trainer

from hf_models import hf_logits, make_hf_model, save_hf_model

ROOT = Path(__file__).resolve().parent.parent
TINY = {"preset": "tiny", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 8}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(40):  # a small, very learnable language: repeated short phrases
        (folder / f"d{i:02d}.txt").write_text(" ".join(" ".join(words[:rng.randint(3, 8)]) for _ in range(30)))
    return folder


def _config(tmp_path, corpus, **over):
    d = {"model": dict(TINY), "data": {"sources": [str(corpus)], "seq_len": 64, "num_proc": 1,
                                       "cache_dir": str(tmp_path / "cache"), "validation_fraction": 0.1},
         "optim": {"learning_rate": 1e-2, "warmup_steps": 2}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
         "run_dir": str(tmp_path / "run"), "steps": 8, "global_batch": 4, "log_every": 2, "eval_every": 4,
         "eval_batches": 1, "checkpoint_every": 4}
    for key, value in over.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return train_config_from_dict(d)


def _one_device_mesh():
    return solarjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    job = load_job(path)
    for cfg in [s.train for s in job.stages] if isinstance(job, RecipeConfig) else [job]:
        assert cfg.steps > 0 and (cfg.model is not None or cfg.init.source is not None)


@pytest.mark.slow
def test_loss_falls(tmp_path, corpus, capsys):
    prompts = ["alpha beta", "gamma"]
    trainer = Trainer(_config(tmp_path, corpus, steps=30, log_every=5, eval_every=30, sample_prompts=prompts,
                              sample_tokens=6), _one_device_mesh())
    capsys.readouterr()
    record = trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[0] > 9 and record["loss"] < losses[0] - 3, losses
    # Not a terminal: one plain progress line per log step (no bar redraws), and one line per eval.
    err = capsys.readouterr().err
    assert "\r" not in err
    progress = [line for line in err.splitlines() if line.startswith("run: step ")]
    assert [line.split()[2] for line in progress] == [f"{r['step']}/30" for r in lines if "loss" in r], err
    assert all(f"loss {r['loss']:.4f} lr {r['lr']:.2e}" in line
               for line, r in zip(progress, [r for r in lines if "loss" in r])), err
    assert "eval" in progress[-1] and "left" in progress[0]
    assert [line for line in err.splitlines() if "eval at step" in line] == \
        [f"run: eval at step {s}: loss {r['eval_loss']:.4f}" for s, r in ((r["step"], r) for r in lines if "eval_loss" in r)]
    assert record["eval_loss"] < 8 and np.isfinite(record["eval_perplexity"])
    # The final export loads like any checkpoint and samples: what the eval at the last step logged.
    config, params = solarjax.load_model(tmp_path / "run" / "final")
    assert config.num_layers == 2 and (tmp_path / "run" / "final" / "tokenizer.model").exists()
    logged = [r for r in lines if "samples" in r]
    assert [r["step"] for r in logged] == [30] and [s["prompt"] for s in logged[0]["samples"]] == prompts
    tokenizer = trainer.data.tokenizer
    ids = tokenizer.encode_batch(prompts)
    direct = sample.generate(config, params, ids, sample.Sampling(max_new_tokens=6), tokenizer.eos_id)
    # The text the completion adds to the prompt: decoded with it, so a first "▁x" keeps its space.
    expected = [tokenizer.decode(p + [t for t in r["token_ids"] if t != tokenizer.eos_id])[len("<s>"):]
                for p, r in zip(ids, direct)]
    assert [p + s["completion"] for p, s in zip(prompts, logged[0]["samples"])] == expected and all(expected)


def test_time_left_counts_steady_steps_and_each_kind_of_work_apart():
    """Steps left at the steady step time, plus each upcoming eval, task scoring, sample and
    checkpoint at its latest duration; nothing before a steady time is known."""
    from solarjax.train.progress import Progress
    progress = Progress("run", 100, 0, enabled=False, upcoming={
        "eval": [50, 100], "tasks": [100], "samples": [50, 100], "checkpoint": [40, 80, 100]})
    assert progress.left(10) is None
    progress.steady = 0.5
    progress.spent("eval", 4.0)
    progress.spent("tasks", 9.0)
    progress.spent("checkpoint", 0.25)
    assert progress.left(10) == pytest.approx(90 * 0.5 + 2 * 4.0 + 9.0 + 3 * 0.25)  # samples: not yet timed
    progress.spent("samples", 1.0)
    assert progress.left(60) == pytest.approx(40 * 0.5 + 4.0 + 9.0 + 1.0 + 2 * 0.25)


@pytest.mark.slow
def test_the_first_step_and_evals_do_not_count_as_training_time(tmp_path, corpus, monkeypatch):
    """Slow evals and a slow first step (a compile) leave the steady step time and tokens/s alone."""
    trainer = Trainer(_config(tmp_path, corpus, steps=12, log_every=2, eval_every=4, checkpoint_every=100),
                      _one_device_mesh())
    step, eval_loss, seen = trainer.train_step, trainer._eval_loss, {}

    def slow_first(*args):
        if not seen:
            time.sleep(3.0)
        seen[len(seen)] = True
        return step(*args)

    def slow_eval(*args, **kwargs):
        time.sleep(2.0)
        return eval_loss(*args, **kwargs)
    trainer.train_step, trainer._eval_loss = slow_first, slow_eval
    import solarjax.train.progress as progress_lib
    made = []
    monkeypatch.setattr(progress_lib.Progress, "close", lambda self: made.append(self))
    monkeypatch.setattr("solarjax.train.trainer.Progress", progress_lib.Progress)
    trainer.run()
    progress = made[0]
    rates = [json.loads(x)["tokens_per_s"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in x]
    assert progress.steady < 0.5  # a tiny step: 2 s of eval or 3 s of compile in it would show
    assert min(rates[1:]) > 4 * 64 / 0.5
    assert progress.durations["eval"] >= 2.0  # and the time left counts the evals to come at that


@pytest.mark.slow
def test_resume_is_exact(tmp_path, corpus):
    straight = Trainer(_config(tmp_path / "a", corpus), _one_device_mesh())
    straight.run()
    first = Trainer(_config(tmp_path / "b", corpus), _one_device_mesh())
    first.run(until=3)
    assert first.checkpoints.latest_step() == 3 and not (tmp_path / "b" / "run" / "final").exists()
    resumed = Trainer(_config(tmp_path / "b", corpus), _one_device_mesh())
    assert int(resumed.state["step"]) == 3
    resumed.run()
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    def losses(p):
        lines = [json.loads(x) for x in (p / "run" / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m["loss"] for m in lines if "loss" in m}
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert set(a) <= set(b) and all(a[k] == b[k] for k in a)  # b also logged where it stopped, step 3


@pytest.mark.slow
def test_sharded_training_equals_single_device(tmp_path, corpus):
    single = Trainer(_config(tmp_path / "a", corpus, steps=2, eval_every=0), _one_device_mesh())
    single.run()
    mesh = solarjax.make_mesh(2, 2, 2)
    sharded = Trainer(_config(tmp_path / "b", corpus, steps=2, eval_every=0), mesh)
    q = sharded.state["params"]["layers"]["self_attn"]["q_proj"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = sharded.state["opt_state"][1][0].mu["layers"]["self_attn"]["q_proj"]
    assert mu.sharding.spec == q.sharding.spec  # optimizer state lives in the parameters' shards
    sharded.run()
    for a, b in zip(jax.tree.leaves(single.state["params"]), jax.tree.leaves(sharded.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_init_from_hf_with_depth_upscaling(tmp_path, corpus):
    hf_dir = save_hf_model(make_hf_model("mistral", vocab_size=32000, hidden_size=32, intermediate_size=64,
                                         head_dim=8, num_hidden_layers=4), tmp_path / "hf")
    cfg = _config(tmp_path, corpus, steps=2, eval_every=0)
    d = cfg.to_dict()
    d["model"] = {"remat": "full"}
    d["init"] = {"from": str(hf_dir), "upscale": {"n": 4, "m": 1}}
    cfg = train_config_from_dict(d)
    trainer = Trainer(cfg, _one_device_mesh())
    assert trainer.model_config.num_layers == 6 and trainer.model_config.remat == "full"
    _, grown = solarjax.load_model(hf_dir, upscale=solarjax.weights.upscale.UpscaleSpec(n=4, m=1))
    for a, b in zip(jax.tree.leaves(trainer.state["params"]), jax.tree.leaves(grown)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(trainer.run()["loss"])


@pytest.mark.slow
def test_non_finite_loss_names_the_step(tmp_path, corpus):
    cfg = _config(tmp_path, corpus, **{"optim.learning_rate": 1e8, "optim.grad_clip": 0.0,
                                       "optim.warmup_steps": 0, "steps": 8, "log_every": 1, "eval_every": 0})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step \d"):
        Trainer(cfg, _one_device_mesh()).run()


@pytest.mark.parametrize("text, overrides, message", [
    ("model: {preset: tiny}\noptim: {lr: 1}\n", [], "optim: unknown key 'lr'"),
    ("model: {preset: tiny}\n", ["optim.learning_rate"], "is not KEY=VALUE"),
    ("model: {preset: tiny}\ninit: {from: /x}\n", [], "model.preset is taken from init.from"),
    ("model: {preset: tiny}\nsteps: 0\n", [], "steps must be a positive integer, got 0"),
    ("model: {preset: tiny}\neval_batches: -1\n", [], "eval_batches must be 0 (every held-out window) or a positive"),
    ("model: {preset: tiny, num_heads: 5}\n", [], "model.num_heads 5 must be a multiple"),
    ("model: [1, 2\n", [], "not valid YAML"),
    ("model: {preset: tiny}\noptim: {learning_rate: fast}\n", [], "optim.learning_rate must be a number, got 'fast'"),
    ("model: {preset: tiny}\nsample_prompts: ['ok', '  ']\n", [], "sample_prompts[1] must be a non-empty string"),
])
def test_config_errors_name_the_key(tmp_path, text, overrides, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_train_config(tmp_path / "c.yaml", overrides)
    assert message in str(e.value)
    assert overrides or "c.yaml" in str(e.value)  # file errors name the file, override errors the override


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path, corpus):
    cfg = tmp_path / "job.yaml"
    d = _config(tmp_path, corpus, steps=400, log_every=1, checkpoint_every=1000, eval_every=0).to_dict()
    cfg.write_text(json.dumps(d))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg)]
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM at step" in err
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 3 <= stopped < 400
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())[-1] == stopped
    run = subprocess.run(cmd + ["steps=" + str(stopped + 2)], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped + 3))


@pytest.mark.slow
def test_resume_refuses_another_model_but_allows_runtime_changes(tmp_path, corpus):
    Trainer(_config(tmp_path, corpus, steps=1, eval_every=0), _one_device_mesh()).run()
    with pytest.raises(ConfigError, match=r"holds a run with model.hidden_size=32, but the config says 64"):
        Trainer(_config(tmp_path, corpus, steps=2, **{"model.hidden_size": 64}), _one_device_mesh())
    resumed = Trainer(_config(tmp_path, corpus, steps=2, **{"model.remat": "full"}), _one_device_mesh())
    assert resumed.model_config.remat == "full" and int(resumed.state["step"]) == 1


def test_final_export_may_not_replace_what_the_run_reads(tmp_path, corpus):
    """A tokenizer (or init.from) inside run_dir/final would be deleted by the export at the end of
    the run; the trainer refuses before it loads anything."""
    from hf_models import tokenizer_file
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    tokenizer = final / "tokenizer.model"
    tokenizer.write_bytes(tokenizer_file().read_bytes())
    with pytest.raises(ConfigError, match=f"output {final} contains the input {tokenizer}"):
        Trainer(_config(tmp_path, corpus, **{"data.tokenizer": str(tokenizer)}), _one_device_mesh())


@pytest.mark.slow
def test_init_from_hf_trains_with_the_model_tokenizer(tmp_path, corpus):
    """No data.tokenizer: the init.from model's own tokenizer.json (ids not 1/2) tokenizes the
    data, samples and the final export, which keeps its tokenizer files and special ids."""
    import transformers

    from hf_models import make_bpe_tokenizer
    hf_dir = save_hf_model(make_hf_model("llama", vocab_size=320, bos_token_id=300, eos_token_id=[301, 304],
                                         pad_token_id=305), tmp_path / "hf")
    make_bpe_tokenizer(hf_dir)
    d = _config(tmp_path, corpus, steps=2, eval_every=2, sample_prompts=["alpha beta"], sample_tokens=3).to_dict()
    d.pop("model")
    d["init"] = {"from": str(hf_dir)}
    trainer = Trainer(train_config_from_dict(d), _one_device_mesh())
    assert trainer.data.tokenizer.path == hf_dir / "tokenizer.json"
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    cache = trainer.data.train.cache
    docs = [f.read_text() for f in sorted(corpus.glob("*.txt"))]
    assert [cache.doc(i).tolist() for i in range(cache.n_docs)] == [theirs.encode(t) + [304] for t in docs]
    trainer.run()
    final = tmp_path / "run" / "final"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (final / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert json.loads((final / "special_ids.json").read_text()) == {"bos_token_id": 300, "eos_token_id": [304, 301],
                                                                     "pad_token_id": 305}
    samples = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if "samples" in line]
    assert samples[0]["samples"][0]["prompt"] == "alpha beta"


def test_a_resume_tokenizes_as_the_run_started_or_refuses(tmp_path, corpus, capsys, monkeypatch):
    """A run whose tokenizer comes from init.from (an HF directory with its own tokenizer.json, ids
    that fit a 32000 vocabulary as Mistral's do) is stopped at step 2 of 4, and the directory moves
    away: the resume takes the tokenizer the run recorded, and step 4's loss equals an uninterrupted
    run's (it took Mistral's and trained on other ids). A config that names another tokenizer is
    refused in one line naming both; RUN/tokenizer holds one tokenizer's files."""
    from solarjax.tokenizer import default_tokenizer_path

    from hf_models import make_bpe_tokenizer
    hf_dir = save_hf_model(make_hf_model("llama", vocab_size=32000, bos_token_id=300, eos_token_id=[301, 304]),
                           tmp_path / "hf")
    make_bpe_tokenizer(hf_dir)

    def config(name, **over):
        d = _config(tmp_path / name, corpus, **{"steps": 4, "eval_every": 0, "checkpoint_every": 2, "log_every": 1,
                                                 **over}).to_dict()
        d.pop("model")
        d["init"] = {"from": str(hf_dir)}
        return train_config_from_dict(d)
    straight = Trainer(config("straight"), _one_device_mesh()).run()
    run = tmp_path / "cut" / "run"
    (run / "tokenizer").mkdir(parents=True)  # a start that stopped before its first checkpoint left Mistral's
    (run / "tokenizer" / "tokenizer.model").write_bytes(b"left over")
    Trainer(config("cut"), _one_device_mesh()).run(until=2)
    assert sorted(p.name for p in (run / "tokenizer").iterdir()) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "special_ids.json", "fingerprint.json"])
    hf_dir.rename(tmp_path / "hf-moved")
    capsys.readouterr()
    resumed = Trainer(config("cut"), _one_device_mesh())
    assert f"note: {hf_dir} is not there any more; the run goes on with the tokenizer it recorded at its start, " \
        f"{run / 'tokenizer'}" in capsys.readouterr().err
    assert resumed.run()["loss"] == straight["loss"]
    with pytest.raises(ConfigError) as e, monkeypatch.context() as m:  # Mistral's named now: refused, no data read
        m.setattr(solarjax.data, "load_data", lambda *a, **k: pytest.fail("the data was loaded before the refusal"))
        Trainer(config("cut", **{"data.tokenizer": str(default_tokenizer_path()), "steps": 6}),
                _one_device_mesh())
    message = str(e.value)
    assert message.startswith(f"{run} was tokenized with {hf_dir} (fingerprint ") and "\n" not in message
    assert f"but the config now gives {default_tokenizer_path()} (" in message


def test_a_resume_on_changed_data_says_so(tmp_path, corpus, capsys):
    """Files added to a source between a stop and its resume change the batches from the resume on:
    one line says which source and from which step (and nothing is said when nothing changed)."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    over = {"steps": 4, "eval_every": 0, "checkpoint_every": 2, "data.sources": [str(data)]}
    Trainer(_config(tmp_path, corpus, **over), _one_device_mesh()).run(until=2)
    capsys.readouterr()
    Trainer(_config(tmp_path, corpus, **over), _one_device_mesh())._lock.release()
    assert "has changed since" not in capsys.readouterr().err
    (data / "zz.txt").write_text("zeta eta theta " * 50)
    Trainer(_config(tmp_path, corpus, **over), _one_device_mesh())._lock.release()
    err = capsys.readouterr().err
    assert "note: data source train has changed since the run last started (" in err
    assert "its batches from step 2 on are not the ones the run would have drawn" in err


@pytest.mark.slow
def test_init_from_a_qwen2_hf_dir_trains_and_exports_as_qwen2(tmp_path, corpus):
    """Qwen2 (q/k/v biases, tied embeddings, its own tokenizer): two steps move the biases too, and
    final/ exports as a Qwen2 that transformers runs to our logits."""
    import transformers

    from hf_models import make_bpe_tokenizer
    hf_dir = save_hf_model(make_hf_model("qwen2", vocab_size=320, tie_word_embeddings=True), tmp_path / "hf")
    make_bpe_tokenizer(hf_dir)
    d = _config(tmp_path, corpus, steps=2, eval_every=0).to_dict()
    d.pop("model")
    d["init"] = {"from": str(hf_dir)}
    trainer = Trainer(train_config_from_dict(d), _one_device_mesh())
    assert trainer.model_config.qkv_bias and trainer.model_config.tie_word_embeddings
    before = np.asarray(trainer.state["params"]["layers"]["self_attn"]["q_bias"])
    assert np.isfinite(trainer.run()["loss"])
    config, params = solarjax.load_model(tmp_path / "run" / "final")
    assert np.abs(np.asarray(params["layers"]["self_attn"]["q_bias"]) - before).min() > 0
    solarjax.save_hf(config, params, tmp_path / "export", tokenizer_dir=tmp_path / "run" / "final")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    assert type(theirs).__name__ == "Qwen2ForCausalLM" and theirs.config.tie_word_embeddings
    tokens = np.random.RandomState(0).randint(0, 320, (1, 16))
    ours = np.asarray(solarjax.logits(config, params, tokens))
    assert np.abs(ours - hf_logits(theirs.eval(), tokens)).max() <= 1e-5


@pytest.mark.slow
def test_more_steps_on_resume_continue_the_learning_rate_curve(tmp_path, corpus):
    """Resumed at step 6 of 10 with steps=20, the cosine goes on from the rate it had reached and
    decays to the same floor at 20 (it used to jump to where a 20-step schedule would have been)."""
    over = {"steps": 10, "log_every": 1, "eval_every": 0, "checkpoint_every": 100, "optim.warmup_steps": 2,
            "optim.min_lr_ratio": 0.1}
    Trainer(_config(tmp_path, corpus, **over), _one_device_mesh()).run(until=6)
    resumed = Trainer(_config(tmp_path, corpus, **{**over, "steps": 20}), _one_device_mesh())
    resumed.run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"] - 1: r["lr"] for r in lines if "lr" in r}  # logged at step k: the rate of update k-1
    peak, floor = 1e-2, 1e-3
    at6 = floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * 4 / 8))  # the 10-step cosine at step 6
    for t in range(6, 20):
        expected = floor + (at6 - floor) * 0.5 * (1 + np.cos(np.pi * (t - 6) / 14))
        np.testing.assert_allclose(lr[t], expected, rtol=1e-5)
    np.testing.assert_allclose(lr[5], floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * 3 / 8)), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"is at step 20, past steps=15; give steps >= 20"):
        Trainer(_config(tmp_path, corpus, **{**over, "steps": 15}), _one_device_mesh())


def test_extending_a_finished_schedule_starts_a_new_segment(tmp_path, corpus, capsys):
    """A finished cosine run with min_lr_ratio 0 (its rate is 0 at the end) extended from 6 to 12
    steps trains on a new segment: its own warmup to the peak and a cosine to 0 at step 12, said
    in the start-up line and recorded in schedule.json (it crashed dividing by the rate 0)."""
    over = {"steps": 6, "log_every": 1, "eval_every": 0, "checkpoint_every": 100, "optim.warmup_steps": 2,
            "optim.min_lr_ratio": 0.0}
    Trainer(_config(tmp_path, corpus, **over), _one_device_mesh()).run()
    capsys.readouterr()
    extended = Trainer(_config(tmp_path, corpus, **{**over, "steps": 12}), _one_device_mesh())
    assert "steps 6 -> 12 at step 6: the schedule had ended there, so a new segment warms up over 2 steps" \
        in capsys.readouterr().err
    extended.run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"] - 1: r["lr"] for r in lines if "lr" in r}  # logged at step k: the rate of update k-1
    peak = 1e-2
    # warmup: linear from peak / 2 at the segment's step 0 to the peak at its step 2, then a cosine over 4
    expected = [peak / 2 + (peak - peak / 2) * t / 2 for t in range(2)] + [
        peak * 0.5 * (1 + np.cos(np.pi * t / 4)) for t in range(4)]
    np.testing.assert_allclose([lr[t] for t in range(6, 12)], expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(lr[5], peak * 0.5 * (1 + np.cos(np.pi * 3 / 4)), rtol=1e-5)  # the first run's
    segments = json.loads((tmp_path / "run" / "schedule.json").read_text())["segments"]
    assert segments == [[0, 6], [6, 12, "restart"]]


@pytest.mark.slow
def test_eval_with_fewer_sequences_than_a_batch_on_a_mesh(tmp_path, corpus):
    """8 devices, global batch 8, a held-out set of fewer than 8 sequences: eval pads the batch with
    rows that carry no loss (it raised IndivisibleError, losing that step's checkpoint)."""
    trainer = Trainer(_config(tmp_path, corpus, steps=2, eval_every=2, global_batch=8, **{
        "data.validation_fraction": 0.05, "data.seq_len": 256, "mesh.fsdp": 8}), solarjax.make_mesh(1, 8, 1))
    val = trainer.data.validation
    assert len(val) < 8
    record = trainer.run()
    assert trainer.checkpoints.latest_step() == 2
    # The same loss, computed directly over exactly the held-out sequences.
    np.testing.assert_allclose(record["eval_loss"], _direct_eval_loss(trainer, range(len(val))), rtol=1e-5)


def _direct_eval_loss(trainer, windows) -> float:
    """Next-token loss within documents over the held-out windows, one window at a time in float64."""
    config, params, val = trainer.model_config, jax.device_get(trainer.state["params"]), trainer.data.validation
    total, count = 0.0, 0
    for i in windows:
        n = int((val.sequence(i)[1] > 0).sum())  # padding only ends the last sequence
        tokens, seg, pos = (a[:n] for a in val.sequence(i))
        z = np.asarray(solarjax.logits(config, params, tokens[None], pos[None], seg[None]), np.float64)[0]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        keep = (seg[:-1] > 0) & (seg[1:] == seg[:-1])
        total -= logp[np.arange(len(tokens) - 1), tokens[1:]][keep].sum()
        count += keep.sum()
    return total / count


@pytest.mark.slow
def test_the_last_eval_scores_every_held_out_window(tmp_path, corpus):
    """Evals during the run use eval_batches batches; those of step 0 and the last step cover the whole
    held-out split (a partial last batch included, on a mesh), so a run's numbers are the split's."""
    trainer = Trainer(_config(tmp_path, corpus, steps=2, eval_every=1, global_batch=4, eval_batches=1, **{
        "data.validation_fraction": 0.25, "mesh.fsdp": 4}), solarjax.make_mesh(1, 4, 1, jax.devices()[:4]))
    val = trainer.data.validation
    assert len(val) > 4 and len(val) % 4, len(val)  # more than one batch, and a partial last one
    at_init = trainer.evaluate(0)["eval_loss"]
    np.testing.assert_allclose(at_init, _direct_eval_loss(trainer, range(len(val))), rtol=1e-5)
    assert trainer.evaluate(1)["eval_loss"] != at_init  # one batch of 4 windows
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_batches=0)  # 0: every eval scores every window
    assert trainer.evaluate(1)["eval_loss"] == at_init
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_batches=1)
    record = trainer.run()
    np.testing.assert_allclose(record["eval_loss"], _direct_eval_loss(trainer, range(len(val))), rtol=1e-5)


@pytest.mark.slow
def test_resume_of_an_upscaled_preset_run_takes_runtime_changes(tmp_path, corpus):
    """model.* runtime keys beside a preset grown by init.upscale were dropped on resume."""
    over = {"steps": 1, "eval_every": 0, "init.upscale": {"layers": "0:2,1:2"}}
    Trainer(_config(tmp_path, corpus, **over), _one_device_mesh()).run()
    resumed = Trainer(_config(tmp_path, corpus, **{**over, "steps": 2, "model.remat": "full"}), _one_device_mesh())
    assert resumed.model_config.num_layers == 3 and resumed.model_config.remat == "full"


@pytest.mark.slow
def test_resume_survives_a_metrics_line_cut_short_by_a_crash(tmp_path, corpus):
    Trainer(_config(tmp_path, corpus, eval_every=0), _one_device_mesh()).run(until=4)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # the process died inside this write
    Trainer(_config(tmp_path, corpus, eval_every=0), _one_device_mesh()).run()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


@pytest.mark.slow
def test_a_stop_between_a_checkpoint_and_its_eval_evaluates_on_resume(tmp_path, corpus):
    """The checkpoint of an eval step is saved before the eval runs; a crash in between leaves the
    checkpoint without the eval, and the resumed run must make it up, not skip it."""
    Trainer(_config(tmp_path / "a", corpus), _one_device_mesh()).run()
    Trainer(_config(tmp_path / "b", corpus), _one_device_mesh()).run(until=4)
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("".join(line + "\n" for line in lines if not ('"eval_loss"' in line and '"step": 4' in line)))
    Trainer(_config(tmp_path / "b", corpus), _one_device_mesh()).run()
    evals = {run: [(r["step"], r["eval_loss"]) for r in map(json.loads, (tmp_path / run / "run" / "metrics.jsonl")
                                                           .read_text().splitlines()) if "eval_loss" in r]
             for run in ("a", "b")}
    assert [step for step, _ in evals["a"]] == [0, 4, 8] and evals["b"] == evals["a"]


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, corpus, capsys):
    """The newest checkpoint's biggest file is truncated (a crash or a full disk mid-write): resume
    warns naming it, moves it aside, continues from the one before and ends where an undamaged run
    ends; with every checkpoint damaged it stops with one line naming them."""
    over = {"eval_every": 0, "keep_checkpoints": 3}
    straight = Trainer(_config(tmp_path / "a", corpus, **over), _one_device_mesh())
    straight.run()
    Trainer(_config(tmp_path / "b", corpus, **over), _one_device_mesh()).run(until=8)
    folder = tmp_path / "b" / "run" / "checkpoints"
    def damage(step):
        biggest = max((f for f in (folder / str(step)).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    damage(8)
    resumed = Trainer(_config(tmp_path / "b", corpus, **{**over, "steps": 8}), _one_device_mesh())
    assert f"checkpoint {folder / '8'} cannot be read" in capsys.readouterr().err
    assert int(resumed.state["step"]) == 4 and (folder / "damaged-8").is_dir()
    resumed.run()
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for step in (4, 8):
        damage(step)
    with pytest.raises(CheckpointError, match=r"no checkpoint can be restored \(steps \[8, 4\] are damaged"):
        Trainer(_config(tmp_path / "b", corpus, **over), _one_device_mesh())


@pytest.mark.slow
def test_a_config_change_is_not_damage(tmp_path, corpus):
    """Resuming with optim.grad_clip turned off changes the optimizer state's structure: the run
    stops naming what differs and how to go on, and moves no checkpoint. A harmless change (the
    learning rate, eval_every, more steps) resumes. init.from the run's checkpoint starts a new run
    from its parameters exactly, with a fresh optimizer of the new structure and the run's tokenizer."""
    first = Trainer(_config(tmp_path, corpus, eval_every=0), _one_device_mesh())
    first.run()
    folder = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(CheckpointError) as e:
        Trainer(_config(tmp_path, corpus, steps=12, eval_every=0, **{"optim.grad_clip": 0.0}), _one_device_mesh())
    message = str(e.value)
    assert message.startswith(f"{folder / '8'} does not match this config's train state: the optimizer state (")
    assert "the parameters (" not in message and "nothing was moved" in message
    assert f"init.from: {folder / '8'} (its parameters, with a fresh optimizer)" in message
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing renamed damaged-*

    resumed = Trainer(_config(tmp_path, corpus, steps=12, eval_every=4, **{"optim.learning_rate": 5e-3}),
                      _one_device_mesh())
    assert int(resumed.state["step"]) == 8
    del resumed

    d = _config(tmp_path / "b", corpus, eval_every=0, **{"optim.grad_clip": 0.0}).to_dict()
    d.pop("model")
    d["init"] = {"from": str(folder / "8")}
    fresh = Trainer(train_config_from_dict(d), _one_device_mesh())
    assert int(fresh.state["step"]) == 0 and fresh.model_config == first.model_config
    for a, b in zip(jax.tree.leaves(first.state["params"]), jax.tree.leaves(fresh.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(not np.asarray(m).any() for m in jax.tree.leaves(fresh.state["opt_state"]))  # fresh moments
    assert fresh.data.tokenizer.path.parent == tmp_path / "run" / "tokenizer"
    fresh.run()  # and it trains
    assert int(fresh.state["step"]) == 8


def test_low_precision_parameters_are_refused_for_training(tmp_path, corpus):
    """bfloat16 parameters without a float32 master copy barely move under AdamW: refused, naming
    the fix (float32 parameters, bfloat16 compute)."""
    with pytest.raises(ConfigError, match=r"model.param_dtype bfloat16 is refused for training.*model.dtype: bfloat16"):
        Trainer(_config(tmp_path, corpus, **{"model.param_dtype": "bfloat16"}), _one_device_mesh())


def test_an_attention_kernel_that_cannot_do_the_config_is_refused_before_training(tmp_path, corpus):
    over = {"model.attention": "pallas_gpu", "model.sliding_window": 16}  # shorter than seq_len 64
    with pytest.raises(ConfigError, match=r"Pallas GPU kernel has no sliding window.*16 is shorter than the sequence \(64"):
        Trainer(_config(tmp_path, corpus, **over), _one_device_mesh())


@pytest.mark.slow
def test_eval_tasks_are_scored_at_each_eval_into_metrics(tmp_path, corpus):
    """eval_tasks: the first and last evals carry the task's metrics, and the last ones are what
    solarjax.cli.evaluate gives for the final parameters."""
    from solarjax.eval.scoring import evaluate
    from solarjax.eval.tasks import load_task
    from solarjax.weights.checkpoint import load_params

    task = tmp_path / "pets.jsonl"
    task.write_text("".join(json.dumps({"context": f"the {a} says", "choices": [" meow", " woof", " moo"], "gold": i % 3})
                            + "\n" for i, a in enumerate(["cat", "dog", "cow", "bird", "fish", "ant"])))
    # eval_tasks_every 0: scored before the first step and after the last only, not at step 2's eval.
    cfg = _config(tmp_path, corpus, steps=4, eval_every=2, eval_tasks=[str(task)], eval_tasks_every=0)
    mesh = solarjax.make_mesh(1, 1, 1, jax.devices()[:1])
    trainer = Trainer(cfg, mesh)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "task/pets/acc" in r}
    assert sorted(scored) == [0, 4] and "eval_loss" in scored[4]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    config, params = load_params(tmp_path / "run" / "final")
    expected = evaluate(config, params, trainer.data.tokenizer, load_task(str(task)), mesh)
    for metric in ("acc", "acc_norm"):
        assert scored[4][f"task/pets/{metric}"] == pytest.approx(expected["results"]["pets"][metric])
    with pytest.raises(ConfigError, match=r"eval_tasks_every must be null, 0 or a positive multiple of eval_every \(2\), got 3"):
        _config(tmp_path / "bad", corpus, eval_every=2, eval_tasks_every=3)
    with pytest.raises(ConfigError, match="eval_tasks: .*nope.jsonl"):
        Trainer(_config(tmp_path / "bad", corpus, eval_tasks=[str(tmp_path / "nope.jsonl")]), mesh)
