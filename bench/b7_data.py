"""Benchmark B7: data pipeline throughput, tokenize + pack the built-in corpus with the Mistral
tokenizer on this machine's cores, beside what training consumes (B1's step: bench-small, AdamW,
batch 4 x 512, float32) measured in the same run.

  python bench/b7_data.py [--num-proc 2] [--runs 3]
"""

import argparse
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solarjax
from solarjax import data
from solarjax.data import corpus
from solarjax.data.config import DataConfig
from solarjax.model.decoder import Decoder


def pipeline_rate(num_proc: int) -> tuple[float, float, float, int]:
    cfg = DataConfig(cache_dir=tempfile.mkdtemp(), num_proc=num_proc, seq_len=512)
    t0 = time.perf_counter()
    d = data.load_data(cfg, vocab_size=32000)
    t1 = time.perf_counter()
    batches = d.batches(global_batch=4, seed=0)
    for step in range(batches.steps_per_epoch):
        batches.batch(step)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, d.train.n_tokens / (t2 - t0), d.train.n_tokens


def training_rate(steps: int = 5) -> float:
    config = solarjax.preset("bench-small")
    params = solarjax.init_params(config, jax.random.key(0))
    opt = optax.adamw(1e-4)
    state = opt.init(params)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (4, 512)))

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = Decoder(config).apply({"params": p}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = jax.block_until_ready(step(params, state))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state))
        times.append(time.perf_counter() - t)
    return 4 * 512 / statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    runs = [pipeline_rate(args.num_proc) for _ in range(args.runs)]
    for tok_s, pack_s, rate, n in runs:
        print(f"tokenize {tok_s:.1f} s + pack {pack_s:.1f} s for {n} tokens: {rate:,.0f} tokens/s", file=sys.stderr)
    train = training_rate()
    rates = [r[2] for r in runs]
    rate = statistics.median(rates)
    print(f"| pipeline tokens/s, median of {args.runs} (min-max) | training consumes tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| {rate:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {train:,.0f} | {rate / train:.0f}x |")
    print(f"\ncorpus: {runs[0][3]:,} tokens (built-in, {len(corpus.default_corpus_files())} files), "
          f"num_proc {args.num_proc}; tokenize {statistics.median(r[0] for r in runs):.1f} s, "
          f"pack one epoch {statistics.median(r[1] for r in runs):.1f} s")


if __name__ == "__main__":
    main()
