"""SentencePiece tokenizers. The default is the real Mistral-7B-v0.1 tokenizer (32000 pieces, bos 1,
eos 2, byte fallback) that the mistral-common package ships, so it works offline; SOLAR uses it too."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import sentencepiece as spm


class TokenizerError(ValueError):
    """A tokenizer file is missing or does not fit the model."""


def default_tokenizer_path() -> Path:
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self._sp.EncodeAsIds(text) + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        ids = self._sp.EncodeAsIds(list(texts))
        return [([self.bos_id] if bos else []) + x + ([self.eos_id] if eos else []) for x in ids]

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def check_fits(self, vocab_size: int, where: str = "the model") -> "Tokenizer":
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"tokenizer {self.path} has {self.vocab_size} pieces, more than the vocab of "
                                 f"{vocab_size} of {where}")
        return self


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """A .model file, a directory holding tokenizer.model, or None for the default Mistral tokenizer."""
    if path is None:
        return Tokenizer(default_tokenizer_path())
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.model").is_file():
            raise TokenizerError(f"{path}: no tokenizer.model in this directory")
        path = path / "tokenizer.model"
    return Tokenizer(path)
