"""What the CPU benchmarks share: the bench-small model (BENCHMARKS.md) on both sides, with the very
same random weights, and a best-of-N timer."""

import tempfile
import time
from pathlib import Path

import jax
import torch
import transformers

import solarjax


def best_time(f, repeats: int = 10) -> float:
    """Seconds of the fastest of `repeats` calls of f, after one warm-up call."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def models(arch: str):
    """(config, solarjax params, the HF model loaded from their export with save_hf(arch=...))."""
    config = solarjax.preset("bench-small")
    params = solarjax.init_params(config, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        solarjax.save_hf(config, params, Path(tmp) / "hf", arch=arch)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32)
    return config, params, hf_model
