"""Is one arm of a recipe really ahead of another? Both stages' final parameters scored on every
held-out window (not only the eval_batches the trainer uses), with a paired bootstrap over windows.

  python bench/demo_paired.py configs/demo.yaml [upscaled control]

Prints each arm's held-out loss (next-token cross entropy within documents, as the trainer's eval
defines it), their difference, a 95% interval of the difference from 2000 bootstrap resamples of the
windows (same windows for both arms: paired), and on how many windows the first arm is better.
"""

import sys
from pathlib import Path

import jax
import numpy as np

import solarjax
from solarjax.checkpoint import load_params
from solarjax.config import load_job
from solarjax.data import load_data, stack_sequences
from solarjax.recipe import stage_train_config


def window_sums(config, params, windows, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per window: summed next-token nll where the next token is in the same document, and the count."""
    nll, count = [], []
    for start in range(0, len(windows), rows):
        b = stack_sequences([windows.sequence(i) for i in range(start, min(start + rows, len(windows)))])
        z = np.asarray(solarjax.logits(config, params, b["tokens"], b["positions"], b["segment_ids"]), np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        seg = b["segment_ids"]
        scored = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
        picked = np.take_along_axis(logp[:, :-1], b["tokens"][:, 1:, None], -1)[..., 0]
        nll.append(-(picked * scored).sum(1))
        count.append(scored.sum(1))
    return np.concatenate(nll), np.concatenate(count)


def main(path: str, first: str = "upscaled", second: str = "control") -> None:
    recipe = load_job(path)
    cfg = stage_train_config(recipe, recipe.stages[0])
    data = load_data(cfg.data)
    mesh = solarjax.make_mesh(1, 1, 1, jax.devices()[:1])
    scores = {}
    for stage in (first, second):
        config, params = load_params(Path(recipe.run_dir) / stage / "final", mesh)
        scores[stage] = window_sums(config, params, data.validation, cfg.global_batch)
    (a, n), (b, n2) = scores[first], scores[second]
    assert (n == n2).all()
    diff = a.sum() / n.sum() - b.sum() / n.sum()
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(n), (2000, len(n)))
    boot = (a[picks].sum(1) - b[picks].sum(1)) / n[picks].sum(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    print(f"held-out: {len(n)} windows, {int(n.sum()):,} scored tokens")
    print(f"{first}: {a.sum() / n.sum():.4f}   {second}: {b.sum() / n.sum():.4f}")
    print(f"{first} - {second}: {diff:+.4f} nats (95% paired bootstrap interval {low:+.4f} .. {high:+.4f}); "
          f"{first} better on {int((a / np.maximum(n, 1) < b / np.maximum(n, 1)).sum())} of {len(n)} windows")


if __name__ == "__main__":
    main(*sys.argv[1:])
