"""Start-up of the main job's stages: seconds from a stage's start (building its Trainer) to its
first training step done, with an empty compilation cache (cold) and with the one the cold start
filled (warm), each in a fresh process, as a recipe's next stage or a restart would be; and the
restart of a stopped run (a new process resuming from its checkpoint), cold and warm.

  python bench/startup.py [configs/demo.yaml]

Each stage runs with its real config (step-0 eval over the whole held-out split, the task, its
model) from a base trained for 2 steps; the token cache is built first, so no figure includes
tokenizing. Prints one row per case: cold s, warm s, cold / warm.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from solarjax.train.config import load_job

CHILD = """
import json, sys, time
began = time.perf_counter()
from solarjax.train.config import load_job
from solarjax.train.recipe import stage_train_config
from solarjax.train.trainer import Trainer
import dataclasses
config, run_dir, cache, stage, prep = sys.argv[1:6]
recipe = load_job(config, [f"run_dir={prep}"])  # earlier stages' finals: prep's
cfg = dataclasses.replace(stage_train_config(recipe, recipe.stage(stage)), run_dir=run_dir, compile_cache_dir=cache)
imported = time.perf_counter()
trainer = Trainer(cfg, eval_ends=True)
built = time.perf_counter()
evaluate, spent = trainer.evaluate, []
def timed(*a, **k):
    t = time.perf_counter()
    out = evaluate(*a, **k)
    spent.append(time.perf_counter() - t)
    return out
trainer.evaluate = timed
trainer.run(until=int(trainer.state["step"]) + 1)
total = time.perf_counter() - imported
print(json.dumps({"start_to_first_step": total, "eval0": sum(spent), "setup": built - imported}))
"""


def child(*args) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(config: str = "configs/demo.yaml") -> None:
    root = Path(tempfile.mkdtemp(prefix="startup-"))
    try:
        # A base to start the continued stages from (2 steps; the cache of tokens built here).
        prep = ("import dataclasses, sys\nfrom solarjax.train.config import load_job\n"
                "from solarjax.train.recipe import stage_train_config\nfrom solarjax.train.trainer import Trainer\n"
                "recipe = load_job(sys.argv[1], [f'run_dir={sys.argv[2]}', f'compile_cache_dir={sys.argv[2]}/xla'])\n"
                "cfg = stage_train_config(recipe, recipe.stages[0])\n"
                "Trainer(dataclasses.replace(cfg, steps=2, eval_every=0, eval_tasks=(), sample_prompts=())).run()\n")
        subprocess.run([sys.executable, "-c", prep, config, str(root / "prep")], check=True, capture_output=True)
        rows = []
        for stage in [s.name for s in load_job(config).stages]:
            got = {}
            for kind in ("cold", "warm"):  # warm: the cache the cold start filled
                got[kind] = child(config, root / f"{stage}-{kind}", root / f"xla-{stage}", stage, root / "prep")
            rows.append((f"stage {stage}", got))
        got = {}
        for kind in ("cold", "warm"):  # a stopped run restarted: a new process resumes from its checkpoint
            got[kind] = child(config, root / "base-warm", root / ("xla-restart" if kind == "cold" else "xla-base"),
                              "base", root / "prep")
        rows.append(("restart of base (no step-0 eval)", got))
        print(f"{'case':<34} {'cold s':>7} {'warm s':>7} {'cold/warm':>9}   {'of which step-0 eval, cold / warm':>34}")
        for name, t in rows:
            cold, warm = t["cold"]["start_to_first_step"], t["warm"]["start_to_first_step"]
            print(f"{name:<34} {cold:7.1f} {warm:7.1f} {cold / warm:9.1f}   "
                  f"{t['cold']['eval0']:16.1f} / {t['warm']['eval0']:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
