"""HF <-> solarjax conversion: bit-exact round trips, loading back into transformers, and clear errors."""

import json
import os
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import solarjax
from solarjax.cli import convert
from solarjax.errors import ConfigError, OutputExistsError
from solarjax.files import atomic_output_dir
from solarjax.weights import checkpoint, hf
from solarjax.weights.tensorfile import SafetensorsFile

from hf_models import KINDS, hf_logits, make_hf_model, save_hf_model, save_kind, tokenizer_file


def _hf_tensors(path):
    """Every tensor of an HF directory, read by the safetensors package itself (not our reader)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run(argv, capsys):
    code = convert.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(dtype, sharded, tmp_path, capsys, monkeypatch):
    torch_dtype = getattr(torch, dtype)
    model = make_hf_model("mistral", dtype=torch_dtype, head_dim=32, sliding_window=8, rope_theta=50000.0)
    src = save_hf_model(model, tmp_path / "hf", **({"max_shard_size": "60KB"} if sharded else {}))
    shutil.copy(tokenizer_file(), src / "tokenizer.model")
    assert (src / "model.safetensors.index.json").exists() == sharded

    devices = []  # conversion spreads the weights over every local device, not device 0 alone
    for module, name in ((checkpoint, "save_params"), (hf, "save_hf")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **k: (devices.extend(
            len(x["layers"]["mlp"]["up_proj"].sharding.device_set) for x in a if isinstance(x, dict)), real(*a, **k))[1])
    code, err = _run(["hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == tokenizer_file().read_bytes()
    shard = ["--shard-size", "60KB"] if sharded else []
    code, err = _run(["jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back", "--dtype", dtype]
                     + shard, capsys)
    assert code == 0, err
    back = tmp_path / "back"
    assert (back / "model.safetensors.index.json").exists() == sharded
    if sharded:
        assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    assert (back / "tokenizer.model").exists()
    assert devices == [len(jax.devices())] * 2

    want, got = _hf_tensors(src), _hf_tensors(back)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch_dtype, name
        assert torch.equal(got[name].view(torch.uint8 if dtype == "float32" else torch.int16).flatten(),
                           tensor.view(torch.uint8 if dtype == "float32" else torch.int16).flatten()), name

    # Both loaded the same way: a model cast with .to(bfloat16) also rounds its rotary buffer.
    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                                 attn_implementation="eager").eval()
    reloaded = load(back)
    assert type(reloaded).__name__ == "MistralForCausalLM"
    assert reloaded.config.sliding_window == 8 and reloaded.config.head_dim == 32
    tokens = np.random.RandomState(0).randint(0, 128, (2, 20))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(load(src), tokens))


def test_llama_round_trip_and_solar_form_from_mistral(tmp_path):
    """A Llama model stays Llama; a Mistral model with a window is written as SOLAR's Llama form."""
    llama = make_hf_model("llama", num_key_value_heads=1)
    config, params = solarjax.load_hf(save_hf_model(llama, tmp_path / "llama"))
    hf.save_hf(config, params, tmp_path / "llama-back")
    assert json.loads((tmp_path / "llama-back" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    mistral = make_hf_model("mistral", sliding_window=16, max_position_embeddings=256)
    config, params = solarjax.load_hf(save_hf_model(mistral, tmp_path / "mistral"))
    hf.save_hf(config, params, tmp_path / "as-llama", arch="llama")
    d = json.loads((tmp_path / "as-llama" / "config.json").read_text())
    assert d["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in d
    assert d["max_position_embeddings"] == 16
    as_llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as-llama",
                                                                 attn_implementation="eager").eval()
    tokens = np.random.RandomState(0).randint(0, 128, (1, 16))
    np.testing.assert_allclose(hf_logits(as_llama, tokens), hf_logits(mistral, tokens), atol=1e-5)


def _hf_config(path) -> dict:
    """config.json as transformers reads it (either RoPE form becomes rope_parameters)."""
    d = transformers.AutoConfig.from_pretrained(path).to_dict()
    d.pop("_name_or_path")
    d["rope_parameters"].pop("type", None)  # transformers keeps this alias when it read rope_scaling {"type": ...}
    return d


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_model_kind_round_trips_bit_exact_with_its_config(kind, tmp_path, capsys):
    """HF -> solarjax -> HF with no options: the same tensors bit for bit and every config field
    transformers reads (architecture, RoPE scaling, tie_word_embeddings, dtype, bos/eos/pad ids,
    initializer_range ...), except Qwen2's max_window_layers, which is inert when nothing slides
    and is written as the depth. The Qwen2 model is bfloat16 and stays so without --dtype."""
    dtype = torch.bfloat16 if kind == "qwen2-tied" else torch.float32
    _, src = save_kind(kind, tmp_path / "hf", dtype=dtype)
    for argv in (["hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt"],
                 ["jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back"]):
        code, err = _run(argv, capsys)
        assert code == 0, err
    want, got = _hf_tensors(src), _hf_tensors(tmp_path / "back")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == dtype and torch.equal(got[name], tensor), name
    assert ("model.layers.1.self_attn.v_proj.bias" in want) == (kind == "qwen2-tied")
    theirs, ours = _hf_config(src), _hf_config(tmp_path / "back")
    if kind == "qwen2-tied":
        assert theirs.pop("max_window_layers") == 28 and ours.pop("max_window_layers") == 2
    assert ours == theirs
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert theirs["dtype"] == written["dtype"] == str(dtype).removeprefix("torch.")
    assert written["architectures"] == ["Qwen2ForCausalLM" if kind == "qwen2-tied" else "LlamaForCausalLM"]


def test_reads_pytorch_model_bin(tmp_path):
    model = make_hf_model("llama", dtype=torch.bfloat16)
    src = save_hf_model(model, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    config, params = solarjax.load_model(src)
    tokens = np.random.RandomState(0).randint(0, 128, (1, 12))
    # A fresh float32 load: the bf16 model's rotary buffer was rounded to bf16 too.
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ref = hf_logits(ref_model, tokens)
    assert np.abs(np.asarray(solarjax.logits(config, params, tokens)) - ref).max() <= 1e-4


def test_checkpoint_round_trip_through_load_model(tmp_path):
    config = solarjax.preset("tiny")
    params = solarjax.init_params(config, __import__("jax").random.key(0))
    solarjax.save_params(tmp_path / "ckpt", config, params)
    config2, params2 = solarjax.load_model(tmp_path / "ckpt")
    assert config2 == config
    for a, b in zip(__import__("jax").tree.leaves(params), __import__("jax").tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Bad input: each stops with one line naming the key or tensor, and leaves no output behind.


@pytest.fixture
def tiny_hf(tmp_path):
    return save_hf_model(make_hf_model("mistral"), tmp_path / "hf")


def _edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def _rewrite_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _expect_error(tiny_hf, tmp_path, capsys, *patterns):
    out = tmp_path / "out"
    code, err = _run(["hf-to-jax", "--hf", tiny_hf, "--out", out], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    return lines[0]


def test_error_unknown_architecture(tiny_hf, tmp_path, capsys):
    _edit_config(tiny_hf, architectures=["GPT2LMHeadModel"])
    _expect_error(tiny_hf, tmp_path, capsys, "architectures", "GPT2LMHeadModel", "MistralForCausalLM")


@pytest.mark.parametrize("changes, patterns", [
    # Phi-3's longrope, in either config form
    (dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                           "original_max_position_embeddings": 64, "rope_theta": 1e4}),
     ["rope_parameters of type 'longrope' is not supported", "'llama3'"]),
    (dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
     ["rope_scaling of type 'longrope' is not supported"]),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
     ["rope_type 'llama3' needs key 'low_freq_factor'"]),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "mscale": 1.0}),
     ["key 'mscale' is not used by rope_type 'linear'"]),
    (dict(partial_rotary_factor=0.5), ["partial_rotary_factor=0.5 is not supported"]),
    (dict(architectures=["Gemma2ForCausalLM"]), ["architectures ['Gemma2ForCausalLM'] is not supported",
                                                 "Qwen2ForCausalLM"]),
    (dict(architectures=["MixtralForCausalLM"]), ["architectures ['MixtralForCausalLM'] is not supported"]),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=16, max_window_layers=1),
     ["use_sliding_window=True with sliding_window=16, max_window_layers=1 gives layers [1]", "Qwen2"]),
    (dict(attention_bias=True), ["attention_bias=True is not supported"]),
])
def test_error_unsupported_models_name_the_key(tiny_hf, tmp_path, capsys, changes, patterns):
    _edit_config(tiny_hf, **changes)
    _expect_error(tiny_hf, tmp_path, capsys, *patterns)


def test_error_missing_tensor(tiny_hf, tmp_path, capsys):
    _rewrite_tensors(tiny_hf, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _expect_error(tiny_hf, tmp_path, capsys, "missing tensor", "model.layers.1.mlp.up_proj.weight", "[96, 64]")


def test_error_unexpected_tensor(tiny_hf, tmp_path, capsys):
    _rewrite_tensors(tiny_hf, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}))
    _expect_error(tiny_hf, tmp_path, capsys, "unexpected tensor", "model.layers.2.mlp.up_proj.weight")


def test_error_wrong_shape(tiny_hf, tmp_path, capsys):
    _edit_config(tiny_hf, intermediate_size=128)
    _expect_error(tiny_hf, tmp_path, capsys, "model.layers.0.mlp.gate_proj.weight", "[96, 64]", "expected [128, 64]")


def test_error_truncated_file(tiny_hf, tmp_path, capsys):
    f = tiny_hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    line = _expect_error(tiny_hf, tmp_path, capsys, "model.safetensors", "truncated")
    assert "tensor '" in line  # names the first tensor that does not fit


def test_error_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", tmp_path, capsys, "no config.json")


def test_error_bad_shard_size_and_existing_output(tiny_hf, tmp_path, capsys):
    assert _run(["hf-to-jax", "--hf", tiny_hf, "--out", tmp_path / "ckpt"], capsys)[0] == 0
    code, err = _run(["jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "o", "--shard-size", "5XB"],
                     capsys)
    assert code == 2 and "shard size '5XB'" in err
    code, err = _run(["hf-to-jax", "--hf", tiny_hf, "--out", tmp_path / "ckpt"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert _run(["hf-to-jax", "--hf", tiny_hf, "--out", tmp_path / "ckpt", "--overwrite"], capsys)[0] == 0


def test_failure_mid_write_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    config, params = solarjax.load_hf(tiny_hf)
    calls = {"n": 0}
    real = hf.SafetensorsWriter

    def failing(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hf, "SafetensorsWriter", failing)
    with pytest.raises(OSError, match="disk full"):
        hf.save_hf(config, params, tmp_path / "out", shard_size=20_000)
    assert calls["n"] == 2
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


_WRITER = """
import os, signal, sys
from pathlib import Path
from solarjax import files
out, kill_at = Path(sys.argv[1]), sys.argv[2]
rename = Path.rename
def dying_rename(self, target):  # SIGKILL just as the new output would be renamed into place
    if kill_at == "placing" and Path(target) == out:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)
Path.rename = dying_rename
with files.atomic_output_dir(out, overwrite=True) as tmp:
    (tmp / "weights").write_text("new")
    if kill_at == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kill_at", ["writing", "placing"])
def test_overwrite_killed_at_any_point_leaves_an_output_and_no_leftovers(kill_at, tmp_path):
    """--overwrite moves the old output aside, renames the new one in, then deletes the old (it
    deleted the old first: a crash before the rename left nothing). A writer killed while writing
    or while placing leaves hidden folders; the next write to the same output finds the writer
    dead (this host, no such pid), puts the old output back if it is all there is, and removes the
    rest. Another host's temporaries and a live process's are left alone."""
    import signal
    import subprocess
    import sys
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    from solarjax.files import _here
    others = [tmp_path / f".out.tmp-other_host_abc123-{os.getpid()}-0123abcd",
              tmp_path / f".out.tmp-{_here()}-{live.pid}-0123abcd"]
    for path in others:
        path.mkdir()
    try:
        run = subprocess.run([sys.executable, "-c", _WRITER, str(out), kill_at], capture_output=True, timeout=120)
        assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
        left = sorted(p.name.split("-")[0] for p in tmp_path.glob(".out.*") if p not in others)
        assert left == ([".out.tmp"] if kill_at == "writing" else [".out.old", ".out.tmp"])
        # The next command on the same output, without --overwrite: the old output is there again.
        with pytest.raises(OutputExistsError, match="already exists"):
            with atomic_output_dir(out):
                pass
        assert (out / "weights").read_text() == "old"
        assert sorted(tmp_path.glob(".out.*")) == sorted(others)
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "weights").write_text("newer")
        assert (out / "weights").read_text() == "newer" and sorted(tmp_path.glob(".out.*")) == sorted(others)
    finally:
        live.kill()


def test_overwrite_whose_rename_fails_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    rename = Path.rename

    def failing(self, target):
        if Path(target) == out and ".tmp-" in self.name:
            raise OSError("no space left")
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="no space left"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old" and not list(tmp_path.glob(".out.*"))


def test_safetensors_reader_matches_reference_library(tiny_hf):
    """Our memory-mapped reader returns what the safetensors package returns."""
    ours = SafetensorsFile(tiny_hf / "model.safetensors")
    ref = load_file(tiny_hf / "model.safetensors")
    assert sorted(ours.keys()) == sorted(ref)
    for name, tensor in ref.items():
        np.testing.assert_array_equal(ours.get(name), tensor.numpy())
    (n,) = struct.unpack("<Q", (tiny_hf / "model.safetensors").read_bytes()[:8])
    assert ours.metadata == {"format": "pt"} and n > 0


@pytest.mark.slow
def test_convert_weights_script_runs_as_a_program(tiny_hf, tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "convert_weights.py"
    run = subprocess.run([sys.executable, str(script), "hf-to-jax", "--hf", str(tiny_hf), "--out",
                          str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert solarjax.load_model(tmp_path / "ckpt")[0].num_layers == 2
    run = subprocess.run([sys.executable, str(script), "jax-to-hf", "--ckpt", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "not a solarjax checkpoint" in run.stderr


def test_tensor_over_2gib_is_written_whole(tmp_path):
    """One write() stops at 2,147,479,552 bytes on Linux; the writer must loop until all is written."""
    from solarjax.weights.tensorfile import SafetensorsWriter, TensorInfo
    n = 2_200_000_000
    big = np.zeros(n, np.uint8)  # calloc'd: untouched pages cost no memory, even while written
    marks = [0, 2_147_479_552 - 4096, 2**31, n - 4096]  # the start, where write() stops, 2 GiB, the end
    rng = np.random.default_rng(0)
    for at in marks:
        big[at:at + 4096] = rng.integers(1, 256, 4096, dtype=np.uint8)
    infos = [TensorInfo("small", (3,), np.dtype(np.float32)), TensorInfo("big", (n,), np.dtype(np.uint8))]
    with SafetensorsWriter(tmp_path / "big.safetensors", infos) as writer:
        writer.write_array(np.arange(3, dtype=np.float32))
        writer.write_array(big)
    back = SafetensorsFile(tmp_path / "big.safetensors").get("big")  # checks the file holds every byte
    for at in marks:
        np.testing.assert_array_equal(back[at:at + 4096], big[at:at + 4096])
    assert np.count_nonzero(back) == np.count_nonzero(big)  # and everywhere else, the zeros
    (tmp_path / "big.safetensors").unlink()  # pytest keeps recent tmp dirs; 2.2 GB should not linger


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("relation", ["is", "lies inside", "contains"])
@pytest.mark.parametrize("command", ["hf-to-jax", "jax-to-hf", "upscale"])
def test_output_never_overlaps_the_input_even_with_overwrite(command, relation, tiny_hf, tmp_path, capsys):
    source = tmp_path / "work" / "input"
    if command == "jax-to-hf":
        assert _run(["hf-to-jax", "--hf", tiny_hf, "--out", source], capsys)[0] == 0
        flags = ["--ckpt", source]
    else:
        shutil.copytree(tiny_hf, source)
        flags = ["--hf", source] + (["--layers", "0:2,0:2"] if command == "upscale" else [])
    out = {"is": source, "lies inside": source / "sub", "contains": source.parent}[relation]
    before = _snapshot(source)
    code, err = _run([command, *flags, "--out", out, "--overwrite"], capsys)
    assert code == 2 and f"output {out} {relation} the input {source}" in err, err
    assert _snapshot(source) == before


def test_writers_refuse_outputs_that_overlap_their_inputs(tiny_hf):
    """The library calls refuse too, not only the CLI; the tokenizer directory counts as an input."""
    from solarjax.weights.upscale import UpscaleSpec, upscale_hf
    config, params = solarjax.load_hf(tiny_hf)
    before = _snapshot(tiny_hf)
    with pytest.raises(ConfigError, match=f"output {tiny_hf} is the input {tiny_hf}"):
        solarjax.save_params(tiny_hf, config, params, tokenizer_dir=tiny_hf, overwrite=True)
    with pytest.raises(ConfigError, match=f"output {tiny_hf / 'hf'} lies inside the input {tiny_hf}"):
        solarjax.save_hf(config, params, tiny_hf / "hf", inputs=[tiny_hf])
    with pytest.raises(ConfigError, match=f"output {tiny_hf.parent} contains the input {tiny_hf}"):
        upscale_hf(tiny_hf, tiny_hf.parent, UpscaleSpec(layers="0:2"), overwrite=True)
    assert _snapshot(tiny_hf) == before


def test_special_ids_survive_conversion_and_upscaling(tmp_path, capsys):
    """A model whose bos/eos/pad are not 1/2 (Llama 3 style, several EOS ids) keeps them through
    hf-to-jax -> jax-to-hf and upscale, with its tokenizer files and generation_config.json."""
    from hf_models import make_bpe_tokenizer
    ids = {"bos_token_id": 300, "eos_token_id": [301, 304], "pad_token_id": 305}
    src = save_hf_model(make_hf_model("llama", vocab_size=320, **ids), tmp_path / "hf")
    make_bpe_tokenizer(src)
    code, err = _run(["hf-to-jax", "--hf", src, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ckpt" / "special_ids.json").read_text()) == {**ids, "dtype": "float32"}
    code, err = _run(["jax-to-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "back"], capsys)
    assert code == 0, err
    code, err = _run(["upscale", "--hf", src, "--out", tmp_path / "up", "--layers", "0:2,0:2"], capsys)
    assert code == 0, err
    for out in (tmp_path / "back", tmp_path / "up"):
        config = transformers.AutoConfig.from_pretrained(out)
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (300, [301, 304], 305), out
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            assert (out / name).read_bytes() == (src / name).read_bytes(), (out, name)


def test_export_refuses_forms_that_are_not_the_same_model():
    """--arch chooses only between equivalent forms: Qwen2's biases have no Llama/Mistral form, and
    the SOLAR form's capped max_position_embeddings would change dynamic RoPE."""
    qwen2 = solarjax.preset("tiny").replace(qkv_bias=True)
    assert hf.default_arch(qwen2) == "qwen2"
    with pytest.raises(hf.ConversionError, match="--arch llama: the model has q/k/v biases, which only Qwen2 has"):
        hf.config_to_hf(qwen2, "llama")
    with pytest.raises(hf.ConversionError, match="--arch qwen2: the model has no q/k/v biases"):
        hf.config_to_hf(solarjax.preset("tiny"), "qwen2")
    windowed = solarjax.preset("tiny").replace(sliding_window=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(hf.ConversionError, match="a sliding window with dynamic RoPE scaling has no llama form"):
        hf.config_to_hf(windowed, "llama")
    assert hf.config_from_hf(hf.config_to_hf(windowed, "mistral")) == windowed
