"""bench/b8_gpu.py, the GPU benchmark, kept from rotting: its --tiny run on the CPU, with its
figures checked against a FLOP count made here from the model's shape."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "b8_gpu.py"


def flops_per_token(model: dict, seq_len: int) -> int:
    """6 per weight that multiplies (every parameter but the embedding table's gather: the
    projections, the norm scales, the output head) + 12 L H E T for attention (PaLM's count)."""
    D, F, L, H, K, V = (model[k] for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                           "num_kv_heads", "vocab_size"))
    E = model["head_dim"] or D // H
    assert not model["qkv_bias"]
    per_layer = D * H * E + 2 * D * K * E + H * E * D + 3 * D * F + 2 * D  # q, k, v, o, gate/up/down, 2 norms
    weights = L * per_layer + D + V * D  # + final norm + output head (the embedding itself when tied)
    return 6 * weights + 12 * L * H * E * seq_len


@pytest.mark.slow
def test_tiny_run_reports_consistent_mfu(tmp_path):
    out = tmp_path / "b8.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--peak-tflops", "0.5", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["platform"] == "cpu" and report["peak_tflops"] == 0.5 and report["jax"]
    train, decode = report["results"]
    assert (train["kind"], decode["kind"]) == ("train", "decode")
    assert train["config"]["dtype"] == "bfloat16" and train["config"]["param_dtype"] == "float32"

    assert train["tokens_per_s"] > 0
    assert train["tokens_per_s"] == pytest.approx(train["rows"] * train["seq_len"] * train["timed_steps"]
                                                  / train["timed_s"], rel=1e-9)
    fpt = flops_per_token(train["config"], train["seq_len"])
    assert train["flops_per_token"] == fpt
    assert train["mfu"] == pytest.approx(train["tokens_per_s"] * fpt / 0.5e12, rel=1e-9)
    assert abs(train["loss"] - math.log(train["config"]["vocab_size"])) < 1.0  # a random model on random tokens

    assert decode["decode_tokens_per_s"] > 0
    assert decode["decode_tokens_per_s"] == pytest.approx(decode["rows"] * (decode["new_tokens"] - 1)
                                                          / decode["decode_s"], rel=1e-9)
    assert "| tiny | train |" in run.stdout and "| tiny | decode |" in run.stdout


def test_peak_by_device_kind_and_refusal(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the import sets it; put back after
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("b8_gpu", SCRIPT)
    b8 = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "b8_gpu", b8)  # where its dataclass looks its module up
    spec.loader.exec_module(b8)
    assert b8.peak_tflops("NVIDIA H200", None)[0] == 989
    assert b8.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989
    assert b8.peak_tflops("cpu", 2.5) == (2.5, "--peak-tflops")
    with pytest.raises(SystemExit, match="'cpu'.*--peak-tflops"):
        b8.peak_tflops("cpu", None)
