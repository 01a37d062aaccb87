"""Benchmark B5: depth up-scaling of a Mistral-7B-shaped HF checkpoint (bf16) to 48 layers,
solarjax's streaming `convert_weights.py upscale` beside mergekit's passthrough merge on the same
input, alternating, in one run. Reports wall time and peak RSS of each (os.wait4 rusage of the
child), their ratios, and whether every output tensor is byte-identical to mergekit's.

  python bench/make_checkpoint.py --out /tmp/b5/base              # 14.5 GB of random bf16 weights
  python bench/b5_upscale.py --base /tmp/b5/base --work /tmp/b5 --mergekit /path/to/venv/bin/mergekit-yaml

mergekit is not a solarjax dependency: install it in its own environment.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from solarjax.weights.tensorfile import SafetensorsFile

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd, log):
    """(wall seconds, peak RSS bytes) of one child process."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[0]} failed, see {log}")
    return wall, usage.ru_maxrss * 1024


def tensor_digests(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        st = SafetensorsFile(f)
        for name in st.keys():
            info = st.info(name)
            data = memoryview(st.get(name).reshape(-1).view("u1"))
            out[name] = (str(info.dtype), info.shape, hashlib.blake2b(data, digest_size=16).hexdigest())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--mergekit", required=True, help="path of mergekit-yaml")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = {"slices": [{"sources": [{"model": str(Path(args.base).resolve()), "layer_range": [0, args.n - args.m]}]},
                         {"sources": [{"model": str(Path(args.base).resolve()), "layer_range": [args.m, args.n]}]}],
              "merge_method": "passthrough", "dtype": "bfloat16"}
    (work / "mergekit.yml").write_text(json.dumps(recipe))  # YAML is a superset of JSON
    commands = {
        "mergekit": [args.mergekit, str(work / "mergekit.yml"), str(work / "out-mergekit")],
        "solarjax": [sys.executable, str(ROOT / "convert_weights.py"), "upscale", "--hf", args.base, "--out",
                     str(work / "out-solarjax"), "--n", str(args.n), "--m", str(args.m), "--shard-size", "5GB"],
    }
    results = {k: [] for k in commands}
    for run in range(args.runs):
        for name, cmd in commands.items():
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
            subprocess.run(["sync"])
            wall, rss = timed(cmd, work / f"{name}.log")
            results[name].append((wall, rss))
            print(f"run {run + 1} {name}: {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB", file=sys.stderr)
    ours, theirs = tensor_digests(work / "out-solarjax"), tensor_digests(work / "out-mergekit")
    identical = ours == theirs
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    med = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    rss = {k: max(r for _, r in v) for k, v in results.items()}
    print(f"| tool | wall s (median of {args.runs}, min-max) | peak RSS GiB |")
    print("|---|---|---|")
    for k, v in results.items():
        walls = [w for w, _ in v]
        print(f"| {k} | {med[k]:.1f} ({min(walls):.1f}-{max(walls):.1f}) | {rss[k] / 2**30:.2f} |")
    print(f"\ntime ratio solarjax/mergekit: {med['solarjax'] / med['mergekit']:.2f}; "
          f"output tensors identical: {identical} ({len(ours)} tensors"
          + (f"; differing: {differing[:5]}" if differing else "") + ")")


if __name__ == "__main__":
    main()
