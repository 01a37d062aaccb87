"""Growth operators on the stacked parameter tree, and the streaming HF -> HF growth.

A layer plan is mergekit's passthrough: half-open ranges of base layers concatenated in order.
SOLAR's depth up-scaling (DUS) of n layers by m is the plan [0, n-m), [m, n): new layer i takes
base layer i for i < n-m and base layer i - (n - 2m) after (Mistral-7B -> SOLAR-10.7B: n=32, m=8).
LLaMA Pro's block expansion by k is the plan that repeats every k-th layer, its second copies
starting as identities (ZEROED projections at zero); `zero_new` does the same to any plan, so that
stacking ("0:16,0:16") or middle duplication ("0:8,8:16,8:16,16:24") can start function-preserving.
Because layers are stacked on one axis, every operator is a gather on that axis of each leaf; the
embedding, final norm and lm_head are kept as they are.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from solarjax.errors import ConfigError
from solarjax.files import check_output
from solarjax.model import decoder as model_lib
from solarjax.model.config import ModelConfig
from solarjax.sharding import param_shardings
from solarjax.weights import hf
from solarjax.weights.tensorfile import SafetensorsFile, SafetensorsWriter, TensorInfo


class UpscaleError(ConfigError):
    """A growth spec does not fit the base model; the message names the value and the allowed range."""


Plan = tuple[tuple[int, int], ...]

# Zero in a layer that must start as the identity: attention's and the MLP's output projections,
# so both residual branches add nothing (LLaMA Pro, arXiv 2401.02415, section 2.3). The layer's
# other weights keep their copied values, so its gradients are not zero and it can learn.
ZEROED = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def dus_plan(n: int, m: int) -> Plan:
    if not isinstance(n, int) or n < 2:
        raise UpscaleError(f"n={n!r} must be an integer >= 2 (the base model's depth)")
    if not isinstance(m, int) or not 1 <= m < n / 2:
        raise UpscaleError(f"m={m!r} is outside [1, n/2) = [1, {n / 2:g}) for n={n}")
    return ((0, n - m), (m, n))


def expand_plan(base_layers: int, k: int) -> Plan:
    """LLaMA Pro's block expansion as a plan: after every k-th block, a second copy of it.
    4 layers, k=2: (0, 2), (1, 4), (3, 4) -> base layers 0 1 1 2 3 3."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or base_layers % k:
        raise UpscaleError(f"expand={k!r} must divide the base's depth of {base_layers} layers "
                           f"(expand in {[d for d in range(1, base_layers + 1) if base_layers % d == 0]})")
    return ((0, k),) + tuple((j * k - 1, (j + 1) * k) for j in range(1, base_layers // k)) + ((base_layers - 1,
                                                                                                base_layers),)


def parse_plan(text: str, what: str = "layer range") -> Plan:
    """'0:24,8:32' -> ((0, 24), (8, 32))."""
    if isinstance(text, int) and not isinstance(text, bool):
        raise UpscaleError(f"{what} {text!r} is a number: YAML reads an unquoted 8:16 as 8 * 60 + 16; quote "
                           f"the ranges, e.g. \"8:16\"")
    ranges = []
    for part in str(text).split(","):
        try:
            start, end = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise UpscaleError(f"{what} {part.strip()!r} in {text!r} is not START:END (e.g. 0:24,8:32)") from None
        ranges.append((start, end))
    return tuple(ranges)


def check_plan(plan: Plan, base_layers: int) -> list[int]:
    """The base layer of every new layer, after checking each range lies in [0, base_layers]."""
    if not plan:
        raise UpscaleError("the layer plan has zero layers; give at least one range START:END")
    for start, end in plan:
        if not 0 <= start < end <= base_layers:
            raise UpscaleError(f"layer range {start}:{end} is empty or outside the base's layers "
                               f"[0, {base_layers}]; need 0 <= start < end <= {base_layers}")
    return [i for start, end in plan for i in range(start, end)]


TRAINABLE = ("all", "new_layers")  # or layer ranges of the grown model, "8:12,20:24"


def parse_trainable(value) -> str | Plan:
    """The top-level `trainable:` key: "all", "new_layers", or sorted, disjoint ranges of layers."""
    if value in TRAINABLE:
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise UpscaleError(f"trainable must be all, new_layers or layer ranges like \"8:12,20:24\", got {value!r}")
    try:
        ranges = parse_plan(value, "trainable: range")
    except UpscaleError as e:
        raise UpscaleError(f"{e}; trainable takes all, new_layers or layer ranges") from None
    for start, end in ranges:
        if not 0 <= start < end:
            raise UpscaleError(f"trainable: range {start}:{end} in {value!r} is empty; need 0 <= start < end")
    ordered = sorted(ranges)
    for (a, b), (c, d) in zip(ordered, ordered[1:]):
        if c < b:
            raise UpscaleError(f"trainable: ranges {a}:{b} and {c}:{d} in {value!r} overlap")
    return tuple(ordered)


@dataclass(frozen=True)
class Growth:
    """What a spec does to a base of some depth. index: the base layer of each grown layer; new:
    the grown layers that are a second or later copy of their base layer (what `trainable:
    new_layers` trains); zeroed: those of them that start with ZEROED projections at zero."""
    index: tuple[int, ...]
    new: tuple[int, ...]
    zeroed: tuple[int, ...]


@dataclass(frozen=True)
class UpscaleSpec:
    """The CLI's and the training config's growth options: DUS (n, m), an explicit layer plan
    (layers), or block expansion (expand: k); zero_new starts a plan's new layers as identities
    (expansion's always do)."""
    n: int | None = None
    m: int | None = None
    layers: str | None = None
    expand: int | None = None
    zero_new: bool = False

    def check(self) -> None:
        """What needs no base model: one growth, its values' types, the plan's syntax."""
        if not isinstance(self.zero_new, bool):
            raise UpscaleError(f"zero_new={self.zero_new!r} must be true or false")
        if self.expand is not None:
            if self.n is not None or self.m is not None or self.layers is not None:
                raise UpscaleError(f"expand={self.expand!r} is a growth of its own: give expand, or n and m, or "
                                   f"layers, not several")
            if not isinstance(self.expand, int) or isinstance(self.expand, bool) or self.expand < 1:
                raise UpscaleError(f"expand={self.expand!r} must be a positive integer (a copy after every "
                                   f"expand-th block)")
        elif self.layers is not None:
            if self.n is not None or self.m is not None:
                raise UpscaleError("give either n and m, or layers, not both")
            parse_plan(self.layers)
        elif self.n is None or self.m is None:
            raise UpscaleError("depth up-scaling needs both n and m (or a layer plan, or expand)")

    def plan(self, base_layers: int) -> Plan:
        self.check()
        if self.expand is not None:
            return expand_plan(base_layers, self.expand)
        if self.layers is not None:
            plan = parse_plan(self.layers)
            check_plan(plan, base_layers)
            return plan
        if self.n != base_layers:
            raise UpscaleError(f"n={self.n} does not match the base model's depth of {base_layers} layers")
        return dus_plan(self.n, self.m)

    def growth(self, base_layers: int) -> Growth:
        index = check_plan(self.plan(base_layers), base_layers)
        seen, new = set(), []
        for i, base in enumerate(index):
            if base in seen:
                new.append(i)
            seen.add(base)
        zeroed = tuple(new) if self.expand is not None or self.zero_new else ()
        return Growth(tuple(index), tuple(new), zeroed)

    def describe(self, base_layers: int) -> str:
        plan = self.plan(base_layers)
        ranges = ", ".join(f"[{a}, {b})" for a, b in plan)
        if self.expand is not None:
            return (f"block expansion (LLaMA Pro) expand={self.expand}: a copy after every {self.expand}-th block, "
                    f"with o_proj and down_proj zero")
        zero = "; the second copies of base layers start with o_proj and down_proj zero" if self.zero_new else ""
        if self.layers is None:
            return f"SOLAR depth up-scaling n={self.n}, m={self.m}: base layers {ranges}{zero}"
        return f"layer plan (mergekit passthrough): base layers {ranges}{zero}"


def _layer_leaves(params, fn):
    return {**params, "layers": jax.tree.map(fn, params["layers"])}


def _check_config_first(config, where: str) -> None:
    # These took (params, config) before every loader settled on (config, params).
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{where}(config, params, ...): the first argument must be the ModelConfig, "
                        f"got {type(config).__name__}")


def zero_layers(params, zeroed: tuple[int, ...]):
    """params with the ZEROED projections of the stacked layers in `zeroed` set to zero (pure)."""
    if not zeroed:
        return params
    layers = params["layers"]
    out = {**layers}
    for block, name in ZEROED:
        leaf = layers[block][name]
        out[block] = {**out[block], name: leaf.at[np.asarray(zeroed)].set(0)}
    return {**params, "layers": out}


def grow(config: ModelConfig, params, spec: UpscaleSpec, mesh=None):
    """(config, params) grown by `spec`: layers gathered by its plan, new layers zeroed where it
    says. Runs under jit with the new tree's shardings, so sharded inputs stay sharded: nothing is
    gathered onto one host."""
    _check_config_first(config, "grow")
    growth = spec.growth(config.num_layers)
    index = np.asarray(growth.index, np.int32)
    new_config = config.replace(num_layers=len(index))
    out_shardings = param_shardings(model_lib.abstract_params(new_config), mesh) if mesh is not None else None
    fn = jax.jit(lambda p: zero_layers(_layer_leaves(p, lambda leaf: jnp.take(leaf, index, axis=0)), growth.zeroed),
                 out_shardings=out_shardings)
    return new_config, fn(params)


def depth_upscale(config: ModelConfig, params, n: int, m: int, mesh=None):
    """SOLAR's DUS on the param tree: returns (config, params) of 2(n - m) layers."""
    _check_config_first(config, "depth_upscale")
    return grow(config, params, UpscaleSpec(n=n, m=m), mesh)


# ---------------------------------------------------------------------------------------------
# Streaming HF -> HF


def upscale_hf(src: str | Path, out: str | Path, spec: UpscaleSpec, arch: str | None = None,
               dtype: str | None = None, shard_size: int = 5 * 10**9, overwrite: bool = False) -> Path:
    """Writes the grown model as an HF directory, one tensor at a time.

    Tensors that keep their dtype are copied file to file by the kernel (copy_file_range) and never
    enter this process's memory; a dtype change converts one tensor at a time.
    """
    src = Path(src)
    check_output(out, (src,))  # before reading anything
    base = hf.HFCheckpoint(src)
    if not base.is_safetensors:
        raise UpscaleError(f"{src}: the streaming up-scaler reads safetensors only; convert the "
                           f"pytorch_model.bin first (e.g. hf-to-jax then jax-to-hf)")
    base_config = hf.config_from_hf(base.hf_config, str(src / "config.json"))
    base.check(base_config)
    growth = spec.growth(base_config.num_layers)
    index = list(growth.index)
    config = base_config.replace(num_layers=len(index))
    arch = arch or hf.ARCHITECTURES[base.hf_config["architectures"][0]]
    src_dtype = base.info("model.embed_tokens.weight").dtype
    np_dtype = hf.SAVE_DTYPES[dtype] if dtype else src_dtype
    dtype_name = dtype or next(k for k, v in hf.SAVE_DTYPES.items() if v == src_dtype)

    specs = hf.weight_specs(config)
    sources = {s.hf_name: s.source_name(index) for s in specs}
    zeroed = {s.hf_name for s in specs if s.layer in growth.zeroed and s.path[1:] in ZEROED}

    def write(writer: SafetensorsWriter, info: TensorInfo) -> None:
        name = sources[info.name]
        file = base.file_of(name)
        if info.name in zeroed:  # one tensor's zeros: the bound of a dtype change
            writer.write_array(np.zeros(info.shape, np_dtype))
        elif isinstance(file, SafetensorsFile) and file.info(name).dtype == np_dtype:
            writer.copy_bytes(file, name)
        else:
            writer.write_array(np.asarray(base.get(name), np_dtype))
    return hf.write_hf_dir(out, [TensorInfo(s.hf_name, s.hf_shape, np_dtype) for s in specs], write,
                           hf.config_to_hf(config, arch, dtype_name, hf.special_ids(src)), src,
                           shard_size=shard_size, overwrite=overwrite, inputs=(src,),
                           desc=f"up-scaling to {len(index)} layers",
                           readme=model_card(src, base_config, config, spec, arch, dtype_name))


def model_card(src, base_config: ModelConfig, config: ModelConfig, spec: UpscaleSpec, arch: str, dtype: str) -> str:
    growth = spec.growth(base_config.num_layers)
    index = list(growth.index)
    zeroed = (f"\nNew layers {list(growth.zeroed)} start with o_proj and down_proj zero: the grown model computes "
              f"the base's function.\n" if growth.zeroed else "")
    architecture = hf.config_to_hf(config, arch)["architectures"][0]
    return f"""---
tags: [depth-up-scaling, solarjax]
---
# Depth up-scaled from `{Path(src).name}`

Made by solarjax on {datetime.date.today().isoformat()}: {spec.describe(base_config.num_layers)}.
{base_config.num_layers} base layers -> {config.num_layers} layers ({architecture}, {dtype}).
Embeddings, final norm and lm_head are the base model's. New layer i takes base layer:

`{index}`
{zeroed}
Recipe: SOLAR 10.7B (Kim et al., arXiv 2312.15166). As with SOLAR, the grown model is meant to be
continued-pretrained before use.
"""
