"""Ahead-of-time compilation of the train step for a TPU slice, on any machine with libtpu
installed (no TPU needed): `train.py --config ... --compile-only --topology v5p-128` reports
whether the step fits the chips' HBM, its per-chip memory and its compiled FLOPs.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from solarjax.errors import ConfigError
from solarjax.model.config import ModelConfig
from solarjax.model.decoder import param_count
from solarjax.sharding import batch_sharding, make_mesh
from solarjax.train.config import TrainConfig
from solarjax.train.plan import RunPlan
from solarjax.train.step import abstract_state
from solarjax.train.topology import HBM_GIB, topology_name


def compile_for_topology(cfg: TrainConfig, topology: str) -> dict:
    """Lowers and compiles the train step for a TPU topology with libtpu's compiler and reports
    per-chip memory and FLOPs. The model comes from cfg.model, or from init.from's config."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata to ask here
    from jax.experimental import topologies  # here: importing it looks for libtpu

    gen, name = topology_name(topology)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing, busy, or the name unknown to it
        fix = ("another process is using libtpu (e.g. a running JAX job on this machine); let it finish, "
               "then retry" if "lockfile" in str(e) else "install the tpu extra: pip install -e '.[tpu]'")
        raise ConfigError(f"--topology {topology}: cannot describe {name} ({type(e).__name__}: {e}); {fix}") from None
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=topo.devices)
    plan = RunPlan.resolve(cfg, mesh, platform="tpu")
    model_config = plan.step_config
    objective = plan.objective
    batch = {k: jax.ShapeDtypeStruct((cfg.global_batch, cfg.data.seq_len), jnp.int32, sharding=batch_sharding(mesh))
             for k in objective.batch_keys}

    def compile_step(config: ModelConfig, unroll: int, chunk: int, microbatches: int):
        optimizer, _, step = plan.build_step(mesh, config=config, unroll=unroll, chunk=chunk, microbatches=microbatches)
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
              "attention": plan.attention}
    try:
        compiled, _ = compile_step(model_config, 1, plan.loss_chunk, cfg.microbatches)
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
    model_flops = plan.flops_per_token * cfg.global_batch * cfg.data.seq_len
    return {
        **report, "fits": per_chip <= HBM_GIB[gen] * 2**30, "compile_s": round(seconds, 1),
        "per_chip_gib": {"arguments": mem.argument_size_in_bytes / 2**30, "temp": mem.temp_size_in_bytes / 2**30,
                         "total": per_chip / 2**30, "hbm": HBM_GIB[gen]},
        "hbm_headroom": 1 - per_chip / (HBM_GIB[gen] * 2**30),
        "compiled_flops_per_step": compiled_flops,
        "model_flops_per_step": model_flops,
        "flop_ratio": compiled_flops / model_flops,
    }
