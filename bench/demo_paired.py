"""Is one arm of a recipe really ahead of another? Both stages' final parameters' loss on every
held-out window (the window_losses.npz each finished stage keeps: its own tokenizer, windows and
sharded eval step), with a paired bootstrap over windows: what a recipe's summary.json reports as
`paired_difference` / `paired_interval` for its PAIRS, here for any two stages.

  python bench/demo_paired.py configs/demo.yaml [upscaled control]

Prints each arm's held-out loss (next-token cross entropy within documents, as the trainer's eval
defines it), their difference, a 95% interval of the difference from 2000 bootstrap resamples of the
windows (same windows for both arms: paired), and on how many windows the first arm is better.
"""

import sys
from pathlib import Path

import numpy as np

from solarjax.train.config import load_job
from solarjax.train.recipe import WINDOWS_FILE, paired_bootstrap, read_window_losses, stage_train_config


def main(path: str, first: str = "upscaled", second: str = "control") -> None:
    recipe = load_job(path)
    dirs = [Path(stage_train_config(recipe, recipe.stage(s)).run_dir) for s in (first, second)]
    missing = [str(d / WINDOWS_FILE) for d in dirs if not (d / WINDOWS_FILE).is_file()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} missing: run the recipe (python train.py --config {path}) to the end")
    (a, n), (b, n2) = (read_window_losses(d) for d in dirs)
    if not np.array_equal(n, n2):
        sys.exit(f"error: {first} and {second} were scored on different held-out windows")
    diff, (low, high) = paired_bootstrap(a, b, n)
    print(f"held-out: {len(n)} windows, {int(n.sum()):,} scored tokens")
    print(f"{first}: {a.sum() / n.sum():.4f}   {second}: {b.sum() / n.sum():.4f}")
    print(f"{first} - {second}: {diff:+.4f} nats (95% paired bootstrap interval {low:+.4f} .. {high:+.4f}); "
          f"{first} better on {int((a / np.maximum(n, 1) < b / np.maximum(n, 1)).sum())} of {len(n)} windows")


if __name__ == "__main__":
    main(*sys.argv[1:])
