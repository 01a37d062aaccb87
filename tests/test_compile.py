"""Ahead-of-time compilation of the train step for a TPU slice with libtpu's compiler, on this CPU
machine (train.py --compile-only --topology ...)."""

import pytest

from solarjax.errors import ConfigError
from solarjax.train.aot import compile_for_topology
from solarjax.train.topology import topology_name

from test_train import TINY, _config, corpus  # noqa: F401  (the corpus fixture)


@pytest.mark.parametrize("name, expected", [
    ("v5p-128", ("v5p", "v5p:4x4x4")), ("v5p-8", ("v5p", "v5p:2x2x1")), ("v4-32", ("v4", "v4:2x2x4")),
    ("v5e-16", ("v5e", "v5e:4x4")), ("v5p:2x2x2", ("v5p", "v5p:2x2x2")),
])
def test_topology_names(name, expected):
    assert topology_name(name) == expected


@pytest.mark.parametrize("name", ["tpu-128", "v5p-abc", "v5p-96"])
def test_bad_topology_names(name):
    with pytest.raises(ConfigError, match="--topology"):
        topology_name(name)


@pytest.mark.slow
def test_compile_for_a_tpu_slice_reports_memory_and_flops(tmp_path, corpus):  # noqa: F811
    cfg = _config(tmp_path, corpus, **{"mesh.fsdp": -1, "global_batch": 8, "model.num_layers": 3})
    report = compile_for_topology(cfg, "v5p-8")
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["attention"] == "splash"  # auto, for a TPU mesh, although this host is a CPU
    assert report["fits"] and 0 < report["per_chip_gib"]["total"] < 95 and report["hbm_headroom"] > 0.9
    # The compiler's FLOPs for the whole step against 6N + attention: the two counts agree.
    assert 0.9 < report["flop_ratio"] < 1.4, report
