"""The tokenized data pipeline: sources -> HF datasets -> token ids, once, into a token cache
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

One module, although long: every part meets at the window (tokens, segment ids, positions of one
row), which the cache, the packers, the dealing and the stream must cut identically (the streaming
tests compare a stream with a cache window by window), and load_data is the one entry point.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from solarjax.config import IMPLICIT_SOURCE, ConfigError, DataConfig, SourceConfig
from solarjax.corpus import BUILTIN, builtin_domain, builtin_paths, write_builtin
from solarjax.records import Render
from solarjax.files import publish_once
from solarjax.tokenizer import Tokenizer, resolve_tokenizer
from solarjax.errors import SolarjaxError

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".rst": "text",
           ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(SolarjaxError):
    """A data source is missing, empty or malformed; the message names the file or field."""


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    kind: str  # "files" (one format), "disk" (save_to_disk directory) or "hub" (a dataset name)
    format: str | None
    paths: tuple[str, ...]


def resolve_sources(sources: tuple[str, ...], cache_dir: str | Path = DataConfig.cache_dir) -> list[Source]:
    """Expands globs and directories and groups files by format. () or `builtin` means the built-in
    corpus, `builtin:code` and `builtin:prose` its domains (written into cache_dir once)."""
    sources = sources or (BUILTIN,)
    by_format: dict[str, list[str]] = {}
    out: list[Source] = []

    def add_file(f: Path):
        fmt = FORMATS.get(f.suffix.lower())
        if fmt is None:
            raise DataError(f"{f}: unknown file type {f.suffix!r}; expected one of {sorted(FORMATS)}")
        by_format.setdefault(fmt, []).append(str(f))

    for s in sources:
        p = Path(os.path.expanduser(s))
        if builtin_domain(s, s) is not None:
            for f in builtin_paths(s, cache_dir):
                add_file(f)
        elif any(c in s for c in "*?["):
            matches = sorted(globlib.glob(os.path.expanduser(s), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise DataError(f"{s}: no file matches this pattern")
            for f in files:
                add_file(f)
        elif p.is_dir():
            if any((p / m).is_file() for m in _SAVED_DATASET_MARKERS):
                out.append(Source("disk", None, (str(p),)))
            else:
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS)
                if not files:
                    raise DataError(f"{p}: directory has no {'/'.join(sorted(FORMATS))} files")
                for f in files:
                    add_file(f)
        elif p.is_file():
            add_file(p)
        elif s.startswith((".", "/", "~")) or p.suffix.lower() in FORMATS or os.sep in s and len(s.split("/")) > 2:
            raise DataError(f"{s}: no such file or directory")
        else:
            out.append(Source("hub", None, (s,)))
    return [Source("files", fmt, tuple(paths)) for fmt, paths in sorted(by_format.items())] + out


def fingerprint(sources: list[Source], tokenizer: Tokenizer, cfg: DataConfig, layout: str = "text") -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(json.dumps([s.kind, s.format]).encode())
        for path in s.paths:
            if s.kind == "hub":
                h.update(path.encode())
                continue
            for f in ([Path(path)] if Path(path).is_file() else sorted(Path(path).rglob("*"))):
                if f.is_file():
                    st = f.stat()
                    h.update(json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns]).encode())
    h.update(tokenizer.fingerprint().encode())
    # The cache format version; 2: documents with U+FFFD are kept (1 dropped them as not UTF-8).
    h.update(json.dumps([cfg.text_field, cfg.add_bos, cfg.add_eos, 2]).encode())
    if layout != "text":  # rendered records: their layout and its version (1); text caches keep their names
        h.update(json.dumps([layout, 1]).encode())
    return h.hexdigest()[:20]


def _utf8_files(paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(files that decode as UTF-8, "file (byte N)" for those that do not). A text file is one
    document, so one with undecodable bytes is skipped whole; a U+FFFD written in the text is
    valid UTF-8 and kept. datasets then reads the good files strictly, so nothing is replaced.
    Each file is read whole, as datasets reads it (sample_by="document")."""
    good, bad = [], []
    for path in paths:
        try:
            Path(path).read_bytes().decode("utf-8")
            good.append(path)
        except UnicodeDecodeError as e:
            bad.append(f"{path} (byte {e.start})")
    return good, bad


def _quietly(load, *args, **kwargs):
    """datasets shows a "Downloading data" bar for 16 or more *local* files (its copy-free
    "download"); nothing is downloaded, so no bar. Bars stay on elsewhere (tokenizing)."""
    from datasets import utils as bars
    was_on = not bars.are_progress_bars_disabled()
    bars.disable_progress_bars()
    try:
        return load(*args, **kwargs)
    finally:
        if was_on:
            bars.enable_progress_bars()


def _load(source: Source, text_field: str | None, hf_cache: Path):
    """(dataset of one text column or None when no file is left, text files skipped as not UTF-8).
    json/csv/parquet/saved/hub text arrives decoded: nothing there is skipped for its characters.
    text_field None: records (sft, dpo), every column as it is."""
    import datasets
    not_utf8: list[str] = []
    if text_field is None and source.format in ("text", "csv"):
        raise DataError(f"{', '.join(source.paths[:3])}: {source.format} files hold no records; sft and dpo "
                        f"data are json/jsonl/parquet records, saved datasets or hub datasets")
    try:
        if source.kind == "files":
            paths, kwargs = list(source.paths), {}
            if source.format == "text":
                paths, not_utf8 = _utf8_files(source.paths)
                if not paths:
                    return None, not_utf8
                kwargs = {"sample_by": "document"}
            ds = _quietly(datasets.load_dataset, source.format, data_files=paths, split="train",
                          cache_dir=str(hf_cache), **kwargs)
        elif source.kind == "disk":
            ds = datasets.load_from_disk(source.paths[0])
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            ds = datasets.load_dataset(source.paths[0], split="train", cache_dir=str(hf_cache))
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types; name the source either way
        raise DataError(f"{', '.join(source.paths[:3])}: cannot load ({type(e).__name__}: {e})") from None
    if text_field is None:
        return ds, not_utf8
    if source.format != "text" and text_field not in ds.column_names:
        raise DataError(f"{', '.join(source.paths[:3])}: no text field {text_field!r}; columns are "
                        f"{ds.column_names} (set data.text_field)")
    if source.format == "text" and text_field != "text":
        ds = ds.rename_column("text", text_field)
    ds = ds.select_columns([text_field])
    # Loaders disagree on string vs large_string; one type lets sources be concatenated.
    return ds.cast(datasets.Features({text_field: datasets.Value("large_string")})), not_utf8


def _fork_is_safe() -> bool:
    """datasets.map forks its workers, which is unsafe once JAX has started its backend threads
    (a recipe's later stage with new data): then this process tokenizes alone."""
    if "jax" not in sys.modules:
        return True
    try:
        from jax._src import xla_bridge
        return not xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a private API: when it moves, keep the workers
        return True


class _Tokenize:
    """The map function: picklable (worker processes load the tokenizer from its path themselves)."""

    def __init__(self, tokenizer_source: str, field: str, bos: bool | None, eos: bool):
        self.tokenizer_source, self.field, self.bos, self.eos = tokenizer_source, field, bos, eos
        self._tok = None

    def __call__(self, batch):
        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_source)
        ids, status = [], []
        for text in batch[self.field]:
            if text is None or not text.strip():
                ids.append([]), status.append(1)  # empty
                continue
            ids.append(self._tok.encode(text, bos=self.bos, eos=self.eos))
            status.append(0)
        return {"ids": ids, "status": status}


# ---------------------------------------------------------------------------------------------
# The token cache


class TokenCache:
    """tokens.bin (flat uint16/uint32 ids, memory-mapped) + offsets.npy (document starts, n_docs + 1);
    rendered records (sft, dpo) add mask.bin (uint8 per token: 1 where the loss learns the token)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.offsets = np.load(self.path / "offsets.npy")
        n = int(self.offsets[-1])
        self.tokens = (np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))
                       if n else np.zeros(0, self.meta["dtype"]))
        self.mask = None
        if (self.path / "mask.bin").is_file():
            self.mask = np.memmap(self.path / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def build_cache(sources: tuple[str, ...], cfg: DataConfig, tokenizer: Tokenizer, layout: str = "text") -> TokenCache:
    """Tokenizes `sources` into the cache, or returns the existing cache for the same inputs.
    layout "text": documents of cfg.text_field; "sft" / "pairs": records rendered by the chat
    template with their loss masks (solarjax.records; a pair is two documents, chosen then rejected)."""
    resolved = resolve_sources(sources, cfg.cache_dir)
    if layout != "text":  # file by file: files of one format may hold different record layouts (columns)
        resolved = [Source(s.kind, s.format, (p,)) for s in resolved for p in s.paths]
    root = Path(os.path.expanduser(cfg.cache_dir))
    path = root / fingerprint(resolved, tokenizer, cfg, layout)
    if (path / "meta.json").is_file():
        return TokenCache(path)
    import datasets
    # datasets' own arrow caches go beside ours, so one cache_dir holds (and frees) everything.
    loaded = [_load(s, cfg.text_field if layout == "text" else None, root / "hf") for s in resolved]
    not_utf8 = [f for _, bad in loaded for f in bad]
    counts = {"empty": 0, "not_utf8": len(not_utf8)}
    parts = [ds for ds, _ in loaded if ds is not None]
    what = ', '.join(sources) or ('the built-in corpus' if layout == "text" else 'the built-in records')
    if not parts:
        raise DataError(f"{what}: no document has any text (0 empty, "
                        f"{len(not_utf8)} not UTF-8: {', '.join(not_utf8[:3])})")
    workers = cfg.num_proc if cfg.num_proc > 1 and _fork_is_safe() else 1
    if layout == "text":
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if len(ds) == 0:
            raise DataError(f"{what}: the dataset is empty")
        mapped = ds.map(_Tokenize(str(tokenizer.source), cfg.text_field, cfg.add_bos, cfg.add_eos), batched=True,
                        batch_size=64, num_proc=min(workers, len(ds)) if workers > 1 else None,
                        remove_columns=ds.column_names, desc="tokenizing")
    else:
        if not tokenizer.chat_template:
            raise DataError(f"{what}: {layout} records are rendered by a chat template, and tokenizer "
                            f"{tokenizer.source} has none; set data.chat_template to a jinja file")
        counts["no_target"] = 0
        # Each source on its own: sources may hold different layouts (different columns).
        mapped = datasets.concatenate_datasets([
            ds.map(Render(layout, tokenizer, ", ".join(src.paths[:2])), batched=True, batch_size=64, with_indices=True,
                   num_proc=min(workers, len(ds)) if workers > 1 and len(ds) > 1 else None,
                   remove_columns=ds.column_names, desc="rendering records")
            for src, ds in zip(resolved, parts) if len(ds)])
        if len(mapped) == 0:
            raise DataError(f"{what}: the dataset is empty")
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    # Every host of a pod may build the same cache at once in a shared cache_dir: publish_once.
    def write(tmp: Path) -> None:
        tmp.mkdir()
        offsets = [0]
        masks = open(tmp / "mask.bin", "wb") if layout != "text" else None
        with open(tmp / "tokens.bin", "wb") as f:
            for batch in tqdm(mapped.iter(batch_size=1024), total=math.ceil(len(mapped) / 1024),
                              desc="writing token cache", unit="batch", disable=None):
                for i, (ids, status) in enumerate(zip(batch["ids"], batch["status"])):
                    if status:  # a record's rows share its status, so a pair is kept or skipped whole
                        counts["empty" if status == 1 else "no_target"] += 1
                        continue
                    f.write(np.asarray(ids, dtype).tobytes())
                    if masks is not None:
                        masks.write(np.asarray(batch["mask"][i], np.uint8).tobytes())
                    offsets.append(offsets[-1] + len(ids))
        if masks is not None:
            masks.close()
        if len(offsets) == 1:
            raise DataError(f"{what}: no document has any text ({counts['empty']} empty, "
                            f"{counts['not_utf8']} not UTF-8, {counts.get('no_target', 0)} with nothing to learn)")
        if counts.get("no_target"):
            print(f"warning: {what}: skipped {counts['no_target']} rows with nothing to learn (no assistant "
                  f"message, or an empty response)", file=sys.stderr)
        if not_utf8:
            print(f"warning: skipped {len(not_utf8)} documents with bytes that are not UTF-8: "
                  f"{', '.join(not_utf8[:3])}{', ...' if len(not_utf8) > 3 else ''}", file=sys.stderr)
        np.save(tmp / "offsets.npy", np.asarray(offsets, np.int64))
        meta = {"sources": [s.paths[:20] for s in resolved], "tokenizer": str(tokenizer.source), "dtype": dtype,
                "layout": layout,
                "n_docs": len(offsets) - 1, "n_tokens": offsets[-1], "skipped": counts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    publish_once(path, write)
    return TokenCache(path)


# ---------------------------------------------------------------------------------------------
# Packing and batches


class PackedSequences:
    """Documents `doc_ids` of a cache, in that order, as one stream cut into windows of seq_len."""

    def __init__(self, cache: TokenCache, doc_ids: np.ndarray, seq_len: int):
        self.cache, self.doc_ids, self.seq_len = cache, np.asarray(doc_ids, np.int64), seq_len
        lengths = cache.offsets[self.doc_ids + 1] - cache.offsets[self.doc_ids]
        self._cum = np.concatenate([[0], np.cumsum(lengths)])

    @property
    def n_tokens(self) -> int:
        return int(self._cum[-1])

    def __len__(self) -> int:
        return math.ceil(self.n_tokens / self.seq_len)

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment_ids, positions), each [seq_len] int32; segment 0 is padding."""
        T = self.seq_len
        tokens, segments, positions = (np.zeros(T, np.int32) for _ in range(3))
        start, end = i * T, min((i + 1) * T, self.n_tokens)
        d = int(np.searchsorted(self._cum, start, side="right")) - 1
        s, piece = start, 0
        while s < end:
            doc = int(self.doc_ids[d])
            a = s - int(self._cum[d])
            n = min(int(self._cum[d + 1]) - s, end - s)
            at = s - start
            tokens[at:at + n] = self.cache.tokens[self.cache.offsets[doc] + a:self.cache.offsets[doc] + a + n]
            piece += 1
            segments[at:at + n] = piece
            positions[at:at + n] = np.arange(n)
            s += n
            d += 1
        return tokens, segments, positions


def stack_sequences(seqs) -> dict[str, np.ndarray]:
    """(tokens, segment_ids, positions) per row, or a dict per row (PackedExamples) -> the batch
    dict, each [rows, seq_len] int32."""
    if isinstance(seqs[0], dict):
        return {k: np.stack([s[k] for s in seqs]) for k in seqs[0]}
    return {"tokens": np.stack([s[0] for s in seqs]), "segment_ids": np.stack([s[1] for s in seqs]),
            "positions": np.stack([s[2] for s in seqs])}


class PackedExamples:
    """Rendered records (sft examples, or dpo pairs: chosen then rejected) packed whole into rows
    of seq_len: an example (a pair) is never split across rows. Each example has its own segment
    id (1, 2, ... in its row, so a pair's chosen is an odd segment and its rejected the next even
    one) and positions from 0; the rest of a row is padding (segment 0). `loss_mask` marks the
    tokens the loss learns.

    Packing is first-fit over a window of open rows, in cache order: deterministic, so every
    process and every resume sees the same rows. An example longer than seq_len keeps its first
    seq_len tokens; a pair longer than seq_len is cut to fit, the longer side first, neither below
    seq_len // 2. Both are counted in `truncated`; one with no token left to learn is dropped
    (`dropped`)."""

    WINDOW = 64  # open rows a new example may go into; more packs tighter and costs more per example

    def __init__(self, cache: TokenCache, units: np.ndarray, seq_len: int, pairs: bool):
        self.cache, self.seq_len, self.pairs = cache, seq_len, pairs
        T, per = seq_len, 2 if pairs else 1
        lengths = np.diff(cache.offsets)
        self.examples, self.truncated, self.dropped = len(units), 0, 0
        free = np.full(self.WINDOW, -1, np.int64)  # room left in each open row; -1: no row there
        open_rows: list[list[tuple[int, int]]] = [[] for _ in range(self.WINDOW)]
        rows: list[list[tuple[int, int]]] = []
        for u in np.asarray(units, np.int64):
            docs = [int(u) * per + k for k in range(per)]
            keep = self._fit([int(lengths[d]) for d in docs])
            if keep != [int(lengths[d]) for d in docs]:
                self.truncated += 1
                if not all(cache.mask[cache.offsets[d]:cache.offsets[d] + n].any() for d, n in zip(docs, keep)):
                    self.dropped += 1
                    continue
            need = sum(keep)
            slot = int(np.argmax(free >= need))
            if free[slot] < need:  # no open row has room: close the fullest, open a new one there
                slot = int(np.argmin(np.where(free < 0, -1, free)))
                if free[slot] >= 0:
                    rows.append(open_rows[slot])
                open_rows[slot], free[slot] = [], T
            open_rows[slot] += list(zip(docs, keep))
            free[slot] -= need
        rows += [r for r, f in zip(open_rows, free) if f >= 0 and r]
        self._start = np.cumsum([0] + [len(r) for r in rows])
        self._items = np.asarray([item for r in rows for item in r], np.int64).reshape(-1, 2)
        self.n_tokens = int(self._items[:, 1].sum()) if len(self._items) else 0

    def _fit(self, lengths: list[int]) -> list[int]:
        T = self.seq_len
        if sum(lengths) <= T:
            return lengths
        if len(lengths) == 1:
            return [T]
        a, b = lengths
        half = T // 2
        if a <= half:
            return [a, T - a]
        if b <= half:
            return [T - b, b]
        return [half, T - half]

    def __len__(self) -> int:
        return len(self._start) - 1

    def sequence(self, i: int) -> dict[str, np.ndarray]:
        """tokens, segment_ids, positions, loss_mask: each [seq_len] int32; segment 0 is padding."""
        T, c = self.seq_len, self.cache
        row = {k: np.zeros(T, np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
        at = 0
        for seg, (doc, n) in enumerate(self._items[self._start[i]:self._start[i + 1]], start=1):
            a = c.offsets[doc]
            row["tokens"][at:at + n] = c.tokens[a:a + n]
            row["loss_mask"][at:at + n] = c.mask[a:a + n]
            row["segment_ids"][at:at + n] = seg
            row["positions"][at:at + n] = np.arange(n)
            at += n
        return row

    def describe(self) -> str:
        fill = self.n_tokens / max(1, len(self) * self.seq_len)
        what = "pairs" if self.pairs else "examples"
        return (f"{self.examples:,} {what} in {len(self):,} rows of {self.seq_len} ({fill:.0%} filled); "
                f"{self.truncated:,} longer than seq_len truncated, {self.dropped:,} of them dropped with "
                f"nothing left to learn")


# ---------------------------------------------------------------------------------------------
# Streaming sources: tokenized on the fly


_NOT_UTF8: set[str] = set()  # text files a stream skipped, each warned about once per process


def _stream_documents(paths: tuple[str, ...], text_field: str, hf_cache: Path):
    """The documents of a streaming source, in order: text files read one by one (None for one that
    is not UTF-8, skipped as the cache skips it), the other parts opened by datasets in streaming
    mode (files of one format, a save_to_disk directory, a hub dataset); nothing written to disk."""
    import datasets
    for src in resolve_sources(paths, hf_cache.parent):
        what = ", ".join(src.paths[:3])
        if src.kind == "files" and src.format == "text":  # one document per file, as the cache reads them
            for path in src.paths:
                try:
                    with open(path, encoding="utf-8") as f:  # text mode: newlines as datasets' text loader reads
                        yield f.read()
                except UnicodeDecodeError as e:
                    if path not in _NOT_UTF8:
                        _NOT_UTF8.add(path)
                        print(f"warning: skipped {path} (byte {e.start}): not UTF-8", file=sys.stderr)
                    yield None  # keeps the documents' numbers, which the stream's recorded positions use
            continue
        try:
            if src.kind == "files":
                kwargs = {"sample_by": "document"} if src.format == "text" else {}
                ds = datasets.load_dataset(src.format, data_files=list(src.paths), split="train", streaming=True,
                                           cache_dir=str(hf_cache), **kwargs)
            elif src.kind == "disk":
                ds = datasets.load_from_disk(src.paths[0])
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds["train"] if "train" in ds else next(iter(ds.values()))
                ds = ds.to_iterable_dataset()
            else:
                ds = datasets.load_dataset(src.paths[0], split="train", streaming=True, cache_dir=str(hf_cache))
            field = "text" if src.format == "text" else text_field
            for record in ds:
                if field not in record:
                    raise DataError(f"{what}: no text field {field!r}; columns are {sorted(record)} (set text_field)")
                yield record[field]
        except DataError:
            raise
        except Exception as e:  # datasets/pyarrow raise many types; name the source either way
            raise DataError(f"{what}: cannot stream ({type(e).__name__}: {e})") from None


class StreamedWindows:
    """A source too large to tokenize up front (`streaming: true`): a background thread reads its
    documents in order, tokenizes them and cuts them into windows of seq_len exactly as
    PackedSequences cuts a cache (pieces with their own segment ids and positions; the stream starts
    again after its end, and the last window of each pass is padded). Window u is the u-th of that
    sequence, so it is deterministic; `sequence(u)` is asked for increasing u. Memory is bounded:
    at most `ahead` windows wait in a queue, and the start positions (pass, document, token) of the
    last `HISTORY` windows are kept (`position`: the Mixture asks for each step's first window as
    it reads it, for the checkpoint, so a step may read any number of windows). A resume seeks to a recorded
    position (`seek`) and reads on from there (documents before it are read, not tokenized); with
    no record it tokenizes its way from the start: slower, as exact."""

    streaming = True
    HISTORY = 4096

    def __init__(self, name: str, paths: tuple[str, ...], text_field: str, tokenizer: Tokenizer, cfg: DataConfig,
                 ahead: int = 256):
        self.name, self.paths, self.text_field, self.tokenizer = name, paths, text_field, tokenizer
        self.seq_len, self.bos, self.eos, self.ahead = cfg.seq_len, cfg.add_bos, cfg.add_eos, ahead
        self.hf_cache = Path(os.path.expanduser(cfg.cache_dir)) / "hf"
        self._known: dict[int, tuple[int, int, int]] = {}  # window -> (pass, document, token): seek targets
        self._starts: dict[int, tuple[int, int, int]] = {}  # the same for windows consumed lately
        self._queue, self._thread, self._stop, self._next = None, None, None, None
        self.max_waiting = 0  # the most windows ever waiting in the queue (<= ahead)

    def __len__(self) -> int:
        raise TypeError(f"source {self.name} is streaming: its number of windows is unknown")

    def _produce(self, queue, stop, u: int, epoch: int, doc: int, offset: int) -> None:
        import queue as queue_lib
        T = self.seq_len

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    queue.put(item, timeout=0.1)
                    return True
                except queue_lib.Full:
                    continue
            return False
        try:
            while True:
                tokens, segments, positions = (np.zeros(T, np.int32) for _ in range(3))
                at, piece, start, any_doc = 0, 0, None, False
                for d, text in enumerate(_stream_documents(self.paths, self.text_field, self.hf_cache)):
                    if d < doc or text is None or not text.strip():
                        continue
                    any_doc = True
                    ids = np.asarray(self.tokenizer.encode(text, bos=self.bos, eos=self.eos), np.int32)
                    a = offset if d == doc else 0
                    while a < len(ids):
                        if at == 0:
                            start = (epoch, d, a)
                        n = min(T - at, len(ids) - a)
                        tokens[at:at + n], positions[at:at + n] = ids[a:a + n], np.arange(n)
                        piece += 1
                        segments[at:at + n] = piece
                        at, a = at + n, a + n
                        if at == T:
                            if not put((u, start, (epoch, d, a), (tokens, segments, positions))):
                                return
                            u += 1
                            tokens, segments, positions = (np.zeros(T, np.int32) for _ in range(3))
                            at, piece = 0, 0
                if at and not put((u, start, (epoch + 1, 0, 0), (tokens, segments, positions))):
                    return
                u += bool(at)
                if not any_doc and doc == 0:
                    raise DataError(f"{', '.join(self.paths[:3])}: the stream has no document with text")
                epoch, doc, offset = epoch + 1, 0, 0
        except BaseException as e:  # the consumer raises it
            put((None, None, None, e))

    def _start(self, u: int) -> None:
        import queue as queue_lib
        import threading
        self.close()
        known = {**self._known, **self._starts}  # sought-to positions and windows read lately
        at = max((k for k in known if k <= u), default=None)
        begin = (at, *known[at]) if at is not None else (0, 0, 0, 0)
        self._queue, self._stop = queue_lib.Queue(maxsize=self.ahead), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop, *begin), daemon=True,
                                        name=f"stream-{self.name}")
        self._thread.start()
        self._next = self.started_at = begin[0]

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment_ids, positions) of window u, each [seq_len] int32, as PackedSequences gives them."""
        if self._thread is None or u < self._next:
            self._start(u)
        while True:
            self.max_waiting = max(self.max_waiting, self._queue.qsize())
            got, start, end, window = self._queue.get()
            if got is None:
                raise window
            self._starts[got] = start
            self._starts.setdefault(got + 1, end)  # reading on from where this window ended gives the next
            while len(self._starts) > self.HISTORY:
                del self._starts[next(iter(self._starts))]
            self._next = got + 1
            if got == u:
                return window

    def position(self, u: int) -> list[int] | None:
        """[pass, document, token] where window u starts, if it was read lately (or sought to)."""
        pos = self._starts.get(u) or self._known.get(u)
        return None if pos is None else list(pos)

    def seek(self, u: int, position) -> None:
        """Window u starts at `position` (from a checkpoint's record): start reading there."""
        self._known[int(u)] = tuple(int(x) for x in position)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


# ---------------------------------------------------------------------------------------------
# Mixtures: named sources at weights, dealt rows step by step


def exact_weights(weights) -> list[int]:
    """Integer weights in the exact ratio of `weights` as written: each float is read as the
    decimal it prints as (0.1 is 1/10, not the binary double nearest it), so 0.6/0.3/0.1 and 6/3/1
    are the same mixture [6, 3, 1] and deal the same rows. A non-finite or negative weight, or all
    zero, is refused."""
    fractions = []
    for w in weights:
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise DataError(f"mixture weight {w!r} must be a finite number >= 0")
        fractions.append(Fraction(repr(w)))
    if not any(fractions):
        raise DataError(f"mixture weights {list(weights)} are all 0: some source must have a weight")
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    g = math.gcd(*ints)
    return [i // g for i in ints]


def seats(weights, rows: int) -> np.ndarray:
    """How many of the first `rows` rows of a mixture each source gets: Sainte-Laguë's divisor
    method in closed form, in exact integer arithmetic (no float noise breaks a tie, and any ratio
    of weights is dealt exactly). Row seats are ordered by the key (2j+1)/w_s ascending (source s's
    (j+1)-th row), ties to the lower source index, and the first `rows` of that one fixed order are
    taken, so the count per source never falls as `rows` grows (no Alabama paradox: per-step
    differences are >= 0) and stays within about one row of rows * w_s / sum(w). int64 [S]."""
    w = exact_weights(weights)
    out = np.zeros(len(w), np.int64)
    if rows <= 0:
        return out
    active = [s for s in range(len(w)) if w[s]]

    # Seats of source s whose key is <= a/b (or < a/b): the j >= 0 with (2j+1) * b <= a * w_s.
    def at_most(a: int, b: int) -> list[int]:
        return [(a * w[s] + b) // (2 * b) for s in range(len(w))]

    def below(a: int, b: int) -> list[int]:
        return [(a * w[s] + b - 1) // (2 * b) for s in range(len(w))]

    # The threshold key: the smallest key with `rows` seats at or below it. For each source, the
    # first of its own keys that gets there (its rows-th key always does), then the least of those.
    threshold = None
    for s in active:
        lo, hi = 0, rows - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(at_most(2 * mid + 1, w[s])) >= rows:
                hi = mid
            else:
                lo = mid + 1
        key = Fraction(2 * lo + 1, w[s])
        threshold = key if threshold is None else min(threshold, key)
    a, b = threshold.numerator, threshold.denominator
    strictly, upto = below(a, b), at_most(a, b)
    need = rows - sum(strictly)
    for s in range(len(w)):  # seats tied at the threshold key: lower source index first
        take = min(upto[s] - strictly[s], need)
        out[s] = strictly[s] + take
        need -= take
    return out


class Mixture:
    """Global batch k of a mixture of sources (one source is a mixture of one), each packed into
    windows on its own.

    The schedule is [(start step, weights), ...]. Within the segment that holds step k, the first
    G * (k - start + 1) rows are dealt to the sources by `seats` (a closed form of the step), and
    step k takes the difference from step k-1: rounding is carried forward, never re-drawn, so over
    many steps each source's share of rows matches its weight to within a row. Source s's u-th row
    overall (u counts every earlier segment's rows too) is window perm_{s,e}[i], (e, i) =
    divmod(u, its windows): its own seeded permutation per epoch, wrapping around on its own. Rows
    of a step are in source order; this process builds rows [p*G/P, (p+1)*G/P). All of it is a pure
    function of (seed, schedule, k): resume needs only k, and P processes build one process's batch."""

    def __init__(self, names: list[str], packed: list, schedule: list[tuple[int, list[float]]],
                 global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        if global_batch < 1 or global_batch % process_count:
            raise DataError(f"global batch {global_batch} must be a positive multiple of the process count "
                            f"{process_count}")
        self.names, self.packed, self.schedule = list(names), list(packed), [(int(a), list(w)) for a, w in schedule]
        cached = [(name, len(p)) for name, p in zip(self.names, self.packed) if not getattr(p, "streaming", False)]
        for name, n in cached:
            if n == 0 and any(w[self.names.index(name)] for _, w in self.schedule):
                raise DataError(f"source {name} has no windows to train on (no document or record left in it), "
                                f"but a mixture weight for it is > 0")
        if len(cached) == len(self.names) and sum(n for _, n in cached) < global_batch:
            raise DataError(f"the data has {sum(n for _, n in cached)} sequences of {self.packed[0].seq_len} "
                            f"tokens, fewer than one global batch of {global_batch}")
        self.global_batch, self.seed = global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._drawn_cache: tuple[int, np.ndarray] | None = None
        self._marks: dict[int, dict[str, list[int]]] = {}  # step -> its streams' positions (positions())

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start_step: int = 0):
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def _segment(self, step: int) -> int:
        return max(i for i, (a, _) in enumerate(self.schedule) if a <= step)

    def drawn(self, step: int) -> np.ndarray:
        """Rows each source gave to steps 0 .. step-1, int64 [S]."""
        if self._drawn_cache is not None and self._drawn_cache[0] == step:
            return self._drawn_cache[1].copy()
        G, total = self.global_batch, np.zeros(len(self.names), np.int64)
        for i, (start, weights) in enumerate(self.schedule):
            if start >= step:
                break
            end = min(step, self.schedule[i + 1][0]) if i + 1 < len(self.schedule) else step
            total += seats(weights, G * (end - start))
        self._drawn_cache = (step, total)
        return total.copy()

    def dealt(self, step: int) -> np.ndarray:
        """Rows of global batch `step` from each source, int64 [S] summing to the global batch."""
        start, weights = self.schedule[self._segment(step)]
        G = self.global_batch
        return seats(weights, G * (step - start + 1)) - seats(weights, G * (step - start))

    def _window(self, s: int, u: int) -> int:
        if getattr(self.packed[s], "streaming", False):  # in stream order; its windows' count is unknown
            return u
        n = len(self.packed[s])
        epoch, i = divmod(u, n)
        key = (s, epoch)
        if key not in self._perms:
            salt = [] if self.names[s] == IMPLICIT_SOURCE else [zlib.crc32(self.names[s].encode())]
            self._perms = {k: v for k, v in self._perms.items() if k[0] != s or k[1] >= epoch - 1}
            self._perms[key] = np.random.default_rng([self.seed, *salt, epoch]).permutation(n)
        return int(self._perms[key][i])

    def global_rows(self, step: int) -> list[tuple[int, int]]:
        """(source index, window) of every row of global batch `step`, in source order."""
        first, counts = self.drawn(step), self.dealt(step)
        self._drawn_cache = (step + 1, first + counts)  # the loop asks for the next step next
        return [(s, self._window(s, int(first[s]) + r)) for s in range(len(self.names)) for r in range(int(counts[s]))]

    def rows(self, step: int) -> list[tuple[int, int]]:
        local = self.global_batch // self.process_count
        return self.global_rows(step)[self.process_index * local:(self.process_index + 1) * local]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: tokens, segment_ids, positions (and an
        objective's masks), [G/P, T] int32. A streaming source's windows are read in order by every
        process (each keeps only its own rows)."""
        local = self.global_batch // self.process_count
        lo, seqs, first = self.process_index * local, [], self.drawn(step)
        marks = {}  # streaming source -> where its first window of this step starts
        for i, (s, w) in enumerate(self.global_rows(step)):  # in order: a stream is read forwards
            streaming = getattr(self.packed[s], "streaming", False)
            if lo <= i < lo + local:
                seqs.append(self.packed[s].sequence(w))
            elif streaming:
                self.packed[s].sequence(w)  # another process's row: read past it
            if streaming and s not in marks:  # now, while the stream still knows it
                marks[s] = self.packed[s].position(w)
        self._marks[step] = self._mark(first, marks)
        for old in [k for k in self._marks if k < step - 8]:  # a checkpoint asks for a step just built
            del self._marks[old]
        return stack_sequences(seqs)

    def _mark(self, first: np.ndarray, marks: dict[int, list[int] | None]) -> dict[str, list[int]]:
        """{name: [window, pass, document, token]} where each streaming source's window first[s]
        starts: from `marks`, else (no row of it yet in this step) as the stream knows it."""
        out = {}
        for s, (name, packed) in enumerate(zip(self.names, self.packed)):
            if getattr(packed, "streaming", False):
                pos = marks[s] if s in marks else packed.position(int(first[s]))
                if pos is not None:
                    out[name] = [int(first[s]), *pos]
        return out

    def positions(self, step: int) -> dict[str, list[int]]:
        """For the checkpoint of `step`: where each streaming source's next window (the first that
        step `step` draws) starts, [window, pass, document, token], recorded when that step's batch
        was built (however many windows it read); a source not read that far is left out."""
        if step in self._marks:
            return self._marks[step]
        return self._mark(self.drawn(step), {})  # the last step: no batch after it was built

    def seek(self, positions: dict[str, list[int]]) -> None:
        for name, packed in zip(self.names, self.packed):
            if name in positions and getattr(packed, "streaming", False):
                packed.seek(positions[name][0], positions[name][1:])

    def close(self) -> None:
        """Stops streaming sources' reader threads (a later batch starts them again where they were)."""
        for packed in self.packed:
            if getattr(packed, "streaming", False):
                packed.close()


def check_mixture_resume(previous: DataConfig, cfg: DataConfig, resume_step: int, run_dir) -> None:
    """The batches of steps before resume_step were dealt with `previous`'s weights (the run's
    config.json), and the dealing carries its rounding forward, so other weights there would deal the
    steps after differently from a straight run. Refuses that, naming the first step that differs;
    weights from resume_step on may change freely (a source missing on one side weighs 0)."""
    def at(c: DataConfig, step: int) -> dict[str, Fraction]:  # exactly as seats() deals them
        weights = [w for s, w in c.weights_by_step() if s <= step][-1]
        exact = exact_weights(list(weights.values()))
        return {n: Fraction(w, sum(exact)) for n, w in zip(weights, exact) if w}

    changes = sorted({s for s, _ in previous.weights_by_step()} | {s for s, _ in cfg.weights_by_step()})
    for step in (s for s in changes if s < resume_step):
        old, new = at(previous, step), at(cfg, step)
        if old != new:
            show = lambda w: ", ".join(f"{n} {float(v):.4g}" for n, v in w.items())
            raise ConfigError(f"data: {run_dir} trained step {step} on the mixture {show(old)}, and this config "
                              f"gives {show(new)} there, which would change the batches of every step after. Keep "
                              f"the weights before step {resume_step} and add a data.mixture_schedule entry "
                              f"{{step: {resume_step}, weights: ...}} for the new ones")


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
        parts = [f"{name} weight {first[name] / total:.3g} (streaming)" if getattr(p, "streaming", False) else
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
    sources, records are derived from the built-in corpus (solarjax.corpus.builtin_records).

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
