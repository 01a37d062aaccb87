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

import glob
import os


def _only_a_cpu_here() -> bool:
    """No TPU chip on the PCI bus (Google's vendor id, as jax looks for one) and no GPU device node."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == "0x1ae0":
                return False
        except OSError:
            continue
    return not any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))


# With libtpu installed (the tpu extra, for --compile-only) jax tries the TPU backend first, and
# libtpu prints a dozen lines of warnings before jax falls back to the CPU. On a host with nothing
# but a CPU the CPU is the only backend there is, so say so before jax is imported; anywhere else
# (or when the user set JAX_PLATFORMS) nothing changes, so no real error can be hidden.
if "JAX_PLATFORMS" not in os.environ and _only_a_cpu_here():
    os.environ["JAX_PLATFORMS"] = "cpu"

from solarjax.errors import ConfigError  # noqa: E402
from solarjax.model.config import PRESETS, ModelConfig, preset  # noqa: E402
from solarjax.model.decoder import init_params, logits, param_count  # noqa: E402
from solarjax.sharding import make_mesh  # noqa: E402
from solarjax.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from solarjax.weights.checkpoint import load_model, load_params, save_params  # noqa: E402
from solarjax.weights.hf import ConversionError, load_hf, save_hf  # noqa: E402

__all__ = ["ConfigError", "ConversionError", "ModelConfig", "PRESETS", "init_params", "load_hf", "load_model",
           "load_params", "load_tokenizer", "logits", "make_mesh", "param_count", "preset", "save_hf", "save_params",
           "Tokenizer"]
