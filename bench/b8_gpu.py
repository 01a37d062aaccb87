"""Benchmark B8: training MFU and decoding speed on one accelerator, in one bounded command.

For each preset (a model shape and how it is run: batch, sequence, microbatches, remat):
  train:  the trainer's own jitted step (step.jit_train_step with the optimizer, schedule and
          loss chunking train.py builds; AdamW, float32 parameters and moments, bf16 compute) on
          random tokens; warm-up steps untimed, then timed steps ending in block_until_ready.
          tokens/s, and MFU = tokens/s x model FLOPs per token (topology.model_flops_per_token: 6 per
          weight that multiplies + PaLM's attention term) / the chip's dense bf16 peak.
  decode: solarjax.eval.sample.generate (jitted prefill + KV-cache decode loop), greedy, no EOS, bf16
          weights, a few rows; tokens/s of the decode loop (timed by generate, after compilation).

The JSON (--out) is rewritten after every measurement, so a run cut short by a timeout keeps what
it measured; progress goes to stderr as it happens. A measurement is skipped, and says so, once
--budget-s seconds have passed.

  python bench/b8_gpu.py --out b8.json                  # llama-1b and llama2-7b, ~6 min on an H200
  python bench/b8_gpu.py --tiny --peak-tflops 1 --out b8.json   # the CPU smoke run the tests make
  python bench/b8_gpu.py --presets mistral-7b --batch 2 --model remat=dots_no_batch --out b8.json

The peak comes from topology.PEAK_TFLOPS by the device kind; an unknown device is refused unless
--peak-tflops is given (a guessed peak would make the MFU meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

# Before jax starts: by default it takes 75% of GPU memory, too little for the 7B step's ~100 GiB
# of parameters, moments and gradients on a 141 GB card.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's solarjax, also where it is not installed (the GPU image)

import jax  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from solarjax.data.config import DataConfig  # noqa: E402
from solarjax.eval import sample  # noqa: E402
from solarjax.model.config import ModelConfig, preset  # noqa: E402
from solarjax.model.decoder import init_params, param_count  # noqa: E402
from solarjax.sharding import batch_sharding, make_mesh  # noqa: E402
from solarjax.train.config import OptimConfig, TrainConfig
from solarjax.train.objectives import get as get_objective  # noqa: E402
from solarjax.train.plan import RunPlan  # noqa: E402
from solarjax.train.step import new_state, state_shardings  # noqa: E402
from solarjax.train.topology import PEAK_TFLOPS, model_flops_per_token  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    model: ModelConfig
    rows: int  # global batch, sequences
    seq_len: int
    microbatches: int  # gradient accumulation groups (activations of rows / microbatches sequences)
    warmup_steps: int
    timed_steps: int
    decode_rows: int
    prompt_len: int
    new_tokens: int
    why: str  # why these choices


BF16 = dict(dtype="bfloat16", param_dtype="float32")
PRESETS = {
    # The CPU smoke size (tests/test_bench.py): bf16 compute like the others, seconds to run.
    "tiny": Preset(preset("tiny").replace(**BF16), rows=2, seq_len=64, microbatches=1, warmup_steps=1,
                   timed_steps=2, decode_rows=2, prompt_len=16, new_tokens=8, why="CPU smoke run"),
    # Llama 3.2 1B's shape (1.24 B parameters, tied 128k embedding). State + gradients ~18 GiB.
    # Without remat a sequence of 4096 keeps ~10-20 GiB of activations (XLA:CPU's buffer assignment
    # says 20 with everything upcast to float32), so 2 sequences per group: <= 60 GiB in all.
    "llama-1b": Preset(
        ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
                    tie_word_embeddings=True, remat="none", **BF16,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        rows=16, seq_len=4096, microbatches=8, warmup_steps=2, timed_steps=6, decode_rows=4, prompt_len=128,
        new_tokens=256, why="no remat (its recompute would cost a third of the step's FLOPs); 8 groups of 2 x 4096 "
                            "bound the activations"),
    # Llama 2 7B's shape (6.74 B parameters), MaxText's 51%-MFU anchor (on H100). float32 params and
    # AdamW moments take 75 GiB and the gradients 25 GiB of the card's ~139 GiB, so: full remat (a
    # block keeps only its input, 1 GiB at 4 x 4096) and no microbatching (its gradient accumulator
    # would be another 25 GiB). XLA:CPU's buffer assignment of this step comes to 130.5 GiB, 25 of
    # them a clipped copy of the gradients that a GPU fusion should not need; if it does not fit,
    # the run says so in the JSON (and tries fewer rows, which saves little here).
    "llama2-7b": Preset(
        ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    num_kv_heads=32, max_position_embeddings=4096, remat="full", **BF16),
        rows=4, seq_len=4096, microbatches=1, warmup_steps=2, timed_steps=4, decode_rows=4, prompt_len=128,
        new_tokens=256, why="full remat, no microbatches: parameters, moments and gradients take ~100 GiB"),
    # Mistral-7B (the SOLAR base), 7.24 B: ~108 GiB of state and gradients, tighter still; not in
    # the default run.
    "mistral-7b": Preset(preset("mistral-7b").replace(remat="full", **BF16), rows=4, seq_len=4096, microbatches=1,
                         warmup_steps=2, timed_steps=4, decode_rows=4, prompt_len=128, new_tokens=256,
                         why="full remat, no microbatches: parameters, moments and gradients take ~108 GiB"),
}
DEFAULT_PRESETS = ("llama-1b", "llama2-7b")


def peak_tflops(kind: str, override: float | None) -> tuple[float, str]:
    """(dense bf16 TFLOP/s of one device, where it came from). Longest table key that starts
    `kind` wins (device kinds carry suffixes such as 'NVIDIA H100 80GB HBM3')."""
    if override is not None:
        if not override > 0:
            raise SystemExit(f"error: --peak-tflops must be > 0, got {override}")
        return float(override), "--peak-tflops"
    match = [k for k in PEAK_TFLOPS if kind.startswith(k)]
    if not match:
        raise SystemExit(f"error: no dense bf16 peak is known for device kind {kind!r} (known: "
                         f"{', '.join(PEAK_TFLOPS)}); give --peak-tflops N for it")
    key = max(match, key=len)
    return float(PEAK_TFLOPS[key]), f"solarjax.train.topology.PEAK_TFLOPS[{key!r}]"


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _say(t0: float, message: str) -> None:
    print(f"[b8 {time.perf_counter() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def measure_train(p: Preset, rows: int, peak: float, t0: float) -> dict:
    config, T = p.model, p.seq_len
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])  # one chip: MFU is per device
    steps = p.warmup_steps + p.timed_steps
    cfg = TrainConfig(model=config, data=DataConfig(seq_len=T), optim=OptimConfig(), steps=steps, global_batch=rows,
                      microbatches=p.microbatches, eval_every=0)
    plan = RunPlan.resolve(cfg, mesh)  # what the trainer would run: attention and loss chunk for this chip
    chunk = plan.loss_chunk
    optimizer, lr, step = plan.build_step(mesh)
    shardings = state_shardings(config, optimizer, mesh)
    with jax.set_mesh(mesh):  # the model's sharding hints, as in Trainer.run
        params = init_params(config, jax.random.key(0), mesh)
        state = jax.jit(lambda q: new_state(optimizer, q), donate_argnums=0, out_shardings=shardings)(params)
        del params
        # One document per row of random tokens: what the step computes does not depend on the values.
        tokens_BT = np.random.RandomState(0).randint(0, config.vocab_size, (rows, T)).astype(np.int32)
        host = {"tokens": tokens_BT, "segment_ids": np.ones((rows, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()}
        assert set(host) == set(get_objective("lm").batch_keys)
        batch = jax.device_put(host, batch_sharding(mesh))
        _say(t0, f"  compiling the train step ({rows} x {T}, microbatches {p.microbatches}, remat {config.remat})")
        c0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - c0
        mem = compiled.memory_analysis()
        memory = None if mem is None else {
            "arguments_gib": mem.argument_size_in_bytes / 2**30, "temp_gib": mem.temp_size_in_bytes / 2**30,
            "output_not_aliased_gib": (mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30}
        stats = jax.devices()[0].memory_stats()
        if memory and stats and "bytes_limit" in stats:
            # Refuse before running a step that cannot fit: the caller retries with fewer rows.
            need = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            free = stats["bytes_limit"] - stats["bytes_in_use"]
            if need > free:
                raise MemoryError(f"RESOURCE_EXHAUSTED: the step needs {need / 2**30:.1f} GiB beyond its arguments, "
                                  f"{free / 2**30:.1f} GiB are free")
        _say(t0, f"  compiled in {compile_s:.1f}s; {p.warmup_steps} warm-up steps")
        for _ in range(p.warmup_steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        s0 = time.perf_counter()
        for _ in range(p.timed_steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))  # steps chain through the donated state: one sync at the end
        timed_s = time.perf_counter() - s0
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} after {steps} steps")
    flops_per_token = model_flops_per_token(config, T)
    tokens_per_step = rows * T
    tokens_per_s = tokens_per_step * p.timed_steps / timed_s
    model_tflops = tokens_per_s * flops_per_token / 1e12
    stats = jax.devices()[0].memory_stats() or {}
    return {"rows": rows, "seq_len": T, "microbatches": p.microbatches, "remat": config.remat, "loss_chunk": chunk,
            "params": param_count(config), "flops_per_token": flops_per_token, "compile_s": compile_s,
            "warmup_steps": p.warmup_steps, "timed_steps": p.timed_steps, "timed_s": timed_s,
            "step_s": timed_s / p.timed_steps, "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": model_tflops, "mfu": model_tflops / peak, "loss": loss, "compiled_memory": memory,
            "peak_gib_in_use_so_far": stats.get("peak_bytes_in_use", 0) / 2**30 or None}


def measure_decode(p: Preset, t0: float, runs: int = 2) -> dict:
    """bf16 weights (how one serves; the training state is gone by now), `runs` calls of generate:
    the first compiles (generate times only after compilation), the best run is reported."""
    config = p.model.replace(param_dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    prompts = np.random.RandomState(1).randint(3, config.vocab_size, (p.decode_rows, p.prompt_len)).tolist()
    timings = []
    for i in range(runs):
        c0 = time.perf_counter()
        result = sample.generate(config, params, prompts, sample.Sampling(max_new_tokens=p.new_tokens), eos_ids=None)
        made = sum(len(r["token_ids"]) for r in result)
        if made != p.decode_rows * p.new_tokens:
            raise RuntimeError(f"generate made {made} tokens, expected {p.decode_rows} x {p.new_tokens}")
        timings.append(dict(result[0]["timing"], wall_s=time.perf_counter() - c0))
        _say(t0, f"  decode run {i + 1}: prefill {timings[-1]['prefill_s']:.3f}s, decode {timings[-1]['decode_s']:.3f}s "
                 f"(wall {timings[-1]['wall_s']:.1f}s with compilation)")
    best = min(timings, key=lambda t: t["decode_s"])
    # The first new token comes from the prefill; the loop makes the other new_tokens - 1 per row.
    loop_tokens = p.decode_rows * (p.new_tokens - 1)
    return {"rows": p.decode_rows, "prompt_len": p.prompt_len, "new_tokens": p.new_tokens, "param_dtype": "bfloat16",
            "prefill_s": best["prefill_s"], "decode_s": best["decode_s"],
            "decode_tokens_per_s": loop_tokens / best["decode_s"],
            "ms_per_step": 1e3 * best["decode_s"] / (p.new_tokens - 1),
            "end_to_end_tokens_per_s": p.decode_rows * p.new_tokens / (best["prefill_s"] + best["decode_s"]),
            "runs": timings}


def _override(p: Preset, args) -> Preset:
    changes = {k: v for k, v in (("rows", args.batch), ("seq_len", args.seq_len), ("microbatches", args.microbatches),
                                 ("timed_steps", args.steps), ("warmup_steps", args.warmup)) if v is not None}
    model = {}
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --model {item!r} is not KEY=VALUE (e.g. remat=dots)")
        model[key] = yaml.safe_load(value)
    if model:
        changes["model"] = p.model.replace(**model)
    p = dataclasses.replace(p, **changes)
    if min(p.rows, p.seq_len, p.microbatches, p.warmup_steps, p.timed_steps) < 1 or p.rows % p.microbatches:
        raise SystemExit(f"error: rows {p.rows}, seq_len {p.seq_len}, microbatches {p.microbatches}, warm-up "
                         f"{p.warmup_steps} and timed steps {p.timed_steps} must be >= 1, and the microbatches "
                         f"must divide the rows")
    return p


def _table(results: list[dict]) -> str:
    lines = ["| preset | what | shape | tokens/s | model TFLOP/s | MFU | notes |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['preset']} | {r['kind']} | | | | | {r.get('error') or r.get('skipped')} |")
        elif r["kind"] == "train":
            lines.append(f"| {r['preset']} | train | {r['rows']} x {r['seq_len']}, mb {r['microbatches']}, remat "
                         f"{r['remat']} | {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.1f} | "
                         f"{100 * r['mfu']:.1f}% | {r['step_s']:.3f} s/step, compile {r['compile_s']:.0f} s |")
        else:
            lines.append(f"| {r['preset']} | decode | {r['rows']} rows, {r['prompt_len']} + {r['new_tokens']} | "
                         f"{r['decode_tokens_per_s']:,.0f} | | | {r['ms_per_step']:.2f} ms/step, prefill "
                         f"{r['prefill_s']:.3f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON of the figures, rewritten after each measurement")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--tiny", action="store_true", help="the CPU smoke run: --presets tiny")
    ap.add_argument("--what", default="train,decode", help="train, decode or both")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s of the device (default: by device kind)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="no measurement starts after this many seconds (the rest are recorded as skipped)")
    ap.add_argument("--batch", type=int, help="override every preset's rows")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--microbatches", type=int)
    ap.add_argument("--steps", type=int, help="timed steps")
    ap.add_argument("--warmup", type=int, help="untimed steps")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="a model field for every preset, e.g. remat=dots (repeatable)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    names = ["tiny"] if args.tiny else [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"error: unknown preset {unknown[0]!r} (known: {', '.join(PRESETS)})")
    what = [w for w in args.what.split(",") if w]
    if not what or set(what) - {"train", "decode"}:
        raise SystemExit(f"error: --what {args.what!r}: give train, decode or train,decode")
    device = jax.devices()[0]
    peak, peak_source = peak_tflops(device.device_kind, args.peak_tflops)
    presets = {n: _override(PRESETS[n], args) for n in names}
    report = {"bench": "b8", "command": [sys.executable, *sys.argv], "device_kind": device.device_kind,
              "platform": device.platform, "devices_visible": jax.device_count(), "jax": jax.__version__,
              "jaxlib": jaxlib.__version__,
              "peak_tflops": peak, "peak_source": peak_source,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": []}
    out = Path(args.out)

    def save():
        report["elapsed_s"] = time.perf_counter() - t0
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)  # a reader (or a kill) never sees half a file

    _say(t0, f"{device.device_kind} ({device.platform}), jax {jax.__version__}, peak {peak:g} TFLOP/s ({peak_source})")
    save()
    failed = False
    for name, p in presets.items():
        for kind in what:
            head = {"preset": name, "kind": kind, "config": p.model.to_dict(), "why": p.why}
            if time.perf_counter() - t0 > args.budget_s:
                report["results"].append({**head, "skipped": f"--budget-s {args.budget_s:g} s passed"})
                _say(t0, f"{name} {kind}: skipped (budget)")
                save()
                continue
            _say(t0, f"{name} {kind}: {param_count(p.model) / 1e6:,.1f} M parameters")
            try:
                if kind == "train":
                    rows = p.rows
                    while True:  # on running out of memory, half the rows (while microbatches divide them)
                        try:
                            record = measure_train(p, rows, peak, t0)
                            break
                        except Exception as e:
                            if not _is_oom(e) or rows // 2 < p.microbatches or (rows // 2) % p.microbatches:
                                raise
                            _say(t0, f"  out of memory at {rows} rows ({str(e).splitlines()[0][:160]}); "
                                     f"trying {rows // 2}")
                            head.setdefault("oom_rows", []).append(rows)
                            rows //= 2
                    _say(t0, f"  {record['tokens_per_s']:,.0f} tokens/s, {record['model_tflops_per_s']:.1f} model "
                             f"TFLOP/s, MFU {100 * record['mfu']:.1f}%")
                else:
                    record = measure_decode(p, t0)
                    _say(t0, f"  decode {record['decode_tokens_per_s']:,.1f} tokens/s")
            except Exception as e:  # recorded, and the other measurements still run
                failed = True
                record = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"}
                _say(t0, f"  failed: {record['error']}")
            report["results"].append({**head, **record})
            save()
    print(_table(report["results"]))
    print(f"\n{report['device_kind']}, jax {report['jax']}, peak {peak:g} TFLOP/s; {report['elapsed_s']:.0f} s; "
          f"JSON: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
