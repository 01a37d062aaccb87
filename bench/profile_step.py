"""Where a CPU training step goes: the trainer's own jitted train step (loss, AdamW, clipping)
on a model preset, traced with jax.profiler, XLA's ops summed by name (fusions, GEMMs, copies).

  python bench/profile_step.py [--preset bench-small] [--batch 4] [--seq 512] [--steps 3] [--top 25]
  python bench/profile_step.py --preset tiny-mistral --set num_layers=4 hidden_size=64 intermediate_size=128 \
      head_dim=16 --seq 256     (the demo's base)
"""

import argparse
import collections
import dataclasses
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import solarjax
from solarjax.data.config import DataConfig
from solarjax.sharding import make_mesh
from solarjax.train.config import TrainConfig
from solarjax.train.plan import RunPlan
from solarjax.train.step import new_state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--loss-chunk-tokens", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT", help="model fields over the preset's")
    args = p.parse_args(argv)
    config = dataclasses.replace(solarjax.preset(args.preset),
                                 **{k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    cfg = TrainConfig(model=config, data=DataConfig(seq_len=args.seq), global_batch=args.batch,
                      loss_chunk_tokens=args.loss_chunk_tokens)
    mesh = make_mesh(1, 1, 1)
    plan = RunPlan.resolve(cfg, mesh)
    optimizer, _, step = plan.build_step(mesh, 1000)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.asarray(np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape))}
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p: new_state(optimizer, p))(solarjax.init_params(config, jax.random.key(0)))
        state, m = step(state, batch)  # compile
        jax.block_until_ready(m)
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                start = time.perf_counter()
                for _ in range(args.steps):
                    state, m = step(state, batch)
                jax.block_until_ready(m)
                wall = time.perf_counter() - start
            trace = json.loads(gzip.open(next(Path(tmp).rglob("perfetto_trace.json.gz"))).read())
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_op = collections.Counter()
    for e in trace["traceEvents"]:  # XLA's ops run on its own threads; the rest is runtime bookkeeping
        if (e.get("ph") == "X" and "XLA" in threads.get((e["pid"], e["tid"]), "")
                and not e["name"].startswith(("ThunkExecutor", "ThreadpoolListener", "Wait"))):
            by_op[e["name"]] += e["dur"] / 1e6
    total = sum(by_op.values())
    print(f"{args.preset}, batch {args.batch} x {args.seq}: {wall / args.steps:.3f} s per step (wall); "
          f"ops {total / args.steps:.3f} s per step (summed over the XLA threads, so up to cores x wall)", file=sys.stderr)
    for name, sec in by_op.most_common(args.top):
        print(f"{sec / args.steps * 1e3:9.1f} ms  {100 * sec / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
