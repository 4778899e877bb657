"""The one embedding loop: a model over items in DataLoader batches, its finished rows and errors
kept in a progress store of chunk files (written at batch boundaries), so a killed run resumes with
the same arrays and a rerun embeds only new images. A single backbone and every model of a fusion
go through :func:`embed_items`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .embedder import Embedder
from .items import ImageDataset, Item, collate
from .progress import ChunkFolder, key_arrays

log = logging.getLogger(__name__)

#: Default number of images per progress chunk (rounded up to whole batches).
DEFAULT_CHUNK_SIZE = 512


class ProgressStore:
    """Finished embeddings and errors, in atomically written chunk files of one configuration."""

    def __init__(self, directory: Path, fingerprint: str, dim: int):
        self.folder = ChunkFolder(directory, fingerprint, dimension=dim)
        self.dim = dim
        self.features: dict[tuple[str, int, int], np.ndarray] = {}
        self.errors: dict[tuple[str, int, int], str] = {}

    def load(self) -> None:
        self.folder.open(self._read)

    def _read(self, z) -> None:
        feats = z["features"]
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features of shape {feats.shape}")
        for key, row in zip(zip(z["names"].tolist(), z["sizes"].tolist(), z["mtimes"].tolist()), feats):
            self.features[key] = row
            self.errors.pop(key, None)
        for key, msg in zip(zip(z["err_names"].tolist(), z["err_sizes"].tolist(),
                                z["err_mtimes"].tolist()), z["err_msgs"].tolist()):
            self.errors[key] = msg
            self.features.pop(key, None)

    def done(self, item: Item) -> bool:
        key = (item.name, item.size, item.mtime_ns)
        return key in self.features or key in self.errors

    def write_chunk(self, feats: list[tuple[Item, np.ndarray]], errors: list[tuple[Item, str]]) -> None:
        if not feats and not errors:
            return
        self.folder.write(**self._arrays(feats, errors))
        for item, row in feats:
            self.features[(item.name, item.size, item.mtime_ns)] = row
        for item, msg in errors:
            self.errors[(item.name, item.size, item.mtime_ns)] = msg

    def _arrays(self, feats, errors) -> dict[str, np.ndarray]:
        names, sizes, mtimes = key_arrays(it for it, _ in feats)
        enames, esizes, emtimes = key_arrays(it for it, _ in errors)
        features = (np.stack([r for _, r in feats]).astype(np.float32) if feats
                    else np.zeros((0, self.dim), np.float32))
        return dict(names=names, sizes=sizes, mtimes=mtimes, features=features,
                    err_names=enames, err_sizes=esizes, err_mtimes=emtimes,
                    err_msgs=np.array([m for _, m in errors], dtype=str).reshape(-1))

    def compact(self, items: Sequence[Item]) -> None:
        """Rewrite the store as one chunk holding exactly the current items (drops stale entries)."""
        feats = [(it, self.features[(it.name, it.size, it.mtime_ns)]) for it in items
                 if (it.name, it.size, it.mtime_ns) in self.features]
        errors = [(it, self.errors[(it.name, it.size, it.mtime_ns)]) for it in items
                  if (it.name, it.size, it.mtime_ns) in self.errors]
        if len(self.folder.chunks()) <= 1 and len(feats) + len(errors) == len(self.features) + len(self.errors):
            return
        self.folder.replace_all(**self._arrays(feats, errors))



@dataclass
class EmbedResult:
    """One model's pass over the items: its store (every finished row and error) and the counts."""

    store: ProgressStore
    fingerprint: str
    embedded: int
    reused: int
    todo: int
    seconds: float


def embed_items(emb: Embedder, items: Sequence[Item], store_dir: Path, fingerprint: str, *, device: str,
                batch_size: int, workers: int, chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True,
                faces: dict | None = None, source: str = "", threads: int = 0) -> EmbedResult:
    """Embed every item not yet in the progress store ``store_dir`` (of ``fingerprint``) with ``emb``,
    in DataLoader batches, writing chunks as it goes (a kill keeps whole batches); return the store.

    The one embedding loop of the stage: a single backbone and every model of a fusion go through it."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    store = ProgressStore(store_dir, fingerprint, emb.dim)
    store.load()
    todo = [it for it in items if not store.done(it)]
    reused = len(items) - len(todo)
    log.info("%s: %d image(s), %d already done, %d to embed with %s (%s, %s, %s, %d-dim) on %s "
             "[batch %d, workers %d, threads %d, channels_last %s]", source, len(items), reused, len(todo),
             emb.spec.name, emb.weights.id, emb.preprocessing.mode, emb.precision, emb.dim, device,
             batch_size, workers, threads, emb.channels_last)

    t0 = time.perf_counter()
    embedded = 0
    if todo:
        loader = DataLoader(ImageDataset(todo, emb.preprocessing, faces), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=collate, pin_memory=(device == "cuda"),
                            prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
        pend_f: list[tuple[Item, np.ndarray]] = []
        pend_e: list[tuple[Item, str]] = []
        bar = tqdm(total=len(todo), unit="img", disable=not progress, desc=f"embedding ({emb.spec.name})",
                   dynamic_ncols=True)
        try:
            for idx, batch, errors in loader:
                for i, msg in errors:
                    log.warning("skipped %s", msg)
                    pend_e.append((todo[i], msg))
                if batch is not None:
                    out = emb.embed_uint8(batch)
                    for i, row in zip(idx, out):
                        if not np.all(np.isfinite(row)):
                            msg = f"{todo[i].file}: the model produced a degenerate (zero or non-finite) embedding"
                            log.warning("skipped %s", msg)
                            pend_e.append((todo[i], msg))
                        else:
                            pend_f.append((todo[i], row))
                            embedded += 1
                bar.update(len(idx) + len(errors))
                if len(pend_f) + len(pend_e) >= chunk_size:
                    store.write_chunk(pend_f, pend_e)
                    pend_f, pend_e = [], []
        except KeyboardInterrupt:
            store.write_chunk(pend_f, pend_e)  # whole batches only, so a resume stays batch-aligned
            raise
        else:
            store.write_chunk(pend_f, pend_e)
        finally:
            bar.close()
    return EmbedResult(store, fingerprint, embedded, reused, len(todo), time.perf_counter() - t0)


def collect_rows(store: ProgressStore, items: Sequence[Item]) -> tuple[list[str], list[np.ndarray], list[tuple[str, str]]]:
    """(names, rows, error rows) of the items, in item order, from a complete store."""
    names: list[str] = []
    rows: list[np.ndarray] = []
    error_rows: list[tuple[str, str]] = []
    for it in items:
        key = (it.name, it.size, it.mtime_ns)
        if key in store.features:
            names.append(it.name)
            rows.append(store.features[key])
        else:
            error_rows.append((it.file, store.errors.get(key, "not processed")))
    return names, rows, error_rows

