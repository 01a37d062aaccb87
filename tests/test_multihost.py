"""A real two-process run: jax.distributed over localhost with gloo collectives, 2 CPU devices per
process, a (data 1, fsdp 4, tensor 1) mesh across both. Each process builds only its rows; the
result, and the samples and task scores logged at eval, equal one process training on 4 devices,
with a two-source mixture whose weights change mid-run (tokens per source and held-out loss per
source logged alike)."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import solarjax
from solarjax.train.trainer import Trainer

import eval_tasks
from test_train import _config, corpus  # noqa: F401  (the corpus fixture)

WORKER = Path(__file__).resolve().parent / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, corpus):  # noqa: F811
    tasks = eval_tasks.write_all(tmp_path / "tasks")
    # A mixture of two named sources whose weights change at step 2: each process deals the same
    # rows to the sources and builds its half; held-out loss per source (validation_fraction).
    mixture = [{"name": "low", "path": str(corpus / "d[01]*.txt"), "weight": 0.7},
               {"name": "high", "path": str(corpus / "d[23]*.txt"), "weight": 0.3}]
    over = {"steps": 3, "eval_every": 3, "checkpoint_every": 3, "mesh.fsdp": 4, "sample_prompts": ["alpha beta"],
            "sample_tokens": 4, "eval_tasks": [f"truthfulqa_mc2={tasks['truthfulqa_mc2']}"], "log_every": 1,
            "data.sources": mixture, "data.mixture_schedule": [{"step": 2, "weights": {"low": 0.2, "high": 0.8}}]}
    single = Trainer(_config(tmp_path / "single", corpus, **over), solarjax.make_mesh(1, 4, 1, jax.devices()[:4]))
    single_loss = single.run()["loss"]

    cfg = _config(tmp_path / "multi", corpus, **over).to_dict()
    (tmp_path / "multi.json").write_text(json.dumps(cfg))
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "multi.json"), coordinator, "2", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["local_rows"] for r in results] == [2, 2]  # global batch 4, half on each process
    windows = single.window_losses()  # every held-out window's loss, as the recipe's paired comparison takes them
    assert set(windows) == {"low", "high"}
    for r in results:
        np.testing.assert_allclose(r["loss"], single_loss, rtol=1e-5)
        assert r["windows"].keys() == windows.keys()
        for name, arrays in windows.items():
            np.testing.assert_allclose(r["windows"][name]["loss"], arrays["loss"], rtol=1e-5)
            np.testing.assert_array_equal(r["windows"][name]["tokens"], arrays["tokens"])
    assert (tmp_path / "multi" / "run" / "checkpoints" / "3").is_dir()
    # The eval's samples (the sampler on a mesh that spans both processes) equal the single run's.
    def logged(run, key):
        lines = [json.loads(line) for line in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in lines if key in r]
    assert logged("multi", "samples") == logged("single", "samples") and len(logged("single", "samples")) == 1
    # eval_tasks' scoring (rows over both processes' devices, results gathered): mc2 at steps 0 and 3.
    mc2 = "task/truthfulqa_mc2/mc2"
    assert len(logged("single", mc2)) == 2 and logged("single", mc2)[0] != logged("single", mc2)[1]
    np.testing.assert_allclose(logged("multi", mc2), logged("single", mc2), rtol=1e-5)
    # The mixture: the same tokens drawn from each source, the same held-out loss of each.
    for key in ("tokens/low", "tokens/high", "eval_loss/low", "eval_loss/high", "loss"):
        assert len(logged("single", key)) >= 2, key
        np.testing.assert_allclose(logged("multi", key), logged("single", key), rtol=1e-5)
    assert logged("single", "tokens/low")[-1] + logged("single", "tokens/high")[-1] == 3 * 4 * 64


def _launch(config_path: Path, n: int = 2) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen([sys.executable, str(WORKER), str(config_path), coordinator, str(n), str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def _finish(procs) -> list[dict]:
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, corpus):  # noqa: F811
    """A preemption notice reaches one host only: every process must save the same step and exit,
    not wait forever in a collective the other has left; the rerun then ends where one
    uninterrupted run does."""
    over = {"steps": 30, "eval_every": 0, "log_every": 1, "checkpoint_every": 100, "mesh.fsdp": 4}
    cfg = _config(tmp_path / "multi", corpus, **over)
    (tmp_path / "multi.json").write_text(json.dumps(cfg.to_dict()))
    procs = _launch(tmp_path / "multi.json")
    metrics = tmp_path / "multi" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    stopped = _finish(procs)
    steps = {r["step"] for r in stopped}
    assert len(steps) == 1 and 3 <= steps.pop() < 30, stopped
    step = stopped[0]["step"]
    assert (tmp_path / "multi" / "run" / "checkpoints" / str(step)).is_dir()

    resumed = _finish(_launch(tmp_path / "multi.json"))
    assert [r["step"] for r in resumed] == [30, 30]
    single = Trainer(_config(tmp_path / "single", corpus, **over), solarjax.make_mesh(1, 4, 1, jax.devices()[:4]))
    np.testing.assert_allclose(resumed[0]["loss"], single.run()["loss"], rtol=1e-5)
