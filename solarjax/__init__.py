"""solarjax: grow Mistral/Llama models by depth up-scaling and keep training them, in JAX.

The public API:
  ModelConfig, preset(name)            model configuration and the named sizes
  init_params(config, rng, mesh=None)  random parameters, created directly into their shards
  param_count(config)                  exact parameter count, nothing allocated
  logits(config, params, token_ids)    float32 [B, T, V]
  load_model(path, mesh=None)          (config, params) from an HF directory or a solarjax checkpoint
  save_params / save_hf                write a solarjax checkpoint / an HF directory
  make_mesh(data, fsdp, tensor)        a device mesh; sharding.RULES maps logical axes onto it
  load_tokenizer(path=None)            a model's tokenizer.json / tokenizer.model (None: Mistral's)
"""

from solarjax.checkpoint import load_model, load_params, save_params
from solarjax.errors import ConfigError
from solarjax.modelconfig import ModelConfig, PRESETS, preset
from solarjax.hf import ConversionError, load_hf, save_hf
from solarjax.model import init_params, logits, param_count
from solarjax.sharding import make_mesh
from solarjax.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ConfigError", "ConversionError", "ModelConfig", "PRESETS", "init_params", "load_hf", "load_model",
           "load_params", "load_tokenizer", "logits", "make_mesh", "param_count", "preset", "save_hf", "save_params",
           "Tokenizer"]
