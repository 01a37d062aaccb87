"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters and the few activation hints name logical axes (model.py); RULES says which mesh axis
shards each. A dimension that the mesh axis does not divide stays replicated rather than failing,
so e.g. an MQA model (1 kv head) still runs on a tensor-parallel mesh; param_shardings warns.
"""

from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from solarjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes, in order of preference. One table for parameters and activations.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ConfigError(f"mesh data={data} fsdp={fsdp} tensor={tensor} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} has {math.prod(sizes)} "
                         f"devices, but {len(devices)} are present")
    # Auto axes: GSPMD propagates shardings from parameters and the few hints in model.py.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_flag(text: str, flag: str = "--mesh") -> Mesh:
    """A mesh over this process's devices from "data,fsdp,tensor" (one may be -1: the rest), as the
    CLIs take it; the default "1,-1,1" shards every weight over all local devices (FSDP), and a
    mesh without -1 uses the first data x fsdp x tensor of them."""
    try:
        sizes = [int(x) for x in text.split(",")]
        assert len(sizes) == 3
    except (ValueError, AssertionError):
        raise ConfigError(f"{flag} must be three integers data,fsdp,tensor, got {text!r}") from None
    devices = jax.local_devices()
    if -1 not in sizes:  # a smaller mesh takes the first devices
        devices = devices[:math.prod(sizes)]
    return make_mesh(*sizes, devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
    """PartitionSpec for one array: each logical axis takes its mesh axes if they divide the dim
    and are not used by an earlier dim."""
    return _spec_and_misses(axes, shape, mesh)[0]


def _spec_and_misses(axes, shape, mesh) -> tuple[PartitionSpec, list[tuple[str, int, tuple[str, ...]]]]:
    """The spec, and (logical axis, dim, mesh axes) for each dim left replicated because its mesh
    axes do not divide it."""
    rules = dict(RULES)
    used: set[str] = set()
    spec, misses = [], []
    for name, dim in zip(axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in solarjax.sharding.RULES")
        target = rules.get(name) if name is not None else None
        target = (target,) if isinstance(target, str) else (target or ())
        chosen = tuple(a for a in target if a not in used and mesh.shape.get(a, 1) > 1)
        if chosen and dim % math.prod(mesh.shape[a] for a in chosen) == 0:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
            if chosen:
                misses.append((name, dim, chosen))
    return PartitionSpec(*spec), misses


def param_shardings(boxed_abstract, mesh: Mesh):
    """NamedSharding for every leaf of a boxed (nn.Partitioned) abstract parameter tree. Warns for
    each dim its mesh axes do not divide: that dim is replicated, so every device holds all of it
    and of its optimizer moments (e.g. hidden 4096 over fsdp=6 shards no weight at all)."""
    def one(path, leaf):
        if not isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, PartitionSpec())
        spec, misses = _spec_and_misses(leaf.names, leaf.value.shape, mesh)
        for name, dim, mesh_axes in misses:
            sizes = "x".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
            why = " (expected: fewer kv heads than tensor)" if name == "kv_heads" else ""
            warnings.warn(f"{jax.tree_util.keystr(path, simple=True, separator='/')} {list(leaf.value.shape)}: "
                          f"{name} {dim} is not divisible by mesh {sizes}, so that dim is replicated{why}")
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def global_from_host(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, as a global array on `sharding` (device_put
    alone cannot place it on another process's devices)."""
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def host_value(x: jax.Array) -> np.ndarray:
    """A global array's whole value on every process (on a mesh spanning processes, each holds only
    its shards)."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def platform() -> str:
    """The platform being compiled for: the mesh's devices when a mesh is set (so an ahead-of-time
    compile for a TPU topology on a CPU host picks TPU kernels), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and getattr(mesh, "abstract_device", None) is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint for an activation, by logical axes, under the mesh set with jax.set_mesh.

    A no-op with no mesh set. The mesh is part of jit's trace context, so a function traced
    without a mesh is traced again under one.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, T]: rows split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
