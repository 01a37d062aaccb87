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


# ---------------------------------------------------------------------------------------------
# Tokenizer directories as models ship them, built locally (nothing can come from the hub)

LLAMA3_TEMPLATE = (  # Llama-3-Instruct's template, verbatim
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's template, verbatim
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|finetune_right_pad_id|>"]


def make_bpe_tokenizer(path: Path, vocab_size: int = 300, files: int = 3) -> Path:
    """A Llama-3-like tokenizer.json: byte-level BPE trained on a few files of the built-in corpus,
    its special tokens after the vocabulary (ids vocab_size.., never 1/2), BOS added by the
    post-processor, the Llama 3 chat template; eos <|eot_id|>, generation stopping on
    <|end_of_text|> and <|eot_id|> (generation_config.json), pad in special_tokens_map.json."""
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from solarjax.data import default_corpus_files
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(f) for f in default_corpus_files()[:files]], trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False, "chat_template": LLAMA3_TEMPLATE}, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}))
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": ids}))
    return path


def make_mistral_tokenizer_json(path: Path) -> Path:
    """Mistral's SentencePiece model converted by transformers to tokenizer.json, BOS added by the
    post-processor and the Instruct chat template, as mistralai/Mistral-7B-Instruct-v0.1 ships it."""
    import json
    import shutil
    from tokenizers import Tokenizer, processors
    sp = path.parent / (path.name + "-sp")
    sp.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_file(), sp / "tokenizer.model")
    transformers.LlamaTokenizer.from_pretrained(sp).save_pretrained(path)
    shutil.rmtree(sp)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
        "chat_template": MISTRAL_TEMPLATE}, indent=2))
    return path


def make_mistral_sentencepiece(path: Path) -> Path:
    """tokenizer.model with the tokenizer_config.json Mistral ships beside it (no tokenizer.json)."""
    import json
    import shutil
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_file(), path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "legacy": True,
        "chat_template": MISTRAL_TEMPLATE}, indent=2))
    return path
