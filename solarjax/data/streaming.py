"""Sources too large to tokenize up front: windows cut on the fly by a reader thread."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from solarjax.data.config import DataConfig
from solarjax.data.sources import DataError, resolve_sources
from solarjax.tokenizer import Tokenizer

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
