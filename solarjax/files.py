"""Writing files whole: an output appears complete, by one rename, or not at all.

publish_once is for caches that any process may build (every host of a pod in a shared folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable


def publish_once(final: str | Path, write: Callable[[Path], None]) -> Path:
    """`final`, made by write(temporary sibling) and one rename unless it exists: for caches that
    several processes may build at once (every host of a pod in a shared folder). The temporary
    name is unique across hosts and only its owner deletes it; the first rename wins, and a later
    one finds `final` there and drops its own copy (the same inputs, so the same bytes)."""
    final = Path(final)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
