"""Tiny random HF checkpoints made by transformers itself, for parity and conversion tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

# Common tiny shapes; each test overrides what it exercises.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


def make_hf_model(arch: str = "mistral", seed: int = 0, dtype=torch.float32, **overrides):
    """A random MistralForCausalLM or LlamaForCausalLM (eval mode, eager attention)."""
    kwargs = {**BASE, **overrides}
    if arch == "mistral":
        config, cls = transformers.MistralConfig(**kwargs), transformers.MistralForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Norm weights start at 1; randomise them so a mix-up between the two norms cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.to(dtype)


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def tokenizer_file() -> Path:
    """The real Mistral-7B tokenizer shipped by mistral-common."""
    import importlib.resources
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
