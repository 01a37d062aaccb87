"""Where documents come from: files, globs, folders, save_to_disk directories, hub names, and the
built-in corpus, resolved to groups of one format and loaded through `datasets`."""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass
from pathlib import Path

from solarjax.data.config import DataConfig
from solarjax.data.corpus import BUILTIN, builtin_domain, builtin_paths
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
