"""The token cache: documents tokenized once (`datasets.map` workers) into a flat memory-mapped
array of ids plus document offsets, in a folder named by a fingerprint of its inputs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from solarjax.data.config import DataConfig
from solarjax.data.records import Render
from solarjax.data.sources import DataError, Source, _load, resolve_sources
from solarjax.files import publish_once
from solarjax.tokenizer import Tokenizer


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
    template with their loss masks (solarjax.data.records; a pair is two documents, chosen then rejected)."""
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
