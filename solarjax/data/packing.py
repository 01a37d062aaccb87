"""Windows of seq_len tokens: documents cut into windows (PackedSequences), or rendered records
packed whole into rows (PackedExamples); a batch is their rows stacked."""

from __future__ import annotations

import math

import numpy as np

from solarjax.data.cache import TokenCache

# ---------------------------------------------------------------------------------------------
# Packing and batches


class PackedSequences:
    """Documents `doc_ids` of a cache, in that order, as one stream cut into windows of seq_len."""

    streaming = False  # its windows are all in a token cache (StreamedWindows: True)

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

    streaming = False  # its windows are all in a token cache (StreamedWindows: True)

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
