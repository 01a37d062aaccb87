"""Is one arm of a recipe really ahead of another? Both stages' final parameters scored on every
held-out window, with a paired bootstrap over windows: what a recipe's summary.json reports as
`paired_difference` / `paired_interval` for its PAIRS, here for any two stages.

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
from solarjax.data import load_data
from solarjax.recipe import paired_bootstrap, stage_train_config, window_losses


def main(path: str, first: str = "upscaled", second: str = "control") -> None:
    recipe = load_job(path)
    cfg = stage_train_config(recipe, recipe.stages[0])
    windows = load_data(cfg.data).validation
    mesh = solarjax.make_mesh(1, 1, 1, jax.devices()[:1])
    scores = {}
    for stage in (first, second):
        config, params = load_params(Path(recipe.run_dir) / stage / "final", mesh)
        scores[stage] = window_losses(config, params, windows, cfg.global_batch)
    (a, n), (b, _) = scores[first], scores[second]
    diff, (low, high) = paired_bootstrap(a, b, n)
    print(f"held-out: {len(n)} windows, {int(n.sum()):,} scored tokens")
    print(f"{first}: {a.sum() / n.sum():.4f}   {second}: {b.sum() / n.sum():.4f}")
    print(f"{first} - {second}: {diff:+.4f} nats (95% paired bootstrap interval {low:+.4f} .. {high:+.4f}); "
          f"{first} better on {int((a / np.maximum(n, 1) < b / np.maximum(n, 1)).sum())} of {len(n)} windows")


if __name__ == "__main__":
    main(*sys.argv[1:])
