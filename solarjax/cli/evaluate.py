"""Task scoring as lm-evaluation-harness does it (SOLAR's H6: ARC, HellaSwag, MMLU, TruthfulQA mc2,
Winogrande, GSM8K), on the sharded model, plus a built-in task that runs offline.

  python -m solarjax.evaluate (--ckpt DIR | --hf DIR) --tasks T1,T2 [--num-fewshot K] [--limit N]
      [--batch-size B] [--max-gen-tokens N] [--mesh D,F,T] [--tokenizer PATH] [--format text|json]
      [--log-items FILE]

A task is NAME=PATH (a local copy of the hub dataset: its files, jsonl/json/parquet, in the hub
layout), NAME alone (the hub, where reachable; `builtin_next_line` needs nothing), or the path of a
generic multiple-choice jsonl (`context`, `choices`, `gold`), scored 0-shot. NAMES lists the tasks.

Scoring rules (docs/architecture.md, "Evaluation", says what matches the harness and what does not):
  - each choice's log-likelihood is the sum over its tokens as the continuation of the few-shot
    context, with the target delimiter " " between them; the continuation's tokens are those of the
    joint encoding past the context's (the harness's _encode_pair, trailing spaces of the context
    moved into the continuation); acc = argmax of the sums, acc_norm = argmax of sum / len(choice);
  - truthfulqa_mc2: the normalized probability mass of the true answers; winogrande: the option
    fills the blank in the context and the shared rest of the sentence is scored;
  - gsm8k: greedy generation until "Question:" or the model's EOS, the answer extracted by the
    harness's strict ("#### N") and flexible (last number) regexes and compared after its cleaning;
  - few-shot examples drawn from the train (MMLU: dev, first k) split with random.Random(1234)
    in eval-document order, as the harness draws them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from solarjax.cli.model_args import add_model_arguments, load_for_cli
from solarjax.errors import cli
from solarjax.eval.scoring import FEWSHOT_SEED, evaluate
from solarjax.eval.tasks import NAMES, TaskError, load_task

# ---------------------------------------------------------------------------------------------
# CLI: what is scored comes from solarjax.eval.tasks, how from solarjax.eval.scoring


def _parser():
    p = argparse.ArgumentParser(prog="python -m solarjax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, mesh_help="data,fsdp,tensor sizes (-1: the remaining devices)")
    p.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(NAMES)} (NAME=PATH for a local "
                   f"copy), or a jsonl path with context/choices/gold")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for every task (default: "
                   "each task's H6 setting: arc 25, hellaswag 10, mmlu 5, truthfulqa 0, winogrande 5, gsm8k 5)")
    p.add_argument("--limit", type=int, default=None, help="score the first N documents of each task (of each "
                   "MMLU subject)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (rounded up to the mesh's data x fsdp)")
    p.add_argument("--max-gen-tokens", type=int, default=256, help="generative tasks: tokens per answer")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--log-items", help="write one JSON line per scored item to this file")
    return p


def _format_text(out: dict) -> str:
    lines = [f"{'task':24} {'metric':22} {'value':>8} {'n':>6}", "-" * 63]
    for task, r in out["results"].items():
        for metric, value in r.items():
            if metric not in ("n", "subjects"):
                lines.append(f"{task:24} {metric:22} {value:8.4f} {r['n']:6d}")
    t = out["config"]["timing"]
    if t["tokens_per_s"]:
        lines.append(f"scored {t['scored_tokens']:,} tokens at {t['tokens_per_s']:,.0f} tokens/s "
                     f"(compile {t['compile_s']:.1f} s)")
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-gen-tokens", args.max_gen_tokens)):
        if value is not None and value < 1:
            raise TaskError(f"{name} must be a positive integer, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise TaskError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    entries = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not entries:
        raise TaskError("--tasks names no task")
    tasks = [t for entry in entries for t in load_task(entry, args.num_fewshot)]
    path, mesh, config, params, tokenizer = load_for_cli(args)
    items = [] if args.log_items else None
    t0 = time.perf_counter()
    out = evaluate(config, params, tokenizer, tasks, mesh, args.batch_size, args.limit, args.max_gen_tokens, items)
    out["config"] = {"model": str(path), "tokenizer": str(tokenizer.path), "tasks": entries,
                     "num_fewshot": {t.group or t.name: t.num_fewshot for t in tasks}, "limit": args.limit,
                     "batch_size": args.batch_size, "max_gen_tokens": args.max_gen_tokens,
                     "fewshot_seed": FEWSHOT_SEED, "mesh": dict(mesh.shape), "devices": jax.device_count(),
                     "backend": jax.default_backend(), "seconds": time.perf_counter() - t0,
                     "timing": out.pop("timing")}
    if args.log_items:
        with open(args.log_items, "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
    print(json.dumps(out, indent=2) if args.format == "json" else _format_text(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
