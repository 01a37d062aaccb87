"""The persistent compilation cache (solarjax.compile_cache): a later process reads a program an
earlier one compiled, never one compiled for other shapes or flags; an unwritable directory is one
warning line and a corrupt entry a recompile. Each case is a fresh process, as a restart is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from solarjax import compile_cache
events = {"hits": 0, "misses": 0}
def listen(event, **kw):
    for kind in ("hits", "misses"):
        if event == f"/jax/compilation_cache/cache_{kind}":
            events[kind] += 1
monitoring.register_event_listener(listen)
used = compile_cache.enable(sys.argv[1], "unused")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # these programs compile fast
n = int(sys.argv[2])
x = jnp.arange(n * n, dtype=jnp.float32).reshape(n, n) / (n * n)
value = float(jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(x).sum())
print(json.dumps({"used": used, "value": value, **events}))
"""


def _probe(cache, n, flags="--xla_backend_optimization_level=0"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    run = subprocess.run([sys.executable, "-c", PROBE, str(cache), str(n)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1]), run.stderr


def test_a_later_process_reads_the_programs_and_only_its_own(tmp_path):
    cold, _ = _probe(tmp_path / "xla", 8)
    assert cold["used"] == str(tmp_path / "xla") and cold["hits"] == 0 and cold["misses"] > 0
    warm, _ = _probe(tmp_path / "xla", 8)
    assert warm["hits"] == cold["misses"] and warm["misses"] == 0 and warm["value"] == cold["value"]
    other_shape, _ = _probe(tmp_path / "xla", 16)
    assert other_shape["misses"] > 0 and other_shape["value"] != cold["value"]
    other_flags, _ = _probe(tmp_path / "xla", 8, flags="--xla_backend_optimization_level=1")
    assert other_flags["hits"] == 0 and other_flags["misses"] > 0  # XLA flags are in the key
    assert other_flags["value"] == pytest.approx(cold["value"], rel=1e-6)


def test_a_corrupt_entry_is_recompiled(tmp_path):
    cold, _ = _probe(tmp_path / "xla", 8)
    entries = [p for p in (tmp_path / "xla").iterdir() if p.name.endswith("-cache")]
    assert entries
    for p in entries:  # a crash in the middle of writing each of them
        p.write_bytes(p.read_bytes()[:100])
    again, err = _probe(tmp_path / "xla", 8)
    assert again["value"] == cold["value"] and again["hits"] == 0
    assert "Error reading persistent compilation cache entry" in err


def test_an_unwritable_cache_is_one_warning_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    got, err = _probe(tmp_path / "file" / "xla", 8)
    assert got["used"] is None and got["hits"] == got["misses"] == 0 and got["value"] > 0
    lines = [line for line in err.splitlines() if "compile cache" in line]
    assert lines == [f"warning: compile cache {tmp_path / 'file' / 'xla'} cannot be written (Not a directory); "
                     f"compiling without it"]


def test_where_a_job_caches():
    from solarjax.compile_cache import where
    env = os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    try:
        assert where(None, "/data/tokens") == "/data/tokens/xla"
        os.environ["JAX_COMPILATION_CACHE_DIR"] = "/shared/xla"
        assert where(None, "/data/tokens") == "/shared/xla"
        assert where("/mine", "/data/tokens") == "/mine" and where("", "/data/tokens") is None
    finally:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        if env is not None:
            os.environ["JAX_COMPILATION_CACHE_DIR"] = env


def test_a_run_compiles_into_its_compile_cache_dir(tmp_path):
    """compile_cache_dir is where the run's programs go (the train step among them); "" is none."""
    import jax

    from solarjax import compile_cache
    from solarjax.train.trainer import Trainer

    from test_train import _config, _one_device_mesh
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"d{i}.txt").write_text("alpha beta gamma delta " * 40)
    before = jax.config.jax_compilation_cache_dir
    try:
        Trainer(_config(tmp_path, corpus, steps=1, eval_every=0, compile_cache_dir=str(tmp_path / "xla")),
                _one_device_mesh()).run()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert any(p.name.startswith("jit_train_step-") for p in (tmp_path / "xla").iterdir())
        Trainer(_config(tmp_path / "off", corpus, steps=1, eval_every=0, compile_cache_dir=""), _one_device_mesh())
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        compile_cache.enable(before or "", "unused")
