"""Tiny random HF checkpoints made by transformers itself, for parity and conversion tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

# Common tiny shapes; each test overrides what it exercises.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


ARCHS = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
         "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def make_hf_model(arch: str = "mistral", seed: int = 0, dtype=torch.float32, **overrides):
    """A random MistralForCausalLM, LlamaForCausalLM or Qwen2ForCausalLM (eval mode, eager attention)."""
    config_cls, cls = ARCHS[arch]
    config = config_cls(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Norm weights start at 1 and biases at 0; randomise them so a mix-up cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model.to(dtype)


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


# Tiny models of the kinds people bring (issue 10): each RoPE scaling, Qwen2, tied embeddings.
# name: (arch, config overrides, RoPE as written in config.json: None keeps transformers 5's
# rope_parameters, else transformers 4's rope_theta + rope_scaling with this key for the type).
# Lengths in the tests (80 tokens) pass original_max_position_embeddings (llama3, yarn) and
# max_position_embeddings (dynamic), where each scaling changes the frequencies.
KINDS = {
    "llama3": ("llama", dict(max_position_embeddings=256, head_dim=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)), None),
    "linear": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0)), "type"),
    "dynamic": ("llama", dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="dynamic", factor=2.0, rope_theta=10000.0)), None),
    "yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                beta_fast=16, rope_theta=10000.0)), "rope_type"),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                                 bos_token_id=5, eos_token_id=[6, 7], pad_token_id=8), None),
    "llama-tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1), None),
}


def save_kind(name: str, path: Path, dtype=torch.float32, **overrides):
    """KINDS[name] saved to `path`, and the model as transformers reads it back from there."""
    arch, kwargs, old_form = KINDS[name]
    save_hf_model(make_hf_model(arch, dtype=dtype, **{**kwargs, **overrides}), path)
    if old_form is not None:
        import json
        d = json.loads((path / "config.json").read_text())
        rope = d.pop("rope_parameters")
        d["rope_theta"] = rope.pop("rope_theta")
        d["rope_scaling"] = {old_form: rope.pop("rope_type"), **rope}
        (path / "config.json").write_text(json.dumps(d, indent=2))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval(), path


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

    from solarjax.data.corpus import default_corpus_files
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


CHATML_TEMPLATE = (  # OpenHermes-2.5-Mistral-7B's template, verbatim
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _added(content: str, special: bool, **flags) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special, **flags}


def make_chatml_sentencepiece(path: Path, layout: str = "decoder", legacy: bool | None = True, **flags) -> Path:
    """A ChatML fine-tune of Mistral as people ship it: tokenizer.model (32000 pieces), no
    tokenizer.json, <|im_end|> (32000, special, the EOS) and <|im_start|> (32001) added beside it,
    generation stopping at 32000. `layout` says where the added tokens are written:
      decoder     tokenizer_config.json's added_tokens_decoder, plus added_tokens.json and
                  special_tokens_map.json (what save_pretrained writes since transformers 4.34)
      legacy      added_tokens.json and special_tokens_map.json only (older saves)
      named       nowhere but the names: eos_token and additional_special_tokens, which transformers
                  appends after the vocabulary
    `flags` (lstrip, rstrip, single_word, ...) go on <|im_end|> (decoder layout only)."""
    import json
    import shutil
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_file(), path / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
              "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
              "chat_template": CHATML_TEMPLATE}
    if legacy is not None:
        config["legacy"] = legacy
    if layout == "decoder":
        config["added_tokens_decoder"] = {
            "0": _added("<unk>", True), "1": _added("<s>", True), "2": _added("</s>", True),
            "32000": _added("<|im_end|>", True, **flags), "32001": _added("<|im_start|>", False)}
    if layout == "named":
        config["additional_special_tokens"] = ["<|im_start|>"]
    else:
        (path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32000, "<|im_start|>": 32001}))
        (path / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 32000}))
    return path
