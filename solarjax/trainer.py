"""Continued pretraining: one pure, jitted train_step over a sharded state, and a plain loop around it.

A run directory holds everything needed to resume: config.json, model_config.json,
checkpoints/<step>/ (orbax: params, optimizer state, step), metrics.jsonl, and final/ (a solarjax
parameter checkpoint with the tokenizer, for sampling and jax-to-hf). Running the same command
again continues from the latest checkpoint: batch k is a pure function of (seed, k), so nothing is
replayed. SIGTERM or Ctrl-C saves a checkpoint at the next step boundary before exiting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from solarjax import checkpoint as ckpt_lib
from solarjax import data as data_lib
from solarjax.config import ConfigError, ModelConfig, TrainConfig
from solarjax.model import Decoder, abstract_params, init_params, param_count
from solarjax.optim import make_optimizer, schedule
from solarjax.sharding import batch_sharding, make_mesh, param_shardings
from solarjax.upscale import UpscaleSpec, apply_plan


def loss_and_count(config: ModelConfig, params, batch):
    """Mean next-token cross entropy over positions whose next token is in the same document."""
    tokens_BT, seg_BT = batch["tokens"], batch["segment_ids"]
    logits_BTV = Decoder(config).apply({"params": params}, tokens_BT, batch["positions"], seg_BT)
    valid_BT = (seg_BT[:, 1:] == seg_BT[:, :-1]) & (seg_BT[:, 1:] > 0)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], tokens_BT[:, 1:])
    count = valid_BT.sum()
    return jnp.where(valid_BT, nll_BT, 0).sum() / jnp.maximum(count, 1), count


class NonFiniteLossError(FloatingPointError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, mesh=None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        # Data first: datasets.map forks its tokenizer workers, which is only safe before JAX has
        # started its backend threads (the vocab check waits for the model config, below).
        self.data = data_lib.load_data(cfg.data)
        self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        batch_rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.global_batch % batch_rows:
            raise ConfigError(f"global_batch {cfg.global_batch} must be a multiple of mesh data x fsdp = {batch_rows}")
        self.optimizer = make_optimizer(cfg.optim, cfg.steps)
        self.schedule = schedule(cfg.optim, cfg.steps)
        self.checkpoints = ocp.CheckpointManager(
            (self.run_dir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
        resume_step = self.checkpoints.latest_step()
        if resume_step is not None:
            self.model_config = self._saved_model_config()
            self.state = self.checkpoints.restore(resume_step, args=ocp.args.StandardRestore(self._abstract_state()))
        else:
            self.model_config, params = self._initial_params()
            self.state = jax.jit(self._new_state, out_shardings=self._state_shardings(), donate_argnums=0)(params)
        self.data.tokenizer.check_fits(self.model_config.vocab_size)
        self.batches = self.data.batches(cfg.global_batch, cfg.data.seed, jax.process_index(), jax.process_count())
        self.batch_sharding = batch_sharding(self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.train_step = jax.jit(self._train_step, in_shardings=(self._state_shardings(), self.batch_sharding),
                                  out_shardings=(self._state_shardings(), replicated), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, out_shardings=replicated)
        self.flops_per_token = 6 * param_count(self.model_config)
        if jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list) + "\n")
            self.model_config.save(self.run_dir / ckpt_lib.CONFIG_FILE)

    # -- state --------------------------------------------------------------------------------

    def _initial_params(self):
        cfg, init = self.cfg, self.cfg.init
        spec = UpscaleSpec(**init.upscale) if init.upscale else None
        if init.source is not None:
            config, params = ckpt_lib.load_model(init.source, self.mesh, upscale=spec)
            runtime = config.replace(**cfg.model_runtime)
            if runtime.param_dtype != config.param_dtype:
                params = jax.tree.map(lambda a: a.astype(runtime.param_dtype), params)
            return runtime, params
        params = init_params(cfg.model, jax.random.key(init.seed), self.mesh)
        if spec is None:
            return cfg.model, params
        params, config = apply_plan(params, cfg.model, spec.plan(cfg.model.num_layers), self.mesh)
        return config, params

    def _saved_model_config(self) -> ModelConfig:
        """The resumed run's model; the config may change how it runs (dtype, remat), not what it is."""
        saved = ModelConfig.load(self.run_dir / ckpt_lib.CONFIG_FILE)
        runtime = TrainConfig.RUNTIME_MODEL_KEYS
        if self.cfg.model is None or self.cfg.init.upscale is not None:  # the config names the base model
            return saved.replace(**self.cfg.model_runtime)
        for f in dataclasses.fields(saved):
            ours, theirs = getattr(self.cfg.model, f.name), getattr(saved, f.name)
            if f.name not in runtime and ours != theirs:
                raise ConfigError(f"{self.run_dir} holds a run with model.{f.name}={theirs!r}, but the config says "
                                  f"{ours!r}; use another run_dir or the same model")
        return saved.replace(**{k: getattr(self.cfg.model, k) for k in runtime})

    def _new_state(self, params):
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def _state_shardings(self):
        params = nn.unbox(param_shardings(abstract_params(self.model_config), self.mesh))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(self.optimizer.init, nn.unbox(abstract_params(self.model_config)))
        opt = optax.tree_map_params(self.optimizer, lambda _, s: s, abstract_opt, params,
                                    transform_non_params=lambda _: replicated)
        return {"params": params, "opt_state": opt, "step": replicated}

    def _abstract_state(self):
        shapes = jax.eval_shape(self._new_state, nn.unbox(abstract_params(self.model_config)))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                            self._state_shardings())

    # -- steps --------------------------------------------------------------------------------

    def _train_step(self, state, batch):
        grad_fn = jax.value_and_grad(lambda p: loss_and_count(self.model_config, p, batch), has_aux=True)
        (loss, count), grads = grad_fn(state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "step": state["step"] + 1}
        return new, {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads),
                     "lr": self.schedule(state["step"])}

    def _eval_step(self, params, batch):
        loss, count = loss_and_count(self.model_config, params, batch)
        return loss * count, count

    def _device_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    # -- the loop -----------------------------------------------------------------------------

    def evaluate(self) -> dict | None:
        if self.data.validation is None:
            return None
        val = data_lib.Batches(self.data.validation, min(self.cfg.global_batch, len(self.data.validation)),
                               seed=0, process_index=jax.process_index(), process_count=jax.process_count())
        total, count = 0.0, 0
        for step in range(min(self.cfg.eval_batches, val.steps_per_epoch)):
            s, n = self.eval_step(self.state["params"], self._device_batch(val.batch(step)))
            total, count = total + float(s), count + int(n)
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def save(self, step: int) -> None:
        self.checkpoints.save(step, args=ocp.args.StandardSave(self.state))

    def run(self, until: int | None = None) -> dict:
        """Trains to cfg.steps, or stops after step `until` (saving a checkpoint there), e.g. to
        fit a job into a time slot; the next run continues exactly where this one stopped."""
        cfg = self.cfg
        last = min(cfg.steps, until) if until is not None else cfg.steps
        start = int(self.state["step"])
        metrics_file = self.run_dir / "metrics.jsonl"
        if jax.process_index() == 0 and metrics_file.exists():  # drop lines a crash left past the checkpoint
            kept = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= start]
            metrics_file.write_text("".join(line + "\n" for line in kept))
        stop = {"signal": None}

        def request_stop(signum, frame):  # acted on at the next step boundary; a second Ctrl-C aborts
            stop["signal"] = signal.Signals(signum).name
            signal.signal(signal.SIGINT, signal.default_int_handler)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step", disable=None)
        pending, last_time, last_logged = [], time.perf_counter(), start
        tokens_per_step = cfg.global_batch * cfg.data.seq_len
        record = {}
        try:
            with jax.set_mesh(self.mesh):
                for step in range(start, last):
                    self.state, metrics = self.train_step(self.state, self._device_batch(self.batches.batch(step)))
                    pending.append((step + 1, metrics))
                    done = step + 1
                    at_checkpoint = done % cfg.checkpoint_every == 0 or done == last or stop["signal"]
                    if done % cfg.log_every == 0 or at_checkpoint:
                        jax.block_until_ready(metrics)  # a sync point: only at log steps
                        now = time.perf_counter()
                        rate = (done - last_logged) * tokens_per_step / (now - last_time)
                        record = self._log(pending, metrics_file, rate)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{rate:,.0f}")
                        pending, last_time, last_logged = [], now, done
                    if cfg.eval_every and done % cfg.eval_every == 0:
                        result = self.evaluate()
                        if result:
                            self._write(metrics_file, {"step": done, **result})
                            record.update(result)
                    if at_checkpoint:
                        self.save(done)
                    bar.update(1)
                    if stop["signal"]:
                        break
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.checkpoints.wait_until_finished()
        done = int(self.state["step"])
        if stop["signal"]:
            if self.checkpoints.latest_step() != done:
                self.save(done)
                self.checkpoints.wait_until_finished()
            print(f"stopped by {stop['signal']} at step {done}; run the same command to resume", file=sys.stderr)
        elif done == cfg.steps:
            self._export_final()
        return record

    def _log(self, pending, metrics_file, tokens_per_s) -> dict:
        record = {}
        for step, metrics in pending:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(f"loss is {values['loss']} at step {step} (grad norm "
                                         f"{values['grad_norm']:.3g}, lr {values['lr']:.3g}); the last good "
                                         f"checkpoint is step {self.checkpoints.latest_step()}")
            record = {"step": step, **values}
        record["tokens_per_s"] = tokens_per_s
        record["model_tflops_per_s"] = tokens_per_s * self.flops_per_token / 1e12
        self._write(metrics_file, record)
        return record

    def _write(self, metrics_file: Path, record: dict) -> None:
        if jax.process_index() == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _export_final(self) -> None:
        """run_dir/final: a solarjax parameter checkpoint with the tokenizer, for sampling and export."""
        final = self.run_dir / "final"
        ckpt_lib.save_params(final, self.model_config, self.state["params"], overwrite=True)
        if jax.process_index() == 0:
            shutil.copy(self.data.tokenizer.path, final / "tokenizer.model")
