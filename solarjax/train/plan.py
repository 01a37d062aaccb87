"""The run plan: everything a training run derives from its config, resolved once, with every
cross-field check, before any data is read or parameter made.

The Trainer, `--compile-only` (solarjax.train.aot) and recipes (match_flops) take a RunPlan; none
derives these again:
- the model: the preset or model fields, or init.from's saved config (or, on resume, the run's
  own), with the config's runtime keys (dtype, remat, attention) and growth applied;
- the objective and its options section;
- the attention implementation for this platform, dtype and sequence length;
- the chunk of the vocabulary loss, and model FLOPs per token;
- checks across sections: seq_len vs max_position_embeddings, the batch vs the mesh and
  microbatches, float32 parameters for training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from solarjax.errors import ConfigError
from solarjax.model import attention
from solarjax.model.config import ModelConfig
from solarjax.train import loss as loss_lib, objectives as objectives_lib
from solarjax.train.config import TrainConfig
from solarjax.train.rundir import RunDir
from solarjax.train.topology import model_flops_per_token
from solarjax.weights import checkpoint as ckpt_lib
from solarjax.train.optim import Trainable, make_optimizer, schedule
from solarjax.train.step import jit_train_step, resolve_trainable
from solarjax.weights.upscale import UpscaleSpec


@dataclasses.dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig
    model_config: ModelConfig  # what the run trains, as saved with its checkpoints
    step_config: ModelConfig  # the same with the attention implementation resolved: what the step runs
    objective: objectives_lib.Objective
    options: object  # the objective's config section (DPOConfig for dpo), or None
    platform: str
    seq_len: int
    loss_chunk: int | None  # positions per step of the chunked vocabulary loss (None without a mesh)
    flops_per_token: float
    attention_note: str | None = None  # why `auto` attention fell back to xla on an accelerator
    trainable: Trainable | None = None  # which parameters train (None: all), resolved from the configs alone

    def optimizer(self, total_steps: int | None = None, extensions: tuple = ()):
        """The optax chain of this run (its state's structure does not depend on the schedule)."""
        return make_optimizer(self.cfg.optim, total_steps or self.cfg.steps, extensions, trainable=self.trainable)

    def build_step(self, mesh, total_steps: int | None = None, extensions: tuple = (), *, config=None,
                   unroll: int = 1, chunk: int | None = None, microbatches: int | None = None):
        """(optimizer, learning-rate schedule, jitted train step) of this run on `mesh`: the one place
        that assembles them, for the Trainer, --compile-only and the benchmarks. `extensions`: a
        resumed run's schedule segments (optim.schedule); `config`, `unroll`, `chunk` and
        `microbatches` only for --compile-only's FLOP-counting variants."""
        total = total_steps or self.cfg.steps
        optimizer, lr = self.optimizer(total, extensions), schedule(self.cfg.optim, total, extensions)
        step = jit_train_step(config or self.step_config, optimizer, lr, mesh, unroll,
                              self.loss_chunk if chunk is None else chunk, microbatches or self.cfg.microbatches,
                              self.objective, self.options, self.trainable)
        return optimizer, lr, step

    @property
    def attention(self) -> str:
        return self.step_config.attention

    @classmethod
    def resolve(cls, cfg: TrainConfig, mesh=None, platform: str | None = None, saved: ModelConfig | None = None):
        """The plan of `cfg` on `mesh` (platform: the mesh's, unless named, e.g. "tpu" for a slice
        compiled ahead of time; without either, no loss chunk and no batch check). `saved`: the
        model config a resumed run's directory holds, which wins over init.from's."""
        platform = platform or (mesh.devices.flat[0].platform if mesh is not None else "cpu")
        model_config = planned_model_config(cfg, saved)
        seq_len = cfg.data.seq_len
        if seq_len > model_config.position_limit:  # max_position_embeddings, or what its RoPE scaling allows
            scaled = (f" and the {model_config.position_limit} positions its RoPE scaling allows"
                      if model_config.position_limit != model_config.max_position_embeddings else "")
            raise ConfigError(f"data.seq_len {seq_len} is longer than the model's max_position_embeddings "
                              f"{model_config.max_position_embeddings}{scaled}")
        if model_config.param_dtype != "float32":  # until there is a float32 master copy (docs/architecture.md)
            raise ConfigError(f"model.param_dtype {model_config.param_dtype} is refused for training: AdamW's moments "
                              f"and updates would take that dtype and most small updates round away (68% of "
                              f"bfloat16 weights unchanged after 10 steps at lr 3e-5); keep param_dtype "
                              f"float32 and set model.dtype: bfloat16 for bfloat16 compute")
        case = (platform, model_config.sliding_window, seq_len, model_config.dtype, model_config.head_dim)
        chosen = attention.choose(model_config.attention, *case)
        note = attention.fallback_note(model_config.attention, chosen, *case)
        chunk = None
        if mesh is not None:
            rows = mesh.shape["data"] * mesh.shape["fsdp"]
            if cfg.global_batch % (rows * cfg.microbatches):
                raise ConfigError(f"global_batch {cfg.global_batch} must be a multiple of mesh data x fsdp = {rows}"
                                  + (f" times microbatches {cfg.microbatches}" if cfg.microbatches > 1 else ""))
            chunk = loss_chunk(cfg, mesh, platform)
        return cls(cfg, model_config, model_config.replace(attention=chosen), objectives_lib.get(cfg.objective),
                   cfg.objective_options, platform, seq_len, chunk, model_flops_per_token(model_config, seq_len), note,
                   resolve_trainable(cfg))


def planned_model_config(cfg: TrainConfig, saved: ModelConfig | None = None) -> ModelConfig:
    """The model a run of `cfg` trains, from configs alone (no parameters are loaded): `saved` (a
    resumed run's), else the model section, else init.from's config; growth applied; the config's
    runtime keys over all. A saved model that differs from the model section is refused."""
    runtime = TrainConfig.RUNTIME_MODEL_KEYS
    if saved is not None:
        if cfg.model is None:  # the model came from init.from
            return saved.replace(**cfg.model_runtime)
        if cfg.init.upscale is None:  # cfg.model is the model itself (with growth, the base before it)
            for f in dataclasses.fields(saved):
                ours, theirs = getattr(cfg.model, f.name), getattr(saved, f.name)
                if f.name not in runtime and ours != theirs:
                    raise ConfigError(f"{cfg.run_dir} holds a run with model.{f.name}={theirs!r}, but the config "
                                      f"says {ours!r}; use another run_dir or the same model")
        return saved.replace(**{k: getattr(cfg.model, k) for k in runtime})
    model_config = cfg.model
    if model_config is None:
        model_config = ckpt_lib.model_config_of(cfg.init.source).replace(**cfg.model_runtime)
    if cfg.init.upscale:
        plan = UpscaleSpec(**cfg.init.upscale).plan(model_config.num_layers)
        model_config = model_config.replace(num_layers=sum(b - a for a, b in plan))
    return model_config


def saved_model_config(run_dir: str | Path) -> ModelConfig | None:
    """The model config a run directory's checkpoints were saved with, or None for a new run (or
    one stopped before its first checkpoint, which starts again from its config)."""
    path = Path(run_dir) / ckpt_lib.CONFIG_FILE
    return ModelConfig.load(path) if RunDir(run_dir).checkpoint_steps() and path.is_file() else None


def loss_chunk(cfg: TrainConfig, mesh, platform: str) -> int:
    """Positions per step of the chunked vocabulary loss for this run's batch on this mesh."""
    rows = cfg.loss_chunk_tokens
    if rows is None:  # CPU: chunks that stay near the caches; accelerators: bounded logits memory
        rows = 256 if platform == "cpu" else 4096
    local_rows = cfg.global_batch // (mesh.shape["data"] * mesh.shape["fsdp"] * cfg.microbatches)
    return loss_lib.chunk_length(cfg.data.seq_len, local_rows, rows)
