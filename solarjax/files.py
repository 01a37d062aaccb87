"""Writing files whole: an output appears complete, by one rename, or not at all.

publish_once is for caches that any process may build (every host of a pod in a shared folder);
atomic_output_dir for what a command is asked to write (an HF directory, a merge, a checkpoint),
which may not overlap its inputs (check_output) and is replaced only with --overwrite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from solarjax.errors import ConfigError, OutputExistsError


def _temporary(final: Path) -> Path:
    """A hidden sibling of `final` that no other process, on any host, names (pids repeat across hosts)."""
    return final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish_once(final: str | Path, write: Callable[[Path], None]) -> Path:
    """`final`, made by write(temporary sibling) and one rename unless it exists: for caches that
    several processes may build at once (every host of a pod in a shared folder). The temporary
    name is unique across hosts and only its owner deletes it; the first rename wins, and a later
    one finds `final` there and drops its own copy (the same inputs, so the same bytes)."""
    final = Path(final)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    try:
        write(tmp)
        if not final.exists():
            try:
                tmp.rename(final)  # atomic; a directory's fails if another process published first
            except OSError:
                if not final.exists():
                    raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return final


def check_output(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuses an output that is, contains or lies inside one of `inputs` (symlinks resolved):
    writing there, let alone replacing it with --overwrite, would change or delete what is read."""
    where = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        relation = ("is" if where == source else "lies inside" if source in where.parents
                    else "contains" if where in source.parents else None)
        if relation:
            raise ConfigError(f"output {out} {relation} the input {given}; writing there would destroy the "
                             f"input, so choose an output outside it")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yields a temporary directory beside `out`; renames it to `out` only if the block succeeds,
    so a crash or an error never leaves a half-written output behind. `out` may not overlap
    `inputs` (check_output), even with overwrite."""
    check_output(out, inputs)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(out)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)

