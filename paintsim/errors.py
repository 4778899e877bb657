"""The two kinds of error a user sees as one line instead of a traceback.

* :class:`UserError`: a problem with the user's files or machine (a missing or damaged artifact,
  an unreachable server, no GPU), said in words that name the file and what to do.
* :class:`BadValue`: a parameter outside what the data allows (``k`` larger than the collection).
  The library speaks of the value; the command line (``paintsim.cli``) adds the flag's name, so a
  message such as ``--k 80: must be between 1 and 78`` is written in one place.
"""
from __future__ import annotations

import errno

#: What a full disk (or a quota, or a file-size limit) makes a write fail with.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class UserError(Exception):
    """A problem with the user's input or environment: printed as one clear line, no traceback."""


class BadValue(ValueError):
    """A parameter value the data does not allow; ``name`` is the parameter (and flag) name."""

    def __init__(self, name: str, value, reason: str):
        super().__init__(f"{name} = {value!r}: {reason}")
        self.name = name
        self.value = value
        self.reason = reason

    def as_flag(self) -> str:
        return f"--{self.name.replace('_', '-')} {self.value}: {self.reason}"
