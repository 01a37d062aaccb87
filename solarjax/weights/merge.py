"""Model merging with mergekit's linear and slerp semantics, streamed tensor by tensor to an HF directory.

Each output tensor is computed from the same tensor of every input (HF directories or solarjax
checkpoints), in float32, and written in the first model's dtype (or --dtype; for a checkpoint,
the dtype jax-to-hf would write: its HF source's):

  linear  sum_i w_i x_i / sum_i w_i  (mergekit's default `normalize: true`, so weights need not sum to 1)
  slerp   the whole tensor, flattened, as one vector: with a = the first model (mergekit's base_model,
          what t=0 gives) and b = the second, cos = <a/|a|, b/|b|> (a vector whose norm is <= EPS is
          left unnormalised); if |cos| > DOT_THRESHOLD the two are treated as parallel and lerped,
          (1-t) a + t b; else theta = arccos(cos) and the result is
          sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b.

The output carries the first model's config, tokenizer files and generation_config.json, like
mergekit's output carries its base model's.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from solarjax.errors import SolarjaxError
from solarjax.files import check_output
from solarjax.model.config import ModelConfig
from solarjax.weights import checkpoint, hf
from solarjax.weights.tensorfile import SafetensorsWriter, TensorInfo

DOT_THRESHOLD = 0.9995  # mergekit's: directions closer than this are treated as parallel
EPS = 1e-8  # mergekit's: a tensor with a norm at or below this is not normalised
METHODS = ("linear", "slerp")
# Fields that decide the tensors or the function they compute; all must agree across the inputs.
# max_position_embeddings is left out: it changes neither (the first model's is carried).
SAME_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "rope_theta", "rms_norm_eps", "sliding_window", "tie_word_embeddings", "rope_scaling",
               "qkv_bias")


class MergeError(SolarjaxError):
    """The inputs cannot be merged as asked; the message names the model, field or tensor."""


# ---------------------------------------------------------------------------------------------
# The two merges, on one tensor


def linear(tensors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """mergekit's linear merge of one tensor, in float32, accumulated one input at a time."""
    w = np.asarray(weights, np.float32)
    out = np.zeros(np.shape(tensors[0]), np.float32)
    for w_i, x in zip(w, tensors):
        out += w_i * np.asarray(x, np.float32)
    out /= w.sum()
    return out


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mergekit's slerp of one tensor pair from a (t=0) to b (t=1), in float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    norm_a, norm_b = np.linalg.norm(a.reshape(-1)), np.linalg.norm(b.reshape(-1))
    norm_a, norm_b = (n if n > EPS else np.float32(1) for n in (norm_a, norm_b))
    # Normalised before the product, as mergekit does, so a raw dot product cannot overflow.
    cos = np.clip(np.vdot(a / norm_a, b / norm_b), -1, 1)
    if abs(cos) > DOT_THRESHOLD:  # parallel (or antiparallel): sin(theta) ~ 0, so lerp instead
        coef_a, coef_b = np.float32(1 - t), np.float32(t)
    else:
        theta = np.arccos(cos)
        coef_a, coef_b = np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    return (coef_a * a + coef_b * b).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Inputs: an HF directory or a solarjax checkpoint, one tensor (in HF layout) at a time


class _HFModel:
    def __init__(self, path: Path):
        self.path = path
        self.files = hf.HFCheckpoint(path)
        self.config = hf.config_from_hf(self.files.hf_config, str(path / "config.json"))
        self.files.check(self.config)  # names a missing, unexpected or misshapen tensor
        self.architecture = self.files.hf_config["architectures"][0]

    def dtype(self, spec: hf.WeightSpec) -> np.dtype:
        return self.files.info(spec.hf_name).dtype

    def get(self, spec: hf.WeightSpec) -> np.ndarray:
        return self.files.get(spec.hf_name)  # a memory-mapped view


class _CheckpointModel:
    """Restores one stacked leaf (every layer of one weight) at a time and keeps only that one, so
    tensors must be asked for grouped by leaf (merge_hf does so when a checkpoint is among the inputs)."""

    architecture = None  # a checkpoint's config decides; it names no HF class

    def __init__(self, path: Path):
        self.path = path
        self.config = ModelConfig.load(path / checkpoint.CONFIG_FILE)
        self._checkpointer = ocp.PyTreeCheckpointer()
        tree = self._checkpointer.metadata(path.absolute() / "params").item_metadata.tree
        self._leaves = {}
        for spec in hf.weight_specs(self.config):
            node = tree
            for key in spec.path:
                if not isinstance(node, dict) or key not in node:
                    raise MergeError(f"{path}: the checkpoint has no parameter {'/'.join(spec.path)} "
                                     f"(tensor {spec.hf_name!r})")
                node = node[key]
            shape = (self.config.num_layers, *spec.shape) if spec.layer is not None else spec.shape
            if tuple(node.shape) != shape:
                raise MergeError(f"{path}: parameter {'/'.join(spec.path)} (tensor {spec.hf_name!r}) has shape "
                                 f"{list(node.shape)}, expected {list(shape)} from {checkpoint.CONFIG_FILE}")
            self._leaves[spec.path] = np.dtype(node.dtype)
        self._cached: tuple[tuple[str, ...], np.ndarray] | None = None

    def dtype(self, spec: hf.WeightSpec) -> np.dtype:
        return self._leaves[spec.path]

    def get(self, spec: hf.WeightSpec) -> np.ndarray:
        if self._cached is None or self._cached[0] != spec.path:
            self._cached = None  # free the previous leaf before reading the next
            item, args = 0, ocp.RestoreArgs(restore_type=np.ndarray)
            for key in reversed(spec.path):  # just this leaf, as a host array
                item, args = {key: item}, {key: args}
            restored = self._checkpointer.restore(
                self.path.absolute() / "params",
                args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
            for key in spec.path:
                restored = restored[key]
            self._cached = (spec.path, restored)
        leaf = self._cached[1]
        return spec.to_hf(leaf[spec.layer] if spec.layer is not None else leaf)


def open_model(path: str | Path):
    path = Path(path)
    if checkpoint.is_checkpoint(path):
        return _CheckpointModel(path)
    if (path / "config.json").is_file():
        return _HFModel(path)
    raise MergeError(f"{path}: neither a Hugging Face model directory (config.json) nor a solarjax checkpoint "
                     f"({checkpoint.CONFIG_FILE} + params/)")


def check_same(models) -> ModelConfig:
    """The shared config, after checking every model against the first."""
    first = models[0]
    for other in models[1:]:
        for field in SAME_FIELDS:
            a, b = getattr(first.config, field), getattr(other.config, field)
            if a != b:
                raise MergeError(f"{other.path}: {field}={b!r} differs from {first.path}'s {field}={a!r}; "
                                 f"merged models must have the same architecture")
        if first.architecture and other.architecture and first.architecture != other.architecture:
            raise MergeError(f"{other.path}: architecture {other.architecture} differs from {first.path}'s "
                             f"{first.architecture}")
    return first.config


# ---------------------------------------------------------------------------------------------
# The streamed merge


def check_method(method: str, n_models: int, weights=None, t=None) -> None:
    if method not in METHODS:
        raise MergeError(f"--method {method!r} is not supported; expected one of {list(METHODS)}")
    if n_models < 2:
        raise MergeError(f"merging needs at least two models, got {n_models}")
    if method == "linear":
        if t is not None:
            raise MergeError("--t is slerp's; a linear merge takes --weights")
        if weights is None or len(weights) != n_models:
            raise MergeError(f"--weights has {0 if weights is None else len(weights)} values for {n_models} models; "
                             f"give one per model, in order (e.g. --weights 0.3,0.7)")
        if not all(math.isfinite(w) for w in weights) or sum(weights) == 0:
            raise MergeError(f"--weights {list(weights)} must be finite numbers with a nonzero sum "
                             f"(the result is divided by it, as mergekit does)")
    else:
        if weights is not None:
            raise MergeError("--weights is linear's; a slerp merge takes --t")
        if n_models != 2:
            raise MergeError(f"slerp merges exactly two models (the first is t=0), got {n_models}")
        if t is None:
            raise MergeError("slerp needs --t, in [0, 1] (0 gives the first model, 1 the second)")
        if not 0 <= t <= 1:
            raise MergeError(f"--t {t!r} is outside [0, 1] (0 gives the first model, 1 the second)")


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise MergeError(f"--weights {text!r} is not a comma-separated list of numbers (e.g. 0.3,0.7)") from None


def merge_hf(paths: list[str | Path], out: str | Path, method: str, weights: list[float] | None = None,
             t: float | None = None, dtype: str | None = None, shard_size: int = 5 * 10**9,
             overwrite: bool = False) -> Path:
    """Merges `paths` (HF directories or solarjax checkpoints; the first is slerp's base and gives the
    config and tokenizer) into the HF directory `out`, one tensor at a time, atomically."""
    paths = [Path(p) for p in paths]
    check_output(out, paths)  # before reading anything
    check_method(method, len(paths), weights, t)
    if dtype is not None and dtype not in hf.SAVE_DTYPES:
        raise MergeError(f"--dtype {dtype!r} is not supported; expected one of {sorted(hf.SAVE_DTYPES)}")
    models = [open_model(p) for p in paths]
    config = check_same(models)
    first = models[0]
    if dtype is None and isinstance(first, _CheckpointModel):
        # jax-to-hf's default: the dtype the checkpoint recorded from its HF source (a bfloat16 model
        # stays bfloat16), not its float32 training copy.
        dtype = hf.source_dtype(first.path) or "float32"

    specs = hf.weight_specs(config)
    if any(isinstance(m, _CheckpointModel) for m in models):
        # A checkpoint holds every layer of a weight in one leaf: read each leaf once.
        order = {path: i for i, path in enumerate(dict.fromkeys(s.path for s in specs))}
        specs = sorted(specs, key=lambda s: (order[s.path], s.layer or 0))
    out_dtype = {s.hf_name: hf.SAVE_DTYPES[dtype] if dtype else first.dtype(s) for s in specs}
    spec_by_name = {s.hf_name: s for s in specs}

    def write(writer: SafetensorsWriter, info: TensorInfo) -> None:
        tensors = [m.get(spec_by_name[info.name]) for m in models]
        merged = linear(tensors, weights) if method == "linear" else slerp(t, *tensors)
        writer.write_array(merged.astype(info.dtype, copy=False))
    return hf.write_hf_dir(out, [TensorInfo(s.hf_name, s.hf_shape, out_dtype[s.hf_name]) for s in specs], write,
                           _out_config(first, config, dtype), first.path, shard_size=shard_size,
                           overwrite=overwrite, inputs=paths, desc=f"{method} merge of {len(models)} models",
                           readme=_model_card(paths, method, weights, t))


def _out_config(first, config: ModelConfig, dtype: str | None) -> dict:
    """The first model's config.json (or, for a checkpoint, the one jax-to-hf would write)."""
    if isinstance(first, _HFModel):
        d = dict(first.files.hf_config)
        if dtype:
            d["dtype"] = dtype
            if "torch_dtype" in d:
                d["torch_dtype"] = dtype
        return d
    return hf.config_to_hf(config, hf.default_arch(config), dtype or config.param_dtype, hf.special_ids(first.path))


def _model_card(paths: list[Path], method: str, weights, t) -> str:
    how = (f"linear, weights {weights} (divided by their sum)" if method == "linear"
           else f"slerp, t={t} (t=0 is the first model)")
    models = "\n".join(f"{i + 1}. `{p}`" for i, p in enumerate(paths))
    return f"""---
tags: [merge, solarjax]
---
# Merge of {len(paths)} models

Made by solarjax on {datetime.date.today().isoformat()} with mergekit's {how}, every tensor in float32.
Config and tokenizer come from the first model.

{models}
"""
