"""What a job costs and where it runs: model FLOPs per token, the accelerators' peak FLOP/s and
HBM, and ahead-of-time compilation of the train step for a TPU slice, on any machine with libtpu
installed (no TPU needed): `train.py --config ... --compile-only --topology v5p-128`.

The trainer reads the FLOP count and the peak table for its MFU figures, so this module sits below
it; compile_for_topology alone needs the trainer's step and imports it when called.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from solarjax import attention
from solarjax import checkpoint as ckpt_lib
from solarjax import objectives as objectives_lib
from solarjax.config import ConfigError, ModelConfig, TrainConfig
from solarjax.model import param_count
from solarjax.optim import make_optimizer, schedule
from solarjax.sharding import batch_sharding, make_mesh
from solarjax.upscale import UpscaleSpec

# Dense bf16 peak per device (TFLOP/s), for MFU; matched against jax's device_kind.
PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459,
               "TPU v6 lite": 918, "TPU v6e": 918, "NVIDIA H100": 989, "NVIDIA H200": 989, "NVIDIA A100": 312}


def peak_tflops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if kind.startswith(k)), None)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a TPU slice, on any machine with libtpu installed (no TPU needed)

HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}  # per chip


def topology_name(name: str) -> tuple[str, str]:
    """'v5p-128' (TensorCores, as Cloud names slices) or 'v5p:4x4x4' -> (generation, 'v5p:4x4x4')."""
    if ":" in name:
        return name.split(":")[0], name
    gen, _, count = name.partition("-")
    if gen not in HBM_GIB or not count.isdigit():
        raise ConfigError(f"--topology {name!r} is not like v5p-128, v4-32, v5e-16 or v5p:4x4x4")
    chips = int(count) // 2 if gen in ("v4", "v5p") else int(count)  # v4/v5p count 2 cores a chip
    # Cloud's shapes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... and 2x2, 2x4, 4x4, 4x8, ...
    dims = ([2, 2, 1] if chips >= 4 else [1, 1, 1]) if gen in ("v4", "v5p") else [1, 1]
    while math.prod(dims) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    if math.prod(dims) != chips:
        raise ConfigError(f"--topology {name!r}: {chips} chips is not a power of two")
    return gen, f"{gen}:{'x'.join(map(str, dims))}"


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6 FLOPs per weight that multiplies (the untied embedding table is a gather and does not),
    plus 12 * L * (H * E) * T for attention scores and values (PaLM's count)."""
    weights = param_count(config) - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    return 6 * weights + 12 * config.num_layers * config.num_heads * config.head_dim * seq_len


def planned_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model a run of `cfg` trains, read from configs alone (no parameters are loaded)."""
    model_config = cfg.model
    if model_config is None:
        model_config = ckpt_lib.model_config_of(cfg.init.source).replace(**cfg.model_runtime)
    if cfg.init.upscale:
        growth = UpscaleSpec(**cfg.init.upscale).growth(model_config.num_layers)
        model_config = model_config.replace(num_layers=len(growth.index))
    return model_config


def compile_for_topology(cfg: TrainConfig, topology: str) -> dict:
    """Lowers and compiles the train step for a TPU topology with libtpu's compiler and reports
    per-chip memory and FLOPs. The model comes from cfg.model, or from init.from's config."""
    import os
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata to ask here
    from jax.experimental import topologies

    from solarjax.trainer import (abstract_state, jit_train_step, loss_chunk, objective_options,  # imports this module
                                  resolve_trainable)
    gen, name = topology_name(topology)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing, busy, or the name unknown to it
        fix = ("another process is using libtpu (e.g. a running JAX job on this machine); let it finish, "
               "then retry" if "lockfile" in str(e) else "install the tpu extra: pip install -e '.[tpu]'")
        raise ConfigError(f"--topology {topology}: cannot describe {name} ({type(e).__name__}: {e}); {fix}") from None
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=topo.devices)
    model_config = planned_model_config(cfg)
    trainable = resolve_trainable(cfg)
    optimizer = make_optimizer(cfg.optim, cfg.steps, trainable=trainable)
    objective = objectives_lib.get(cfg.objective)
    batch = {k: jax.ShapeDtypeStruct((cfg.global_batch, cfg.data.seq_len), jnp.int32, sharding=batch_sharding(mesh))
             for k in objective.batch_keys}

    def compile_step(config: ModelConfig, unroll: int, chunk: int, microbatches: int):
        step = jit_train_step(config, optimizer, schedule(cfg.optim, cfg.steps), mesh, unroll, chunk, microbatches,
                              cfg.objective, objective_options(cfg), trainable)
        state = abstract_state(config, optimizer, mesh)
        reference = (state["params"],) if objective.reference else ()  # a frozen copy, sharded like the policy
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the sharding hints, as in Trainer.run
            compiled = step.lower(state, batch, *reference).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return compiled, float(cost.get("flops", 0.0)) * len(topo.devices)

    start = time.perf_counter()
    report = {"topology": name, "chips": len(topo.devices), "mesh": dict(mesh.shape), "layers": model_config.num_layers,
              "parameters": param_count(model_config), "global_batch": cfg.global_batch, "seq_len": cfg.data.seq_len,
              "attention": attention.choose(model_config.attention, "tpu", model_config.sliding_window,
                                            cfg.data.seq_len)}
    try:
        compiled, _ = compile_step(model_config, 1, loss_chunk(cfg, mesh), cfg.microbatches)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**report, "fits": False, "error": str(e).splitlines()[0]}
    seconds = time.perf_counter() - start
    # XLA counts a while loop's body once, so the scanned step's own count misses L-1 layers.
    # Fully unrolled 1- and 2-layer variants give the per-layer and the fixed cost instead.
    # The loss runs as one chunk and the batch as one group there, for the same reason (scans too).
    one, two = (compile_step(model_config.replace(num_layers=n), n, cfg.data.seq_len, 1)[1] for n in (1, 2))
    compiled_flops = one + (model_config.num_layers - 1) * (two - one)
    mem = compiled.memory_analysis()
    per_chip = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    model_flops = model_flops_per_token(model_config, cfg.data.seq_len) * cfg.global_batch * cfg.data.seq_len
    return {
        **report, "fits": per_chip <= HBM_GIB[gen] * 2**30, "compile_s": round(seconds, 1),
        "per_chip_gib": {"arguments": mem.argument_size_in_bytes / 2**30, "temp": mem.temp_size_in_bytes / 2**30,
                         "total": per_chip / 2**30, "hbm": HBM_GIB[gen]},
        "hbm_headroom": 1 - per_chip / (HBM_GIB[gen] * 2**30),
        "compiled_flops_per_step": compiled_flops,
        "model_flops_per_step": model_flops,
        "flop_ratio": compiled_flops / model_flops,
    }
