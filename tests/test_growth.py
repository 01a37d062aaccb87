"""The growth family (block expansion, stacking, middle duplication, zero_new): grown models
compute the base's function, in solarjax and after export in transformers; the streamed CLI writes
the in-memory growth's files byte for byte; bad specs are one line naming the value."""

import shutil

import jax
import numpy as np
import pytest
import transformers

import solarjax
from solarjax import convert, hf, upscale
from solarjax.errors import ConfigError
from solarjax.upscale import UpscaleError, UpscaleSpec
from hf_models import hf_logits, make_hf_model, save_hf_model, tokenizer_file

# (spec, the grown model's base layer per layer, the new layers, zeroed or not)
SPECS = {
    "expand2": (UpscaleSpec(expand=2), [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7], [2, 5, 8, 11]),
    "expand8": (UpscaleSpec(expand=8), list(range(8)) + [7], [8]),
    "stack_zero_new": (UpscaleSpec(layers="0:8,0:8", zero_new=True), list(range(8)) * 2, list(range(8, 16))),
    "middle_zero_new": (UpscaleSpec(layers="0:3,3:5,3:5,5:8", zero_new=True), [0, 1, 2, 3, 4, 3, 4, 5, 6, 7], [5, 6]),
    "dus_zero_new": (UpscaleSpec(n=8, m=2, zero_new=True), list(range(6)) + list(range(2, 8)), [6, 7, 8, 9]),
}


@pytest.fixture(scope="module")
def base8(tmp_path_factory):
    """A tiny 8-layer Llama with a tokenizer, as HF writes it."""
    path = tmp_path_factory.mktemp("base8") / "hf"
    save_hf_model(make_hf_model("llama", num_hidden_layers=8, hidden_size=32, intermediate_size=48), path)
    shutil.copy(tokenizer_file(), path / "tokenizer.model")
    return path


def test_growth_maps_layers_and_names_new_ones():
    for name, (spec, index, new) in SPECS.items():
        growth = spec.growth(8)
        assert list(growth.index) == index and list(growth.new) == new and list(growth.zeroed) == new, name
    plain = UpscaleSpec(layers="0:8,0:8").growth(8)  # without zero_new: new layers, none zeroed
    assert list(plain.new) == list(range(8, 16)) and plain.zeroed == ()
    assert upscale.expand_plan(4, 2) == ((0, 2), (1, 4), (3, 4))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_grown_models_compute_the_base_function_here_and_in_transformers(base8, tmp_path, name):
    """The loader (reading each new layer from the base's files), the param-tree operator, and the
    HF export loaded by transformers all give the base's logits; the new layers' o_proj and
    down_proj are zero and every other tensor is its base layer's."""
    spec, index, new = SPECS[name]
    tokens = np.random.RandomState(0).randint(0, 128, (2, 12))
    config, base = solarjax.load_hf(base8)
    base_logits = np.asarray(solarjax.logits(config, base, tokens))
    grown_config, grown = solarjax.load_model(base8, upscale=spec)
    tree_config, tree = upscale.grow(config, base, spec)
    assert grown_config == tree_config and grown_config.num_layers == len(index)
    for (path, a), b, base_leaf in zip(jax.tree_util.tree_leaves_with_path(grown), jax.tree.leaves(tree),
                                       jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        if path[0].key != "layers":
            continue
        zeroed = tuple(k.key for k in path[1:]) in upscale.ZEROED
        for i, b_i in enumerate(index):
            expected = 0 * np.asarray(base_leaf[b_i]) if zeroed and i in new else np.asarray(base_leaf[b_i])
            np.testing.assert_array_equal(np.asarray(a[i]), expected, err_msg=f"{jax.tree_util.keystr(path)} {i}")
    assert np.abs(np.asarray(solarjax.logits(grown_config, grown, tokens)) - base_logits).max() <= 1e-5
    hf.save_hf(grown_config, grown, tmp_path / "out", tokenizer_dir=base8)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert theirs.config.num_hidden_layers == len(index)
    assert np.abs(hf_logits(theirs, tokens) - base_logits).max() <= 1e-5


@pytest.mark.parametrize("args, spec, dtype", [
    (["--expand", "2"], UpscaleSpec(expand=2), "float32"),
    (["--layers", "0:3,3:5,3:5,5:8", "--zero-new"], UpscaleSpec(layers="0:3,3:5,3:5,5:8", zero_new=True), "bfloat16"),
])
def test_streamed_cli_writes_the_in_memory_growth_byte_for_byte(base8, tmp_path, capsys, args, spec, dtype):
    out = tmp_path / "stream"
    assert convert.main(["upscale", "--hf", str(base8), "--out", str(out), "--dtype", dtype, "--shard-size", "20KB",
                         *args]) == 0, capsys.readouterr().err
    config, base = solarjax.load_hf(base8)
    grown_config, grown = upscale.grow(config, base, spec)
    hf.save_hf(grown_config, grown, tmp_path / "tree", dtype=dtype, shard_size=20_000, tokenizer_dir=base8)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in (tmp_path / "tree").glob("*.safetensors"))
    for name in files + ["model.safetensors.index.json", "config.json"]:
        assert (out / name).read_bytes() == (tmp_path / "tree" / name).read_bytes(), name
    assert "o_proj and down_proj zero" in (out / "README.md").read_text()


@pytest.mark.parametrize("spec, message", [
    (UpscaleSpec(expand=3), "expand=3 must divide the base's depth of 8 layers (expand in [1, 2, 4, 8])"),
    (UpscaleSpec(expand=0), "expand=0 must be a positive integer"),
    (UpscaleSpec(expand=2, n=8, m=2), "expand=2 is a growth of its own: give expand, or n and m, or layers"),
    (UpscaleSpec(expand=2, layers="0:8"), "expand=2 is a growth of its own"),
    (UpscaleSpec(layers="0:8", zero_new="yes"), "zero_new='yes' must be true or false"),
])
def test_bad_growth_specs_are_one_line(spec, message):
    with pytest.raises(UpscaleError) as e:
        spec.plan(8)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ConfigError)


def test_bad_growth_in_the_config_and_the_cli(base8, tmp_path, capsys):
    from solarjax.config import train_config_from_dict
    with pytest.raises(ConfigError, match=r"^init.upscale: expand=2 is a growth of its own"):
        train_config_from_dict({"model": {"preset": "tiny"}, "init": {"upscale": {"expand": 2, "n": 2, "m": 1}}})
    with pytest.raises(ConfigError, match=r"init.upscale: unknown key 'expnad' \(known: expand, layers, m, n, zero_new\)"):
        train_config_from_dict({"model": {"preset": "tiny"}, "init": {"upscale": {"expnad": 2}}})
    code = convert.main(["upscale", "--hf", str(base8), "--out", str(tmp_path / "o"), "--expand", "3"])
    assert code == 2 and "expand=3 must divide the base's depth of 8 layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
