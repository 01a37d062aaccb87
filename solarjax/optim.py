"""The optimizer: global-norm clipping, then AdamW on a warmup + decay schedule; no weight decay
on norm scales and biases (1-D parameters per layer)."""

from __future__ import annotations

import jax
import optax

from solarjax.config import OptimConfig


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


def make_optimizer(cfg: OptimConfig, total_steps: int, extensions=()) -> optax.GradientTransformation:
    def decay_mask(params):
        # Stacked layers add a leading axis, so a norm scale is [L, D]: decide by the leaf's name.
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key != "scale" and not path[-1].key.endswith("_bias"), params)

    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(optax.adamw(schedule(cfg, total_steps, extensions), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
