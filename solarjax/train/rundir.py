"""A run directory belongs to one job: a lock file in it names the holder and carries a heartbeat.

RUN/run.lock holds {host, boot, pidns, pid, started, heartbeat, token} as JSON. It is created with
O_EXCL (atomic on local and NFS filesystems alike; flock is not relied on, it does not work across
NFS clients) and refreshed by a daemon thread every HEARTBEAT_S seconds. A second job on the same
directory stops before touching anything, naming the holder. A lock that outlived its holder does
not block a rerun: a holder that ran on this host since its last boot, in this PID namespace, is
gone when its pid no longer runs; one from before a reboot is gone at once; any other (another
host, or another container that shares the hostname but not the PIDs) is gone when its heartbeat
is older than STALE_S.

A takeover moves the stale lock aside under a name of its own and checks that what it moved is the
lock it judged stale (its bytes); if another job took the lock over first, what was moved is that
job's fresh lock, and it is put back (os.link: only if no lock is there). So of two jobs racing for
a stale lock exactly one holds it. A job that finds its lock taken (the heartbeat, or `check` at a
step boundary) is `lost`: the Trainer stops there with one line and writes nothing more.

One process of a job holds the lock (process 0 of a multi-process job; the others learn the
outcome from it, whatever it is). Within one process a directory's lock is shared: taking it again
(a Trainer made twice on one run, as a resume test does) returns the lock already held.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from solarjax.errors import SolarjaxError
from solarjax.files import atomic_output_dir, boot_id, pid_namespace, process_alive

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # five minutes without a heartbeat from another host: its holder is gone


class RunDirError(SolarjaxError):
    """The run directory cannot be taken for this job (not writable, or held: RunDirBusyError)."""


class RunDirBusyError(RunDirError):
    """Another job holds the run directory; the message names it and how to clear a wrong lock."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.boot, self.pidns = boot_id(), pid_namespace()
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self.lost = threading.Event()  # another job holds the lock now
        self._thread = None
        self.held = False

    def _record(self, started: float) -> dict:
        return {"host": self.host, "boot": self.boot, "pidns": self.pidns, "pid": self.pid, "started": started,
                "heartbeat": time.time(), "token": self.token}

    def _read(self, path: Path | None = None) -> tuple[bytes | None, dict | None]:
        """(the file's bytes, its record): (None, None) when it is gone, (bytes, None) when it is not
        a record (cut short by a crash mid-write, or being written now)."""
        try:
            raw = (path or self.path).read_bytes()
        except OSError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return raw, None
        return raw, holder if isinstance(holder, dict) else None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        for _ in range(20):  # each pass either takes the lock, refuses, or moves a stale one aside
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw, holder = self._read()
                if raw is None:
                    continue  # gone meanwhile: try again
                why = self._stale(holder)
                if why is None:
                    raise RunDirBusyError(self._busy_message(holder)) from None
                if why:
                    print(f"warning: {self.path}: taking over the lock: {why}", file=sys.stderr)
                self._move_aside(raw)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._record(started)))
                f.flush()
                os.fsync(f.fileno())
            self._started, self.held = started, True
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            atexit.register(self.release)
            return self
        raise RunDirBusyError(f"{self.path}: could not take the lock (it keeps changing hands)")

    def _move_aside(self, stale: bytes) -> None:
        """Removes the lock file if it still is the stale lock read as `stale`; a lock that another
        job created meanwhile is put back where it was (unless a third has made one there since:
        that one holds, and the job of the one moved learns it at its next check)."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
        try:
            os.rename(self.path, aside)  # atomic: of two takers, one moves any given file
        except FileNotFoundError:
            return
        if self._read(aside)[0] != stale:  # a fresh lock, not the one judged stale: undo
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink()

    def _stale(self, holder: dict | None) -> str | None:
        """Why the lock may be taken over ('' for our own process), or None if its holder lives."""
        if holder is None:  # unreadable: a crash between create and write, unless it is being written now
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return ""
            return f"the lock file is unreadable and {age:.0f} s old" if age > 10 else None
        pid = holder.get("pid")
        if holder.get("host") == self.host and self.boot and holder.get("boot"):
            if holder["boot"] != self.boot:
                return f"its holder, pid {pid} on this host ({self.host}), ran before the host last booted"
            if self.pidns and holder.get("pidns") == self.pidns:  # its pid means what ours does
                if pid == self.pid:
                    return ""  # this process again: one job
                if not isinstance(pid, int) or not process_alive(pid):
                    return f"its holder, pid {pid} on this host ({self.host}), is no longer running"
                return None
        # Another host, or this one seen from another PID namespace (a container that shares the
        # hostname): its pid cannot be asked, its heartbeat can.
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > STALE_S:
            return (f"its holder, pid {pid} on host {holder.get('host')}, last showed a heartbeat "
                    f"{age:.0f} s ago (more than {STALE_S:.0f} s)")
        return None

    def _busy_message(self, holder: dict | None) -> str:
        if holder is None:
            who = "a job whose lock file is being written"
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
            beat = time.time() - float(holder.get("heartbeat", 0))
            who = (f"pid {holder.get('pid')} on host {holder.get('host')} (started {since}, heartbeat "
                   f"{beat:.0f} s ago)")
        return (f"run directory {self.path.parent} is in use by {who}; wait for it to finish or use another "
                f"run_dir. If you know that job is gone, remove {self.path} and run again")

    def check(self) -> bool:
        """Whether this job still holds the lock (reads the file now); sets `lost` when not."""
        if self.held and not self.lost.is_set():
            for _ in range(5):  # gone for a moment: a taker that moved it aside is putting it back
                raw, holder = self._read()
                if raw is not None:
                    break
                time.sleep(0.2)
            if holder is None or holder.get("token") != self.token:
                self.lost.set()
        return self.held and not self.lost.is_set()

    def lost_message(self) -> str:
        _, holder = self._read()
        who = "another job" if holder is None else f"pid {holder.get('pid')} on host {holder.get('host')}"
        return (f"run directory {self.path.parent}: its lock was taken over by {who} while this job ran; "
                f"this job stops here and writes nothing more")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.check():
                print(f"warning: {self.path}: the lock was taken over by another job; this job stops at its "
                      f"next step", file=sys.stderr)
                return
            tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}")
            try:
                tmp.write_text(json.dumps(self._record(self._started)))
                os.replace(tmp, self.path)
            except OSError:  # a full disk must not kill the job; the next beat tries again
                pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        _, holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        atexit.unregister(self.release)


_HELD: dict[Path, RunLock] = {}  # this process's locks, by resolved run directory


def lock_run_dir(run_dir: str | Path) -> RunLock | None:
    """Takes the run directory's lock for this job (or returns the one this process holds):
    process 0 takes it, and every process of a multi-process job stops together when it is held
    elsewhere. None on processes other than 0. Release it with .release() (or at exit)."""
    key = Path(run_dir).resolve()
    lock, error = None, None
    # Without jax.distributed this is process 0 of 1; asking jax would start its backend, which
    # must wait until the data pipeline's tokenizer workers have forked (Trainer).
    multi = jax.distributed.is_initialized() and jax.process_count() > 1
    if not multi or jax.process_index() == 0:
        lock = _HELD.get(key)
        if lock is None or not lock.check():
            try:
                lock = _HELD[key] = RunLock(run_dir).acquire()
            except RunDirBusyError as e:
                error = e
            except OSError as e:  # permissions, a read-only folder: one line, and every process learns it
                error = RunDirError(f"run directory {run_dir}: cannot take its lock {LOCK_FILE} "
                                        f"({e.strerror or e})")
            except BaseException as e:  # a bug: its traceback, after the others are told
                error = e
    if multi:
        held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not held and error is None:
            raise RunDirError(f"run directory {run_dir}: process 0 could not take its lock (its error says why)")
    if error is not None:
        raise error
    return lock


# ---------------------------------------------------------------------------------------------
# The run's records: what a resume must agree with (docs/architecture.md, "A run's records")

CONFIG_RECORD = "config.json"  # the config of the steps taken (its data section: the mixture's weights)
SCHEDULE_RECORD = "schedule.json"  # {"segments": [[0, steps], [start, steps, "continue"|"restart"], ...]}
TRAINABLE_RECORD = "trainable.json"  # what the run trains, resolved to layers: a resume must train the same
STREAMS_RECORD = "streams.json"  # {step: {source: [window, pass, document, token]}} of streaming sources
DATA_RECORD = "data.json"  # {source: [documents, tokens]} of the cached sources at the run's latest start
TOKENIZER_DIR = "tokenizer"  # the tokenizer the run tokenizes with (a copy), and its fingerprint
TOKENIZER_RECORD = "fingerprint.json"  # in TOKENIZER_DIR: {"fingerprint", "source", "chat_template"}


class RunDir:
    """A run directory's layout and its records, read and written in one place. Records are small
    JSON files, each replaced whole (a crash leaves the old one or the new one, never half)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.tokenizer = self.path / TOKENIZER_DIR

    def checkpoint_steps(self) -> list[int]:
        """The steps of the checkpoint folders, newest first, read from the listing alone (damaged
        ones included: the Trainer's restore tells them apart)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit()), reverse=True)

    def read(self, name: str) -> dict | None:
        path = self.path / name
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            raise RunDirError(f"{path}: the run's record is not valid JSON; restore it or start a new run_dir") from None

    def write(self, name: str, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=2, default=list) + "\n")
        os.replace(tmp, self.path / name)

    def tokenizer_record(self) -> dict | None:
        """{"fingerprint", "source", "chat_template"} of the tokenizer the run started with, or None
        (a new run, or one from before the record)."""
        path = self.tokenizer / TOKENIZER_RECORD
        return json.loads(path.read_text()) if path.is_file() else None

    def record_tokenizer(self, tokenizer, chat_template: str | None) -> None:
        """Copies `tokenizer` into RUN/tokenizer (replacing what was there whole: an earlier
        tokenizer's files must not stay beside the new one's) with its fingerprint."""
        with atomic_output_dir(self.tokenizer, overwrite=True) as tmp:
            tokenizer.save(tmp)
            (tmp / TOKENIZER_RECORD).write_text(json.dumps({
                "fingerprint": tokenizer.fingerprint(), "source": str(tokenizer.source),
                "chat_template": chat_template}) + "\n")
