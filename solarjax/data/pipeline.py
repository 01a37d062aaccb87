"""The tokenized data pipeline, load_data: sources -> HF datasets -> token ids, once, into a token cache
on disk -> packed sequences -> deterministic per-process batches.

- Tokenize once: `datasets.map(batched=True, num_proc=...)`, BOS/EOS around each document, written to
  `cache_dir/<fingerprint>/` as a flat memory-mapped token array (tokens.bin) plus document offsets
  (offsets.npy). The fingerprint covers the sources (path, size, mtime), the tokenizer's files and
  special-token settings, and the options, so a second run with the same inputs reuses the cache
  without tokenizing.
- Packing: documents (in cache order) form one stream cut into windows of seq_len; each piece of a
  document in a window gets its own segment id and positions restarting at 0, so attention never
  crosses documents, and a long document is split, never dropped. The last window is padded with
  segment 0.
- Batches (`Mixture`): named sources, each cached and packed on its own, dealt into each step's
  rows by `seats` (Sainte-Laguë in exact arithmetic, a closed form of the step); source s's u-th
  row is window perm_{s,e}[i] with (e, i) = divmod(u, its windows) and perm_{s,e} a seeded
  permutation per epoch. Step k's global batch is a pure function of (seed, weights, k); each
  process takes its contiguous block of rows, so resuming at step k replays nothing. One source
  is a mixture of one, so adding a source later (at weight 0 until some step) leaves its windows
  as they were. Streaming sources are tokenized on the fly.

Every part meets at the window (tokens, segment ids, positions of one row), which the cache
(data.cache), the packers (data.packing), the dealing (data.mixture) and the stream
(data.streaming) must cut identically (the streaming tests compare a stream with a cache window by
window); this module's load_data is the one entry point.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from solarjax.data.cache import TokenCache, build_cache
from solarjax.data.config import IMPLICIT_SOURCE, DataConfig, SourceConfig
from solarjax.data.corpus import write_builtin
from solarjax.data.mixture import Mixture
from solarjax.data.packing import PackedExamples, PackedSequences
from solarjax.data.sources import DataError
from solarjax.data.streaming import StreamedWindows
from solarjax.tokenizer import Tokenizer, resolve_tokenizer


@dataclass
class Data:
    """The tokenizer, each training source's packed windows (`sources`, by name, in config order),
    the mixture's weights by step ([(0, weights), (step, weights), ...], one list entry per source),
    and the held-out sets by name (`held_out`; one unnamed set is named "")."""
    tokenizer: Tokenizer
    sources: dict[str, PackedSequences | PackedExamples]
    schedule: list[tuple[int, list[float]]]
    held_out: dict[str, PackedSequences | PackedExamples]

    @property
    def train(self) -> PackedSequences | PackedExamples | None:
        """The one source's windows (None for a mixture of several)."""
        return next(iter(self.sources.values())) if len(self.sources) == 1 else None

    @property
    def validation(self) -> PackedSequences | PackedExamples | None:
        """The one held-out set (None without one, or with several: see held_out)."""
        return next(iter(self.held_out.values())) if len(self.held_out) == 1 else None

    def batches(self, global_batch: int, seed: int, process_index: int = 0,
                process_count: int = 1) -> "Mixture":
        return Mixture(list(self.sources), list(self.sources.values()), self.schedule, global_batch, seed,
                       process_index, process_count)

    def describe(self) -> str:
        """The mixture: each source's weights, documents, tokens and windows; the schedule; held-out sets."""
        first = dict(zip(self.sources, self.schedule[0][1]))
        total = sum(first.values())
        parts = [f"{name} weight {first[name] / total:.3g} (streaming)" if p.streaming else
                 f"{name} weight {first[name] / total:.3g} ({documents_in(p):,} documents, {p.n_tokens:,} tokens, "
                 f"{len(p):,} windows)" for name, p in self.sources.items()]
        text = f"{len(self.sources)} source{'s' * (len(self.sources) > 1)}: " + "; ".join(parts)
        for step, weights in self.schedule[1:]:
            total = sum(weights)
            text += f"; from step {step}: " + ", ".join(f"{n} {w / total:.3g}" for n, w in zip(self.sources, weights))
        if self.held_out:
            text += "; held out: " + ", ".join(f"{name or 'validation'} {documents_in(p):,} documents, {p.n_tokens:,} tokens"
                                               for name, p in self.held_out.items())
        return text


def documents_in(packed) -> int:
    return len(packed.doc_ids) if isinstance(packed, PackedSequences) else packed.examples


def load_data(cfg: DataConfig, vocab_size: int | None = None, model_dir: str | None = None,
              layout: str = "text", tokenizer: Tokenizer | None = None) -> Data:
    """Tokenizer, token caches and the packed train (and validation) sequences for `cfg`. Without
    data.tokenizer, the model directory being trained (`model_dir`, init.from) lends its tokenizer;
    `tokenizer` (a resumed run's own) overrides both.
    layout: "text" (documents cut into windows), "sft" or "pairs" (records packed whole); without
    sources, records are derived from the built-in corpus (solarjax.data.corpus.builtin_records).

    Each source (cfg.named_sources()) has its own token cache, so adding a source later tokenizes
    only that one. validation_fraction holds out that share of each source (named after it)."""
    tokenizer = tokenizer or resolve_tokenizer(cfg.tokenizer, model_dir, cfg.chat_template)
    if vocab_size is not None:
        tokenizer.check_fits(vocab_size)
    per = 2 if layout == "pairs" else 1  # documents per unit that is packed and held out whole

    def pack(cache, units):
        if layout == "text":
            return PackedSequences(cache, units, cfg.seq_len)
        return PackedExamples(cache, units, cfg.seq_len, pairs=layout == "pairs")

    def cache_of(source) -> TokenCache:
        paths = source.path
        if layout != "text" and not paths:
            paths = (str(write_builtin(layout, cfg.cache_dir)),)
        own = dataclasses.replace(cfg, text_field=source.text_field) if source.text_field else cfg
        return build_cache(paths, own, tokenizer, layout)

    train, held_out = {}, {}
    for source in cfg.named_sources():
        if source.streaming:
            if layout != "text":
                raise DataError(f"source {source.name}: streaming is for text (lm) sources; {layout} records are "
                                f"packed whole from a token cache")
            train[source.name] = StreamedWindows(source.name, source.path, source.text_field or cfg.text_field,
                                                 tokenizer, cfg)
            continue
        cache = cache_of(source)
        all_units = np.arange(cache.n_docs // per)
        if cfg.validation_fraction:
            n_val = max(1, round(cfg.validation_fraction * len(all_units)))
            if n_val >= len(all_units):
                raise DataError(f"data.validation_fraction {cfg.validation_fraction} of {len(all_units)} "
                                f"{'documents' if layout == 'text' else 'records'} leaves none for training"
                                + (f" (source {source.name})" if cfg.named_validation else ""))
            salt = [] if source.name == IMPLICIT_SOURCE else [zlib.crc32(source.name.encode())]
            held = np.zeros(len(all_units), bool)
            held[np.random.default_rng([cfg.seed, 1, *salt]).permutation(len(all_units))[:n_val]] = True
            # Unnamed (plain sources only): one set, as before; named sources: one set each.
            held_out[source.name if cfg.named_validation else ""] = pack(cache, all_units[held])
            train[source.name] = pack(cache, all_units[~held])
        else:
            train[source.name] = pack(cache, all_units)
    if cfg.validation:
        sets = cfg.validation if cfg.named_validation else [SourceConfig("", tuple(cfg.validation))]
        fields = {src.name: src.text_field for src in cfg.named_sources()}
        for s in sets:  # a set named after a source reads that source's text_field unless it gives its own
            cache = cache_of(s if s.text_field or not fields.get(s.name) else
                             dataclasses.replace(s, text_field=fields[s.name]))
            held_out[s.name] = pack(cache, np.arange(cache.n_docs // per))
    names = list(train)
    schedule = [(step, [weights[n] for n in names]) for step, weights in cfg.weights_by_step()]
    return Data(tokenizer, train, schedule, held_out)
