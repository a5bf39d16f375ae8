"""User errors: bad data, a missing path, an invalid flag value. `alignkit.cli` prints them as one line
(`error: FILE:LINE: problem`) and exits 1; a traceback means a bug (or ALIGNKIT_DEBUG=1 was set)."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the file:line or the flag and says what is wrong."""


class DataError(UserError, ValueError):
    """A record that cannot be used, at `path:line` (line 0 = the file as a whole)."""

    def __init__(self, path, line: int, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")
