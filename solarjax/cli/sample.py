"""python -m solarjax.sample: greedy or sampled completions of prompts from a checkpoint or an HF directory.

  python -m solarjax.sample (--ckpt DIR | --hf DIR) --prompt TEXT [--prompt TEXT ...] [--prompts-file F]
      [--chat] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--format text|json]

The model directory's own tokenizer is used (tokenizer.json or tokenizer.model), and generation stops
at any of its EOS ids (generation_config.json may list several). --chat sends each prompt as a user
message through the model's chat template. The sampler itself is solarjax.eval.sample.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from solarjax.cli.model_args import add_model_arguments, load_for_cli
from solarjax.errors import cli
from solarjax.eval import sample as sampler  # as a module: what tests and tools patch is what runs

# ---------------------------------------------------------------------------------------------
# CLI


def _parser():
    p = argparse.ArgumentParser(prog="python -m solarjax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the "
                   "model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 is off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p


@cli
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines()
                        if line.strip()]
        except OSError as e:
            raise sampler.SamplingError(f"--prompts-file {args.prompts_file}: {e.strerror}") from None
    if not prompts:
        raise sampler.SamplingError("give at least one --prompt or a --prompts-file")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise sampler.SamplingError(f"prompt {i} is empty")
    sampling = sampler.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    path, mesh, config, params, tokenizer = load_for_cli(args)
    if args.chat:
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in prompts]
    else:
        ids = tokenizer.encode_batch(prompts)
    with jax.set_mesh(mesh):
        results = sampler.generate(config, params, ids, sampling, tokenizer.eos_ids)
    for text, prompt, r in zip(prompts, ids, results):
        completion = tokenizer.decode_suffix(prompt, [t for t in r["token_ids"] if t not in tokenizer.eos_ids])
        if args.format == "json":
            print(json.dumps({"prompt": text, "completion": completion, **r}))
        else:  # a chat reply is its own turn, not a continuation of the user's text
            print(text + ("\n" if args.chat else "") + completion + "\n")
    return 0
