"""Weights on disk: safetensors I/O (tensorfile), Hugging Face formats and the name map (hf),
solarjax's parameter checkpoints (checkpoint), growth (upscale) and merges (merge). Imports the
model and the root modules."""

from solarjax.weights.checkpoint import load_model, load_params, save_params
from solarjax.weights.hf import ConversionError, load_hf, save_hf
from solarjax.weights.merge import merge_hf
from solarjax.weights.upscale import UpscaleSpec, grow, upscale_hf

__all__ = ["load_model", "load_params", "save_params", "ConversionError", "load_hf", "save_hf", "merge_hf",
           "UpscaleSpec", "grow", "upscale_hf"]
