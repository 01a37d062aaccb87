"""Continued pretraining: a plain loop around the train step (solarjax.train.step), with its periodic
hooks: eval, checkpoints, logging, samples, and the export of final/.

A run directory holds everything needed to resume: checkpoints/<step>/ (orbax: params, optimizer
state, step), the run's records (train/rundir.py: config, tokenizer, schedule, trainable parts,
streams, data), metrics.jsonl, and final/ (a solarjax parameter checkpoint with the tokenizer, for
sampling and jax-to-hf). Running the same command
again continues from the latest checkpoint: batch k is a pure function of (seed, k), so nothing is
replayed. SIGTERM or Ctrl-C saves a checkpoint at the next step boundary before exiting.

It is one module because its hooks share that run directory, and resume depends on all of them
agreeing on it (checkpoints, metrics.jsonl, the records, TensorBoard's purge step); the step itself, which needs none of it, is solarjax.train.step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from solarjax import compile_cache, data as data_lib
from solarjax.data.config import DataConfig
from solarjax.errors import ConfigError, DiskFullError, MissingInputError, SolarjaxError, is_disk_full
from solarjax.eval import sample as sample_lib, scoring as scoring_lib, tasks as tasks_lib
from solarjax.files import check_output
from solarjax.model.decoder import abstract_params, init_params, param_count
from solarjax.sharding import batch_sharding, make_mesh
from solarjax.tokenizer import load_tokenizer, resolve_tokenizer
from solarjax.train import objectives as objectives_lib, step as step_lib
from solarjax.train.config import TrainConfig
from solarjax.train.plan import RunPlan, saved_model_config
from solarjax.train.progress import Progress
from solarjax.train.rundir import (
    CONFIG_RECORD,
    DATA_RECORD,
    SCHEDULE_RECORD,
    STREAMS_RECORD,
    TRAINABLE_RECORD,
    RunDir,
    RunDirBusyError,
    lock_run_dir,
)
from solarjax.train.topology import peak_tflops_per_device
from solarjax.weights import checkpoint as ckpt_lib
from solarjax.weights.upscale import UpscaleSpec, grow


class NonFiniteLossError(SolarjaxError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class CheckpointError(SolarjaxError):
    """The run's checkpoints cannot be restored (all damaged), or were saved by a run this config
    cannot continue (another optimizer structure); the message names the folder and what to do."""


class Trainer:
    def __init__(self, cfg: TrainConfig, mesh=None, eval_ends: bool = False, initial_eval: dict | None = None):
        """eval_ends: evaluate before the first step and after the last whatever eval_every says
        (a recipe's stages: their comparison needs those losses). initial_eval: the eval of the
        initial parameters, made already (a recipe's stage that continues an earlier one unchanged
        has that one's last eval), logged at step 0 instead of computed again."""
        self.cfg, self.eval_ends, self.initial_eval, self._rows_step = cfg, eval_ends, initial_eval, None
        self.run_dir = Path(cfg.run_dir)
        self.records = RunDir(self.run_dir)
        self.objective = objectives_lib.get(cfg.objective)  # the config has checked the name
        check_output(self.run_dir / "final", self._inputs())  # now, not after the run, at the export
        self._lock = lock_run_dir(self.run_dir)  # before anything in the run directory is touched
        try:
            self._setup(mesh)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _setup(self, mesh) -> None:
        cfg = self.cfg
        compile_cache.enable(cfg.compile_cache_dir, cfg.data.cache_dir)  # before the first compile
        ckpt_lib.drop_orbax_leftovers()  # a damaged checkpoint or a full disk: our one line, not orbax's noise
        # Everything the run derives from its config, checked across sections, before any data is read
        # (the platform, which needs JAX's backend, comes with the mesh below).
        saved = saved_model_config(self.run_dir)
        self.trainable = RunPlan.resolve(cfg, saved=saved).trainable
        on_disk = self.records.checkpoint_steps()
        if on_disk:  # a resume's cheap checks first: a refusal must not wait for the corpus to be tokenized
            self._check_trainable(on_disk[0])
            try:  # the resume step is at least the oldest checkpoint's (exactly: after the restore, below)
                self._check_mixture(on_disk[-1])
            except ConfigError:  # then the newest's fails too, and it is the step that will most likely resume
                self._check_mixture(on_disk[0])
                raise
        # Data before JAX's backend: datasets.map forks its tokenizer workers, which is only safe
        # before JAX has started its threads (the vocab check waits for the model config, below).
        self.data = data_lib.load_data(cfg.data, layout=self.objective.layout, tokenizer=self._tokenizer(bool(on_disk)))
        self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        self.plan = plan = RunPlan.resolve(cfg, self.mesh, saved=saved)
        self.model_config = plan.model_config
        self.checkpoints = ocp.CheckpointManager(
            (self.run_dir / "checkpoints").absolute(),
            item_handlers=ocp.StandardCheckpointHandler(),  # item_metadata: what a checkpoint holds, unread
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
        # The optimizer state's structure does not depend on the schedule, which needs the step.
        resume_step, restored = self._restore_newest_good(plan.optimizer())
        self.schedule_plan = self._schedule_plan(resume_step)
        self._check_mixture(resume_step)
        first_total, *extensions = self.schedule_plan
        self.optimizer, self.schedule, self.train_step = plan.build_step(self.mesh, first_total[1], tuple(extensions))
        initial = None
        if restored is not None:
            self.state = restored
        else:
            config, params = self._initial_params()
            if config != self.model_config:  # the plan read it from the configs alone: a bug if they differ
                raise AssertionError(f"the planned model {self.model_config} is not the one made {config}")
            shardings = step_lib.state_shardings(self.model_config, self.optimizer, self.mesh)
            if self.objective.reference and plan.options.reference is None:  # a copy: new_state donates params
                initial = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["params"])(params)
            self.state = jax.jit(lambda p: step_lib.new_state(self.optimizer, p), donate_argnums=0,
                                 out_shardings=shardings)(params)
        self.reference = self._reference_params(initial)
        self.data.tokenizer.check_fits(self.model_config.vocab_size)
        try:  # bad names and files fail now, not at the first eval
            self.tasks = [t for arg in cfg.eval_tasks for t in tasks_lib.load_task(arg)]
        except tasks_lib.TaskError as e:
            raise ConfigError(f"eval_tasks: {e}") from None
        self.batches = self.data.batches(cfg.global_batch, cfg.data.seed, jax.process_index(), jax.process_count())
        self.batch_sharding = batch_sharding(self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.loss_context = objectives_lib.Context(plan.step_config, plan.loss_chunk, 1, plan.options)
        self.eval_step = jax.jit(self._eval_step, out_shardings=replicated)
        self.flops_per_token = plan.flops_per_token
        self.peak_tflops = peak_tflops_per_device()  # None where unknown (CPUs): no MFU then
        if restored is not None:  # streaming sources read on from where the checkpoint's step stood
            self.batches.seek((self.records.read(STREAMS_RECORD) or {}).get(str(resume_step), {}))
        cached = [p for p in self.data.sources.values() if not p.streaming]
        if jax.process_index() == 0:
            print(f"model: {self.model_config.num_layers} layers, {param_count(self.model_config):,} parameters; "
                  f"data: {sum(p.n_tokens for p in cached):,} tokens in {sum(len(p) for p in cached):,} sequences"
                  f"{' and streaming sources' if len(cached) < len(self.data.sources) else ''}; "
                  f"mesh {dict(self.mesh.shape)}; run dir {cfg.run_dir}"
                  + (f", resumed from its checkpoint of step {resume_step}" if restored is not None else ""),
                  file=sys.stderr)
            print(self._describe_trainable(), file=sys.stderr)
            if plan.attention_note:
                print(plan.attention_note, file=sys.stderr)
            if len(self.data.sources) > 1 or self.data.schedule[1:] or cfg.data.named_validation:
                print(f"mixture: {self.data.describe()}", file=sys.stderr)
            for name, packed in self.data.sources.items():
                if isinstance(packed, data_lib.PackedExamples):
                    print(f"{cfg.objective} data{'' if self.data.train else ' ' + name}: {packed.describe()}",
                          file=sys.stderr)
            records = self.records
            records.write(CONFIG_RECORD, cfg.to_dict())
            self.model_config.save(self.run_dir / ckpt_lib.CONFIG_FILE)
            if restored is None or records.tokenizer_record() is None:  # init.from RUN/checkpoints/STEP finds it too
                records.record_tokenizer(self.data.tokenizer, cfg.data.chat_template)
            records.write(SCHEDULE_RECORD, {"segments": self.schedule_plan})
            records.write(TRAINABLE_RECORD, self._trainable_record())
            self._note_data_changes(resume_step if restored is not None else 0)

    def _trainable_record(self) -> dict:
        t = self.trainable
        return {"trainable": self.cfg.trainable, "layers": None if t is None else list(t.layers),
                "rest": t is None or t.rest}

    def _describe_trainable(self) -> str:
        """trainable: ...: N parameters trained, M frozen; optimizer state S values (B bytes)."""
        params = nn.unbox(abstract_params(self.model_config))
        total = sum(a.size for a in jax.tree.leaves(params))
        trained = total if self.trainable is None else sum(
            a.size for a in jax.tree.leaves(jax.eval_shape(self.trainable.select, params)))
        state = jax.tree.leaves(jax.eval_shape(self.optimizer.init, params))
        values, nbytes = sum(a.size for a in state), sum(a.size * a.dtype.itemsize for a in state)
        layers = "" if self.trainable is None else f" (layers {_ranges(self.trainable.layers)})"
        return (f"trainable: {self.cfg.trainable}{layers}: {trained:,} parameters trained, {total - trained:,} "
                f"frozen; optimizer state {values:,} values ({nbytes / 2**20:,.1f} MiB)")

    def _restore_newest_good(self, optimizer) -> tuple[int, dict | None]:
        """(step, state) of the newest checkpoint that restores, or (0, None) for a new run.

        First what each checkpoint holds (orbax's metadata: every array's path and shape) is
        compared with the state this config builds: a difference is a change of config (e.g.
        optim.grad_clip added or removed, which changes the optimizer's structure), not damage,
        and stops the run naming it, with nothing moved. Only a checkpoint that cannot be read (a
        crash mid-write, a truncated or missing file) is moved aside to damaged-STEP with one
        warning line, so that the run goes on from the one before and can save that step again."""
        steps = sorted(self.checkpoints.all_steps(), reverse=True)
        if not steps:
            return 0, None
        folder = self.run_dir / "checkpoints"
        target = step_lib.abstract_state(self.model_config, optimizer, self.mesh)
        expected = ckpt_lib.tree_shapes(target)
        for step in steps:
            try:
                saved = self.checkpoints.item_metadata(step)
                if saved is None:
                    raise FileNotFoundError("its metadata is missing")
            except Exception as e:  # orbax raises many types for a damaged file; any means unreadable
                self._move_aside(folder, step, e)
                continue
            mismatch = ckpt_lib.state_mismatch(ckpt_lib.tree_shapes(saved), expected)
            if mismatch:
                raise CheckpointError(
                    f"{folder / str(step)} does not match this config's train state: {mismatch}. The config "
                    f"changed how the state is built (optim.grad_clip on or off, trainable, ...); nothing was "
                    f"moved. Change the config back to resume, or start a new run_dir from these weights with "
                    f"init.from: {folder / str(step)} (its parameters, with a fresh optimizer)")
            try:
                return step, self.checkpoints.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as e:
                self._move_aside(folder, step, e)
        raise CheckpointError(f"{folder}: no checkpoint can be restored (steps {steps} are damaged and were "
                              f"moved to damaged-STEP); remove {self.run_dir} to start over")

    def _check_trainable(self, newest: int) -> None:
        """A resume trains the parts the run trained (trainable.json, written at its start; a run
        from before it: the state's shapes still tell most changes)."""
        saved, ours = self.records.read(TRAINABLE_RECORD), self._trainable_record()
        if saved is not None and (saved["layers"], saved["rest"]) != (ours["layers"], ours["rest"]):
            def what(r):
                return r["trainable"] + ("" if r["layers"] is None else f" (layers {_ranges(r['layers'])})")
            raise CheckpointError(
                f"{self.run_dir} was trained with trainable: {what(saved)}, but the config says trainable: "
                f"{what(ours)}; a run keeps what it trains (its optimizer state holds those parts' moments), and "
                f"nothing was moved. Change trainable back to resume, or start a new run_dir from these weights "
                f"with init.from: {self.records.checkpoints / str(newest)}")

    def _check_mixture(self, resume_step: int) -> None:
        """The weights of the steps already taken are the run's (config.json: their config)."""
        previous = self.records.read(CONFIG_RECORD) if resume_step else None
        if previous is not None:
            data_lib.check_mixture_resume(DataConfig(**previous["data"]), self.cfg.data, resume_step, self.run_dir)

    def _note_data_changes(self, resume_step: int) -> None:
        """A resume whose sources now hold other documents (files added, removed or edited) draws
        other batches from here on than the run would have: said in one line per source, and the
        sizes recorded anew (data.json: documents and tokens of each cached source)."""
        now = {name: [data_lib.documents_in(p), int(p.n_tokens)] for name, p in self.data.sources.items()
               if not p.streaming}
        before = (self.records.read(DATA_RECORD) or {}) if resume_step else {}
        for name, (docs, tokens) in now.items():
            if name in before and before[name] != [docs, tokens]:
                print(f"note: data source {name} has changed since the run last started ({before[name][0]:,} "
                      f"documents, {before[name][1]:,} tokens; now {docs:,} and {tokens:,}): its batches from "
                      f"step {resume_step} on are not the ones the run would have drawn", file=sys.stderr)
        self.records.write(DATA_RECORD, now)

    def _tokenizer(self, resuming: bool):
        """The tokenizer the run tokenizes with: the config's (data.tokenizer, else init.from's own,
        else Mistral's); on resume the one the run recorded at its start. A resume whose config now
        names another tokenizer is refused; one whose tokenizer has moved away (init.from's
        directory, data.tokenizer, data.chat_template) goes on with the run's copy, RUN/tokenizer."""
        cfg, init = self.cfg.data, self.cfg.init
        record = self.records.tokenizer_record() if resuming else None

        def named():
            model_dir = ckpt_lib.tokenizer_dir(init.source) if init.source and cfg.tokenizer is None else None
            return resolve_tokenizer(cfg.tokenizer, model_dir, cfg.chat_template)
        if record is None:
            return named()
        given = [cfg.tokenizer or (init.source if init.source else None), cfg.chat_template]
        gone = next((p for p in given if p and not Path(os.path.expanduser(p)).exists()), None)
        tokenizer = None
        if gone is None:
            try:
                tokenizer = named()
            except MissingInputError as e:  # a run checkpoint whose run no longer keeps a tokenizer
                gone = str(e).split(":")[0]
        if tokenizer is None:
            print(f"note: {gone} is not there any more; the run goes on with the tokenizer it recorded at its start, "
                  f"{self.records.tokenizer}", file=sys.stderr)
            return load_tokenizer(self.records.tokenizer)
        if tokenizer.fingerprint() != record["fingerprint"]:
            raise ConfigError(
                f"{self.run_dir} was tokenized with {record['source']} (fingerprint {record['fingerprint'][:12]}), "
                f"but the config now gives {tokenizer.source} ({tokenizer.fingerprint()[:12]}), which tokenizes "
                f"differently; nothing was changed. Set data.tokenizer: {self.records.tokenizer} to go on with the "
                f"run's own, or start a new run_dir to train with the other")
        return tokenizer

    def _move_aside(self, folder: Path, step: int, error: Exception) -> None:
        gc.collect()  # orbax's abandoned reads go now, quietly (checkpoint.drop_orbax_leftovers)
        text = (str(error).splitlines() or [""])[0].split(". See full TensorStore details")[0]
        reason = f"{type(error).__name__}: {text}"[:200]
        aside = folder / f"damaged-{step}"
        n = 1
        while aside.exists():  # damaged before, in an earlier attempt
            n += 1
            aside = folder / f"damaged-{step}-{n}"
        if jax.process_index() == 0:
            (folder / str(step)).rename(aside)
        print(f"warning: checkpoint {folder / str(step)} cannot be read ({reason}); moved to {aside}; "
              f"trying the one before", file=sys.stderr)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
        self.checkpoints.reload()  # forget the step that moved

    def _schedule_plan(self, resume_step: int) -> list[tuple]:
        """[(0, steps), (start, new steps, mode), ...]: the first run's length and every extension
        of it (optim.schedule). A resume with other `steps` continues the learning-rate curve from
        where it is, or, when the schedule had ended, restarts it (its own warmup and decay)."""
        record = self.records.read(SCHEDULE_RECORD) if resume_step else None
        if record is None:
            return [(0, self.cfg.steps)]
        plan = [tuple(seg) for seg in record["segments"]]
        if self.cfg.steps == plan[-1][1]:
            return plan
        if self.cfg.steps < resume_step:
            raise ConfigError(f"{self.run_dir} is at step {resume_step}, past steps={self.cfg.steps}; "
                              f"give steps >= {resume_step}")
        if plan[-1][0] == resume_step:  # changed again before any step of the last change was taken
            plan.pop()
            if self.cfg.steps == plan[-1][1]:
                return plan
        optim = self.cfg.optim
        if resume_step >= plan[-1][1]:
            mode = "restart"
            what = (f"the schedule had ended there, so a new segment warms up over {optim.warmup_steps} steps to "
                    f"the peak {optim.learning_rate:g} and decays to {optim.learning_rate * optim.min_lr_ratio:g} "
                    f"at step {self.cfg.steps}")
        else:
            mode = "continue"
            what = f"the learning rate continues from its value there and decays to the same floor at step {self.cfg.steps}"
        print(f"note: steps {plan[-1][1]} -> {self.cfg.steps} at step {resume_step}: {what}", file=sys.stderr)
        return plan + [(resume_step, self.cfg.steps, mode)]

    def _inputs(self) -> list[str]:
        """What the run reads, which final/ must not overlap: the initial weights, the tokenizer,
        the data sources that are local paths, and the token cache."""
        data = self.cfg.data
        named = [*data.named_sources(), *(v for v in data.validation if isinstance(v, data_lib.SourceConfig))]
        given = [p for s in named for p in s.path] + [v for v in data.validation if isinstance(v, str)]
        sources = [s for s in given if Path(os.path.expanduser(s)).exists()]
        paths = [self.cfg.init.source, data.tokenizer, data.cache_dir, data.chat_template, *sources]  # not hub names or globs
        if self.objective.reference:  # before the plan is resolved: the config's section
            paths.append(self.cfg.objective_options.reference)
        return [os.path.expanduser(p) for p in paths if p is not None]

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
        return grow(cfg.model, params, spec, self.mesh)

    def _reference_params(self, initial):
        """The frozen reference of an objective that has one: its options' reference (dpo.reference),
        or the initial policy (`initial`, or on resume rebuilt from init as at the start: the same values)."""
        if not self.objective.reference:
            return None
        source = self.plan.options.reference
        if source is None:
            return initial if initial is not None else self._initial_params()[1]
        config, params = ckpt_lib.load_model(source, self.mesh)
        runtime = TrainConfig.RUNTIME_MODEL_KEYS + ("max_position_embeddings",)
        for f in dataclasses.fields(config):
            ours, theirs = getattr(self.model_config, f.name), getattr(config, f.name)
            if f.name not in runtime and ours != theirs:
                raise ConfigError(f"{self.objective.name}.reference {source} has {f.name}={theirs!r}, but the "
                                  f"policy has {ours!r}; the reference must be the same architecture")
        if config.param_dtype != self.model_config.param_dtype:
            params = jax.tree.map(lambda a: a.astype(self.model_config.param_dtype), params)
        return params

    def _eval_step(self, params, batch, reference=None):
        """The objective's loss and metrics summed over the batch, and its units, to be added up."""
        return {**self.objective.sums(self.loss_context, params, batch, reference),
                self.objective.count: self.objective.units(batch)}

    def _step_args(self) -> tuple:
        return () if self.reference is None else (self.reference,)

    def _device_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    # -- the loop -----------------------------------------------------------------------------

    def evaluate(self, step: int | None = None, spent=None) -> dict | None:
        """Held-out loss (with a validation set) and the eval_tasks' metrics, as one record. The
        tasks are scored at step 0, the last step and multiples of eval_tasks_every (None: every eval).
        spent(kind, seconds), if given, learns how long the loss ("eval") and the tasks took."""
        # A stage's numbers at init and at the end are the whole split's; eval_batches 0: every eval's.
        whole = step in (0, self.cfg.steps) or self.cfg.eval_batches == 0
        began = time.perf_counter()
        result = self._eval_loss(whole)
        middle = time.perf_counter()
        if step is None or self._tasks_due(step):
            result.update(self._eval_tasks())
            if spent is not None and self.tasks:
                spent("tasks", time.perf_counter() - middle)
        if spent is not None and self.data.held_out:
            spent("eval", middle - began)
        return result or None

    def _tasks_due(self, step: int) -> bool:
        every = self.cfg.eval_tasks_every
        return every is None or step in (0, self.cfg.steps) or bool(every and step % every == 0)

    def _eval_tasks(self) -> dict:
        """eval_tasks scored as `python -m solarjax.evaluate` scores them: {TASK_METRIC: value}."""
        if not self.tasks:
            return {}
        out = scoring_lib.evaluate(self.model_config, self.state["params"], self.data.tokenizer, self.tasks,
                                   self.mesh, batch_size=self.cfg.global_batch, limit=self.cfg.eval_tasks_limit)
        return {f"task/{task}/{metric}": value for task, metrics in out["results"].items()
                for metric, value in metrics.items() if metric != "n" and isinstance(value, (int, float))}

    def _eval_loss(self, whole: bool = False) -> dict:
        """eval_loss over every held-out set's tokens together; with named sets also eval_loss/NAME,
        each set's own mean. Each set contributes `eval_batches` batches drawn from its windows (seed
        0), or with `whole` (the evals of step 0 and the last step) every window, so that a run's
        numbers at init and at the end are the whole split's (a continued stage's first equals the
        stage it starts from's last)."""
        if not self.data.held_out:
            return {}
        total, result = {}, {}
        for name, val in self.data.held_out.items():
            sums = self._eval_sums(val, whole)
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + v
            if name:
                result[f"eval_loss/{name}"] = sums["loss"] / max(sums[self.objective.count], 1)
        count = max(total.pop(self.objective.count), 1)
        loss = total.pop("loss") / count
        result = {"eval_loss": loss, **result}
        if self.objective.per_token:
            result["eval_perplexity"] = math.exp(min(loss, 50.0))
        return {**result, **{f"eval_{k}": v / count for k, v in total.items()}}

    def _every_window(self, val):
        """This process's rows of every window of a held-out set, in order, a global batch at a
        time; the last batch's missing rows are padding (segment 0, no loss)."""
        G, P, p = self.cfg.global_batch, jax.process_count(), jax.process_index()
        pad = jax.tree.map(np.zeros_like, val.sequence(0))
        for b in range(-(-len(val) // G)):
            yield data_lib.stack_sequences([val.sequence(r) if r < len(val) else pad
                                            for r in range(b * G + p * G // P, b * G + (p + 1) * G // P)])

    def _eval_sums(self, val, whole: bool) -> dict[str, float]:
        """The objective's sums and units over one held-out set: its first eval_batches global batches,
        or (whole) every window in order."""
        G = self.cfg.global_batch
        if len(val) >= G and not whole:
            batches = data_lib.Mixture([data_lib.IMPLICIT_SOURCE], [val], [(0, [1.0])], G, seed=0,
                                       process_index=jax.process_index(), process_count=jax.process_count())
            local = [batches.batch(step) for step in range(min(self.cfg.eval_batches, len(val) // G))]
        else:
            local = self._every_window(val)
        sums = {}
        for batch in local:
            for k, v in jax.device_get(self.eval_step(self.state["params"], self._device_batch(batch),
                                                      *self._step_args())).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return sums

    def window_losses(self) -> dict[str, dict[str, np.ndarray]] | None:
        """Per held-out set (by name): every window's summed loss and units ({"loss": [N], count:
        [N]}, in window order) under the current parameters, through the sharded eval step on this
        job's mesh. Collective: every process calls it and gets the whole arrays. None for an
        objective whose units are not rows (dpo's pairs)."""
        if self.objective.rows is None:
            return None
        if self._rows_step is None:
            self._rows_step = jax.jit(lambda params, batch: self.objective.rows(self.loss_context, params, batch),
                                      out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        out = {}
        with jax.set_mesh(self.mesh):
            for name, val in self.data.held_out.items():
                parts = [jax.device_get(self._rows_step(self.state["params"], self._device_batch(batch)))
                         for batch in self._every_window(val)]
                out[name] = {k: np.concatenate([part[k] for part in parts])[:len(val)] for k in parts[0]}
        return out

    def samples(self) -> list[dict]:
        """Greedy completions of cfg.sample_prompts by the current parameters (the sampler's API)."""
        cfg, tokenizer = self.cfg, self.data.tokenizer
        if not cfg.sample_prompts:
            return []
        if self.objective.layout != "text" and tokenizer.chat_template:  # as the model was tuned: a user turn
            ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in cfg.sample_prompts]
        else:
            ids = tokenizer.encode_batch(list(cfg.sample_prompts))
        results = sample_lib.generate(self.model_config, self.state["params"], ids,
                                      sample_lib.Sampling(max_new_tokens=cfg.sample_tokens), tokenizer.eos_ids)
        stop = set(tokenizer.eos_ids)
        completions = [tokenizer.decode_suffix(prompt, [t for t in r["token_ids"] if t not in stop])
                       for prompt, r in zip(ids, results)]  # as it reads after its prompt
        return [{"prompt": text, "completion": c} for text, c in zip(cfg.sample_prompts, completions)]

    def save(self, step: int) -> None:
        with self._disk_full_is_one_line(f"the checkpoint of step {step}"):
            self.checkpoints.save(step, args=ocp.args.StandardSave(self.state))
            positions = self.batches.positions(step)
            if positions and jax.process_index() == 0:  # where streaming sources stand: a resume seeks there
                record = {k: v for k, v in (self.records.read(STREAMS_RECORD) or {}).items() if int(k) < step}
                record = dict(list(record.items())[-(self.cfg.keep_checkpoints + 2):])
                self.records.write(STREAMS_RECORD, {**record, str(step): positions})

    def _wait_for_saves(self) -> None:
        with self._disk_full_is_one_line("a checkpoint"):
            self.checkpoints.wait_until_finished()

    @contextlib.contextmanager
    def _disk_full_is_one_line(self, what: str):
        """A full disk while writing a checkpoint (orbax writes in the background, so it may surface
        at the next save or at the wait) ends as one DiskFullError: orbax keeps an unfinished
        checkpoint in a temporary folder that it never lists, so the earlier ones stay the resume point."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            folder = self.run_dir / "checkpoints"
            raise DiskFullError(f"{folder}: no space left on the device while writing {what} "
                                f"({str(e).splitlines()[0][:160]}); the last complete checkpoint is step "
                                f"{self.checkpoints.latest_step()}. Free space and run the same command to "
                                f"resume from it") from None

    def run(self, until: int | None = None) -> dict:
        """Trains to cfg.steps, or stops after step `until` (saving a checkpoint there), e.g. to
        fit a job into a time slot; the next run continues exactly where this one stopped. The run
        directory's lock is held until it returns (taken again if an earlier run() released it)."""
        self._lock = lock_run_dir(self.run_dir)
        try:
            return self._run(until)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _run(self, until: int | None) -> dict:
        cfg = self.cfg
        last = min(cfg.steps, until) if until is not None else cfg.steps
        start = int(self.state["step"])
        metrics_file = self.run_dir / "metrics.jsonl"
        evaluated = False  # whether metrics.jsonl has the eval of step `start`
        self._check_lock()
        if jax.process_index() == 0 and metrics_file.exists():
            kept = _records_up_to(metrics_file, start)
            metrics_file.write_text("".join(line + "\n" for line in kept))
            evaluated = any(_is_eval(r) and r["step"] == start for r in map(json.loads, kept))
        if jax.process_count() > 1:  # the eval is collective: every process must make the same choice
            evaluated = bool(multihost_utils.broadcast_one_to_all(np.int32(evaluated)))
        self._tensorboard = _TensorBoard(self.run_dir, start) if jax.process_index() == 0 else None
        stop = {"signal": None}
        # Several processes must stop at the same step, or they wait in different collectives. With
        # jax.distributed, SIGTERM is left to JAX's preemption service (its handler tells every
        # process; reached_preemption_sync_point agrees on one step), and Ctrl-C is turned into it.
        multi = jax.process_count() > 1

        def request_stop(signum, frame):  # acted on at the next step boundary; a second Ctrl-C aborts
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if multi:
                signal.raise_signal(signal.SIGTERM)
            else:
                stop["signal"] = signal.Signals(signum).name
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, request_stop)
                        for sig in ((signal.SIGINT,) if multi else (signal.SIGTERM, signal.SIGINT))}
        progress = Progress(self.run_dir.name, cfg.steps, start, enabled=jax.process_index() == 0,
                            upcoming=self._upcoming(start))
        # Steady training time: without the first step (its compile) and without evals, samples
        # and saves (`busy`), for tokens/s and the time left.
        pending, last_time, last_logged, busy = [], time.perf_counter(), start, 0.0
        steady_time, steady_steps = 0.0, 0
        tokens_per_step = cfg.global_batch * cfg.data.seq_len
        record = {}
        try:
            with jax.set_mesh(self.mesh):
                # Step 0: the loss at init (an up-scaled model's drop). Later: a stop that came between
                # a step's checkpoint and its eval, which the resumed loop would otherwise skip.
                if not evaluated and self._eval_due(start):
                    self._eval_and_sample(start, metrics_file, record, progress, samples=start > 0)
                batch = self._device_batch(self.batches.batch(start)) if start < last else None
                for step in range(start, last):
                    self.state, metrics = self.train_step(self.state, batch, *self._step_args())  # dispatched; runs on
                    if step + 1 < last:  # while the next batch is built and sent, before any sync below
                        batch = self._device_batch(self.batches.batch(step + 1))
                    pending.append((step + 1, metrics))
                    done = step + 1
                    if multi and multihost_utils.reached_preemption_sync_point(done):
                        stop["signal"] = "SIGTERM (preemption notice)"
                    at_checkpoint = done % cfg.checkpoint_every == 0 or done == last or stop["signal"]
                    eval_due = self._eval_due(done)
                    if done % cfg.log_every == 0 or at_checkpoint or eval_due:
                        self._check_lock()  # before anything of this step is written
                    logged = done % cfg.log_every == 0 or at_checkpoint
                    if logged or done == start + 1:
                        jax.block_until_ready(metrics)  # a sync point: only at log steps (and the first)
                        now = time.perf_counter()
                        if done == start + 1:  # the compile: its own rate, then steady time starts here
                            rate = tokens_per_step / (now - last_time)
                            last_time, last_logged, busy = now, done, 0.0
                        elif done > last_logged:
                            seconds = now - last_time - busy
                            steady_time, steady_steps = steady_time + seconds, steady_steps + done - last_logged
                            rate = (done - last_logged) * tokens_per_step / seconds
                            progress.steady = steady_time / steady_steps
                            last_time, last_logged, busy = now, done, 0.0
                        if logged:
                            record = self._log(pending, metrics_file, rate)
                            progress.log(done, record)
                            pending = []
                    if at_checkpoint:  # before eval and samples, so that neither can cost a checkpoint
                        busy += self._timed(progress, "checkpoint", self.save, done)
                    if eval_due:
                        busy += self._timed(progress, None, self._eval_and_sample, done, metrics_file, record,
                                            progress)
                    progress.advance(done)
                    if stop["signal"]:
                        break
        finally:
            progress.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.batches.close()  # no streaming reader thread outlives the run
            self._wait_for_saves()
        done = int(self.state["step"])
        if stop["signal"]:
            if self.checkpoints.latest_step() != done:
                self.save(done)
                self._wait_for_saves()
            print(f"stopped by {stop['signal']} at step {done}; run the same command to resume", file=sys.stderr)
        elif done == cfg.steps:
            self._export_final()
        return record

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(every and (step % every == 0 or step == self.cfg.steps)) or (
            self.eval_ends and step in (0, self.cfg.steps))

    def _check_lock(self) -> None:
        """Stops the job, writing nothing more, when another job has taken its run directory's lock
        (a takeover that judged it stale); every process stops together."""
        lost = self._lock is not None and not self._lock.check()
        if jax.process_count() > 1:  # only process 0 holds the lock
            lost = bool(multihost_utils.broadcast_one_to_all(np.int32(lost)))
        if lost:
            raise RunDirBusyError(self._lock.lost_message() if self._lock is not None else
                                  f"run directory {self.run_dir}: process 0 found its lock taken over by another "
                                  f"job; this job stops here and writes nothing more")

    @staticmethod
    def _timed(progress: Progress, kind: str | None, work, *args) -> float:
        """Runs work(*args); its seconds, told to `progress` as `kind`'s."""
        began = time.perf_counter()
        work(*args)
        seconds = time.perf_counter() - began
        if kind is not None:
            progress.spent(kind, seconds)
        return seconds

    def _upcoming(self, start: int) -> dict[str, list[int]]:
        """The steps after `start` at which each kind of work besides training comes (Progress)."""
        steps = range(start + 1, self.cfg.steps + 1)
        evals = [s for s in steps if self._eval_due(s)]
        return {"eval": evals, "tasks": [s for s in evals if self.tasks and self._tasks_due(s)],
                "samples": evals if self.cfg.sample_prompts else [],
                "checkpoint": [s for s in steps if s % self.cfg.checkpoint_every == 0 or s == self.cfg.steps]}

    def _eval_and_sample(self, step: int, metrics_file: Path, record: dict, progress: Progress,
                         samples: bool = True) -> None:
        if step == 0 and self.initial_eval is not None:
            result = dict(self.initial_eval)
        else:
            result = self.evaluate(step, progress.spent)
        if result:
            self._write(metrics_file, {"step": step, **result})
            record.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
            if "eval_loss" in result:
                progress.eval(step, result)
        began = time.perf_counter()
        completions = self.samples() if samples else []
        if completions:
            progress.spent("samples", time.perf_counter() - began)
            self._write(metrics_file, {"step": step, "samples": completions})
            if jax.process_index() == 0:
                progress.write("\n".join(f"[step {step}] {s['prompt']!r} -> {s['completion']!r}" for s in completions))

    def _log(self, pending, metrics_file, tokens_per_s) -> dict:
        record = {}
        for step, metrics in pending:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(f"loss is {values['loss']} at step {step} (grad norm "
                                         f"{values['grad_norm']:.3g}, lr {values['lr']:.3g}); the last good "
                                         f"checkpoint is step {self.checkpoints.latest_step()}")
            record = {"step": step, **values}
        # Cumulative tokens (windows of seq_len, a last window's padding included) drawn from each source.
        drawn = self.batches.drawn(record["step"])
        record.update({f"tokens/{name}": int(n) * self.cfg.data.seq_len for name, n in zip(self.data.sources, drawn)})
        record["tokens_per_s"] = tokens_per_s
        record["model_tflops_per_s"] = tokens_per_s * self.flops_per_token / 1e12
        if self.peak_tflops:
            record["mfu"] = record["model_tflops_per_s"] / (self.peak_tflops * self.mesh.size)
        self._write(metrics_file, record)
        return record

    def _write(self, metrics_file: Path, record: dict) -> None:
        if jax.process_index() == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._tensorboard.write(record)

    def _export_final(self) -> None:
        """run_dir/final: a solarjax parameter checkpoint with the tokenizer, for sampling and export."""
        final = self.run_dir / "final"
        ckpt_lib.save_params(final, self.model_config, self.state["params"], overwrite=True, inputs=self._inputs())
        if jax.process_index() == 0:
            self.data.tokenizer.save(final)


def _ranges(layers) -> str:
    """[8, 9, 10, 11, 20] -> '8:12,20:21'."""
    out, layers = [], list(layers)
    for i in layers:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return ",".join(f"{a}:{b}" for a, b in out) or "none"


def _is_eval(record: dict) -> bool:
    return "eval_loss" in record or any(k.startswith("task/") for k in record)


def _records_up_to(metrics_file: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step`: lines a crash left past the checkpoint are dropped,
    and so is a line cut short by a crash mid-write (it can only be the last)."""
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {metrics_file}: dropping a damaged line {line[:60]!r}", file=sys.stderr)
    return kept


def read_metrics(metrics_file: str | Path) -> list[dict]:
    """metrics.jsonl as records, skipping a line cut short by a crash."""
    return [json.loads(line) for line in _records_up_to(Path(metrics_file), sys.maxsize)]


class _TensorBoard:
    """Scalar event files in the run directory (tensorboardX), beside metrics.jsonl, so that
    `tensorboard --logdir runs/X` shows every run (and every stage of a recipe) side by side."""
    KEYS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "perf/tokens_per_s",
            "model_tflops_per_s": "perf/model_tflops_per_s", "mfu": "perf/mfu", "eval_loss": "eval/loss",
            "eval_perplexity": "eval/perplexity"}

    def __init__(self, run_dir: Path, start_step: int):
        from tensorboardX import SummaryWriter
        run_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard hides events a crashed run wrote past the restored step.
        self._writer = SummaryWriter(str(run_dir), purge_step=start_step or None)

    def write(self, record: dict) -> None:
        """The known keys by their tags, eval_tasks' as task/TASK/METRIC, an objective's own
        metrics (dpo's rewards, ...) as train/KEY or eval/KEY."""
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            tag = self.KEYS.get(key) or (key if key.startswith(("task/", "tokens/")) else
                                         f"eval/{key[10:]}/loss" if key.startswith("eval_loss/") else
                                         f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}")
            self._writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self._writer.close()
