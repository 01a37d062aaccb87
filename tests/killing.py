"""Killing a training process the hard way, for the resume tests."""

import signal
import subprocess
import time
from pathlib import Path


def sigkill_after_checkpoint(cmd: list[str], env: dict, checkpoints: Path, step: int, timeout: float) -> int:
    """Starts cmd, sends SIGKILL (no handler runs, nothing more is saved) as soon as a checkpoint of
    `step` or later is in `checkpoints`, and returns the newest checkpoint's step. Fails if the
    process ended by itself first."""
    saved = lambda: [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]  # noqa: E731
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not any(s >= step for s in saved()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return max(saved(), default=0)
