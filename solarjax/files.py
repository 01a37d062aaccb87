"""Writing files whole: an output appears complete, by one rename, or not at all.

publish_once is for caches that any process may build (every host of a pod in a shared folder);
atomic_output_dir for what a command is asked to write (an HF directory, a merge, a checkpoint),
which may not overlap its inputs (check_output) and is replaced only with --overwrite. Both first
clean what a killed writer of the same name left (clean_after_dead_writers).
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


def process_alive(pid: int) -> bool:
    """Whether `pid` runs, in this PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _here() -> str:
    """Where a pid means this process's kind of pid, as a name part: the host name, and a short hash
    of the boot and the PID namespace (containers may share a host name but not their pids)."""
    space = uuid.uuid5(uuid.NAMESPACE_OID, f"{boot_id()}/{pid_namespace()}").hex[:6]
    return f"{socket.gethostname().replace('-', '_')}_{space}"


def _temporary(final: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `final` that no other process, on any host, names (pids repeat across
    hosts and containers): .NAME.tmp-HERE-PID-TAG for what is being written, .NAME.old-HERE-PID-TAG
    for the output an overwrite moved aside."""
    return final.parent / f".{final.name}.{kind}-{_here()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _dead_writers(final: Path, kind: str) -> list[Path]:
    """`final`'s siblings named by _temporary(final, kind) whose writer is provably dead: here (this
    host, boot and PID namespace), and no process has its pid. Any other's are never touched."""
    prefix = f".{final.name}.{kind}-{_here()}-"
    found = []
    for path in final.parent.iterdir():
        if path.name.startswith(prefix):
            pid, _, tag = path.name[len(prefix):].partition("-")
            if pid.isdigit() and len(tag) == 8 and not process_alive(int(pid)):
                found.append(path)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_after_dead_writers(final: str | Path) -> None:
    """Removes what a killed writer (SIGKILL, power loss) left beside `final`: its half-written
    temporaries, and an old output it had moved aside once the new one is in place. Had it died
    between those two renames, `final` is missing and the old output is the last whole one: it is
    put back."""
    final = Path(final)
    for path in _dead_writers(final, "tmp"):
        _remove(path)
    for path in _dead_writers(final, "old"):
        if not os.path.lexists(final):
            path.rename(final)
        else:
            _remove(path)


def publish_once(final: str | Path, write: Callable[[Path], None]) -> Path:
    """`final`, made by write(temporary sibling) and one rename unless it exists: for caches that
    several processes may build at once (every host of a pod in a shared folder). The temporary
    name is unique across hosts and only its owner deletes it; the first rename wins, and a later
    one finds `final` there and drops its own copy (the same inputs, so the same bytes)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_after_dead_writers(final)
    if final.exists():
        return final
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
    so a crash or an error never leaves a half-written output behind. With overwrite the old
    output is moved aside, the new one renamed in, and only then the old one deleted: a crash
    leaves one of the two in place (before, the old one was deleted first, for seconds to minutes
    with nothing there). What a killed writer left is cleaned first (clean_after_dead_writers).
    `out` may not overlap `inputs` (check_output), even with overwrite."""
    check_output(out, inputs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_after_dead_writers(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    tmp = _temporary(out)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(out):
        old = _temporary(out, "old")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)

