"""The optimizer: global-norm clipping, then AdamW on a warmup + decay schedule; no weight decay
on norm scales and biases (1-D parameters per layer). Optionally only some parameters train
(`trainable`, e.g. block expansion's new layers): the frozen ones carry no optimizer state."""

from __future__ import annotations

import jax
import numpy as np
import optax

from solarjax.config import OptimConfig
from solarjax.errors import ConfigError


def schedule(cfg: OptimConfig, total_steps: int, extensions: tuple[tuple[int, int], ...] = ()) -> optax.Schedule:
    """Warmup, then decay to min_lr_ratio * peak at total_steps. Each extension (start, new_total),
    recorded when a run was resumed at `start` with more steps, continues from the rate reached
    at `start` and decays with the same shape to the same floor at new_total: the curve stays
    continuous instead of jumping to where a longer schedule would have been."""
    lr = _schedule(cfg, total_steps)
    for start, new_total in extensions:
        floor, at = cfg.learning_rate * cfg.min_lr_ratio, float(lr(start))
        n = max(new_total - start, 1)
        if cfg.schedule == "cosine":
            decay = optax.cosine_decay_schedule(at, n, alpha=min(floor / at, 1.0))
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


def make_optimizer(cfg: OptimConfig, total_steps: int, extensions=(), trainable=None) -> optax.GradientTransformation:
    """trainable: None (every parameter trains) or a tree like the params whose leaves broadcast
    against them, 1 where a parameter trains and 0 where it is frozen; a stacked [L, ...] leaf may
    train in some layers only, with a mask of shape [L, 1, ...] (upscale.expand_blocks makes one)."""
    def decay_mask(params):
        # Stacked layers add a leading axis, so a norm scale is [L, D]: decide by the leaf's name.
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key != "scale" and not path[-1].key.endswith("_bias"), params)

    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(optax.adamw(schedule(cfg, total_steps, extensions), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    if trainable is None:
        return optax.chain(*parts)
    return _train_only(optax.chain(*parts), trainable)


def _train_only(inner: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """`inner` (clipping and AdamW) on the trainable parameters alone.

    A leaf frozen everywhere gets optax.set_to_zero: a zero update and no state, so no Adam moments
    (two parameter-sized buffers each). A leaf trainable everywhere gets `inner` as it is. A stacked
    leaf trained in some layers only keeps its moments (they are one array), and its frozen layers'
    gradient is zeroed before `inner` and its update after (AdamW's weight decay would move them).
    So frozen gradients count nowhere, not in the clip's global norm either: how far the trainable
    parameters move does not depend on what the frozen ones would have done.
    """
    paths_masks = jax.tree_util.tree_flatten_with_path(trainable)[0]
    masks, labels = [], []
    for path, leaf in paths_masks:
        mask = np.asarray(leaf, np.float32)
        if not np.isin(mask, (0, 1)).all():
            bad = [float(x) for x in np.unique(mask) if x not in (0, 1)][:3]
            raise ConfigError(f"trainable{jax.tree_util.keystr(path)} holds {bad}; a freeze mask holds only "
                             f"0 (frozen) and 1 (trained)")
        labels.append("frozen" if not mask.any() else "trained")
        masks.append(None if mask.all() or not mask.any() else mask)  # only partly trained leaves multiply
    label_tree = jax.tree.unflatten(jax.tree.structure(trainable), labels)

    def check(params):
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        if not leaves:  # optax.tree_map_params initialises with an empty placeholder
            return optax.EmptyState()
        if jax.tree.structure(params) != jax.tree.structure(trainable):
            names = {jax.tree_util.keystr(p) for p, _ in leaves}
            masked = {jax.tree_util.keystr(p) for p, _ in paths_masks}
            raise ConfigError(f"the trainable tree must have the params' structure; params only: "
                             f"{' '.join(sorted(names - masked)[:3]) or 'none'}, trainable only: "
                             f"{' '.join(sorted(masked - names)[:3]) or 'none'}")
        for (path, param), (_, mask) in zip(leaves, paths_masks):
            try:
                fits = np.broadcast_shapes(np.shape(mask), param.shape) == param.shape
            except ValueError:
                fits = False
            if not fits:
                raise ConfigError(f"trainable{jax.tree_util.keystr(path)} has shape {list(np.shape(mask))}, which "
                                 f"does not broadcast to the parameter's {list(param.shape)}")
        return optax.EmptyState()

    def keep_trained_layers(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        leaves = [u if m is None else (u * m).astype(u.dtype) for u, m in zip(leaves, masks)]
        return jax.tree.unflatten(treedef, leaves), state

    keep = optax.GradientTransformation(check, keep_trained_layers)
    return optax.chain(keep, optax.partition({"trained": inner, "frozen": optax.set_to_zero()}, label_tree), keep)
