"""Typed, frozen configuration for the Mistral/Llama decoder family.

A ModelConfig is hashable, so it can be a static argument of jit; every module gets the same one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # None: full causal attention
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; softmax, norms' statistics and logits stay float32
    param_dtype: str = "float32"
    remat: str = "none"  # activation checkpointing of each block, see REMAT_POLICIES

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by "
                                  f"model.num_heads {self.num_heads}; set model.head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be a positive even integer, got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads {self.num_heads} must be a multiple of "
                              f"model.num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ConfigError(f"model.sliding_window must be null or a positive integer, "
                              f"got {self.sliding_window!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown model config key {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except TypeError as e:  # a required key is missing
            raise ConfigError(f"{where}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read model config: {e}") from None
        return cls.from_dict(d, where=str(path))


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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it becomes batches (solarjax/data.py)."""
    sources: tuple[str, ...] = ()  # files, globs, directories (save_to_disk), or hub names; () = built-in corpus
    text_field: str = "text"  # column holding the text, for json/csv/parquet/saved datasets
    validation: tuple[str, ...] = ()  # its own sources, or ...
    validation_fraction: float = 0.0  # ... a held-out share of the documents
    tokenizer: str | None = None  # .model file or a directory with tokenizer.model; None = Mistral's
    seq_len: int = 512
    cache_dir: str = "~/.cache/solarjax/tokens"
    num_proc: int = 2  # tokenizer processes
    seed: int = 0
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self):
        for name in ("sources", "validation"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(v, str) for v in value):
                raise ConfigError(f"data.{name} must be a list of paths, globs or dataset names, got {value!r}")
            else:
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.validation and self.validation_fraction:
            raise ConfigError("give data.validation sources or data.validation_fraction, not both")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be a positive integer, got {self.num_proc!r}")
        if not self.text_field:
            raise ConfigError("data.text_field must name a column")
