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
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from .artifacts import read_json, write_json_atomic
from .devices import auto_block_size
from .errors import BadValue, UserError

log = logging.getLogger(__name__)

DATASET = "similarity"
NAMES = "image_names"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
#: How far a stored score may be from the float32 dot product: float16 keeps ~3 decimals, so two
#: neighbours this close to the k-th may swap places between the matrix and the streamed route.
SCORE_TOLERANCE = {"float16": 2e-3, "float32": 1e-4}
#: bytes of one HDF5 chunk (a band of whole rows), small enough for the chunk cache
CHUNK_BYTES = 1 << 20
#: room kept free on the disk beyond the file itself
DISK_MARGIN = 64 * 2**20


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def state_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress.json")


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


def _reserve(path: Path, nbytes: int) -> None:
    """Make the file system hand ``path`` its ``nbytes`` now (``posix_fallocate``), so a full disk
    (or a file-size limit) is an ``OSError`` here instead of a failed write deep inside HDF5,
    which h5py cannot recover from cleanly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(1, nbytes))
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    finally:
        os.close(fd)


def _create(partial: Path, n: int, dtype: str, names: np.ndarray, attrs: dict) -> None:
    import h5py

    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    try:  # prove the room is there before HDF5 extends the file to its full size
        _reserve(partial, matrix_bytes(n, dtype) + n * 256 + 2**16)
    finally:
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
    _reserve(partial, partial.stat().st_size)  # blocks are only written into space held already
    _fsync(partial)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_matrix(emb, path: Path, *, dtype: str = "float16", block_size: int | None = None,
                 device: str = "cpu", progress: bool = True,
                 memory_budget: int | None = None) -> dict:
    """Write (or finish, or keep) the full similarity matrix of ``emb`` (an ``Embeddings``) at ``path``.

    Returns a summary dict (``status``: ``complete``/``resumed``/``computed``, rows, seconds, bytes).
    """
    import h5py
    from tqdm import tqdm

    from . import knn

    if dtype not in DTYPES:
        raise BadValue("dtype", dtype, f"choose one of {', '.join(DTYPES)}")
    knn.check_block_size(block_size)
    path = Path(path)
    features = emb.features
    n = features.shape[0]
    fingerprint = emb.sha256
    itemsize = np.dtype(dtype).itemsize
    chunk_rows = rows_per_chunk(n, itemsize)
    block = block_size or auto_block_size(n, 4 * n + itemsize * n, memory_budget)
    if block_size is None and block > chunk_rows:
        block -= block % chunk_rows  # whole chunks per block
    identity = {"format_version": FORMAT_VERSION, "features_sha256": fingerprint, "n": n,
                "dim": int(features.shape[1]), "dtype": dtype, "block_rows": int(block)}

    if path.exists():
        try:
            with MatrixReader(path) as done:
                same = done.features_sha256 == fingerprint and done.dtype == dtype
        except UserError:
            same = False
        if same:
            log.info("%s is already complete for these features; nothing to do", path)
            return {"status": "complete", "rows": n, "seconds": 0.0, "bytes": path.stat().st_size}
        log.info("%s was computed from other features or another dtype; recomputing", path)

    partial, state_file = partial_path(path), state_path(path)
    start_row, run_id = _resume_point(partial, state_file, identity)
    if start_row == 0:
        check_free_space(path, matrix_bytes(n, dtype) + n * 256)
        run_id = uuid.uuid4().hex
        attrs = {**{k: v for k, v in identity.items() if k != "block_rows"},
                 "source": str(emb.paths.features), "computed_with": "paintsim.knn.score_blocks",
                 "features_meta": json.dumps(emb.meta, sort_keys=True, default=str),
                 "created_by": "compute_similarity.py", "run_id": run_id}
        _create(partial, n, dtype, emb.names, attrs)
        write_json_atomic(state_file, {**identity, "run_id": run_id, "rows_done": 0})
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
            write_json_atomic(state_file, {**identity, "run_id": run_id, "rows_done": int(r1)})
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


def _resume_point(partial: Path, state_file: Path, identity: dict) -> tuple[int, str | None]:
    """(first unfinished row, run id) of a partial file that its state describes, or (0, None).

    The state and the partial file must name the same run: a state file written by one run
    never vouches for rows of a partial file that another run created.
    """
    import h5py

    if not partial.exists() or not state_file.exists():
        return 0, None
    try:
        state = read_json(state_file)
    except (OSError, ValueError, UserError):
        log.warning("%s is unreadable; starting the matrix again", state_file)
        return 0, None
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in identity.items()):
        log.info("%s belongs to other features or settings; starting the matrix again", partial)
        return 0, None
    try:
        with h5py.File(partial, "r") as f:
            run_id = f.attrs.get("run_id")
            run_id = run_id.decode() if isinstance(run_id, bytes) else run_id
            ok = (isinstance(f[DATASET], h5py.Dataset)
                  and f[DATASET].shape == (identity["n"], identity["n"])
                  and f.attrs.get("features_sha256") == identity["features_sha256"])
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        log.warning("%s does not open cleanly; starting the matrix again", partial)
        return 0, None
    if not run_id or state.get("run_id") != run_id:
        log.warning("%s was written by run %s but %s records run %s; starting the matrix again",
                    partial, run_id, state_file, state.get("run_id"))
        return 0, None
    rows = state.get("rows_done")
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= identity["n"]:
        log.warning("%s records rows_done=%r; starting the matrix again", state_file, rows)
        return 0, None
    return rows, run_id


class MatrixReader:
    """A finished matrix, opened for reading and checked: the one reader of ``similarity_scores.h5``.

    Refuses (as :class:`UserError`) a file that does not open, lacks the two datasets, is not
    marked ``complete``, or whose shape does not match its names. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str]):
        import h5py

        self.path = path = Path(path)
        if not path.exists():
            hint = (f" ({partial_path(path).name} is an unfinished run: rerun compute_similarity.py "
                    "to finish it)" if partial_path(path).exists() else "")
            raise FileNotFoundError(f"{path} does not exist: run compute_similarity.py first{hint}")
        try:
            self._f = h5py.File(path, "r")
        except OSError as exc:
            raise UserError(f"{path} is not a readable HDF5 file ({exc}); rerun compute_similarity.py") from None
        try:
            self._check(h5py)
        except BaseException:
            self._f.close()
            raise

    def _check(self, h5py) -> None:
        f, path = self._f, self.path
        ds, names = f.get(DATASET), f.get(NAMES)
        if not isinstance(ds, h5py.Dataset) or not isinstance(names, h5py.Dataset):
            raise UserError(f"{path} has no '{DATASET}' and '{NAMES}' datasets: not a paintsim matrix")
        if not bool(f.attrs.get("complete", False)):
            raise UserError(f"{path} is not complete (its `complete` attribute is false); rerun "
                            "compute_similarity.py to finish it")
        if ds.ndim != 2 or ds.shape[0] != ds.shape[1] or names.ndim != 1 or ds.shape[0] != names.shape[0]:
            raise UserError(f"{path}: '{DATASET}' has shape {ds.shape} but there are {names.shape} names")
        if ds.dtype.kind != "f" or names.dtype.kind not in "SO":
            raise UserError(f"{path}: '{DATASET}' holds {ds.dtype} and '{NAMES}' {names.dtype}; "
                            "expected float scores and UTF-8 names")
        self.dataset = ds
        self.n = int(ds.shape[0])
        self.dtype = str(ds.dtype)
        self.chunk_rows = int(ds.chunks[0]) if ds.chunks else 64
        self.attrs = {key: (v.item() if hasattr(v, "item") else v) for key, v in f.attrs.items()}
        sha = self.attrs.get("features_sha256")
        self.features_sha256 = sha.decode() if isinstance(sha, bytes) else sha

    def __enter__(self) -> "MatrixReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def tolerance(self) -> float:
        return SCORE_TOLERANCE.get(self.dtype, SCORE_TOLERANCE["float16"])

    def names(self) -> np.ndarray:
        raw = self._f[NAMES][...]
        try:
            return np.array([x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw])
        except UnicodeDecodeError as exc:
            raise UserError(f"{self.path}: '{NAMES}' is not UTF-8 ({exc})") from None

    def stale_reason(self, emb) -> str | None:
        """Why this matrix does not belong to ``emb`` (other names or other features), or None."""
        if self.n != len(emb):
            return f"it is {self.n} x {self.n} but features.npy has {len(emb)} rows"
        if not np.array_equal(self.names(), emb.names):
            return "it was computed for other images than image_names.npy"
        if self.features_sha256 is not None and self.features_sha256 != emb.sha256:
            return "it was computed from other features than features.npy"
        return None

    def row_blocks(self, block_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(r0, r1, rows as float32)``, ``block_rows`` rows at a time (one buffer reused)."""
        n = self.n
        buf = np.empty((min(block_rows, n), n), dtype=np.float32)
        for r0 in range(0, n, block_rows):
            r1 = min(n, r0 + block_rows)
            out = buf[: r1 - r0]
            self.dataset.read_direct(out, np.s_[r0:r1])
            yield r0, r1, out

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return np.asarray(self.dataset[r0:r1, :], dtype=np.float32)


def top_k_from_matrix(reader: MatrixReader, k: int, *, block_size: int | None = None,
                      progress: bool = False, memory_budget: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top ``k`` (self excluded) of a finished matrix, one row block at a time.

    Returns ``(index int32 [N, k], score float32 [N, k])``.
    """
    import torch
    from tqdm import tqdm

    from . import knn

    knn.check_block_size(block_size)
    n = reader.n
    k = knn.validate_k(k, n)
    block = block_size or auto_block_size(n, 12 * n, memory_budget)
    out_idx = np.empty((n, k), dtype=np.int32)
    out_val = np.empty((n, k), dtype=np.float32)
    with torch.inference_mode(), tqdm(total=n, unit="row", desc="top-k", disable=not progress,
                                      dynamic_ncols=True, mininterval=0.5) as bar:
        for r0, r1, rows in reader.row_blocks(block):
            v, i = knn.select_top_k(torch.from_numpy(rows), k, 0, torch.arange(r0, r1))
            out_idx[r0:r1] = i.numpy()
            out_val[r0:r1] = v.numpy()
            bar.update(r1 - r0)
    return out_idx, out_val


def check_pairs(path: Path, emb, i: np.ndarray, j: np.ndarray, values: np.ndarray, *,
                max_rows: int, seed: int, progress: bool = False) -> dict:
    """Read pairs ``(i, j)`` back from the matrix and compare them with ``values`` (the same
    pairs' scores from the features). Whole row chunks are read in a seeded random order until
    ``max_rows`` rows have been read, so the check costs at most that many rows of I/O and one
    chunk of memory, whatever N is. A missing, unfinished or stale matrix is skipped, with why.
    """
    from tqdm.auto import tqdm

    if not Path(path).exists():
        return {"status": "skipped", "reason": f"{Path(path).name} not present (compute_similarity.py not run)"}
    try:
        reader = MatrixReader(path)
    except (UserError, FileNotFoundError) as exc:
        return {"status": "skipped", "reason": str(exc)}
    with reader:
        stale = reader.stale_reason(emb)
        if stale:
            return {"status": "skipped", "reason": f"{reader.path.name} is stale: {stale}"}
        chunk_rows = max(1, min(reader.chunk_rows, 2 * max(1, (1 << 25) // reader.n)))
        blocks = i // chunk_rows
        order = np.random.default_rng(seed + 1).permutation(np.unique(blocks))
        from_h5, from_feat = [], []
        rows_read = 0
        for b in tqdm(order, desc="reading pairs from the matrix", unit="block", disable=not progress):
            if rows_read >= max_rows:
                break
            s = int(b) * chunk_rows
            e = min(reader.n, s + chunk_rows)
            block = reader.rows(s, e)
            rows_read += e - s
            sel = np.flatnonzero(blocks == b)
            from_h5.append(block[i[sel] - s, j[sel]])
            from_feat.append(values[sel])
        h5v, fv = np.concatenate(from_h5), np.concatenate(from_feat)
        diff = np.abs(h5v - fv)
        tol = reader.tolerance
        return {"status": "agree" if float(diff.max()) <= tol else "DISAGREE", "dtype": reader.dtype,
                "pairs_compared": int(h5v.size), "rows_read": int(rows_read),
                "inter_from_matrix": float(h5v.mean()),
                "inter_from_features_same_pairs": float(fv.mean()),
                "max_abs_diff": float(diff.max()), "tolerance": tol}
