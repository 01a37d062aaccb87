"""The model's configuration for the Mistral/Llama decoder family, and its presets.

A ModelConfig is hashable, so it can be a static argument of jit; every module gets the same one.
The bottom of the package: it imports nothing of solarjax but its errors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from solarjax.errors import ConfigError, require_positive_ints

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "xla", "splash", "pallas_gpu", "cudnn")  # see solarjax.model.attention
# RoPE scaling types and their keys, as transformers' modeling_rope_utils reads them
# (model.rope_frequencies computes each): (required, optional). partial_rotary_factor is not supported.
ROPE_SCALING_KEYS = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads, recomputed by replace()
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # None: full causal attention
    tie_word_embeddings: bool = False
    # RoPE scaling, e.g. {"rope_type": "llama3", "factor": 8.0, ...} (keys: ROPE_SCALING_KEYS); None:
    # plain RoPE. Given as a mapping, held as sorted (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2); o_proj has none
    initializer_range: float = 0.02  # std of the random init, as HF's config.json names it
    dtype: str = "float32"  # compute dtype; softmax, norms' statistics and logits stay float32
    param_dtype: str = "float32"
    remat: str = "none"  # activation checkpointing of each block, see REMAT_POLICIES
    attention: str = "auto"  # which implementation computes attention in training, see solarjax.model.attention

    def __post_init__(self):
        require_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                     "num_kv_heads", "max_position_embeddings"), "model.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads {self.num_heads} must be a multiple of "
                              f"model.num_kv_heads {self.num_kv_heads}")
        # Remembered beside the fields (not one: equality and hashing see the resolved value), so
        # replace() and to_dict() can drop an implied head_dim: a preset given a new width or head
        # count then gets hidden_size // num_heads instead of the old head_dim.
        object.__setattr__(self, "_head_dim_given", self.head_dim is not None)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by "
                                  f"model.num_heads {self.num_heads}; set model.head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be a positive even integer, got {self.head_dim!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ConfigError(f"model.sliding_window must be null or a positive integer, "
                              f"got {self.sliding_window!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ConfigError(f"model.initializer_range must be > 0, got {self.initializer_range!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"model.attention must be one of {ATTENTION}, got {self.attention!r}")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
        object.__setattr__(self, "initializer_range", float(self.initializer_range))
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"model.qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope(self) -> dict[str, Any]:
        """rope_scaling as a dict ({} for plain RoPE)."""
        return dict(self.rope_scaling or ())

    @property
    def position_limit(self) -> int:
        """How far positions may go (sampling, scoring): what the RoPE scaling implies, as vLLM
        derives its max_model_len. yarn: original_max_position_embeddings x factor (Qwen2.5 with
        factor 4: 131072); linear and dynamic: max_position_embeddings x factor; llama3's config
        already holds the scaled length (Llama 3.1: 131072), so it stays max_position_embeddings."""
        s = self.rope
        if s.get("rope_type") == "yarn":
            return int(s["original_max_position_embeddings"] * s["factor"])
        if s.get("rope_type") in ("linear", "dynamic"):
            return int(self.max_position_embeddings * s["factor"])
        return self.max_position_embeddings

    def replace(self, **changes) -> "ModelConfig":
        return build(type(self), {**self.to_dict(), **changes}, "model")

    def to_dict(self) -> dict[str, Any]:
        """The fields as given: head_dim is None when it was implied by hidden_size // num_heads."""
        d = dataclasses.asdict(self)
        if not self._head_dim_given:
            d["head_dim"] = None
        d["rope_scaling"] = self.rope if self.rope_scaling is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> "ModelConfig":
        return build(cls, d, where)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read model config: {e}") from None
        return cls.from_dict(d, where=str(path))


def _check_rope_scaling(value) -> tuple[tuple[str, Any], ...]:
    """A rope_scaling mapping (or its pairs) checked against ROPE_SCALING_KEYS, as sorted pairs."""
    where = "model.rope_scaling"
    try:
        d = dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a mapping like {{rope_type: llama3, factor: 8.0, ...}}, "
                          f"got {value!r}") from None
    kind = d.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"{where}.rope_type {kind!r} is not supported; expected one of "
                          f"{sorted(ROPE_SCALING_KEYS)}")
    required, optional = ROPE_SCALING_KEYS[kind]
    for key in required:
        if key not in d:
            raise ConfigError(f"{where}: rope_type {kind!r} needs key {key!r} (required: {', '.join(required)})")
    unknown = sorted(set(d) - {"rope_type", *required, *optional})
    if unknown:
        raise ConfigError(f"{where}: key {unknown[0]!r} is not used by rope_type {kind!r} (known: "
                          f"{', '.join(required + optional)})")
    for key, v in d.items():
        if key == "original_max_position_embeddings":
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}.{key} must be a positive integer, got {v!r}")
        elif key == "truncate":
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{where}.{key} must be true or false, got {v!r}")
        elif key != "rope_type" and v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ConfigError(f"{where}.{key} must be a number, got {v!r}")
    if not d["factor"] or d["factor"] <= 0:
        raise ConfigError(f"{where}.factor must be > 0, got {d['factor']!r}")
    return tuple(sorted(d.items()))


# Reference sizes (shared/DESIGN.md). Two lines each, as they read in the papers' tables.
PRESETS: dict[str, ModelConfig] = {
    "mistral-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, max_position_embeddings=32768, sliding_window=4096),
    "solar-10.7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=48,
                               num_heads=32, num_kv_heads=8, max_position_embeddings=4096),
    # BENCHMARKS.md's CPU comparison model.
    "bench-small": ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
                               num_heads=8, num_kv_heads=2, max_position_embeddings=4096),
    # Test sizes: a few milliseconds a step on CPU.
    "tiny": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512),
    "tiny-mistral": ModelConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=4,
                                num_heads=4, num_kv_heads=2, max_position_embeddings=2048, sliding_window=256),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})") from None


def build(cls, d, where: str):
    """cls(**d), naming unknown and missing keys; "1e-4" becomes a float for float fields (YAML 1.1,
    which PyYAML reads, takes 1e-4 without a dot for a string)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    d = dict(d)
    for name, value in d.items():
        if isinstance(value, str) and str(fields[name].type).startswith("float"):
            try:
                d[name] = float(value)
            except ValueError:
                raise ConfigError(f"{where}.{name} must be a number, got {value!r}") from None
    try:
        return cls(**d)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {e}") from None
