"""The finished work of a resumable stage (features, faces, poses): a folder of atomically written
``chunk-NNNNNN.npz`` files (no pickle) of one configuration, named by its fingerprint in
``config.json``. Opening it discards the chunks of another configuration and skips an unreadable
chunk with a warning; what a chunk holds is the stage's business."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifacts import load_npz, read_json_object, save_npz_atomic, write_json_atomic
from .errors import UserError

log = logging.getLogger(__name__)


class ChunkFolder:
    def __init__(self, directory: Path, fingerprint: str, **config: Any):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.config = config
        self._next = 0

    def chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz"))

    def open(self, read: Callable[[dict[str, np.ndarray]], None]) -> None:
        """Keep only this configuration's chunks and hand each readable one to ``read``."""
        cfg_path = self.dir / "config.json"
        if self.dir.exists():
            try:
                same = read_json_object(cfg_path).get("fingerprint") == self.fingerprint
            except (OSError, UserError):
                same = False
            stale = [] if same else self.chunks()
            if stale:
                log.info("discarding %d progress chunk(s) of another configuration in %s", len(stale), self.dir)
            for p in stale:
                p.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_path, {"fingerprint": self.fingerprint, **self.config})
        for path in self.chunks():
            try:
                self._next = max(self._next, int(path.stem.split("-")[1]) + 1)
                read(load_npz(path))
            except (OSError, ValueError, KeyError, IndexError) as exc:
                log.warning("ignoring unreadable progress chunk %s (%s)", path, exc)

    def write(self, **arrays: np.ndarray) -> Path:
        """One more chunk, written atomically (a kill leaves the earlier ones whole)."""
        path = self.dir / f"chunk-{self._next:06d}.npz"
        self._next += 1
        save_npz_atomic(path, **arrays)
        return path

    def replace_all(self, **arrays: np.ndarray) -> None:
        """Rewrite the folder as one chunk: the new one is whole before the old ones go."""
        old = self.chunks()
        self.write(**arrays)
        for p in old:
            p.unlink()


def key_arrays(items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(names, sizes, mtimes) of stage items: how a chunk says which file version it holds."""
    items = list(items)
    return (np.array([it.name for it in items], dtype=str).reshape(-1),
            np.array([it.size for it in items], dtype=np.int64),
            np.array([it.mtime_ns for it in items], dtype=np.int64))
