"""Benchmarks B3 and B4: decoding speed of solarjax's sampler beside HF transformers' generate, on
the bench-small model (BENCHMARKS.md) with the very same random weights, greedy, float32, CPU.

  B3: batch 1, a 32-token prompt, 256 new tokens; also the share of the memory-bandwidth roofline
      (weight bytes read per token / measured copy bandwidth).
  B4: 16 prompts of mixed lengths (8-64 tokens), left-padded, 128 new tokens each.

Both sides are timed end to end (prefill + decode) after a warm-up run, EOS disabled so every row
makes all its tokens; medians of --runs alternating runs.

  python bench/b3_b4_decode.py [--runs 3]
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np
import torch
import transformers
from bench_small import best_time, models

import solarjax
from solarjax.eval import sample


def copy_bandwidth(nbytes=1 << 29, repeats=5) -> float:
    """Bytes per second moved by a large numpy copy, counting the read and the write."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * nbytes / best_time(lambda: np.copyto(dst, src), repeats)


def hf_generate(model, prompts, new):
    tokens, _, segments = sample.left_pad(prompts)
    ids, mask = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(segments > 0, dtype=torch.long)
    P = tokens.shape[1]
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    return time.perf_counter() - t, out[:, P:].tolist()


def ours_generate(config, params, prompts, new):
    t = time.perf_counter()
    r = sample.generate(config, params, prompts, sample.Sampling(max_new_tokens=new), eos_ids=None)
    wall = time.perf_counter() - t
    timing = r[0]["timing"]
    return timing["prefill_s"] + timing["decode_s"], wall, [x["token_ids"] for x in r]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    config, params, hf_model = models("llama")
    hf_model.eval()
    rng = np.random.RandomState(0)
    cases = {
        "B3": ([rng.randint(3, config.vocab_size, 32).tolist()], 256),
        "B4": ([rng.randint(3, config.vocab_size, n).tolist() for n in rng.randint(8, 65, 16)], 128),
    }
    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} torch threads, cores: {len(__import__('os').sched_getaffinity(0))}",
          file=sys.stderr)
    rows = []
    for name, (prompts, new) in cases.items():
        tokens = len(prompts) * new
        ours_generate(config, params, prompts, new)  # compile
        hf_generate(hf_model, prompts, 4)  # warm up
        ours_t, hf_t, agree = [], [], True
        for _ in range(args.runs):
            t, _, ours_ids = ours_generate(config, params, prompts, new)
            ours_t.append(t)
            t, hf_ids = hf_generate(hf_model, prompts, new)
            hf_t.append(t)
            agree &= ours_ids == hf_ids
        o, h = statistics.median(ours_t), statistics.median(hf_t)
        rows.append((name, len(prompts), new, tokens / o, (tokens / max(ours_t), tokens / min(ours_t)),
                     tokens / h, (tokens / max(hf_t), tokens / min(hf_t)), h / o, agree))
        print(f"{name}: solarjax {tokens / o:.1f} tok/s, HF {tokens / h:.1f} tok/s, ratio {h / o:.2f}, "
              f"same tokens: {agree}", file=sys.stderr)
    bw = copy_bandwidth()
    n_params = solarjax.param_count(config)
    # Per decoded token every weight is read once, except the embedding table (one row).
    weight_bytes = 4 * (n_params - config.vocab_size * config.hidden_size + config.hidden_size)
    roofline = bw / weight_bytes
    print("| id | batch x new | solarjax tok/s (min-max) | HF generate tok/s (min-max) | ratio | same tokens |")
    print("|---|---|---|---|---|---|")
    for name, b, new, o, orng, h, hrng, ratio, agree in rows:
        print(f"| {name} | {b} x {new} | {o:.1f} ({orng[0]:.1f}-{orng[1]:.1f}) | {h:.1f} ({hrng[0]:.1f}-{hrng[1]:.1f}) "
              f"| {ratio:.2f} | {agree} |")
    b3 = rows[0]
    print(f"\nroofline (batch 1): copy bandwidth {bw / 1e9:.1f} GB/s (read + write), {weight_bytes / 1e6:.0f} MB "
          f"of weights per token -> {roofline:.1f} tok/s; solarjax {100 * b3[3] / roofline:.0f}%, "
          f"HF {100 * b3[5] / roofline:.0f}% of it")


if __name__ == "__main__":
    main()
