"""The training entry point behind train.py.

  python train.py --config configs/X.yaml [dotted.key=value ...]
  python train.py --config configs/X.yaml --compile-only --topology v5p-128   (AOT, needs libtpu)
  multi-host on CPU/GPU clusters without auto-detection:
  python train.py --config ... --coordinator HOST:PORT --num-processes N --process-id I
On TPU pods, SLURM and Open MPI, --distributed auto lets jax.distributed find its peers.
Running the same command again resumes from the run directory's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from solarjax.errors import ConfigError, cli


def _parser():
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (configs/)")
    p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. optim.learning_rate=1e-4")
    p.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: jax.distributed.initialize() detects TPU pods, SLURM, Open MPI")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for an explicit multi-process run")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--compile-only", action="store_true",
                   help="compile the train step ahead of time for --topology and report memory and FLOPs")
    p.add_argument("--topology", help="TPU slice for --compile-only, e.g. v5p-128 or v5p:4x4x4 (needs libtpu)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines: stage headers, the model line, samples and the final table only")
    p.add_argument("--stage", help="with --compile-only and a recipe: the stage to compile (default: the last)")
    return p


@cli
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import jax

    from solarjax.train.config import RecipeConfig, load_job
    from solarjax.train.progress import set_quiet
    set_quiet(args.quiet)
    cfg = load_job(args.config, args.overrides)
    if args.compile_only:
        import json

        from solarjax.train.aot import compile_for_topology
        if not args.topology:
            raise ConfigError("--compile-only needs --topology (e.g. v5p-128)")
        if isinstance(cfg, RecipeConfig):
            from solarjax.train.recipe import stage_train_config
            names = [s.name for s in cfg.stages]
            if args.stage is not None and args.stage not in names:
                raise ConfigError(f"--stage {args.stage!r} is not a stage of {args.config} ({', '.join(names)})")
            cfg = stage_train_config(cfg, cfg.stage(args.stage or names[-1]))
        print(json.dumps(compile_for_topology(cfg, args.topology), indent=2))
        return 0
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise ConfigError("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed == "auto":
        jax.distributed.initialize()
    from solarjax.train.trainer import Trainer
    if isinstance(cfg, RecipeConfig):
        from solarjax.train.recipe import run_recipe
        run_recipe(cfg)
        return 0
    record = Trainer(cfg).run()
    if record:
        print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"), file=sys.stderr)
    return 0
