"""User errors: bad data, a missing path, an invalid flag value. `alignkit.cli` prints them as one line
(`error: FILE:LINE: problem`) and exits 1; a traceback means a bug (or ALIGNKIT_DEBUG=1 was set)."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class UserError(Exception):
    """Something the user can fix; the message names the file:line or the flag and says what is wrong."""


class DataError(UserError, ValueError):
    """A record that cannot be used, at `path:line` (line 0 = the file as a whole)."""

    def __init__(self, path, line: int, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")


@contextmanager
def writing(path: str | Path, what: str):
    """Turn a failed write (disk full, read-only, permissions) into one line naming what was being written."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)
        reason = "no space left on the device" if full else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
        reason = reason.splitlines()[0]
        raise UserError(f"cannot write {what} {path}: {reason}") from e
