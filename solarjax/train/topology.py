"""What a job costs and where it runs: model FLOPs per token, the accelerators' peak FLOP/s and
HBM, and TPU slice names. The trainer reads these for its MFU figures; solarjax.train.aot, above the
trainer, compiles for a slice.
"""

from __future__ import annotations

import math

import jax

from solarjax.errors import ConfigError
from solarjax.model.config import ModelConfig
from solarjax.model.decoder import param_count

# Dense bf16 peak per device (TFLOP/s), for MFU; matched against jax's device_kind.
PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459,
               "TPU v6 lite": 918, "TPU v6e": 918, "NVIDIA H100": 989, "NVIDIA H200": 989, "NVIDIA A100": 312}


def peak_tflops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if kind.startswith(k)), None)


HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}  # per chip


def topology_name(name: str) -> tuple[str, str]:
    """'v5p-128' (TensorCores, as Cloud names slices) or 'v5p:4x4x4' -> (generation, 'v5p:4x4x4')."""
    if ":" in name:
        return name.split(":")[0], name
    gen, _, count = name.partition("-")
    if gen not in HBM_GIB or not count.isdigit():
        raise ConfigError(f"--topology {name!r} is not like v5p-128, v4-32, v5e-16 or v5p:4x4x4")
    chips = int(count) // 2 if gen in ("v4", "v5p") else int(count)  # v4/v5p count 2 cores a chip
    # Cloud's shapes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... and 2x2, 2x4, 4x4, 4x8, ...
    dims = ([2, 2, 1] if chips >= 4 else [1, 1, 1]) if gen in ("v4", "v5p") else [1, 1]
    while math.prod(dims) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    if math.prod(dims) != chips:
        raise ConfigError(f"--topology {name!r}: {chips} chips is not a power of two")
    return gen, f"{gen}:{'x'.join(map(str, dims))}"


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6 FLOPs per weight that multiplies (the untied embedding table is a gather and does not),
    plus 12 * L * (H * E) * T for attention scores and values (PaLM's count)."""
    weights = param_count(config) - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    return 6 * weights + 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
