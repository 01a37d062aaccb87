"""convert_weights.py: Hugging Face <-> solarjax weight conversion.

  python convert_weights.py hf-to-jax --hf DIR --out DIR
  python convert_weights.py upscale --hf IN --out OUT (--n 32 --m 8 | --layers 0:24,8:32 | --expand 4)
                                    [--zero-new] [--arch mistral|llama|qwen2] [--dtype ...] [--shard-size 5GB]
  python convert_weights.py jax-to-hf --ckpt DIR --out DIR [--arch mistral|llama|qwen2]
                                      [--dtype float32|bfloat16|float16] [--shard-size 5GB]
  python convert_weights.py merge --hf A --hf B [--hf C ...] --out OUT
                                  (--method linear --weights 0.3,0.7 | --method slerp --t 0.4)
                                  [--dtype ...] [--shard-size 5GB]

Models: MistralForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM (RoPE scaling linear, dynamic,
llama3, yarn). A model keeps its architecture, except that --arch picks Mistral or Llama where
the two are the same model; Qwen2's q/k/v biases have no other form.
"""

from __future__ import annotations

import argparse
import sys

from solarjax.errors import cli
from solarjax.files import check_output
from solarjax.sharding import mesh_from_flag
from solarjax.weights import checkpoint, hf, merge, upscale
from solarjax.weights.tensorfile import parse_size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_weights.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-jax", help="HF Mistral/Llama/Qwen2 directory -> solarjax checkpoint (orbax)")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors or .bin)")
    a.add_argument("--out", required=True, help="solarjax checkpoint directory to create")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b = sub.add_parser("jax-to-hf", help="solarjax checkpoint -> HF directory (config.json + safetensors)")
    b.add_argument("--ckpt", required=True, help="solarjax checkpoint directory")
    b.add_argument("--out", required=True, help="HF model directory to create")
    b.add_argument("--arch", choices=("mistral", "llama", "qwen2"), default=None,
                   help="HF architecture; default: qwen2 for q/k/v biases, else mistral if the model has a "
                        "sliding window, else llama")
    b.add_argument("--dtype", choices=sorted(hf.SAVE_DTYPES), default=None,
                   help="default: the dtype of the HF model it was converted from, else float32")
    b.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c = sub.add_parser("upscale", help="HF -> HF growth (DUS, a layer plan, block expansion), streamed tensor by tensor")
    c.add_argument("--hf", required=True, help="base HF model directory (safetensors)")
    c.add_argument("--out", required=True, help="HF model directory to create")
    c.add_argument("--n", type=int, help="base depth (SOLAR: 32)")
    c.add_argument("--m", type=int, help="layers dropped from each copy (SOLAR: 8)")
    c.add_argument("--layers", help="explicit plan of base layer ranges, mergekit style: 0:24,8:32")
    c.add_argument("--expand", type=int, metavar="K",
                   help="LLaMA Pro block expansion: after every K-th block a copy with o_proj and down_proj zero")
    c.add_argument("--zero-new", action="store_true",
                   help="with --n/--m or --layers: the second and later copies of a base layer start with o_proj and "
                        "down_proj zero, so the grown model computes the base's function")
    c.add_argument("--arch", choices=("mistral", "llama", "qwen2"), default=None,
                   help="HF architecture; default: the base's; llama writes SOLAR's published form")
    c.add_argument("--dtype", choices=sorted(hf.SAVE_DTYPES), default=None, help="default: the base's dtype")
    c.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d = sub.add_parser("merge", help="mergekit's linear or slerp merge -> HF directory, streamed tensor by tensor")
    d.add_argument("--hf", action="append", required=True, metavar="DIR",
                   help="a model to merge: HF directory or solarjax checkpoint (e.g. a run's final/); give it "
                        "once per model; the first is slerp's t=0 and gives the config and tokenizer")
    d.add_argument("--out", required=True, help="HF model directory to create")
    d.add_argument("--method", choices=merge.METHODS, required=True)
    d.add_argument("--weights", help="linear: one weight per model, e.g. 0.3,0.7 (divided by their sum)")
    d.add_argument("--t", type=float, help="slerp: 0 gives the first model, 1 the second")
    d.add_argument("--dtype", choices=sorted(hf.SAVE_DTYPES), default=None,
                   help="default: the first model's dtype (the merge itself runs in float32)")
    d.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


@cli
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    sources = [args.ckpt] if args.command == "jax-to-hf" else args.hf if args.command == "merge" else [args.hf]
    check_output(args.out, sources)  # before loading: refused at once, not after minutes of reading
    if args.command == "merge":
        merge.merge_hf(args.hf, args.out, args.method, weights=merge.parse_weights(args.weights), t=args.t,
                       dtype=args.dtype, shard_size=parse_size(args.shard_size), overwrite=args.overwrite)
    elif args.command == "hf-to-jax":
        config, params = hf.load_hf(args.hf, mesh_from_flag("1,-1,1"))  # over all local devices
        checkpoint.save_params(args.out, config, params, tokenizer_dir=args.hf, overwrite=args.overwrite,
                               inputs=[args.hf])
    elif args.command == "upscale":
        spec = upscale.UpscaleSpec(n=args.n, m=args.m, layers=args.layers, expand=args.expand, zero_new=args.zero_new)
        upscale.upscale_hf(args.hf, args.out, spec, arch=args.arch, dtype=args.dtype,
                           shard_size=parse_size(args.shard_size), overwrite=args.overwrite)
    else:
        shard_size = parse_size(args.shard_size)
        config, params = checkpoint.load_params(args.ckpt, mesh_from_flag("1,-1,1"))
        hf.save_hf(config, params, args.out, arch=args.arch, dtype=args.dtype, shard_size=shard_size,
                   tokenizer_dir=args.ckpt, overwrite=args.overwrite, inputs=[args.ckpt])
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
