"""The train step: one pure function (state, batch) -> (state, metrics), jitted once with the
state's shardings and donated state buffers, and what it is built from: the state (parameters,
optimizer state, step) and its shardings, the abstract state an ahead-of-time compile lowers
against, and the parts of the model the optimizer trains. The Trainer (solarjax.train.trainer) runs it
in its loop; `--compile-only` (solarjax.train.aot) and the benchmarks compile it without a Trainer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from solarjax.errors import ConfigError
from solarjax.model.config import ModelConfig
from solarjax.model.decoder import abstract_params
from solarjax.sharding import batch_sharding, param_shardings
from solarjax.train import objectives as objectives_lib
from solarjax.train.config import TrainConfig
from solarjax.train.optim import Trainable
from solarjax.weights import checkpoint as ckpt_lib
from solarjax.weights.upscale import UpscaleSpec, parse_trainable


def loss_and_count(config: ModelConfig, params, batch, unroll: int = 1, chunk: int | None = None):
    """Mean next-token cross entropy over positions whose next token is in the same document (the
    lm objective), and their count. chunk: positions per step of the chunked vocabulary loss
    (solarjax.train.loss; must divide the sequence length); None: one chunk, the whole sequence."""
    lm = objectives_lib.get("lm")
    loss, metrics = lm.mean(objectives_lib.Context(config, chunk, unroll), params, batch)
    return loss, metrics[lm.count]


def new_state(optimizer, params) -> dict:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def state_shardings(model_config: ModelConfig, optimizer, mesh) -> dict:
    """Params by their logical axes; each optimizer state array in the shards of the parameter
    whose key path ends its own (Adam's mu/nu, inside whatever chain, partition or freezing wraps
    them; a frozen part's gathered moments [layers trained, ...] too, as the layer axis is never
    sharded); anything else (step counts) replicated."""
    params = nn.unbox(param_shardings(abstract_params(model_config), mesh))
    abstract = nn.unbox(abstract_params(model_config))
    by_path = {tuple(k.key for k in path): (sharding, len(leaf.shape)) for (path, sharding), leaf in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(abstract))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, leaf):
        keys = []
        for k in reversed(path):  # the trailing run of dict keys: a parameter's path
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        sharding, ndim = by_path.get(tuple(keys), (replicated, None))
        return sharding if ndim == len(leaf.shape) else replicated
    abstract_opt = jax.eval_shape(optimizer.init, abstract)
    return {"params": params, "opt_state": jax.tree_util.tree_map_with_path(place, abstract_opt), "step": replicated}


def resolve_trainable(cfg: TrainConfig) -> Trainable | None:
    """cfg.trainable as the layers of the (grown) model that train, or None for all; read from
    configs alone (init.from's config, init.upscale), so a resumed run resolves it the same way."""
    value = parse_trainable(cfg.trainable)
    if value == "all":
        return None
    base = cfg.model if cfg.model is not None else ckpt_lib.model_config_of(cfg.init.source)
    growth = UpscaleSpec(**cfg.init.upscale).growth(base.num_layers) if cfg.init.upscale else None
    depth = len(growth.index) if growth is not None else base.num_layers
    if value == "new_layers":
        if not growth.new:
            raise ConfigError(f"trainable: new_layers names no parameter: init.upscale {cfg.init.upscale} "
                              f"repeats no base layer, so it adds no new layer")
        return Trainable(growth.new, rest=False)
    for start, end in value:
        if end > depth:
            raise ConfigError(f"trainable: range {start}:{end} is outside the "
                              f"{'grown ' if growth is not None else ''}model's {depth} layers [0, {depth})")
    return Trainable(tuple(i for start, end in value for i in range(start, end)), rest=False)


def abstract_state(model_config: ModelConfig, optimizer, mesh) -> dict:
    shapes = jax.eval_shape(lambda p: new_state(optimizer, p), nn.unbox(abstract_params(model_config)))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        state_shardings(model_config, optimizer, mesh))


def jit_train_step(model_config: ModelConfig, optimizer, lr_schedule, mesh, unroll: int = 1,
                   chunk: int | None = None, microbatches: int = 1,
                   objective: objectives_lib.Objective = objectives_lib.get("lm"), options=None,
                   trainable: Trainable | None = None):
    """The one train step: (state, batch) -> (state, metrics), jitted with the state's shardings
    and donated state buffers; (state, batch, reference) for an objective with a frozen reference
    model, whose parameters are sharded like the policy's and are not in the optimizer state.
    chunk: as in loss_and_count. microbatches: the batch's rows are split into this many groups,
    run one after another (a scan) with their gradients summed, so activations are those of one
    group; the result is the whole batch's mean loss and gradient. objective: one of
    objectives.OBJECTIVES; options: its config section (e.g. DPOConfig). trainable: the parts the
    optimizer trains (its grad_norm is theirs: what the clip sees)."""
    obj = objective
    ctx = objectives_lib.Context(model_config, chunk, unroll, options)

    def train_step(state, batch, reference=None):
        count = obj.units(batch)  # over the whole batch: each group's sums / all units
        per_unit = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)

        def grads_and_sums(rows):
            def loss(p):
                sums = obj.sums(ctx, p, rows, reference)
                return sums["loss"] * per_unit, sums
            (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
            return grads, sums
        if microbatches == 1:
            grads, sums = grads_and_sums(batch)
        else:
            # Row r goes to group r % K: each group keeps the batch's spread over the devices.
            groups = jax.tree.map(lambda a: jnp.moveaxis(a.reshape(a.shape[0] // microbatches, microbatches,
                                                                   *a.shape[1:]), 1, 0), batch)

            def accumulate(acc, rows):
                return jax.tree.map(jnp.add, acc, grads_and_sums(rows)), None
            sums_shape = jax.eval_shape(lambda rows: obj.sums(ctx, state["params"], rows, reference),
                                        jax.tree.map(lambda a: a[0], groups))
            zeros = (jax.tree.map(jnp.zeros_like, state["params"]),
                     jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums_shape))
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, groups)
        metrics = {k: v * per_unit for k, v in sums.items()}  # means over the whole batch's units
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "step": state["step"] + 1}
        trained = grads if trainable is None else trainable.select(grads)
        return new, {**metrics, obj.count: count, "grad_norm": optax.global_norm(trained),
                     "lr": lr_schedule(state["step"])}
    shardings = state_shardings(model_config, optimizer, mesh)
    in_shardings = (shardings, batch_sharding(mesh)) + ((shardings["params"],) if obj.reference else ())
    return jax.jit(train_step, in_shardings=in_shardings,
                   out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
