"""The errors meant for the user, and how the command-line tools report them.

Every error that names a bad input (a config key, a file, a tensor, a value) is a SolarjaxError;
the CLIs print those as one line and exit 2. Anything else is a bug and keeps its traceback, so
that a ValueError raised by a mistake inside solarjax is never dressed as a user error.
SOLARJAX_DEBUG=1 shows the traceback of a SolarjaxError too, for bug reports.

SolarjaxError subclasses ValueError (and the file errors FileNotFoundError / FileExistsError /
OSError) so that callers of the Python API that catch those keep working.
"""

from __future__ import annotations

import errno
import functools
import os
import sys


class SolarjaxError(ValueError):
    """A bad input or a fault of the environment, explained in one line naming what is wrong."""


class ConfigError(SolarjaxError):
    """A configuration value is missing, unknown or out of range; the message names it."""


class MissingInputError(SolarjaxError, FileNotFoundError):
    """A path the user gave is not there, or is not what it should be."""


class OutputExistsError(SolarjaxError, FileExistsError):
    """An output path exists and replacing it was not asked for."""


class DiskFullError(SolarjaxError, OSError):
    """A write failed for lack of space; earlier files are intact. The message names the path."""


def require_positive_ints(obj, names, prefix: str = "") -> None:
    """ConfigError naming the first of `obj`'s fields `names` that is not an int >= 1 (bools are not)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{prefix}{name} must be a positive integer, got {value!r}")


def debugging() -> bool:
    return os.environ.get("SOLARJAX_DEBUG", "") not in ("", "0")


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain of causes, or TensorStore's RESOURCE_EXHAUSTED for a write
    (orbax wraps the OS error in its own exceptions and loses errno)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and "write" in text.lower()):
            return True
        error = error.__cause__ or error.__context__
    return False


def cli(main):
    """Wraps a CLI's main(argv) -> exit code: a SolarjaxError (or a full disk) prints `error: ...`
    and returns 2; every other exception propagates with its traceback."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except Exception as e:
            if debugging() or not (isinstance(e, SolarjaxError) or is_disk_full(e)):
                raise
            message = str(e) if isinstance(e, SolarjaxError) else f"no space left on the device: {e}"
            print(f"error: {message}", file=sys.stderr)
            return 2
    return wrapped
