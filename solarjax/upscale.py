"""Growth operators on the stacked parameter tree, and the streaming HF -> HF depth up-scaling.

A layer plan is mergekit's passthrough: half-open ranges of base layers concatenated in order.
SOLAR's depth up-scaling (DUS) of n layers by m is the plan [0, n-m), [m, n): new layer i takes
base layer i for i < n-m and base layer i - (n - 2m) after (Mistral-7B -> SOLAR-10.7B: n=32, m=8).
Because layers are stacked on one axis, every operator is a gather on that axis of each leaf; the
embedding, final norm and lm_head are kept as they are.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from solarjax import hf
from solarjax import model as model_lib
from solarjax.modelconfig import ModelConfig
from solarjax.errors import SolarjaxError
from solarjax.sharding import param_shardings
from solarjax.tensorfile import (SafetensorsFile, SafetensorsWriter, TensorInfo, atomic_output_dir, check_output,
                                 plan_shards)


class UpscaleError(SolarjaxError):
    """A growth spec does not fit the base model; the message names the value and the allowed range."""


Plan = tuple[tuple[int, int], ...]


def dus_plan(n: int, m: int) -> Plan:
    if not isinstance(n, int) or n < 2:
        raise UpscaleError(f"n={n!r} must be an integer >= 2 (the base model's depth)")
    if not isinstance(m, int) or not 1 <= m < n / 2:
        raise UpscaleError(f"m={m!r} is outside [1, n/2) = [1, {n / 2:g}) for n={n}")
    return ((0, n - m), (m, n))


def parse_plan(text: str) -> Plan:
    """'0:24,8:32' -> ((0, 24), (8, 32))."""
    ranges = []
    for part in str(text).split(","):
        try:
            start, end = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise UpscaleError(f"layer range {part.strip()!r} in {text!r} is not START:END (e.g. 0:24,8:32)") from None
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


@dataclass(frozen=True)
class UpscaleSpec:
    """The CLI's and the training config's growth options: DUS (n, m) or an explicit layer plan."""
    n: int | None = None
    m: int | None = None
    layers: str | None = None

    def plan(self, base_layers: int) -> Plan:
        if self.layers is not None:
            if self.n is not None or self.m is not None:
                raise UpscaleError("give either n and m, or layers, not both")
            plan = parse_plan(self.layers)
            check_plan(plan, base_layers)
            return plan
        if self.n is None or self.m is None:
            raise UpscaleError("depth up-scaling needs both n and m (or a layer plan)")
        if self.n != base_layers:
            raise UpscaleError(f"n={self.n} does not match the base model's depth of {base_layers} layers")
        return dus_plan(self.n, self.m)

    def describe(self, base_layers: int) -> str:
        plan = self.plan(base_layers)
        ranges = ", ".join(f"[{a}, {b})" for a, b in plan)
        if self.layers is None:
            return f"SOLAR depth up-scaling n={self.n}, m={self.m}: base layers {ranges}"
        return f"layer plan (mergekit passthrough): base layers {ranges}"


def _layer_leaves(params, fn):
    return {**params, "layers": jax.tree.map(fn, params["layers"])}


def _check_config_first(config, where: str) -> None:
    # These took (params, config) before every loader settled on (config, params).
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{where}(config, params, ...): the first argument must be the ModelConfig, "
                        f"got {type(config).__name__}")


def apply_plan(config: ModelConfig, params, plan: Plan, mesh=None):
    """(config, params) with layers gathered by `plan`. Runs under jit with the new tree's
    shardings, so sharded inputs stay sharded: nothing is gathered onto one host."""
    _check_config_first(config, "apply_plan")
    index = np.asarray(check_plan(plan, config.num_layers), np.int32)
    new_config = config.replace(num_layers=len(index))
    out_shardings = param_shardings(model_lib.abstract_params(new_config), mesh) if mesh is not None else None
    grow = jax.jit(lambda p: _layer_leaves(p, lambda leaf: jnp.take(leaf, index, axis=0)),
                   out_shardings=out_shardings)
    return new_config, grow(params)


def depth_upscale(config: ModelConfig, params, n: int, m: int, mesh=None):
    """SOLAR's DUS on the param tree: returns (config, params) of 2(n - m) layers."""
    _check_config_first(config, "depth_upscale")
    return apply_plan(config, params, UpscaleSpec(n=n, m=m).plan(config.num_layers), mesh)


# Block expansion (LLaMA Pro, arXiv 2401.02415): identity-initialised copies, trained alone.

ZEROED_IN_NEW_BLOCKS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def expand_blocks(config: ModelConfig, params, k: int, mesh=None):
    """After every k-th block insert a copy of it whose o_proj and down_proj are zero, so each new
    block adds nothing to the residual stream and the grown model computes the base function.

    Returns (config, params, trainable): `trainable` is a tree like params whose leaves broadcast
    against them, 1 on the new blocks and 0 elsewhere, for `optim.make_optimizer(trainable=...)`.
    """
    _check_config_first(config, "expand_blocks")
    L = config.num_layers
    if not isinstance(k, int) or k < 1 or L % k:
        raise UpscaleError(f"block expansion every k={k!r} blocks must divide the depth of {L} layers "
                           f"(k in {[d for d in range(1, L + 1) if L % d == 0]})")
    index, is_new = [], []
    for i in range(L):
        index.append(i)
        is_new.append(False)
        if (i + 1) % k == 0:
            index.append(i)
            is_new.append(True)
    new_config, grown = apply_plan(config, params, tuple((i, i + 1) for i in index), mesh)
    new = np.asarray(is_new)

    def zero_new(path, leaf):
        names = tuple(p.key for p in path)
        if names[:2] in ZEROED_IN_NEW_BLOCKS:
            return jnp.where(new.reshape((-1,) + (1,) * (leaf.ndim - 1)), 0, leaf).astype(leaf.dtype)
        return leaf
    grown = {**grown, "layers": jax.tree_util.tree_map_with_path(zero_new, grown["layers"])}
    trainable = jax.tree.map(lambda leaf: jnp.zeros((), jnp.float32), grown)
    trainable["layers"] = jax.tree.map(
        lambda leaf: jnp.asarray(new, jnp.float32).reshape((-1,) + (1,) * (leaf.ndim - 1)), grown["layers"])
    return new_config, grown, trainable


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
    plan = spec.plan(base_config.num_layers)
    index = check_plan(plan, base_config.num_layers)
    config = base_config.replace(num_layers=len(index))
    arch = arch or hf.ARCHITECTURES[base.hf_config["architectures"][0]]
    src_dtype = base.info("model.embed_tokens.weight").dtype
    np_dtype = hf.SAVE_DTYPES[dtype] if dtype else src_dtype
    dtype_name = dtype or next(k for k, v in hf.SAVE_DTYPES.items() if v == src_dtype)

    specs = hf.weight_specs(config)
    infos = [TensorInfo(s.hf_name, s.hf_shape, np_dtype) for s in specs]
    sources = {s.hf_name: s.source_name(index) for s in specs}
    shards = plan_shards(infos, shard_size)
    names = hf.shard_file_names(len(shards))
    with atomic_output_dir(out, overwrite, inputs=(src,)) as tmp:
        hf_config = hf.config_to_hf(config, arch, dtype_name, hf.special_ids(src))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        bar = tqdm(total=sum(i.nbytes for i in infos), desc=f"up-scaling to {len(index)} layers", unit="B",
                   unit_scale=True, disable=None)
        for file_name, shard in zip(names, shards):
            with SafetensorsWriter(tmp / file_name, shard, metadata={"format": "pt"}) as writer:
                for info in shard:
                    name = sources[info.name]
                    file = base.file_of(name)
                    if isinstance(file, SafetensorsFile) and file.info(name).dtype == np_dtype:
                        writer.copy_bytes(file, name)
                    else:
                        writer.write_array(np.asarray(base.get(name), np_dtype))
                    bar.update(info.nbytes)
        bar.close()
        hf.write_index(tmp, shards, names)
        hf.copy_tokenizer_files(src, tmp)
        (tmp / "README.md").write_text(model_card(src, base_config, config, spec, arch, dtype_name))
    return Path(out)


def model_card(src, base_config: ModelConfig, config: ModelConfig, spec: UpscaleSpec, arch: str, dtype: str) -> str:
    index = check_plan(spec.plan(base_config.num_layers), base_config.num_layers)
    architecture = hf.config_to_hf(config, arch)["architectures"][0]
    return f"""---
tags: [depth-up-scaling, solarjax]
---
# Depth up-scaled from `{Path(src).name}`

Made by solarjax on {datetime.date.today().isoformat()}: {spec.describe(base_config.num_layers)}.
{base_config.num_layers} base layers -> {config.num_layers} layers ({architecture}, {dtype}).
Embeddings, final norm and lm_head are the base model's. New layer i takes base layer:

`{index}`

Recipe: SOLAR 10.7B (Kim et al., arXiv 2312.15166). As with SOLAR, the grown model is meant to be
continued-pretrained before use.
"""
