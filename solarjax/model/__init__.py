"""The model: its configuration and presets (config), the decoder's math (decoder), attention
behind one seam (attention) and how products run on XLA:CPU (xla_cpu). Imports only the root
modules (errors, sharding)."""

from solarjax.model.config import PRESETS, ModelConfig, preset
from solarjax.model.decoder import Decoder, abstract_params, init_params, logits, param_count

__all__ = ["PRESETS", "ModelConfig", "preset", "Decoder", "abstract_params", "init_params", "logits", "param_count"]
