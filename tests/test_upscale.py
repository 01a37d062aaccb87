"""Depth up-scaling and layer plans: exact layer mapping, streaming HF -> HF, the training loader."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import solarjax
from solarjax.cli import convert
from solarjax.weights import hf, upscale
from solarjax.weights.upscale import UpscaleError, UpscaleSpec

from hf_models import hf_logits, make_hf_model, save_hf_model, save_kind, tokenizer_file


def _hf_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _mergekit_passthrough(base: dict, slices) -> dict:
    """What mergekit's passthrough merge writes for these slices, built from its documented
    semantics (not from solarjax): non-layer tensors copied, output layers numbered in order, each
    with every tensor of its base layer: weights, and Qwen2's q/k/v biases, which mergekit's
    qwen2.json lists among each layer's tensors. A tied lm_head is absent and stays so."""
    out = {k: v for k, v in base.items() if not k.startswith("model.layers.")}
    j = 0
    for start, end in slices:
        for i in range(start, end):
            prefix = f"model.layers.{i}."
            for k, v in base.items():
                if k.startswith(prefix):
                    out[f"model.layers.{j}." + k[len(prefix):]] = v
            j += 1
    return out


@pytest.fixture(scope="module")
def base8(tmp_path_factory):
    """A tiny 8-layer Mistral with a tokenizer, as HF writes it."""
    path = tmp_path_factory.mktemp("base8") / "hf"
    save_hf_model(make_hf_model("mistral", num_hidden_layers=8, sliding_window=8), path)
    shutil.copy(tokenizer_file(), path / "tokenizer.model")
    return path


def test_solar_index_map():
    index = upscale.check_plan(upscale.dus_plan(32, 8), 32)
    assert index == list(range(0, 24)) + list(range(8, 32))
    assert len(index) == 48 and index[24] == 8 and index[47] == 31
    assert upscale.parse_plan("0:24,8:32") == upscale.dus_plan(32, 8)


def test_param_tree_dus_maps_every_tensor(base8, tmp_path):
    config, params = solarjax.load_hf(base8)
    new_config, grown = upscale.depth_upscale(config, params, n=8, m=2)
    assert new_config.num_layers == 12 and new_config.replace(num_layers=8) == config
    index = list(range(6)) + list(range(2, 8))
    for (path, leaf), base_leaf in zip(jax.tree_util.tree_leaves_with_path(grown["layers"]),
                                       jax.tree.leaves(params["layers"])):
        for i, b in enumerate(index):
            np.testing.assert_array_equal(np.asarray(leaf[i]), np.asarray(base_leaf[b]), err_msg=f"{path} layer {i}")
    for name in ("embed_tokens", "lm_head"):
        np.testing.assert_array_equal(grown[name], params[name])
    # Through HF names: every tensor of the 12-layer result is the expected base tensor.
    hf.save_hf(new_config, grown, tmp_path / "grown", arch="mistral")
    got, expected = _hf_tensors(tmp_path / "grown"), _mergekit_passthrough(_hf_tensors(base8), [(0, 6), (2, 8)])
    assert got.keys() == expected.keys()
    for name, t in got.items():
        assert torch.equal(t, expected[name]), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_equals_param_tree_and_mergekit(base8, tmp_path, dtype, capsys):
    args = ["upscale", "--hf", base8, "--out", tmp_path / "stream", "--n", "8", "--m", "2", "--dtype", dtype,
            "--shard-size", "100KB"]
    assert convert.main([str(a) for a in args]) == 0, capsys.readouterr().err
    stream = _hf_tensors(tmp_path / "stream")
    assert len(list((tmp_path / "stream").glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["num_hidden_layers"] == 12
    assert (tmp_path / "stream" / "tokenizer.model").exists()
    assert "n=8, m=2" in (tmp_path / "stream" / "README.md").read_text()

    # The param-tree path followed by jax-to-hf writes the same tensors, bit for bit.
    config, params = solarjax.load_hf(base8)
    new_config, grown = upscale.depth_upscale(config, params, n=8, m=2)
    hf.save_hf(new_config, grown, tmp_path / "tree", arch="mistral", dtype=dtype)
    tree = _hf_tensors(tmp_path / "tree")
    # And what mergekit's passthrough would write, from the base files, cast the same way.
    expected = {k: v.to(getattr(torch, dtype)) for k, v in
                _mergekit_passthrough(_hf_tensors(base8), [(0, 6), (2, 8)]).items()}
    assert stream.keys() == tree.keys() == expected.keys()
    for name in expected:
        assert torch.equal(stream[name], tree[name]) and torch.equal(stream[name], expected[name]), name


def test_streaming_plan_as_llama_loads_in_transformers(base8, tmp_path):
    upscale.upscale_hf(base8, tmp_path / "solar", UpscaleSpec(layers="0:5,3:8"), arch="llama")
    grown = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "solar", attn_implementation="eager").eval()
    assert type(grown).__name__ == "LlamaForCausalLM" and grown.config.num_hidden_layers == 10
    assert grown.config.max_position_embeddings == 8  # the base's window becomes Llama's limit
    # The training loader grows the same model straight from the base directory.
    config, params = solarjax.load_model(base8, upscale=UpscaleSpec(layers="0:5,3:8"))
    tokens = np.random.RandomState(0).randint(0, 128, (2, 8))
    assert np.abs(np.asarray(solarjax.logits(config, params, tokens)) - hf_logits(grown, tokens)).max() <= 1e-4


@pytest.mark.parametrize("kind", ["llama3", "qwen2-tied"])
def test_dus_of_llama3_and_qwen2_equals_mergekit_and_keeps_the_model_kind(kind, tmp_path, capsys):
    """A Llama 3 (llama3 RoPE scaling) and a Qwen2 (q/k/v biases, tied embeddings), grown 4 -> 6
    layers: streaming and the param tree write mergekit's tensors, biases following their layers;
    the result keeps its architecture, RoPE and ties, and transformers computes what we compute."""
    _, base = save_kind(kind, tmp_path / "base", num_hidden_layers=4)
    assert convert.main(["upscale", "--hf", str(base), "--out", str(tmp_path / "stream"), "--n", "4", "--m", "1"]) == 0
    capsys.readouterr()
    config, params = solarjax.load_hf(base)
    new_config, grown = upscale.depth_upscale(config, params, n=4, m=1)
    hf.save_hf(new_config, grown, tmp_path / "tree", tokenizer_dir=base)
    expected = _mergekit_passthrough(_hf_tensors(base), [(0, 3), (1, 4)])
    assert ("model.layers.5.self_attn.q_proj.bias" in expected) == (kind == "qwen2-tied")
    stream, tree = _hf_tensors(tmp_path / "stream"), _hf_tensors(tmp_path / "tree")
    assert stream.keys() == tree.keys() == expected.keys()
    for name in expected:
        assert torch.equal(stream[name], expected[name]) and torch.equal(tree[name], expected[name]), name
    base_config = json.loads((base / "config.json").read_text())
    for out in ("stream", "tree"):
        d = json.loads((tmp_path / out / "config.json").read_text())
        assert d["num_hidden_layers"] == 6 and d["architectures"] == base_config["architectures"], out
        assert d["rope_parameters"] == base_config["rope_parameters"], out
        assert d["tie_word_embeddings"] == base_config["tie_word_embeddings"], out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream", attn_implementation="eager")
    tokens = np.random.RandomState(0).randint(0, 128, (2, 40))  # past llama3's original 32 positions
    ours = np.asarray(solarjax.logits(new_config, grown, tokens))
    assert np.abs(ours - hf_logits(theirs.eval(), tokens)).max() <= 1e-5


def test_loader_places_grown_model_in_shards(base8, tmp_path):
    mesh = solarjax.make_mesh(data=2, fsdp=2, tensor=2)
    spec = UpscaleSpec(n=8, m=2)
    config, params = solarjax.load_model(base8, mesh=mesh, upscale=spec)
    assert config.num_layers == 12
    q = params["layers"]["self_attn"]["q_proj"]
    assert q.shape[0] == 12 and q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    base_config, base = solarjax.load_hf(base8)
    _, ref = upscale.depth_upscale(base_config, base, 8, 2)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # From a solarjax checkpoint the same spec gives the same tree, sharded on the mesh.
    solarjax.save_params(tmp_path / "ckpt", base_config, base)
    config2, params2 = solarjax.load_model(tmp_path / "ckpt", mesh=mesh, upscale=spec)
    assert config2 == config
    assert params2["layers"]["mlp"]["up_proj"].sharding.spec == params["layers"]["mlp"]["up_proj"].sharding.spec
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec, message", [
    (UpscaleSpec(n=32, m=8), "n=32 does not match the base model's depth of 8 layers"),
    (UpscaleSpec(n=8, m=4), "m=4 is outside [1, n/2) = [1, 4) for n=8"),
    (UpscaleSpec(n=8, m=0), "m=0 is outside [1, n/2)"),
    (UpscaleSpec(layers="0:6,4:9"), "layer range 4:9 is empty or outside the base's layers [0, 8]"),
    (UpscaleSpec(layers="3:3"), "layer range 3:3 is empty"),
    (UpscaleSpec(layers=""), "layer range '' in '' is not START:END"),
    (UpscaleSpec(layers="0-4"), "layer range '0-4' in '0-4' is not START:END"),
    (UpscaleSpec(n=8), "needs both n and m"),
    (UpscaleSpec(n=8, m=2, layers="0:4"), "either n and m, or layers"),
])
def test_bad_specs_name_the_value(spec, message):
    with pytest.raises(UpscaleError) as e:
        spec.plan(8)
    assert message in str(e.value)


def test_zero_layer_plan_and_argument_order():
    with pytest.raises(UpscaleError, match="zero layers"):
        upscale.check_plan((), 8)
    config = solarjax.preset("tiny").replace(num_layers=4)
    params = jax.eval_shape(lambda: solarjax.init_params(config, jax.random.key(0)))
    # The order was (params, config) before every loader settled on (config, params).
    with pytest.raises(TypeError, match=r"depth_upscale\(config, params, ...\): the first argument must be the "
                                        r"ModelConfig, got dict"):
        upscale.depth_upscale(params, config, n=4, m=1)


def test_cli_errors(base8, tmp_path, capsys):
    def run(*args):
        code = convert.main([str(a) for a in args])
        return code, capsys.readouterr().err
    code, err = run("upscale", "--hf", base8, "--out", tmp_path / "o", "--n", "32", "--m", "8")
    assert code == 2 and "n=32 does not match the base model's depth of 8 layers" in err
    assert not (tmp_path / "o").exists()
    bin_dir = tmp_path / "bin"
    model = make_hf_model("llama")
    save_hf_model(model, bin_dir)
    (bin_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    code, err = run("upscale", "--hf", bin_dir, "--out", tmp_path / "o", "--layers", "0:2,0:2")
    assert code == 2 and "reads safetensors only" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    code, err = run("upscale", "--hf", base8, "--out", tmp_path / "taken", "--n", "8", "--m", "2")
    assert code == 2 and "already exists" in err and (tmp_path / "taken" / "x").read_text() == "keep me"
