"""Benchmarks B1 and B2: training throughput on CPU through `train.py` itself (its metrics.jsonl
tokens/s over steady log intervals: the jitted step, the data pipeline, the loop and its syncs),
beside HF transformers MistralForCausalLM + torch.optim.AdamW on the same bench-small model, the
same batch shape (4 x 512) and the same optimizer settings (AdamW, weight decay 0.1, global-norm
clipping 1.0), float32; runs alternate in one script. B2 is model FLOPs/s over the machine's
practical peak (a large float32 matmul timed in the same run); model FLOPs per token are the
trainer's (and B6's) count: 6 per weight that multiplies plus PaLM's attention term.

  python bench/b1_b2_train.py [--steps 12] [--runs 3] [--compare OTHER_CHECKOUT]

--compare also runs another checkout's train.py (e.g. a worktree of the commit before a change),
alternating with this one's, for a before/after in one run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
import yaml
from bench_small import best_time, models

from solarjax.train.topology import model_flops_per_token

B, T, LOG_EVERY = 4, 512, 2
ROOT = Path(__file__).resolve().parent.parent


def matmul_peak(n=2048, repeats=5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / best_time(lambda: f(a).block_until_ready(), repeats)


def train_py(steps: int, workdir: Path, root: Path = ROOT) -> float:
    """Median tokens/s of train.py's log intervals after the first (which holds the compile)."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    config = {"model": {"preset": "bench-small"}, "data": {"seq_len": T}, "global_batch": B, "steps": steps,
              "log_every": LOG_EVERY, "eval_every": 0, "checkpoint_every": 10_000, "run_dir": str(run_dir),
              "optim": {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant"}}
    path = workdir / "b1.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "train.py"), "--config", str(path)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rates = [r["tokens_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_s" in r]
    return statistics.median(rates[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compare", type=Path, help="another checkout whose train.py runs alternately")
    args = p.parse_args(argv)
    config, _, hf_model = models("mistral")
    hf_model.train()
    torch.set_num_threads(os.cpu_count())
    ids = torch.as_tensor(np.random.RandomState(0).randint(0, config.vocab_size, (B, T)), dtype=torch.long)
    torch_opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def torch_step():
        torch_opt.zero_grad(set_to_none=True)
        loss = hf_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        torch_opt.step()
        return loss.item()

    ours, theirs, other = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            if args.compare:
                other.append(train_py(args.steps, Path(tmp), args.compare.resolve()))
                print(f"run: {args.compare} {other[-1]:.0f} tokens/s", file=sys.stderr)
            ours.append(train_py(args.steps, Path(tmp)))
            torch_step()  # warm-up
            t = time.perf_counter()
            for _ in range(args.steps):
                torch_step()
            theirs.append(B * T * args.steps / (time.perf_counter() - t))
            print(f"run: solarjax {ours[-1]:.0f} tokens/s, HF {theirs[-1]:.0f} tokens/s", file=sys.stderr)
    o, h = statistics.median(ours), statistics.median(theirs)
    peak = matmul_peak()
    fpt = model_flops_per_token(config, T)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, {os.cpu_count()} cores", file=sys.stderr)
    print("| id | train.py tokens/s (min-max) | HF + torch AdamW tokens/s (min-max) | ratio |")
    print("|---|---|---|---|")
    print(f"| B1 | {o:.0f} ({min(ours):.0f}-{max(ours):.0f}) | {h:.0f} ({min(theirs):.0f}-{max(theirs):.0f}) "
          f"| {o / h:.2f} |")
    if other:
        c = statistics.median(other)
        print(f"| B1, {args.compare} | {c:.0f} ({min(other):.0f}-{max(other):.0f}) | | {c / h:.2f} |")
    print(f"\nB2: {fpt / 1e6:.1f} MFLOP/token * {o:.0f} tokens/s = {fpt * o / 1e9:.1f} GFLOP/s; practical peak "
          f"(2048^3 float32 matmul) {peak / 1e9:.1f} GFLOP/s -> MFU {100 * fpt * o / peak:.0f}% "
          f"(HF: {100 * fpt * h / peak:.0f}%)")


if __name__ == "__main__":
    main()
