"""JAX's persistent compilation cache, on by default: a program compiled once (a stage's train
step, its eval step, the sampler) is read back by every later process that compiles the same one,
so a recipe's later stages with the same shapes and a restarted run skip their compiles.

JAX keys each entry by the program, its shapes and shardings, the devices, the XLA flags and the
jax/jaxlib versions, so an entry is never served to another program. A read that fails (an entry
cut short by a crash mid-write) is a warning from JAX and a recompile, never a crash. A directory
that cannot be written is one warning line here, and the job runs uncached.

Where: `compile_cache_dir` (a config key; "" turns it off), else $JAX_COMPILATION_CACHE_DIR, else
`xla/` under the data cache directory (data.cache_dir, ~/.cache/solarjax/tokens by default).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

# Programs that compile faster than this are not written: a file per tiny program costs more than
# it saves. The demo's steps take seconds; a test's tiny ones a few tenths.
MIN_COMPILE_SECONDS = 0.2

_active: str | None = None  # the directory this process uses now


def where(configured: str | None, data_cache_dir: str) -> str | None:
    """The directory a job uses: `configured` (None: unset; "": off), else the environment's, else
    data_cache_dir/xla."""
    if configured is None:
        configured = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path(data_cache_dir) / "xla")
    return str(Path(os.path.expanduser(configured)).absolute()) if configured else None


def enable(configured: str | None, data_cache_dir: str) -> str | None:
    """Turns the cache on in `where(...)` for this process (before its first compile, or switching
    from another directory); returns the directory, or None when off or not writable."""
    global _active
    path = where(configured, data_cache_dir)
    if path == _active:
        return path
    if path is not None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            probe = Path(path) / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            print(f"warning: compile cache {path} cannot be written ({e.strerror or e}); compiling without it",
                  file=sys.stderr)
            path = None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    compilation_cache.reset_cache()  # JAX reads the directory once; a switch must start afresh
    _active = path
    return path
