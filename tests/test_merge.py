"""Model merging: the same tensors as mergekit's own linear and slerp merges (mergekit is a test
dependency and runs here, offline, on the same local directories), solarjax checkpoints as inputs,
the endpoints and branches of slerp, streaming, atomic output and the refusals."""

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
import transformers
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

import solarjax
from solarjax.cli import convert
from solarjax.weights import merge

from hf_models import hf_logits, make_hf_model, save_hf_model, tokenizer_file

NEAR_PARALLEL = "model.layers.0.self_attn.q_proj.weight"  # cos 0.99975: mergekit lerps
JUST_SPHERICAL = "model.layers.0.self_attn.k_proj.weight"  # cos 0.9993: just below the threshold, slerped
ANTIPARALLEL = "model.layers.1.mlp.down_proj.weight"  # b = -a: lerped too (|cos| is compared)
ZERO_IN_A = "model.layers.1.self_attn.o_proj.weight"  # norm 0 <= eps: mergekit does not normalise it


def _hf_tensors(path):
    """Every tensor of an HF directory, read by the safetensors package itself (not our reader)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return {k: v.float().numpy() for k, v in out.items()}


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def _with_cos(a, cos, rng):
    """A tensor whose direction makes exactly `cos` with `a`'s (float64), of the same norm."""
    a = a.double().numpy()
    n = rng.standard_normal(a.shape)
    n -= (n.ravel() @ a.ravel()) / (a.ravel() @ a.ravel()) * a
    n *= np.linalg.norm(a) / np.linalg.norm(n)
    return torch.as_tensor(cos * a + np.sqrt(1 - cos**2) * n, dtype=torch.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny random Mistrals as HF writes them; A carries a tokenizer and a generation config,
    B is set up to hit every branch of slerp against A."""
    root = tmp_path_factory.mktemp("merge")
    a, b, c = (make_hf_model("mistral", seed=s) for s in (0, 1, 2))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        pb[NEAR_PARALLEL].copy_(2 * _with_cos(pa[NEAR_PARALLEL], 0.99975, rng))
        pb[JUST_SPHERICAL].copy_(_with_cos(pa[JUST_SPHERICAL], 0.9993, rng))
        pb[ANTIPARALLEL].copy_(-pa[ANTIPARALLEL])
        pa[ZERO_IN_A].zero_()
    paths = [save_hf_model(m, root / name) for m, name in ((a, "A"), (b, "B"), (c, "C"))]
    shutil.copy(tokenizer_file(), paths[0] / "tokenizer.model")
    return paths


def _mergekit(config: dict, out):
    """mergekit's own merge of local directories (no hub), tensors in float32."""
    run_merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return _hf_tensors(out)


def _mergekit_linear(paths, weights, out):
    return _mergekit({"merge_method": "linear",
                      "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]},
                     out)


def _mergekit_slerp(a, b, t, out):
    return _mergekit({"merge_method": "slerp", "base_model": str(a), "parameters": {"t": t},
                      "models": [{"model": str(a)}, {"model": str(b)}]}, out)


def _run(capsys, *args):
    code = convert.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _assert_same(got: dict, expected: dict, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=atol, err_msg=name)


def test_fixture_hits_every_branch_of_slerp(models):
    """The tensor pairs are what their names say, measured here independently of solarjax."""
    a, b = _hf_tensors(models[0]), _hf_tensors(models[1])
    assert merge.DOT_THRESHOLD < _cos(a[NEAR_PARALLEL], b[NEAR_PARALLEL]) < 1 - 1e-4
    assert 0.999 < _cos(a[JUST_SPHERICAL], b[JUST_SPHERICAL]) < merge.DOT_THRESHOLD
    assert _cos(a[ANTIPARALLEL], b[ANTIPARALLEL]) < -merge.DOT_THRESHOLD
    assert not a[ZERO_IN_A].any()
    ordinary = [k for k in a if k not in (NEAR_PARALLEL, JUST_SPHERICAL, ANTIPARALLEL, ZERO_IN_A)]
    assert all(abs(_cos(a[k], b[k])) < merge.DOT_THRESHOLD for k in ordinary)


@pytest.mark.parametrize("weights, n", [("0.3,0.7", 2), ("1,2,-0.5", 3)])
def test_linear_equals_mergekit(models, weights, n, tmp_path, capsys):
    paths = models[:n]
    args = ["merge", *sum((["--hf", p] for p in paths), []), "--method", "linear", "--weights", weights,
            "--out", tmp_path / "ours"]
    code, err = _run(capsys, *args)
    assert code == 0, err
    expected = _mergekit_linear(paths, [float(w) for w in weights.split(",")], tmp_path / "mergekit")
    _assert_same(_hf_tensors(tmp_path / "ours"), expected)


@pytest.mark.parametrize("t", [0.4, 0.0, 1.0])
def test_slerp_equals_mergekit(models, t, tmp_path, capsys):
    a, b = models[:2]
    code, err = _run(capsys, "merge", "--hf", a, "--hf", b, "--method", "slerp", "--t", t, "--out", tmp_path / "ours")
    assert code == 0, err
    ours = _hf_tensors(tmp_path / "ours")
    _assert_same(ours, _mergekit_slerp(a, b, t, tmp_path / "mergekit"))
    ta, tb = _hf_tensors(a), _hf_tensors(b)
    if t in (0.0, 1.0):  # the base is the first model
        _assert_same(ours, ta if t == 0 else tb)
        return
    # The parallel pairs are lerped; the pair just below the threshold is not (the two differ there).
    for name in (NEAR_PARALLEL, ANTIPARALLEL):
        np.testing.assert_allclose(ours[name], (1 - t) * ta[name] + t * tb[name], rtol=0, atol=1e-6, err_msg=name)
    lerp = (1 - t) * ta[JUST_SPHERICAL] + t * tb[JUST_SPHERICAL]
    assert np.abs(ours[JUST_SPHERICAL] - lerp).max() > 1e-5


def _bfloat16_copy(path, out):
    transformers.AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.model", "generation_config.json"):
        if (path / name).exists():
            shutil.copy(path / name, out / name)
    return out


def test_bfloat16_inputs_merge_in_float32_and_carry_the_first_models_files(models, tmp_path, capsys):
    a, b = (_bfloat16_copy(p, tmp_path / f"{p.name}-bf16") for p in models[:2])
    expected = _mergekit_slerp(a, b, 0.5, tmp_path / "mergekit")  # mergekit reads them as float32

    # In the inputs' dtype by default: mergekit's float32 result, rounded once (within half a step).
    code, err = _run(capsys, "merge", "--hf", a, "--hf", b, "--method", "slerp", "--t", "0.5", "--shard-size", "50KB",
                     "--out", tmp_path / "bf16")
    assert code == 0, err
    out = tmp_path / "bf16"
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert got.keys() == expected.keys() and {t.dtype for t in got.values()} == {torch.bfloat16}
    for name, t in got.items():
        np.testing.assert_allclose(t.float().numpy(), expected[name], rtol=2**-8, atol=1e-30, err_msg=name)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((a / "config.json").read_text())
    for name in ("tokenizer.model", "generation_config.json"):
        assert (out / name).read_bytes() == (a / name).read_bytes()
    assert "slerp, t=0.5" in (out / "README.md").read_text()

    # --dtype float32 keeps the float32 result: bfloat16 arithmetic would be ~1e-3 off.
    code, err = _run(capsys, "merge", "--hf", a, "--hf", b, "--method", "slerp", "--t", "0.5", "--dtype", "float32",
                     "--out", tmp_path / "f32")
    assert code == 0, err
    _assert_same(_hf_tensors(tmp_path / "f32"), expected)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_solarjax_checkpoints_as_inputs_load_in_transformers(models, tmp_path, capsys):
    a, b = models[:2]
    for path in (a, b):
        assert _run(capsys, "hf-to-jax", "--hf", path, "--out", tmp_path / f"ckpt-{path.name}")[0] == 0
    ckpt_a, ckpt_b = tmp_path / "ckpt-A", tmp_path / "ckpt-B"
    expected_slerp = _mergekit_slerp(a, b, 0.4, tmp_path / "mk-slerp")
    expected_linear = _mergekit_linear([a, b], [0.3, 0.7], tmp_path / "mk-linear")

    # Checkpoint first (config and tokenizer from the checkpoint), and mixed with an HF directory.
    code, err = _run(capsys, "merge", "--hf", ckpt_a, "--hf", b, "--method", "slerp", "--t", "0.4",
                     "--out", tmp_path / "slerp")
    assert code == 0, err
    _assert_same(_hf_tensors(tmp_path / "slerp"), expected_slerp)
    code, err = _run(capsys, "merge", "--hf", ckpt_a, "--hf", ckpt_b, "--method", "linear", "--weights", "0.3,0.7",
                     "--out", tmp_path / "linear")
    assert code == 0, err
    _assert_same(_hf_tensors(tmp_path / "linear"), expected_linear)
    assert (tmp_path / "linear" / "tokenizer.model").exists()

    tokens = np.random.RandomState(0).randint(0, 128, (2, 10))
    for ours, theirs in (("slerp", "mk-slerp"), ("linear", "mk-linear")):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / ours, attn_implementation="eager")
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / theirs, attn_implementation="eager")
        assert type(model).__name__ == "MistralForCausalLM"
        np.testing.assert_allclose(hf_logits(model.eval(), tokens), hf_logits(reference.eval(), tokens),
                                   rtol=0, atol=1e-5)
    # And solarjax reads the merge back to the same logits.
    config, params = solarjax.load_model(tmp_path / "linear")
    np.testing.assert_allclose(np.asarray(solarjax.logits(config, params, tokens)), hf_logits(model, tokens),
                               rtol=0, atol=1e-4)


def test_a_checkpoint_first_merges_into_the_dtype_jax_to_hf_writes(models, tmp_path, capsys):
    """A checkpoint of a bfloat16 model records that dtype; jax-to-hf writes it back, and so does a
    merge with the checkpoint first (before: float32, twice the size)."""
    a, b = (_bfloat16_copy(p, tmp_path / f"{p.name}-bf16") for p in models[:2])
    for path in (a, b):
        assert _run(capsys, "hf-to-jax", "--hf", path, "--out", tmp_path / f"ckpt-{path.name}")[0] == 0
    ckpt_a, ckpt_b = tmp_path / "ckpt-A-bf16", tmp_path / "ckpt-B-bf16"
    assert _run(capsys, "jax-to-hf", "--ckpt", ckpt_a, "--out", tmp_path / "exported")[0] == 0
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    expected = _mergekit_linear([a, b], [0.3, 0.7], tmp_path / "mk")  # mergekit reads bfloat16 as float32
    for second in (ckpt_b, b):
        code, err = _run(capsys, "merge", "--hf", ckpt_a, "--hf", second, "--method", "linear", "--weights", "0.3,0.7",
                         "--out", tmp_path / f"merged-{second.name}")
        assert code == 0, err
        out = tmp_path / f"merged-{second.name}"
        assert json.loads((out / "config.json").read_text())["dtype"] == exported["dtype"] == "bfloat16"
        got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
        assert {t.dtype for t in got.values()} == {torch.bfloat16}
        for name, t in got.items():  # rounded once (atol: a weighted sum that cancels to ~1e-9)
            np.testing.assert_allclose(t.float().numpy(), expected[name], rtol=2**-8, atol=1e-8, err_msg=name)
    # --dtype still decides.
    code, err = _run(capsys, "merge", "--hf", ckpt_a, "--hf", ckpt_b, "--method", "linear", "--weights", "0.3,0.7",
                     "--dtype", "float32", "--out", tmp_path / "f32")
    assert code == 0, err
    _assert_same(_hf_tensors(tmp_path / "f32"), expected)


def test_streams_one_tensor_at_a_time(tmp_path):
    """Peak memory is a few tensors, not the model: traced numpy allocations during a 3-model merge
    stay under 6 of its largest tensors while the output is over 20 of them."""
    paths = [save_hf_model(make_hf_model("llama", seed=s, num_hidden_layers=8, intermediate_size=512),
                           tmp_path / f"m{s}") for s in range(3)]
    largest = 64 * 512 * 4
    tracemalloc.start()
    merge.merge_hf(paths, tmp_path / "out", "linear", weights=[1, 1, 1])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = sum(v.nbytes for v in _hf_tensors(tmp_path / "out").values())
    assert total > 20 * largest and peak < 6 * largest, (peak, total)


def test_failure_mid_merge_leaves_nothing(models, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = merge.slerp

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(merge, "slerp", failing)
    with pytest.raises(OSError, match="disk full"):
        merge.merge_hf(models[:2], tmp_path / "out", "slerp", t=0.5)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.fixture(scope="module")
def misfits(models, tmp_path_factory):
    """Models that must not merge with A: another depth, another architecture, a missing tensor."""
    root = tmp_path_factory.mktemp("misfits")
    deeper = save_hf_model(make_hf_model("mistral", num_hidden_layers=3), root / "deeper")
    llama = save_hf_model(make_hf_model("llama"), root / "llama")
    windowless = save_hf_model(make_hf_model("mistral", sliding_window=None), root / "windowless")
    missing = root / "missing"
    shutil.copytree(models[1], missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    return dict(deeper=deeper, llama=llama, windowless=windowless, missing=missing)


@pytest.mark.parametrize("inputs, options, message", [
    (["A", "deeper"], ["--method", "linear", "--weights", "1,1"],
     "deeper: num_layers=3 differs from {A}'s num_layers=2; merged models must have the same architecture"),
    (["windowless", "llama"], ["--method", "linear", "--weights", "1,1"],
     "llama: architecture LlamaForCausalLM differs from {windowless}'s MistralForCausalLM"),
    (["A", "llama"], ["--method", "slerp", "--t", "0.5"], "llama: sliding_window=None differs from"),
    (["A", "missing"], ["--method", "linear", "--weights", "1,1"],
     "missing: missing tensor 'model.layers.1.mlp.up_proj.weight' (shape [96, 64])"),
    (["A", "B"], ["--method", "linear", "--weights", "0.2,0.3,0.5"], "--weights has 3 values for 2 models"),
    (["A", "B"], ["--method", "linear"], "--weights has 0 values for 2 models"),
    (["A", "B"], ["--method", "linear", "--weights", "1,-1"], "must be finite numbers with a nonzero sum"),
    (["A", "B"], ["--method", "linear", "--weights", "1,x"], "--weights '1,x' is not a comma-separated list"),
    (["A", "B"], ["--method", "linear", "--weights", "1,1", "--t", "0.5"], "--t is slerp's"),
    (["A", "B", "C"], ["--method", "slerp", "--t", "0.5"], "slerp merges exactly two models (the first is t=0), got 3"),
    (["A", "B"], ["--method", "slerp", "--t", "1.5"], "--t 1.5 is outside [0, 1]"),
    (["A", "B"], ["--method", "slerp", "--t", "-0.1"], "--t -0.1 is outside [0, 1]"),
    (["A", "B"], ["--method", "slerp"], "slerp needs --t, in [0, 1]"),
    (["A", "B"], ["--method", "slerp", "--t", "0.5", "--weights", "1,1"], "--weights is linear's"),
    (["A"], ["--method", "linear", "--weights", "1"], "merging needs at least two models, got 1"),
])
def test_refusals_name_the_model_and_value(models, misfits, inputs, options, message, tmp_path, capsys):
    where = {p.name: p for p in models} | misfits
    args = ["merge", *sum((["--hf", where[name]] for name in inputs), []), *options, "--out", tmp_path / "out"]
    code, err = _run(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message.format(**{k: str(v) for k, v in where.items()}) in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_output_may_not_overlap_an_input(models, tmp_path, capsys):
    inner = models[1] / "merged"
    code, err = _run(capsys, "merge", "--hf", models[0], "--hf", models[1], "--method", "slerp", "--t", "0.5",
                     "--out", inner)
    assert code == 2 and "lies inside the input" in err and not inner.exists()
