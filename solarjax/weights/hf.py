"""Hugging Face <-> solarjax: config.json both ways, an explicit tensor name map, and tensor-by-tensor
reading and writing of (sharded) safetensors.

HF stores q_proj/k_proj already permuted for rotate-half RoPE, which is the convention model.py
implements, so every weight converts by a rename, a transpose and a reshape. No torch at run time;
torch is used only to read legacy pytorch_model.bin files when it is installed.

It is one module because config.json, the name map and both directions of the conversion must
agree: a new architecture or tensor changes all of them, and tests/test_hf.py's round trips check
them together; every HF directory solarjax writes goes through write_hf_dir here.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from jax.sharding import SingleDeviceSharding
from tqdm.auto import tqdm

from solarjax.errors import ConfigError, SolarjaxError
from solarjax.files import atomic_output_dir
from solarjax.model import decoder as model_lib
from solarjax.model.config import ROPE_SCALING_KEYS, ModelConfig
from solarjax.sharding import param_shardings
from solarjax.tokenizer import SPECIAL_IDS_FILE, TOKENIZER_FILES, has_tokenizer, load_tokenizer
from solarjax.weights.tensorfile import SafetensorsFile, SafetensorsWriter, TensorFileError, TensorInfo, plan_shards

ARCHITECTURES = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_ARCHITECTURES = {v: k for k, v in ARCHITECTURES.items()}
SAVE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16)}
# Buffers some older checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class ConversionError(SolarjaxError):
    """An HF checkpoint or config does not match what solarjax expects; the message names it."""


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(d: dict, where: str = "config.json", param_dtype: str = "float32") -> ModelConfig:
    archs = d.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConversionError(f"{where}: architectures {archs} is not supported; expected one of "
                              f"{sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[archs[0]]
    if d.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {d['hidden_act']!r} is not supported; expected 'silu'")
    if arch != "qwen2":  # Qwen2's biases are fixed by the architecture; these keys do not exist there
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ConversionError(f"{where}: {key}={d[key]} is not supported; expected false")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise ConversionError(f"{where}: missing key {key!r}")
    if arch == "qwen2":
        _check_qwen2_window(d, where)
    theta, scaling = _rope_from_hf(d, where)
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"), rope_theta=theta, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            sliding_window=d.get("sliding_window") if arch == "mistral" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), rope_scaling=scaling,
            qkv_bias=arch == "qwen2", initializer_range=d.get("initializer_range", 0.02), param_dtype=param_dtype)
    except ConfigError as e:
        raise ConversionError(f"{where}: {e}") from None


def _rope_from_hf(d: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from `rope_scaling` (transformers 4: key `type` or `rope_type`,
    theta beside it) or `rope_parameters` (transformers 5: theta inside), read as transformers 5
    does: rope_scaling wins when both are set."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)  # transformers 5 writes both when it read the old form
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial not in (None, 1.0):
        raise ConversionError(f"{where}: partial_rotary_factor={partial} is not supported; expected 1.0 (RoPE on "
                              f"the whole head)")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise ConversionError(f"{where}: {key} of type {kind!r} is not supported; expected one of "
                              f"{['default', *sorted(ROPE_SCALING_KEYS)]}")
    if kind in ("llama3", "yarn"):  # transformers' default when it is missing
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return theta, {"rope_type": kind, **params}


def _check_qwen2_window(d: dict, where: str) -> None:
    """Qwen2's sliding window applies to layers >= max_window_layers when use_sliding_window is
    set (or to the layers `layer_types` names); any sliding layer is refused, since solarjax has one
    window for all layers. With use_sliding_window false (every released Qwen2/2.5) nothing slides."""
    L = d["num_hidden_layers"]
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    first = d.get("max_window_layers", 28)
    types = d.get("layer_types") or ["sliding_attention" if window is not None and i >= first else "full_attention"
                                     for i in range(L)]
    sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    if sliding:
        raise ConversionError(f"{where}: use_sliding_window={d.get('use_sliding_window')} with sliding_window="
                              f"{d.get('sliding_window')}, max_window_layers={first} gives layers {sliding} "
                              f"({types[sliding[0]]}) a sliding window, which is not supported for Qwen2; "
                              f"expected use_sliding_window=false")


def default_arch(config: ModelConfig) -> str:
    """Qwen2 for q/k/v biases (no other form has them), else Mistral when a sliding window must be
    expressed, else Llama (SOLAR's published form)."""
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if config.sliding_window is not None else "llama"


def config_to_hf(config: ModelConfig, arch: str, dtype: str = "float32", special_ids: dict | None = None) -> dict:
    """config.json for `config`; `special_ids` (from `special_ids(source)`) gives bos/eos/pad_token_id.
    RoPE is written in both transformers 5's form (rope_parameters) and 4's (rope_theta +
    rope_scaling), so either reads the same model."""
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(f"--arch {arch!r} is not supported; expected one of {sorted(HF_ARCHITECTURES)}")
    if config.qkv_bias != (arch == "qwen2"):
        have = "has q/k/v biases, which only" if config.qkv_bias else "has no q/k/v biases, which"
        raise ConversionError(f"--arch {arch}: the model {have} Qwen2 has; expected --arch "
                              f"{default_arch(config) if config.qkv_bias else 'llama or mistral'}")
    max_pos, window = config.max_position_embeddings, config.sliding_window
    if arch != "mistral" and window is not None:
        if config.rope.get("rope_type") == "dynamic":  # dynamic NTK scales with max_position_embeddings
            raise ConversionError(f"--arch {arch}: a sliding window with dynamic RoPE scaling has no {arch} form "
                                  f"(capping max_position_embeddings at the window would change the RoPE); "
                                  f"expected --arch mistral")
        # Llama has no sliding window; with positions capped at the window the two models compute
        # the same function, which is how SOLAR-10.7B was published (4096 positions, no window).
        max_pos, window = min(max_pos, window), None
    rope = config.rope or {"rope_type": "default"}
    d = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": max_pos,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": config.rope or None, "rope_parameters": {"rope_theta": config.rope_theta, **rope},
        "tie_word_embeddings": config.tie_word_embeddings,
        **{k: v for k, v in (special_ids or {}).items() if v is not None},
        "initializer_range": config.initializer_range, "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
        "torch_dtype": dtype,
    }
    if arch == "mistral":
        d["sliding_window"] = window
    elif arch == "llama":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:  # Qwen2: no layer slides (config_from_hf refuses models where one does)
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
        if config.to_dict()["head_dim"] is None:  # Qwen2's config has head_dim only when it is given
            del d["head_dim"]
    return d


# ---------------------------------------------------------------------------------------------
# The name map


@dataclass(frozen=True)
class WeightSpec:
    hf_name: str
    path: tuple[str, ...]  # key path in the solarjax params tree
    layer: int | None  # index on the stacked layer axis, None for unstacked leaves
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # solarjax shape of one layer's slice
    transpose: bool  # HF Linear weights are [out, in]; solarjax kernels are [in, ...out]

    def to_solarjax(self, hf_array: np.ndarray) -> np.ndarray:
        """A view when possible (transpose and axis splits don't copy)."""
        return hf_array.T.reshape(self.shape) if self.transpose else hf_array.reshape(self.shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return array.reshape(self.hf_shape[::-1]).T if self.transpose else array.reshape(self.hf_shape)

    def source_name(self, layer_map: list[int] | None) -> str:
        """The base model's tensor this one is read from when new layer i is base layer_map[i]."""
        if self.layer is None or layer_map is None:
            return self.hf_name
        return self.hf_name.replace(f"model.layers.{self.layer}.", f"model.layers.{layer_map[self.layer]}.", 1)


def weight_specs(config: ModelConfig) -> list[WeightSpec]:
    """Every HF tensor of the model, in HF's order, with where it lives in solarjax."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, K, E = config.num_heads, config.num_kv_heads, config.head_dim
    specs = [WeightSpec("model.embed_tokens.weight", ("embed_tokens",), None, (V, D), (V, D), False)]
    bias = config.qkv_bias  # Qwen2: each after its weight, in HF's order
    per_layer = [
        ("input_layernorm.weight", ("input_layernorm", "scale"), (D,), (D,), False),
        ("self_attn.q_proj.weight", ("self_attn", "q_proj"), (H * E, D), (D, H, E), True),
        *([("self_attn.q_proj.bias", ("self_attn", "q_bias"), (H * E,), (H, E), False)] if bias else []),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj"), (K * E, D), (D, K, E), True),
        *([("self_attn.k_proj.bias", ("self_attn", "k_bias"), (K * E,), (K, E), False)] if bias else []),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj"), (K * E, D), (D, K, E), True),
        *([("self_attn.v_proj.bias", ("self_attn", "v_bias"), (K * E,), (K, E), False)] if bias else []),
        ("self_attn.o_proj.weight", ("self_attn", "o_proj"), (D, H * E), (H, E, D), True),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (D,), (D,), False),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj"), (F, D), (D, F), True),
        ("mlp.up_proj.weight", ("mlp", "up_proj"), (F, D), (D, F), True),
        ("mlp.down_proj.weight", ("mlp", "down_proj"), (D, F), (F, D), True),
    ]
    for i in range(config.num_layers):
        for suffix, path, hf_shape, shape, transpose in per_layer:
            specs.append(WeightSpec(f"model.layers.{i}.{suffix}", ("layers",) + path, i, hf_shape, shape,
                                    transpose))
    specs.append(WeightSpec("model.norm.weight", ("norm", "scale"), None, (D,), (D,), False))
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head",), None, (V, D), (D, V), True))
    return specs


# ---------------------------------------------------------------------------------------------
# Reading


class HFCheckpoint:
    """The tensors of an HF model directory, opened lazily: safetensors (single or sharded, memory-
    mapped) or, when torch is installed, pytorch_model.bin (loaded with weights_only=True)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{self.path}: no config.json; expected a Hugging Face model directory")
        try:
            self.hf_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_file}: not valid JSON: {e}") from None
        self._where: dict[str, str] = {}  # tensor name -> file name
        self._files: dict[str, object] = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.path / index_name
            if index.is_file():
                try:
                    self._where = dict(json.loads(index.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConversionError(f"{index}: not a valid index ({e})") from None
                break
            if (self.path / single).is_file():
                self._where = {name: single for name in self._open(single).keys()}
                break
        else:
            raise ConversionError(f"{self.path}: no model.safetensors, model.safetensors.index.json or "
                                  f"pytorch_model.bin")
        for name in set(self._where.values()):
            self._open(name)  # validates every file's header and size up front

    def _open(self, file_name: str):
        if file_name not in self._files:
            file = self.path / file_name
            if not file.is_file():
                raise ConversionError(f"{file}: listed in the index but missing")
            if file_name.endswith(".safetensors"):
                try:
                    self._files[file_name] = SafetensorsFile(file)
                except TensorFileError as e:
                    raise ConversionError(str(e)) from None
            else:
                self._files[file_name] = _TorchFile(file)
        return self._files[file_name]

    @property
    def is_safetensors(self) -> bool:
        return all(name.endswith(".safetensors") for name in self._files)

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str):
        return self._open(self._where[name])

    def info(self, name: str) -> TensorInfo:
        return self.file_of(name).info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info(name).shape)

    def get(self, name: str) -> np.ndarray:
        return self.file_of(name).get(name)

    def check(self, config: ModelConfig) -> list[WeightSpec]:
        """The name map for `config`, after checking that the tensors are exactly those, in shape."""
        specs = weight_specs(config)
        expected = {s.hf_name for s in specs}
        for spec in specs:
            if spec.hf_name not in self._where:
                raise ConversionError(f"{self.path}: missing tensor {spec.hf_name!r} (shape {list(spec.hf_shape)})")
            found = self.shape(spec.hf_name)
            if found != spec.hf_shape:
                raise ConversionError(f"{self.path}/{self._where[spec.hf_name]}: tensor {spec.hf_name!r} has "
                                      f"shape {list(found)}, expected {list(spec.hf_shape)}")
        for name in self._where:
            tied_head = name == "lm_head.weight" and config.tie_word_embeddings
            if name not in expected and not tied_head and not name.endswith(_IGNORED_SUFFIXES):
                raise ConversionError(f"{self.path}/{self._where[name]}: unexpected tensor {name!r}")
        return specs


class _TorchFile:
    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{path}: reading pytorch_model.bin needs torch; install torch or convert "
                                  f"the checkpoint to safetensors") from None
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for damaged files
            raise ConversionError(f"{path}: cannot load: {e}") from None

    def keys(self):
        return list(self._tensors)

    def info(self, name):
        return TensorInfo(name, tuple(self._tensors[name].shape), self.get(name).dtype)

    def get(self, name):
        import torch
        t = self._tensors[name]
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def load_hf(path: str | Path, mesh=None, param_dtype: str = "float32",
            layer_map: list[int] | None = None) -> tuple[ModelConfig, dict]:
    """Reads an HF Mistral/Llama/Qwen2 directory into (config, params).

    With a mesh, each device's shard is read straight from the memory-mapped files into its place,
    so no host ever holds a whole stacked layer leaf; without one, params land on the default device.
    layer_map (from solarjax.weights.upscale) builds a deeper model whose layer i is base layer layer_map[i].
    """
    ckpt = HFCheckpoint(path)
    config = config_from_hf(ckpt.hf_config, str(Path(path) / "config.json"), param_dtype)
    ckpt.check(config)
    if layer_map is not None:
        config = config.replace(num_layers=len(layer_map))
    specs = weight_specs(config)
    boxed = model_lib.abstract_params(config)
    if mesh is not None:
        shardings = param_shardings(boxed, mesh)
    else:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    by_path: dict[tuple[str, ...], list[WeightSpec]] = {}
    for spec in specs:
        by_path.setdefault(spec.path, []).append(spec)
    dtype = jax.numpy.dtype(param_dtype)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))
    flat_shardings = jax.tree.leaves(shardings)
    out = []
    bar = tqdm(total=len(specs), desc=f"reading {Path(path).name}", unit="tensor", disable=None)
    for (key_path, leaf), sharding in zip(leaves, flat_shardings):
        path_names = tuple(k.key for k in key_path)
        group = by_path[path_names]

        def read(index, group=group):
            def one(spec, sub):
                return np.asarray(spec.to_solarjax(ckpt.get(spec.source_name(layer_map)))[sub], dtype)
            if group[0].layer is None:
                return one(group[0], index)
            return np.stack([one(group[i], index[1:]) for i in range(len(group))[index[0]]])

        out.append(jax.make_array_from_callback(leaf.shape, sharding, read))
        bar.update(len(group))
    bar.close()
    return config, jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Writing


def _host_slice(leaf: jax.Array, spec: WeightSpec) -> np.ndarray:
    """One HF tensor's worth of a params leaf on the host (one layer of a stacked leaf)."""
    array = leaf[spec.layer] if spec.layer is not None else leaf
    return np.asarray(jax.device_get(array))


def save_hf(config: ModelConfig, params: dict, out: str | Path, arch: str | None = None,
            dtype: str | None = None, shard_size: int = 5 * 10**9, tokenizer_dir: str | Path | None = None,
            overwrite: bool = False, inputs=()) -> Path:
    """Writes config.json and (sharded) safetensors, tensor by tensor, atomically. `out` may not
    overlap `inputs` or tokenizer_dir (tensorfile.check_output). tokenizer_dir (the source model's
    directory) also gives the bos/eos/pad ids and, when dtype is None, the dtype (else float32)."""
    arch = arch or default_arch(config)
    dtype = dtype or source_dtype(tokenizer_dir) or "float32"
    if dtype not in SAVE_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; expected one of {sorted(SAVE_DTYPES)}")
    hf_config = config_to_hf(config, arch, dtype, special_ids(tokenizer_dir))
    if arch == "llama" and config.sliding_window is not None:
        print(f"note: Llama has no sliding window; writing max_position_embeddings="
              f"{hf_config['max_position_embeddings']} so the model computes the same function", file=sys.stderr)
    np_dtype = SAVE_DTYPES[dtype]
    specs = weight_specs(config)
    spec_by_name = {s.hf_name: s for s in specs}

    def write(writer: SafetensorsWriter, info: TensorInfo) -> None:
        spec = spec_by_name[info.name]
        node = params
        for key in spec.path:
            node = node[key]
        writer.write_array(spec.to_hf(_host_slice(node, spec)).astype(np_dtype))
    return write_hf_dir(out, [TensorInfo(s.hf_name, s.hf_shape, np_dtype) for s in specs], write, hf_config,
                        tokenizer_dir, shard_size=shard_size, overwrite=overwrite, inputs=(*inputs, tokenizer_dir),
                        desc=f"writing {Path(out).name}")


def write_hf_dir(out: str | Path, infos: list[TensorInfo], write: Callable[[SafetensorsWriter, TensorInfo], None],
                 hf_config: dict, tokenizer_dir: str | Path | None, *, shard_size: int, overwrite: bool,
                 inputs=(), desc: str = "", readme: str | None = None) -> Path:
    """An HF model directory, written atomically (tensorfile.atomic_output_dir; `out` may not
    overlap `inputs`): config.json, the tensors `infos` in safetensors shards of at most shard_size
    bytes, each put into its shard's writer by write(writer, info) in order (so memory holds one
    tensor), model.safetensors.index.json when sharded, tokenizer_dir's tokenizer files and
    generation_config.json, and README.md when given. save_hf, upscale_hf and merge_hf write this way."""
    shards = plan_shards(infos, shard_size)
    names = shard_file_names(len(shards))
    with atomic_output_dir(out, overwrite, inputs) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        bar = tqdm(total=sum(i.nbytes for i in infos), desc=desc, unit="B", unit_scale=True, disable=None)
        for name, shard in zip(names, shards):
            with SafetensorsWriter(tmp / name, shard, metadata={"format": "pt"}) as writer:
                for info in shard:
                    write(writer, info)
                    bar.update(info.nbytes)
        bar.close()
        write_index(tmp, shards, names)
        copy_tokenizer_files(tokenizer_dir, tmp)
        if readme is not None:
            (tmp / "README.md").write_text(readme)
    return Path(out)


def shard_file_names(count: int) -> list[str]:
    """HF's names: model.safetensors alone, else model-0000i-of-0000n.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, shards: list[list[TensorInfo]], names: list[str]) -> None:
    """model.safetensors.index.json, which HF expects when there is more than one shard."""
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for shard in shards for i in shard)},
                 "weight_map": {i.name: n for n, shard in zip(names, shards) for i in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_ids(src: str | Path | None) -> dict:
    """The bos/eos/pad ids a model written from `src` declares in config.json: those of src's own
    config.json (an HF directory) or special_ids.json (a solarjax checkpoint), else its tokenizer's,
    else the default Mistral tokenizer's. Never assumed: a Llama 3 keeps 128000 / [128001, 128009]."""
    for name in ("config.json", SPECIAL_IDS_FILE):
        if src is not None and (Path(src) / name).is_file():
            d = json.loads((Path(src) / name).read_text())
            if any(k in d for k in SPECIAL_KEYS):
                return {k: d.get(k) for k in SPECIAL_KEYS}
    return load_tokenizer(src if has_tokenizer(src) else None).special_ids()


def source_dtype(src: str | Path | None) -> str | None:
    """The dtype a model written from `src` keeps: its config.json's `dtype` (`torch_dtype` before
    transformers 5), or the one special_ids.json recorded from there; None when neither says."""
    for name in ("config.json", SPECIAL_IDS_FILE):
        if src is not None and (Path(src) / name).is_file():
            d = json.loads((Path(src) / name).read_text())
            value = d.get("dtype") or d.get("torch_dtype")
            if value in SAVE_DTYPES:
                return value
    return None


def copy_tokenizer_files(src: str | Path | None, dst: Path, special_ids_file: bool = False) -> list[str]:
    """The tokenizer files (and generation_config.json) of `src`; with special_ids_file (solarjax
    checkpoints), also special_ids.json with the source's bos/eos/pad ids and dtype, for jax-to-hf."""
    copied = []
    if src is not None:
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, dst / name)
                copied.append(name)
        if special_ids_file:
            dtype = source_dtype(src)
            record = {**special_ids(src), **({"dtype": dtype} if dtype else {})}
            (dst / SPECIAL_IDS_FILE).write_text(json.dumps(record) + "\n")
    return copied
