"""The optimizer: global-norm clipping, then AdamW on a warmup + decay schedule; no weight decay
on norm scales and biases (1-D parameters per layer). Optionally only some parameters train
(Trainable, e.g. block expansion's new layers): the frozen ones carry no optimizer state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from solarjax.errors import ConfigError
from solarjax.train.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int, extensions: tuple[tuple, ...] = ()) -> optax.Schedule:
    """Warmup, then decay to min_lr_ratio * peak at total_steps. Each extension (start, new_total,
    mode), recorded when a run was resumed at `start` with other steps (schedule.json):
    - "continue" (a run resumed before its schedule ended): from the rate reached at `start`, the
      same shape of decay to the same floor at new_total, so the curve stays continuous instead of
      jumping to where a longer schedule would have been;
    - "restart" (a finished schedule extended: its rate is at the floor, 0 with min_lr_ratio 0): a
      new segment with its own warmup to the peak and decay to the floor at new_total.
    A (start, new_total) pair, as runs before the modes recorded it, continues."""
    lr = _schedule(cfg, total_steps)
    for start, new_total, *mode in extensions:
        n = max(new_total - start, 1)
        if mode == ["restart"]:
            lr = optax.join_schedules([lr, _schedule(cfg, n)], [start])
            continue
        floor, at = cfg.learning_rate * cfg.min_lr_ratio, float(lr(start))
        if cfg.schedule == "cosine":
            decay = optax.cosine_decay_schedule(at, n, alpha=min(floor / at, 1.0) if at > 0 else 0.0)
        elif cfg.schedule == "linear":
            decay = optax.linear_schedule(at, min(floor, at), n)
        else:
            decay = optax.constant_schedule(at)
        lr = optax.join_schedules([lr, decay], [start])
    return lr


def _schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(peak / cfg.warmup_steps, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Which parameters train: the stacked layers in `layers` (None: every layer) and, with `rest`,
    everything outside the layer stack (embeddings, final norm, head)."""
    layers: tuple[int, ...] | None = None
    rest: bool = True

    @property
    def everything(self) -> bool:
        return self.layers is None and self.rest

    def select(self, tree: dict) -> dict:
        """The trained part of a params-shaped tree: the trained layers gathered from each stacked
        leaf ([L, ...] -> [len(layers), ...]), frozen parts None (an empty subtree)."""
        def part(key, value):
            if key != "layers":
                return value if self.rest else None
            if self.layers is None:
                return value
            if not self.layers:
                return None
            index = np.asarray(self.layers, np.int32)
            return jax.tree.map(lambda a: jnp.take(a, index, axis=0), value)
        return {key: part(key, value) for key, value in tree.items()}

    def scatter(self, sub: dict, like: dict) -> dict:
        """Updates shaped like `like` from the trained part's `sub`; frozen entries are -0.0, since
        x + (-0.0) is x bit for bit for every x (+0.0 included, where x + 0.0 would turn -0.0 into +0.0)."""
        def frozen(tree):
            return jax.tree.map(lambda a: jnp.full_like(a, -0.0), tree)

        def part(key, value):
            if key != "layers":
                return sub[key] if self.rest else frozen(value)
            if self.layers is None:
                return sub[key]
            if not self.layers:
                return frozen(value)
            index = np.asarray(self.layers, np.int32)
            return jax.tree.map(lambda a, u: jnp.full_like(a, -0.0).at[index].set(u.astype(a.dtype)), value, sub[key])
        return {key: part(key, value) for key, value in like.items()}


def make_optimizer(cfg: OptimConfig, total_steps: int, extensions=(), trainable: Trainable | None = None
                   ) -> optax.GradientTransformation:
    """trainable: None (every parameter trains) or which parts do (Trainable): the frozen ones get
    no optimizer state, no update, no weight decay, and count nowhere, not in the clip's norm."""
    def decay_mask(params):
        # Stacked layers add a leading axis, so a norm scale is [L, D]: decide by the leaf's name.
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key != "scale" and not path[-1].key.endswith("_bias"), params)

    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(optax.adamw(schedule(cfg, total_steps, extensions), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    if trainable is None or trainable.everything:
        return optax.chain(*parts)
    return _train_only(optax.chain(*parts), trainable)


def _train_only(inner: optax.GradientTransformation, trainable: Trainable) -> optax.GradientTransformation:
    """`inner` (clipping and AdamW) on the trained part of the parameters alone (Trainable.select).

    Its state is inner's state of that part: Adam's two moments exist for the trained layers and
    leaves only (a gather along the layer axis each step buys that; the frozen layers' moments
    would cost two copies of them). Frozen gradients never reach `inner`, so they count nowhere,
    not in the clip's global norm either: how far the trained parameters move does not depend on
    what the frozen ones would have done; and AdamW's weight decay never sees a frozen weight.
    """
    def init(params):
        if "layers" not in params:
            raise ConfigError(f"trainable layers need the model's stacked params['layers']; the tree has "
                              f"{', '.join(sorted(params))}")
        depth = jax.tree.leaves(params["layers"])[0].shape[0]
        outside = [i for i in trainable.layers or () if not 0 <= i < depth]
        if outside:
            raise ConfigError(f"trainable layer {outside[0]} is outside the model's {depth} layers [0, {depth})")
        return inner.init(trainable.select(params))

    def update(updates, state, params=None):
        sub, state = inner.update(trainable.select(updates), state,
                                  None if params is None else trainable.select(params))
        return trainable.scatter(sub, updates), state

    return optax.GradientTransformation(init, update)
