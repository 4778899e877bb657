"""One writer per stage per data dir: an advisory ``fcntl`` lock on ``<data-dir>/.locks/<stage>.lock``.

Two runs of one stage on one data dir would delete each other's partial files and progress records
(a matrix marked complete with rows of zeros; features of the other run's weights). The lock makes
the second run stop with one line naming the holder, or wait for it (``--wait-for-lock``). The
kernel releases the lock when its process dies, even by ``kill -9``, so a stale lock file never
blocks a rerun; the file itself is left in place and only says who held it last.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

from .errors import UserError

log = logging.getLogger(__name__)

LOCK_DIR = ".locks"


class StageBusy(UserError):
    """Another process holds this stage's lock on the data dir."""


def lock_path(data_dir: str | os.PathLike[str], stage: str) -> Path:
    return Path(data_dir) / LOCK_DIR / f"{stage}.lock"


def _holder(fd: int) -> str:
    """The holder's record, as words (best effort: it may be mid-write)."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw else {}
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host', '?')} (run {info.get('run_id', '?')}, "
            f"started {info.get('started', '?')}: {info.get('command', '?')})")


@contextlib.contextmanager
def stage_lock(data_dir: str | os.PathLike[str], stage: str, *, wait: bool = False) -> Iterator[str]:
    """Hold ``stage``'s lock on ``data_dir`` for the block; yields this run's id.

    A second holder is refused with :class:`StageBusy` naming the first, or, with ``wait``, blocks
    until the first ends.
    """
    path = lock_path(data_dir, stage)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise UserError(f"cannot create the lock file {path} ({exc.strerror}): the data dir must be a "
                        "writable directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _holder(fd)
            if not wait:
                raise StageBusy(f"another {stage} run is working on {Path(data_dir)}: {holder} holds "
                                f"{path}; wait for it to finish, stop it, or rerun with --wait-for-lock") from None
            log.warning("waiting for %s to release %s", holder, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        run_id = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "stage": stage,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        yield run_id
    finally:
        os.close(fd)  # releases the lock
