"""Parameter checkpoints (orbax) with the model config beside them, and load_model for any source.

A solarjax parameter checkpoint is a directory:
  model_config.json   the ModelConfig
  params/             orbax StandardCheckpointer tree (restored straight into shards)
  tokenizer.json ... tokenizer files (and generation_config.json), when the source had them
  special_ids.json    the source's bos/eos/pad ids and dtype, which jax-to-hf writes into config.json
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from solarjax import hf
from solarjax import model as model_lib
from solarjax.config import ModelConfig
from solarjax.sharding import param_shardings
from solarjax.tensorfile import atomic_output_dir, check_output
from solarjax.upscale import UpscaleSpec, apply_plan, check_plan

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


def load_params(path: str | Path, mesh=None) -> tuple[ModelConfig, dict]:
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a solarjax checkpoint (expected {CONFIG_FILE} and params/)")
    config = ModelConfig.load(path / CONFIG_FILE)
    boxed = model_lib.abstract_params(config)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: sharding, nn.unbox(boxed))
    else:
        shardings = nn.unbox(param_shardings(boxed, mesh))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
    params = ocp.StandardCheckpointer().restore(path.absolute() / "params", target)
    return config, params


def load_model(path: str | Path, mesh=None, upscale: UpscaleSpec | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF model directory or a solarjax checkpoint, placed on `mesh`'s
    shards when one is given, and grown by `upscale` (depth up-scaling or a layer plan) if given.

    From HF, each new layer is read straight from its base layer's tensors into the devices'
    shards: neither the base nor the grown model is ever whole on one host.
    """
    path = Path(path)
    if is_checkpoint(path):
        config, params = load_params(path, mesh)
        if upscale is None:
            return config, params
        config, params = apply_plan(config, params, upscale.plan(config.num_layers), mesh)
        return config, params
    if (path / "config.json").is_file():
        if upscale is None:
            return hf.load_hf(path, mesh)
        base = hf.config_from_hf(hf.HFCheckpoint(path).hf_config, str(path / "config.json"))
        return hf.load_hf(path, mesh, layer_map=check_plan(upscale.plan(base.num_layers), base.num_layers))
    raise FileNotFoundError(f"{path}: neither a Hugging Face model directory (config.json) nor a solarjax "
                            f"checkpoint ({CONFIG_FILE} + params/)")
