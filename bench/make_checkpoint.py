"""Writes a random HF checkpoint of a named preset shape (default: Mistral-7B in bfloat16, 14.5 GB),
for benchmark B5. Values come from a 256 MB pool of N(0, 0.02) read at a random offset per tensor,
so tensors differ from one another (and byte-identity checks mean something) without paying for
7 billion fresh random draws.

  python bench/make_checkpoint.py --out /tmp/mistral-7b-random [--preset mistral-7b] [--dtype bfloat16]
"""

import argparse
import sys

import numpy as np

from solarjax.model.config import preset
from solarjax.weights import hf
from solarjax.weights.tensorfile import TensorInfo, parse_size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="mistral-7b")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(hf.SAVE_DTYPES))
    p.add_argument("--shard-size", default="10GB", help="HF's Mistral-7B-v0.1 has shards of ~10 GB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    config = preset(args.preset)
    dtype = hf.SAVE_DTYPES[args.dtype]
    rng = np.random.default_rng(args.seed)
    pool = (rng.standard_normal(128 << 20, dtype=np.float32) * 0.02).astype(dtype)
    pool = np.concatenate([pool, pool])  # any window of up to len/2 values is contiguous
    infos = [TensorInfo(s.hf_name, s.hf_shape, dtype) for s in hf.weight_specs(config)]

    def write(writer, info):
        size = int(np.prod(info.shape))
        parts, done = [], 0
        while done < size:
            n = min(size - done, len(pool) // 2)
            start = int(rng.integers(0, len(pool) // 2))
            parts.append(pool[start:start + n])
            done += n
        writer.write_array(np.concatenate(parts).reshape(info.shape) if len(parts) > 1 else parts[0].reshape(info.shape))
    hf.write_hf_dir(args.out, infos, write, hf.config_to_hf(config, "mistral", args.dtype), None,
                    shard_size=parse_size(args.shard_size), overwrite=args.overwrite, desc=f"writing {args.out}")
    print(f"{args.out}: {sum(i.nbytes for i in infos) / 1e9:.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
