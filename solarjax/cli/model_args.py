"""The model flags every command-line tool shares (--ckpt | --hf, --tokenizer, --mesh) and the one
loader behind them."""

from __future__ import annotations

from pathlib import Path

from solarjax import compile_cache
from solarjax.data.config import DataConfig
from solarjax.sharding import mesh_from_flag
from solarjax.tokenizer import TokenizerError, default_tokenizer_path, has_tokenizer, load_tokenizer
from solarjax.weights.checkpoint import load_model, tokenizer_dir

# ---------------------------------------------------------------------------------------------
# The model arguments every command that runs a model takes (sample, evaluate)


def add_model_arguments(p, mesh_help: str = "data,fsdp,tensor over this machine's devices (-1: the rest); "
                        "the default shards the weights over all of them") -> None:
    """--ckpt | --hf (one required), --tokenizer, --mesh."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="solarjax checkpoint directory (a run's final/, or RUN/checkpoints/STEP)")
    src.add_argument("--hf", help="Hugging Face model directory")
    p.add_argument("--mesh", default="1,-1,1", help=mesh_help)
    p.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model, or a directory with one; default: the "
                   "model directory's own (a directory without one is refused: none is assumed)")


def load_for_cli(args):
    """(path, mesh, config, params, tokenizer) from add_model_arguments' flags. A model directory
    without a tokenizer and no --tokenizer is refused before any weight is read: Llama 2's 32000
    ids are not Mistral's, so none is guessed."""
    path = Path(args.ckpt or args.hf)
    if args.tokenizer is None and not has_tokenizer(tokenizer_dir(path)):
        raise TokenizerError(f"{path} has no tokenizer.json or tokenizer.model; give --tokenizer (a tokenizer "
                             f"file or a directory with one; Mistral's: {default_tokenizer_path()})")
    compile_cache.enable(None, DataConfig.cache_dir)  # the sampler's and the scorer's programs, once
    mesh = mesh_from_flag(args.mesh)
    config, params = load_model(path, mesh)
    tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir(path)).check_fits(config.vocab_size, str(path))
    return path, mesh, config, params, tokenizer
