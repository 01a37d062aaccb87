"""A real two-process run: jax.distributed over localhost with gloo collectives, 2 CPU devices per
process, a (data 1, fsdp 4, tensor 1) mesh across both. Each process builds only its rows; the
result, and the samples logged at eval, equal one process training on 4 devices."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import solarjax
from solarjax.trainer import Trainer
from test_train import _config, corpus  # noqa: F401  (the corpus fixture)

WORKER = Path(__file__).resolve().parent / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path, corpus):  # noqa: F811
    over = {"steps": 3, "eval_every": 3, "checkpoint_every": 3, "mesh.fsdp": 4, "sample_prompts": ["alpha beta"],
            "sample_tokens": 4}
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
    for r in results:
        np.testing.assert_allclose(r["loss"], single_loss, rtol=1e-5)
    assert (tmp_path / "multi" / "run" / "checkpoints" / "3").is_dir()
    # The eval's samples (the sampler on a mesh that spans both processes) equal the single run's.
    def samples(run):
        lines = [json.loads(line) for line in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r["samples"] for r in lines if "samples" in r]
    assert samples("multi") == samples("single") and len(samples("single")) == 1
