"""Parameter checkpoints (orbax) with the model config beside them, and load_model for any source.

A solarjax parameter checkpoint is a directory:
  model_config.json   the ModelConfig
  params/             orbax StandardCheckpointer tree (restored straight into shards)
  tokenizer.json ... tokenizer files (and generation_config.json), when the source had them
  special_ids.json    the source's bos/eos/pad ids and dtype, which jax-to-hf writes into config.json

A training run's checkpoint, RUN/checkpoints/STEP (the whole train state: params, optimizer
state, step; the model config is RUN/model_config.json), is also a source: load_model restores
its parameters alone, which is how a run starts afresh from another run's weights
(`init.from: RUN/checkpoints/STEP`, e.g. after an optimizer change that the old state cannot follow).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from solarjax.errors import MissingInputError, debugging, is_disk_full
from solarjax.files import atomic_output_dir, check_output
from solarjax.model import decoder as model_lib
from solarjax.model.config import ModelConfig
from solarjax.sharding import param_shardings
from solarjax.tokenizer import has_tokenizer
from solarjax.weights import hf
from solarjax.weights.upscale import UpscaleSpec, grow, zero_layers

CONFIG_FILE = "model_config.json"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / "params").is_dir()


def save_params(path: str | Path, config: ModelConfig, params, tokenizer_dir=None, overwrite=False,
                inputs=()) -> Path:
    """Writes the checkpoint; `path` may not overlap `inputs` or tokenizer_dir (check_output)."""
    path = Path(path)
    inputs = (*inputs, tokenizer_dir)
    if jax.process_count() > 1:
        check_output(path, inputs)
        # Every process writes its shards; orbax coordinates them and commits atomically itself.
        if jax.process_index() == 0:
            path.mkdir(parents=True, exist_ok=True)
            config.save(path / CONFIG_FILE)
            hf.copy_tokenizer_files(tokenizer_dir, path, special_ids_file=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path.absolute() / "params", params, force=overwrite)
        checkpointer.wait_until_finished()
        return path
    with atomic_output_dir(path, overwrite, inputs) as tmp:
        config.save(tmp / CONFIG_FILE)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.absolute() / "params", params)
        checkpointer.wait_until_finished()
        hf.copy_tokenizer_files(tokenizer_dir, tmp, special_ids_file=True)
    return path


def is_run_checkpoint(path: str | Path) -> bool:
    """RUN/checkpoints/STEP of a training run (orbax CheckpointManager layout)."""
    path = Path(path)
    return (path.parent.name == "checkpoints" and path.name.isdigit() and (path / "default").is_dir()
            and (path.parent.parent / CONFIG_FILE).is_file())


def run_of(path: str | Path) -> Path:
    """The run directory that holds the run checkpoint `path`."""
    return Path(path).parent.parent


def abstract_params(config: ModelConfig, mesh=None) -> dict:
    """The parameters as ShapeDtypeStructs with their shardings on `mesh` (or on one device)."""
    boxed = model_lib.abstract_params(config)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: sharding, nn.unbox(boxed))
    else:
        shardings = nn.unbox(param_shardings(boxed, mesh))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)


def load_params(path: str | Path, mesh=None) -> tuple[ModelConfig, dict]:
    """(config, params) of a solarjax parameter checkpoint or of a run checkpoint (its params only)."""
    path = Path(path)
    if is_run_checkpoint(path):
        config = ModelConfig.load(run_of(path) / CONFIG_FILE)
        target = {"params": abstract_params(config, mesh)}
        manager = ocp.CheckpointManager(path.parent.absolute(), item_handlers=ocp.PyTreeCheckpointHandler())
        restored = manager.restore(int(path.name), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        return config, restored["params"]
    if not is_checkpoint(path):
        raise MissingInputError(f"{path}: not a solarjax checkpoint (expected {CONFIG_FILE} and params/, or a "
                                f"run's checkpoints/STEP)")
    config = ModelConfig.load(path / CONFIG_FILE)
    params = ocp.StandardCheckpointer().restore(path.absolute() / "params", abstract_params(config, mesh))
    return config, params


def model_config_of(path: str | Path) -> ModelConfig:
    """The ModelConfig of any source load_model takes, read from its config alone."""
    path = Path(path)
    if is_run_checkpoint(path):
        return ModelConfig.load(run_of(path) / CONFIG_FILE)
    if is_checkpoint(path):
        return ModelConfig.load(path / CONFIG_FILE)
    if (path / "config.json").is_file():
        return hf.config_from_hf(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    raise MissingInputError(f"{path}: neither a Hugging Face model directory (config.json), a solarjax "
                            f"checkpoint ({CONFIG_FILE} + params/) nor a run's checkpoints/STEP")


def tokenizer_dir(path: str | Path) -> Path:
    """Where the tokenizer of a model source lies: the source itself, or for a run checkpoint the
    tokenizer its run saved (RUN/tokenizer, or RUN/final of a finished run)."""
    path = Path(path)
    if not is_run_checkpoint(path):
        return path
    for candidate in (run_of(path) / "tokenizer", run_of(path) / "final"):
        if has_tokenizer(candidate):
            return candidate
    raise MissingInputError(f"{path}: its run {run_of(path)} has no saved tokenizer (tokenizer/ or final/); "
                            f"name the tokenizer the run used with data.tokenizer")


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
    """'opt_state/1/0/mu/embed_tokens' -> shape for each array of a state, from live or abstract
    arrays or from orbax's metadata of a saved one (which spells a NamedTuple's fields as keys)."""
    def name(key):
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def state_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """What differs between a saved state's arrays and the ones a run expects, in words, or None."""
    def listed(names):
        names = sorted(names)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    parts = []
    for part, what in (("params", "the parameters"), ("opt_state", "the optimizer state"), ("step", "the step")):
        ours = {k: v for k, v in expected.items() if k.split("/")[0] == part}
        theirs = {k: v for k, v in saved.items() if k.split("/")[0] == part}
        only_saved, only_ours = set(theirs) - set(ours), set(ours) - set(theirs)
        shapes = [f"{k} {list(theirs[k])} (expected {list(ours[k])})" for k in sorted(set(ours) & set(theirs))
                  if ours[k] != theirs[k]]
        if only_saved or only_ours or shapes:
            detail = []
            if only_saved:
                detail.append(f"it holds {listed(only_saved)}, which this run does not have")
            if only_ours:
                detail.append(f"it lacks {listed(only_ours)}")
            if shapes:
                detail.append(f"shapes differ: {listed(shapes)}")
            parts.append(f"{what} ({'; '.join(detail)})")
    return "; ".join(parts) or None


_NOISE = ("Event loop is closed", "Encountered error while reading array", "Encountered error while writing array")


class _DropDiskFull(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (is_disk_full(error) or "RESOURCE_EXHAUSTED" in record.getMessage())


class _DropAbandonedReads(logging.Filter):
    """asyncio's "Task exception was never retrieved" for one of orbax's own reads: a read that a
    failed restore abandoned, logged with its traceback whenever the task is garbage-collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if "orbax" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def drop_orbax_leftovers() -> None:
    """Silences what orbax leaves behind when a read or write fails, once per process; the error
    itself still reaches the caller, which reports it in one line (Trainer). A failed restore
    abandons pending reads: each is garbage-collected later printing a TensorStore spec of ~40
    lines (sys.unraisablehook), and TensorStore's threads complete them into a closed event loop,
    each printing 'Event loop is closed' (sys.excepthook), and asyncio may log an abandoned read's
    exception with its traceback when its task is collected (the 'asyncio' logger; seen once in
    CI, timing-dependent). A full disk during a background save
    is logged by orbax's threads as several tracebacks (the 'absl' logger). Exactly those are
    dropped; everything else reaches the hooks and loggers as before. SOLARJAX_DEBUG=1 keeps all."""
    if debugging():
        return
    if not getattr(sys.excepthook, "drops_orbax_leftovers", False):
        excepthook = sys.excepthook

        def quiet_excepthook(kind, value, tb):
            if not str(value).startswith(_NOISE):
                excepthook(kind, value, tb)
        quiet_excepthook.drops_orbax_leftovers = True
        sys.excepthook = quiet_excepthook
    if not getattr(sys.unraisablehook, "drops_orbax_leftovers", False):  # pytest swaps this one per test
        unraisable = sys.unraisablehook

        def quiet_unraisable(info):
            if not str(info.exc_value).startswith(_NOISE):
                unraisable(info)
        quiet_unraisable.drops_orbax_leftovers = True
        sys.unraisablehook = quiet_unraisable
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropDiskFull) for f in absl.filters):
        absl.addFilter(_DropDiskFull())
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropAbandonedReads())


def load_model(path: str | Path, mesh=None, upscale: UpscaleSpec | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF model directory or a solarjax checkpoint, placed on `mesh`'s
    shards when one is given, and grown by `upscale` (depth up-scaling or a layer plan) if given.

    From HF, each new layer is read straight from its base layer's tensors into the devices'
    shards: neither the base nor the grown model is ever whole on one host.
    """
    path = Path(path)
    if is_checkpoint(path) or is_run_checkpoint(path):
        config, params = load_params(path, mesh)
        if upscale is None:
            return config, params
        return grow(config, params, upscale, mesh)
    if (path / "config.json").is_file():
        if upscale is None:
            return hf.load_hf(path, mesh)
        base = hf.config_from_hf(hf.HFCheckpoint(path).hf_config, str(path / "config.json"))
        growth = upscale.growth(base.num_layers)
        config, params = hf.load_hf(path, mesh, layer_map=list(growth.index))
        if growth.zeroed:  # in place (donated), shard by shard
            shardings = jax.tree.map(lambda a: a.sharding, params)
            params = jax.jit(lambda p: zero_layers(p, growth.zeroed), out_shardings=shardings,
                             donate_argnums=0)(params)
        return config, params
    raise MissingInputError(f"{path}: neither a Hugging Face model directory (config.json), a solarjax "
                            f"checkpoint ({CONFIG_FILE} + params/) nor a run's checkpoints/STEP")
