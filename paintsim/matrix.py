"""The full N x N similarity matrix on disk (HDF5), written resumably and read back in row blocks.

HDF5 is not crash-safe: a process killed while HDF5 updates its metadata can leave a file that
does not open. The writer is therefore designed so that a kill -9 at any moment loses at most the
block being written, and an unfinished matrix is never taken for a finished one:

* the matrix is written to ``similarity_scores.h5.partial``; it gets the final name only by an
  atomic rename once every block is in and the ``complete`` attribute is set;
* all chunks are allocated when the dataset is created (``H5D_ALLOC_TIME_EARLY``) and flushed
  before any block is written, so writing blocks afterwards touches raw data only, never the
  file's metadata;
* a separate JSON state file (``similarity_scores.h5.progress.json``, replaced atomically) records
  the rows finished; a block is flushed and fsynced to disk before it is recorded there;
* a rerun whose state matches the same features, dtype and block layout reopens the partial file
  and continues from the first unfinished block; anything else (no state, another features file,
  a partial file that does not open) starts again from scratch.
Blocks are deterministic, so the resumed file holds exactly the values of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .artifacts import read_json, write_json_atomic
from .cli import UserError

log = logging.getLogger(__name__)

DATASET = "similarity"
NAMES = "image_names"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
#: bytes of one HDF5 chunk (a band of whole rows), small enough for the chunk cache
CHUNK_BYTES = 1 << 20
#: room kept free on the disk beyond the file itself
DISK_MARGIN = 64 * 2**20


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def state_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress.json")


def features_fingerprint(features: np.ndarray) -> str:
    """SHA-256 of the float32 features (shape included): which features a matrix was computed from."""
    h = hashlib.sha256(f"{features.shape}|{features.dtype}".encode())
    flat = np.ascontiguousarray(features).reshape(-1).view(np.uint8)
    step = 64 * 2**20
    for start in range(0, flat.size, step):
        h.update(memoryview(flat[start:start + step]))
    return h.hexdigest()


def rows_per_chunk(n: int, itemsize: int) -> int:
    return int(max(1, min(n, CHUNK_BYTES // max(1, n * itemsize))))


def matrix_bytes(n: int, dtype: str) -> int:
    return n * n * np.dtype(dtype).itemsize


def check_free_space(path: Path, needed: int) -> None:
    """Stop with a clear message when the disk holding ``path`` cannot take ``needed`` more bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if needed + DISK_MARGIN > free:
        raise UserError(
            f"not enough disk space for {path}: it needs {needed / 2**30:.2f} GiB (+ "
            f"{DISK_MARGIN / 2**20:.0f} MiB margin) but {path.parent} has only {free / 2**30:.2f} GiB "
            "free; free some space, write elsewhere with --output, use --dtype float16, or skip "
            "the full matrix and run optimized_similarity.py (it needs no matrix)")


def is_complete(path: Path) -> bool:
    """True when ``path`` is a finished matrix file (opens, has the datasets, ``complete`` set)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False)) and DATASET in f and NAMES in f
    except (OSError, KeyError):
        return False


def _create(partial: Path, n: int, dtype: str, names: np.ndarray, attrs: dict) -> None:
    import h5py

    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    chunk_rows = rows_per_chunk(n, np.dtype(dtype).itemsize)
    with h5py.File(partial, "w", libver="earliest", track_order=False) as f:
        space = h5py.h5s.create_simple((n, n))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((chunk_rows, n))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # no metadata changes once blocks are written
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        h5py.h5d.create(f.id, DATASET.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
        encoded = np.char.encode(np.asarray(names).astype(str), "utf-8")
        f.create_dataset(NAMES, data=encoded.astype(f"S{max(1, encoded.dtype.itemsize)}"))
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["complete"] = False
        f[DATASET].attrs["description"] = ("cosine similarity of features.npy rows i and j "
                                           "(dot product of L2-normalised float32 embeddings)")
    _fsync(partial)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_matrix(features: np.ndarray, names: np.ndarray, meta: dict, path: Path, *,
                 dtype: str = "float16", block_size: int | None = None, device: str = "cpu",
                 progress: bool = True, source: str = "features.npy",
                 memory_budget: int | None = None) -> dict:
    """Write (or finish, or keep) the full similarity matrix of ``features`` at ``path``.

    Returns a summary dict (``status``: ``complete``/``resumed``/``computed``, rows, seconds, bytes).
    """
    import h5py
    from tqdm import tqdm

    from . import knn

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path)
    n = features.shape[0]
    fingerprint = features_fingerprint(features)
    itemsize = np.dtype(dtype).itemsize
    chunk_rows = rows_per_chunk(n, itemsize)
    if block_size is not None and block_size < 1:
        raise UserError(f"--block-size must be at least 1, got {block_size}")
    block = block_size or knn.auto_block_size(n, 4 * n + itemsize * n, memory_budget)
    if block_size is None and block > chunk_rows:
        block -= block % chunk_rows  # whole chunks per block
    identity = {"format_version": FORMAT_VERSION, "features_sha256": fingerprint, "n": n,
                "dim": int(features.shape[1]), "dtype": dtype, "block_rows": int(block)}

    if path.exists() and is_complete(path):
        with h5py.File(path, "r") as f:
            same = (f.attrs.get("features_sha256") == fingerprint and f[DATASET].dtype == np.dtype(dtype))
        if same:
            log.info("%s is already complete for these features; nothing to do", path)
            return {"status": "complete", "rows": n, "seconds": 0.0, "bytes": path.stat().st_size}
        log.info("%s was computed from other features or another dtype; recomputing", path)

    partial, state_file = partial_path(path), state_path(path)
    start_row = _resume_point(partial, state_file, identity)
    if start_row == 0:
        check_free_space(path, matrix_bytes(n, dtype) + n * 256)
        attrs = {**{k: v for k, v in identity.items() if k != "block_rows"},
                 "source": source, "computed_with": "paintsim.knn.score_blocks",
                 "features_meta": json.dumps(meta, sort_keys=True, default=str),
                 "created_by": "compute_similarity.py"}
        _create(partial, n, dtype, names, attrs)
        write_json_atomic(state_file, {**identity, "rows_done": 0})
        status = "computed"
    else:
        log.info("resuming %s from row %d of %d", partial, start_row, n)
        status = "resumed"

    t0 = time.perf_counter()
    total_bytes = (n - start_row) * n * itemsize
    with h5py.File(partial, "r+") as f, tqdm(
            total=total_bytes, initial=0, unit="B", unit_scale=True, unit_divisor=1024,
            desc="similarity matrix", disable=not progress, dynamic_ncols=True,
            mininterval=0.5) as bar:
        dset = f[DATASET]
        for r0, r1, scores in knn.score_blocks(features, device=device, block_size=block,
                                               start_row=start_row):
            dset[r0:r1] = scores.astype(dtype, copy=False)
            f.flush()
            _fsync(partial)
            write_json_atomic(state_file, {**identity, "rows_done": int(r1)})
            bar.update((r1 - r0) * n * itemsize)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(rows_per_s=f"{(r1 - start_row) / elapsed:.0f}", refresh=False)
        f.attrs["complete"] = True
    _fsync(partial)
    os.replace(partial, path)
    with contextlib.suppress(FileNotFoundError):
        state_file.unlink()
    seconds = time.perf_counter() - t0
    return {"status": status, "rows": n - start_row, "seconds": seconds, "bytes": path.stat().st_size}


def _resume_point(partial: Path, state_file: Path, identity: dict) -> int:
    """First unfinished row of a matching partial file, or 0 to start afresh."""
    import h5py

    if not partial.exists() or not state_file.exists():
        return 0
    try:
        state = read_json(state_file)
    except (OSError, ValueError):
        log.warning("%s is unreadable; starting the matrix again", state_file)
        return 0
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in identity.items()):
        log.info("%s belongs to other features or settings; starting the matrix again", partial)
        return 0
    try:
        with h5py.File(partial, "r") as f:
            ok = (f[DATASET].shape == (identity["n"], identity["n"])
                  and f.attrs.get("features_sha256") == identity["features_sha256"])
    except (OSError, KeyError):
        ok = False
    if not ok:
        log.warning("%s does not open cleanly; starting the matrix again", partial)
        return 0
    rows = int(state.get("rows_done", 0))
    return rows if 0 <= rows <= identity["n"] else 0


def open_matrix(path: Path):
    """Open a finished matrix for reading; an unfinished or foreign file is a clear error."""
    import h5py

    path = Path(path)
    if not path.exists():
        hint = (f" ({partial_path(path).name} is an unfinished run: rerun compute_similarity.py "
                "to finish it)" if partial_path(path).exists() else "")
        raise FileNotFoundError(f"{path} does not exist: run compute_similarity.py first{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 file ({exc}); rerun compute_similarity.py") from exc
    if DATASET not in f or NAMES not in f:
        f.close()
        raise UserError(f"{path} has no '{DATASET}' and '{NAMES}' datasets: not a paintsim matrix")
    if not bool(f.attrs.get("complete", False)):
        f.close()
        raise UserError(f"{path} is marked incomplete; rerun compute_similarity.py to finish it")
    shape = f[DATASET].shape
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] != len(f[NAMES]):
        f.close()
        raise UserError(f"{path}: '{DATASET}' has shape {shape} but there are {len(f[NAMES])} names")
    return f


def read_names(f) -> np.ndarray:
    return np.char.decode(f[NAMES][...], "utf-8")


def iter_row_blocks(f, block_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(r0, r1, rows as float32)`` of an open matrix, ``block_rows`` rows at a time."""
    dset = f[DATASET]
    n = dset.shape[0]
    buf = np.empty((min(block_rows, n), n), dtype=np.float32)
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        out = buf[: r1 - r0]
        dset.read_direct(out, np.s_[r0:r1])
        yield r0, r1, out


def top_k_from_matrix(path: Path, k: int, *, block_size: int | None = None,
                      progress: bool = False, memory_budget: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Each row's top ``k`` (self excluded) from a finished matrix, reading one row block at a time.

    Returns ``(index int32 [N, k], score float32 [N, k], image_names, attrs)``.
    """
    import torch
    from tqdm import tqdm

    from . import knn

    with open_matrix(path) as f:
        n = f[DATASET].shape[0]
        k = knn.validate_k(k, n)
        block = block_size or knn.auto_block_size(n, 12 * n, memory_budget)
        names = read_names(f)
        attrs = {key: (v.item() if hasattr(v, "item") else v) for key, v in f.attrs.items()}
        out_idx = np.empty((n, k), dtype=np.int32)
        out_val = np.empty((n, k), dtype=np.float32)
        with torch.inference_mode(), tqdm(total=n, unit="row", desc="top-k", disable=not progress,
                                          dynamic_ncols=True, mininterval=0.5) as bar:
            for r0, r1, rows in iter_row_blocks(f, block):
                s = torch.from_numpy(rows)
                v, i = knn.select_top_k(s, k, 0, torch.arange(r0, r1))
                out_idx[r0:r1] = i.numpy()
                out_val[r0:r1] = v.numpy()
                bar.update(r1 - r0)
    return out_idx, out_val, names, attrs
