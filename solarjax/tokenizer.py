"""One Tokenizer over a model directory's tokenizer.json (HF `tokenizers`) or tokenizer.model
(SentencePiece), with the special ids and chat template the directory declares.

The default is the real Mistral-7B-v0.1 SentencePiece model (32000 pieces, bos 1, eos 2, byte
fallback) that the mistral-common package ships, so it works offline; SOLAR uses it too.

Special tokens are resolved as transformers 5 resolves them: bos/eos/pad token strings from
tokenizer_config.json, overridden by special_tokens_map.json (which it reads only when
tokenizer_config.json has no added_tokens_decoder); whether BOS (EOS) is added from
tokenizer.json's post-processor (transformers 5 leaves it in charge), or tokenizer_config.json's
add_bos_token (add_eos_token) for a SentencePiece model (default true (false), as Llama/Mistral ship).
The ids that end generation (`eos_ids`) are the tokenizer's EOS plus generation_config.json's
eos_token_id (an int or a list, as Llama 3 has), else config.json's.

Added tokens (ChatML's <|im_start|> and <|im_end|> beside a tokenizer.model, say) come from where
transformers 5 reads them: tokenizer_config.json's added_tokens_decoder when it has one, else
added_tokens.json; named special tokens (and additional/extra special tokens) that are in neither
the vocabulary nor those lists are appended after it. Text is split on them before SentencePiece
runs, as transformers does, honouring each token's lstrip/rstrip/single_word; `normalized` tokens
are matched on the raw text too, as transformers 5's Llama tokenizer (which has no normalizer) does.
With `legacy: true` every piece of text between added tokens gets SentencePiece's dummy prefix
("▁"); otherwise (transformers 5's default) only text at the very start does. A tokenizer.json
gets the added tokens it lacks appended, as transformers adds them.

SentencePiece stays the engine for .model files: it is what Mistral was trained with, and it
matches mistral-common. transformers' own conversion of a .model to tokenizer.json merges runs of
spaces differently ("a  b"), so on such text the two disagree; tests/test_tokenizer.py says where.

One module, at 500 lines: the special ids, the added tokens and the chat template are resolved
from the same files, in the order transformers reads them, and each decides what the others mean.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
import re
import shutil
from pathlib import Path

import sentencepiece as spm
import tokenizers

from solarjax.errors import SolarjaxError

# Files that make up a tokenizer, copied with every checkpoint and export. generation_config.json
# rides along because it holds the stop ids; special_ids.json is solarjax's record of config.json's
# bos/eos/pad ids inside its own checkpoints (see hf.special_ids).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
SPECIAL_IDS_FILE = "special_ids.json"


class TokenizerError(SolarjaxError):
    """A tokenizer file is missing or does not fit the model, or a chat cannot be rendered."""


def default_tokenizer_path() -> Path:
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


def has_tokenizer(path: str | Path | None) -> bool:
    return path is not None and any((Path(path) / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    """A special token as the configs write it: a string, or an AddedToken dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched in the text before the model's tokenizer runs (transformers' AddedToken):
    `lstrip`/`rstrip` swallow the whitespace beside it, `single_word` matches it only between
    non-word characters, `special` tokens are dropped by decode(skip_special_tokens=True)."""
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False

    @classmethod
    def parse(cls, value, where: str, special: bool = True) -> "AddedToken":
        """A string, or the dict tokenizer_config.json writes ({"content": ..., "lstrip": ...})."""
        if isinstance(value, str):
            return cls(value, special=special)
        if not isinstance(value, dict) or not isinstance(value.get("content"), str):
            raise TokenizerError(f"{where}: {value!r} is not a token (a string or a dict with \"content\")")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"special": special, **{k: bool(v) if k != "content" else v for k, v in value.items()
                                             if k in fields}})


def _is_word(char: str) -> bool:
    return bool(char) and (char.isalnum() or char == "_")


class Tokenizer:
    """`source` is a tokenizer.json, a .model file, or a directory holding either (tokenizer.json
    preferred, as transformers' fast tokenizers do). Configs are read from the file's directory
    when the file has its standard name."""

    def __init__(self, source: str | Path, chat_template: str | None = None):
        self.source = Path(source)
        self._chat_template_override = chat_template  # data.chat_template's text, over the directory's own
        path = self.source
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
            if not found:
                raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
            path = found[0]
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file")
        self.path = path
        self.directory = path.parent if path.name in ("tokenizer.json", "tokenizer.model") else None
        if path.suffix == ".json":
            try:
                self._hf = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises plain Exceptions for malformed files
                raise TokenizerError(f"{path}: not a tokenizer.json ({e})") from None
            self._sp = None
        else:
            self._hf, self._sp = None, spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(path))
            except (OSError, RuntimeError) as e:
                raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        self._resolve_specials()

    def __reduce__(self):  # datasets.map workers and pickles reload from the files
        return Tokenizer, (str(self.source), self._chat_template_override)

    def _config(self, name: str) -> dict:
        return _read_json(self.directory / name) if self.directory else {}

    def _resolve_specials(self):
        config = self._config("tokenizer_config.json")
        # transformers 5 reads special_tokens_map.json and added_tokens.json only when
        # tokenizer_config.json has no added_tokens_decoder (older saves).
        token_map = {} if "added_tokens_decoder" in config else self._config("special_tokens_map.json")
        self.config = {**config, **token_map}
        names = dict.fromkeys(NAMED_TOKENS)
        if self._sp is not None:  # a .model names its own control pieces; the configs may override them
            ids = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(),
                   "unk_token": self._sp.unk_id(), "pad_token": self._sp.pad_id()}
            names.update({k: self._sp.IdToPiece(i) if i >= 0 else None for k, i in ids.items()})
        names.update({k: _token_text(self.config[k]) for k in names if k in self.config})
        self.special_tokens = {k: v for k, v in names.items() if v is not None}  # the template's bos_token, ...
        # A bare .model (no tokenizer_config.json, like the default) keeps SentencePiece's own way:
        # a dummy prefix for every piece of text, as mistral-common encodes around control tokens.
        self.legacy = bool(config.get("legacy", False)) if config else True
        self._add_declared_tokens(config, token_map)
        self.bos_id, self.eos_id, self.pad_id = (self.token_id(names[k]) for k in ("bos_token", "eos_token",
                                                                                    "pad_token"))
        if self._hf is not None:
            # transformers 5 keeps tokenizer.json's post-processor: what it adds around "a" decides.
            ids = self._hf.encode("a").ids
            self.add_bos = self.bos_id is not None and ids[:1] == [self.bos_id]
            self.add_eos = self.eos_id is not None and ids[-1:] == [self.eos_id]
        else:
            self.add_bos = self.bos_id is not None and bool(self.config.get("add_bos_token", True))
            self.add_eos = self.eos_id is not None and bool(self.config.get("add_eos_token", False))
        stop = []
        for name in ("generation_config.json", "config.json", SPECIAL_IDS_FILE):
            value = self._config(name).get("eos_token_id")
            if value is not None:
                stop = value if isinstance(value, list) else [value]
                break
        self.eos_ids = list(dict.fromkeys(([] if self.eos_id is None else [self.eos_id]) + stop))

    def _declared_tokens(self, config: dict, token_map: dict) -> list[tuple[int | None, AddedToken, str]]:
        """(declared id or None, token, file) in the order transformers 5 adds them: the added tokens
        by id, then the special tokens by name (bos_token ..., any other string *_token) and the listed
        ones (additional_special_tokens, extra_special_tokens), appended when the vocabulary lacks them."""
        directory = self.directory or self.path.parent
        configs = str(directory / "tokenizer_config.json") + (" or special_tokens_map.json" if token_map else "")
        values = [self.config[k] for k in NAMED_TOKENS if self.config.get(k) is not None]
        values += [v for k, v in self.config.items()
                   if k.endswith("_token") and k not in NAMED_TOKENS and isinstance(v, (str, dict))]
        for source in (config, token_map):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                value = source.get(key) or []
                values += list(value.values() if isinstance(value, dict) else value)
        named = [(None, AddedToken.parse(v, configs), configs) for v in values]
        if "added_tokens_decoder" in config:
            where, decoder = str(directory / "tokenizer_config.json"), config["added_tokens_decoder"]
            if not isinstance(decoder, dict) or not all(str(i).isdigit() for i in decoder):
                raise TokenizerError(f"{where}: added_tokens_decoder must map ids to tokens, got {str(decoder)[:100]}")
            added = [(int(i), AddedToken.parse(v, where, special=False), where) for i, v in decoder.items()]
        else:
            where, ids = str(directory / "added_tokens.json"), self._config("added_tokens.json")
            if not all(isinstance(t, str) and isinstance(i, int) for t, i in ids.items()):
                raise TokenizerError(f"{where}: expected {{token: id}}, got {str(ids)[:100]}")
            specials = {token.content for _, token, _ in named}  # as transformers reads the file
            added = [(i, AddedToken(t, special=t in specials, normalized=t not in specials), where)
                     for t, i in ids.items()]
        return sorted(added, key=lambda a: a[0]) + named

    def _add_declared_tokens(self, config: dict, token_map: dict) -> None:
        """Builds the added-token table (SentencePiece) or adds what tokenizer.json lacks, checking
        that each declared id is the one it gets: transformers appends in order whatever id a file
        declares, so a gap or a renamed piece would silently move a token away from its embedding."""
        self._added: dict[str, tuple[int, AddedToken]] = {}  # SentencePiece: content -> (id, token)
        self._appended: list[tuple[int, AddedToken]] = []  # what the configs add past the tokenizer file's ids
        size = self._sp.GetPieceSize() if self._sp is not None else None
        for declared, token, where in self._declared_tokens(config, token_map):
            if self._hf is not None:
                if self._hf.token_to_id(token.content) is not None:
                    continue  # tokenizer.json's own entry decides, as in transformers
                flags = {k: v for k, v in dataclasses.asdict(token).items() if k != "content"}
                self._hf.add_tokens([tokenizers.AddedToken(token.content, **flags)])
                got = self._hf.token_to_id(token.content)
                self._appended.append((got, token))
            else:
                if token.content in self._added:
                    continue
                got = self._sp.PieceToId(token.content)
                if self._sp.IdToPiece(got) != token.content:  # not a piece: the next id after the pieces
                    got = size + len(self._appended)
                    self._appended.append((got, token))
                self._added[token.content] = (got, token)
            if declared is not None and declared != got:
                raise TokenizerError(
                    f"{where}: added token {token.content!r} has id {declared}, but it would get id {got} (added "
                    f"tokens follow the vocabulary of {self.path.name} in id order, without gaps); transformers "
                    f"also gives it {got}, which is not the embedding the model learned for it")
        if self._sp is not None:
            # The .model's control pieces (<s>, </s>) are special tokens to transformers, named or not.
            for i in range(size):
                if self._sp.IsControl(i) and self._sp.IdToPiece(i) not in self._added:
                    self._added[self._sp.IdToPiece(i)] = (i, AddedToken(self._sp.IdToPiece(i)))
            for text in self.special_tokens.values():  # and the pieces special tokens name (<unk>)
                piece = self._sp.PieceToId(text)
                if text not in self._added and self._sp.IdToPiece(piece) == text:
                    self._added[text] = (piece, AddedToken(text))
        self._by_id = {i: t for i, t in self._added.values()}
        # Longest first: at the leftmost match the longest token wins, as in transformers' trie.
        self._pattern = re.compile("|".join(map(re.escape, sorted(self._added, key=len, reverse=True)))) \
            if self._added else None

    def _split(self, text: str) -> list[tuple[int, str | int]]:
        """SentencePiece only: (offset, text or added token id) pieces of `text`, split on the added
        tokens with their lstrip/rstrip/single_word rules (tokenizers' AddedVocabulary)."""
        out, start, pos = [], 0, 0
        while self._pattern is not None and (m := self._pattern.search(text, pos)):
            a, b = m.span()
            i, token = self._added[m.group()]
            if token.single_word and (_is_word(text[a - 1:a]) or _is_word(text[b:b + 1])):
                pos = a + 1  # inside a word: plain text
                continue
            while token.lstrip and a > start and text[a - 1].isspace():
                a -= 1
            while token.rstrip and b < len(text) and text[b].isspace():
                b += 1
            if a > start:
                out.append((start, text[start:a]))
            out.append((a, i))
            start = pos = b
        if start < len(text):
            out.append((start, text[start:]))
        return out

    @functools.cached_property
    def _sp_inner(self) -> spm.SentencePieceProcessor:
        """SentencePiece without its dummy prefix: for text after an added token when not legacy
        (transformers' Metaspace prepend_scheme "first")."""
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        if not proto.normalizer_spec.add_dummy_prefix:
            return self._sp
        proto.normalizer_spec.add_dummy_prefix = False
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto.SerializeToString())
        return sp

    def token_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if self._hf is not None:
            return self._hf.token_to_id(text)
        if text in self._added:
            return self._added[text][0]
        i = self._sp.PieceToId(text)
        return None if i == self._sp.unk_id() and text != self._sp.IdToPiece(i) else i

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can give, added tokens included (transformers' len(tokenizer))."""
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.GetPieceSize() + len(self._appended)

    @property
    def files(self) -> list[Path]:
        """The files that make up this tokenizer (what the token cache's fingerprint covers)."""
        if self.directory is None:
            return [self.path]
        return [self.directory / n for n in TOKENIZER_FILES if (self.directory / n).is_file()] + (
            [self.directory / SPECIAL_IDS_FILE] if (self.directory / SPECIAL_IDS_FILE).is_file() else [])

    def fingerprint(self) -> str:
        """What decides the ids and the chat rendering, wherever the files lie: the model file's
        bytes (tokenizer.json or .model, under any name), the configs' bytes, the special ids and
        the chat template in effect. A copy written by save() has its source's fingerprint, so a
        run that resumes from its own copy (RUN/tokenizer) reads the same token cache."""
        h = hashlib.sha256()
        for f in self.files:
            if f.name in (SPECIAL_IDS_FILE, "chat_template.jinja"):  # in the resolved values below
                continue
            h.update(("model" if f == self.path else f.name).encode() + hashlib.sha256(f.read_bytes()).digest())
        h.update(json.dumps([self.bos_id, self.eos_id, self.eos_ids, self.pad_id, self.add_bos, self.add_eos,
                             self.chat_template]).encode())
        # How text is split beyond what the tokenizer file does alone (added tokens and their flags).
        if self._sp is not None:
            split = [[i, *dataclasses.astuple(t)] for i, t in self._added.values()
                     if i >= self._sp.GetPieceSize() or t != AddedToken(t.content)]
        else:
            split = [[i, *dataclasses.astuple(t)] for i, t in self._appended]
        h.update(json.dumps(["added tokens", split, self.legacy]).encode())
        return h.hexdigest()

    # -- text <-> ids ---------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        ids = []
        for start, part in self._split(text):
            if isinstance(part, int):
                ids.append(part)
            else:  # legacy: every piece of text gets the dummy prefix; otherwise only one at the start
                ids += (self._sp if self.legacy or start == 0 else self._sp_inner).EncodeAsIds(part)
        return ids

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """bos/eos=None add BOS/EOS when the model does (`add_bos`, `add_eos`), as transformers'
        encode(text) does; a model without such a token gets none."""
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        return (([self.bos_id] if bos and self.bos_id is not None else []) + self._ids(text)
                + ([self.eos_id] if eos and self.eos_id is not None else []))

    def encode_batch(self, texts: list[str], bos: bool | None = None, eos: bool | None = None) -> list[list[int]]:
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, added tokens written out (special ones left out with skip_special_tokens)
        and ids the tokenizer does not know skipped, as transformers' decode does."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        # SentencePiece decodes the runs between added tokens. Legacy encoding gave each run a
        # dummy prefix, which decoding each run drops; otherwise only the text's start had one.
        sp = self._sp if self.legacy else self._sp_inner
        parts, run = [], []
        for i in ids + [None]:
            token = self._by_id.get(i)
            if token is None and i is not None:
                if 0 <= i < self._sp.GetPieceSize():
                    run.append(i)
                continue
            if run:
                parts.append(sp.DecodeIds(run))
                run = []
            if token is not None and not (skip_special_tokens and token.special):
                parts.append(token.content)
        text = "".join(parts)
        return text[1:] if sp is not self._sp and text.startswith(" ") else text

    def decode_suffix(self, prefix, ids, skip_special_tokens: bool = False) -> str:
        """The text `ids` add after `prefix` (a prompt): decode(prefix + ids) past decode(prefix), as
        transformers' text streamers do. Decoded alone, a completion loses its leading space (the
        "▁" of "▁Paris" is SentencePiece's dummy prefix there) and bytes of a character split
        between prompt and completion would not decode."""
        head = self.decode(prefix, skip_special_tokens)
        whole = self.decode(list(prefix) + list(ids), skip_special_tokens)
        return whole[len(os.path.commonprefix([head, whole])):]

    # -- chat -----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        if self._chat_template_override is not None:
            return self._chat_template_override
        template = self.config.get("chat_template")
        if self.directory and (self.directory / "chat_template.jinja").is_file():
            template = (self.directory / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """The ids of `messages` rendered by the model's chat template, as transformers'
        apply_chat_template(tokenize=True) gives them: the template writes its own BOS."""
        template = self.chat_template
        if not template:
            raise TokenizerError(f"{self.directory or self.path}: the model has no chat template "
                                 f"(tokenizer_config.json 'chat_template' or chat_template.jinja)")
        try:
            text = _compile(template).render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TokenizerError:  # the template's own raise_exception: its message is for the user
            raise
        except Exception as e:  # the template is the model directory's code: what fails in it is its fault
            raise TokenizerError(f"{self.chat_template_origin}: the chat template cannot be rendered "
                                 f"({type(e).__name__}: {str(e)[:200]})") from None
        return self._ids(text)

    @property
    def chat_template_origin(self) -> str:
        """Where chat_template comes from, for messages."""
        if self._chat_template_override is not None:
            return "data.chat_template"
        if self.directory and (self.directory / "chat_template.jinja").is_file():
            return str(self.directory / "chat_template.jinja")
        return str((self.directory or self.path.parent) / "tokenizer_config.json")

    # -- checks and copies ----------------------------------------------------------------------

    def check_fits(self, vocab_size: int, where: str = "the model") -> "Tokenizer":
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"tokenizer {self.source} has {self.vocab_size} tokens, more than the vocab of "
                                 f"{vocab_size} of {where}")
        return self

    def save(self, directory: str | Path) -> None:
        """Copies the tokenizer files into `directory` and records the special ids (special_ids.json),
        so that sampling and jax-to-hf from there keep them."""
        directory = Path(directory)
        if self.directory is None:
            shutil.copy(self.path, directory / ("tokenizer.json" if self.path.suffix == ".json" else "tokenizer.model"))
        else:
            for f in self.files:
                shutil.copy2(f, directory / f.name)
        if self._chat_template_override is not None:  # transformers reads it before tokenizer_config.json's
            (directory / "chat_template.jinja").write_text(self._chat_template_override)
        (directory / SPECIAL_IDS_FILE).write_text(json.dumps(self.special_ids()) + "\n")

    def special_ids(self) -> dict:
        """config.json's keys: eos_token_id is a list when there are several (as Llama 3 writes it)."""
        eos = self.eos_ids[0] if len(self.eos_ids) == 1 else (self.eos_ids or None)
        return {"bos_token_id": self.bos_id, "eos_token_id": eos, "pad_token_id": self.pad_id}


@functools.lru_cache(maxsize=8)  # compiling is most of a short render's time; SFT renders each record 2n+1 times
def _compile(template: str):
    """transformers' chat-template environment: sandboxed, trim_blocks and lstrip_blocks, its globals."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


def load_tokenizer(path: str | Path | None = None, chat_template: str | Path | None = None) -> Tokenizer:
    """A tokenizer.json or .model file, a directory holding one, or None for the default Mistral
    tokenizer; chat_template: a jinja file that replaces the directory's template (data.chat_template)."""
    text = None
    if chat_template is not None:
        try:
            text = Path(chat_template).expanduser().read_text()
        except OSError as e:
            raise TokenizerError(f"chat template {chat_template}: {e.strerror}") from None
    return Tokenizer(default_tokenizer_path() if path is None else path, text)


def resolve_tokenizer(path: str | Path | None, model_dir: str | Path | None = None,
                      chat_template: str | Path | None = None) -> Tokenizer:
    """data.tokenizer when set; else the tokenizer of the model being trained (init.from) when it
    has one; else the default Mistral tokenizer."""
    if path is None and has_tokenizer(model_dir):
        path = model_dir
    return load_tokenizer(path, chat_template)
