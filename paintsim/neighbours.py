"""The neighbour table ``top_{k}_*.npy`` and its side record ``top_{k}_*.json``.

The table is a structured array of N records, ``index`` int32 ``[k]`` (rows of
``image_names.npy``) and ``score`` float32 ``[k]``, descending, self excluded. Two routes write
one: ``optimized_similarity.py`` streams it from the features (``top_{k}_similar.npy``, route
``streamed``, exact float32 scores) and ``extract_top_10.py`` reads it from the full matrix
(``top_{k}_from_matrix.npy``, route ``matrix``, scores as stored, float16 by default), and
``optimized_similarity.py --boost`` re-ranks by metadata (``top_{k}_boosted.npy``, route
``boosted``, final scores; see :mod:`paintsim.boost`). The side record says which route wrote it,
for which features (SHA-256), when, and for a boosted table the boost.

Every stage that needs neighbours finds the table by one rule, :func:`find_table`: among the
tables with at least k neighbours per row computed from the current features, the streamed route
first, then the smallest k, then the name; a table of other features is never used.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import DataPaths, load_npy, read_json_object, save_npy_atomic, write_json_atomic
from .errors import UserError

log = logging.getLogger(__name__)

FIELDS = ("index", "score")
ROUTES = ("streamed", "matrix", "boosted")
_NAME_RE = re.compile(r"top_(\d+)_(similar|from_matrix|faces|poses|boosted)\.npy")
_ROUTE_OF_NAME = {"similar": "streamed", "from_matrix": "matrix", "faces": "streamed", "poses": "streamed",
                  "boosted": "boosted"}
#: The table names each kind of item may use (``DataPaths.kind``). A boosted table
#: (``top_{k}_boosted.npy``) is never found by the lookup: it is read only when named (``--neighbours``).
_SUFFIXES_OF_KIND = {"paintings": ("similar", "from_matrix"), "faces": ("faces",), "poses": ("poses",)}


def table_dtype(k: int) -> np.dtype:
    """The record: ``index`` int32[k] (rows of image_names.npy), ``score`` float32[k]."""
    return np.dtype([("index", np.int32, (k,)), ("score", np.float32, (k,))])


def record_path(path: str | os.PathLike[str]) -> Path:
    """``top_10_similar.npy`` -> ``top_10_similar.json``."""
    return Path(path).with_suffix(".json")


@dataclass
class NeighbourTable:
    path: Path
    index: np.ndarray           # int32 [N, k]
    score: np.ndarray           # float32 [N, k]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.index.shape[1])

    @property
    def route(self) -> str:
        return str(self.record.get("route", "unknown"))

    def describe(self) -> str:
        """How reports and figures name the table: ``top_10_similar.npy (streamed route)``."""
        return f"{self.path.name} ({self.route} route)"


def save_table(path: str | os.PathLike[str], index: np.ndarray, score: np.ndarray, *, route: str,
               features_sha256: str, **extra: Any) -> None:
    """Write the table, then its side record (route, k, N, the features' SHA-256, time)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    index, score = np.asarray(index), np.asarray(score)
    if index.shape != score.shape or index.ndim != 2:
        raise ValueError(f"index {index.shape} and score {score.shape} must both be [N, k]")
    table = np.empty(index.shape[0], dtype=table_dtype(index.shape[1]))
    table["index"] = index
    table["score"] = score
    save_npy_atomic(path, table)
    write_json_atomic(record_path(path), {
        "route": route, "k": int(index.shape[1]), "n": int(index.shape[0]),
        "features_sha256": features_sha256, "table": Path(path).name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra})


def load_table(path: str | os.PathLike[str], n: int | None = None) -> NeighbourTable:
    """Read and check a table (and its side record when present); ``n``: the collection size."""
    path = Path(path)
    table = load_npy(path)
    if tuple(table.dtype.names or ()) != FIELDS or table.ndim != 1 or table.dtype["index"].ndim != 1:
        raise UserError(f"{path} is not a neighbour table (expected a 1-D structured array with "
                        f"fields {FIELDS}, got dtype {table.dtype}, shape {table.shape})")
    index = np.asarray(table["index"], dtype=np.int32)
    score = np.asarray(table["score"], dtype=np.float32)
    if n is not None:
        if len(table) != n:
            raise UserError(f"{path} has {len(table)} rows but the collection has {n} images (stale); "
                            "rerun optimized_similarity.py")
        if index.size and (index.min() < 0 or index.max() >= n):
            raise UserError(f"{path}: neighbour indices outside 0..{n - 1}; rerun optimized_similarity.py")
    rec_path = record_path(path)
    record: dict[str, Any] = read_json_object(rec_path) if rec_path.exists() else {}
    if "route" not in record:
        m = _NAME_RE.fullmatch(path.name)
        record = dict(record, route=_ROUTE_OF_NAME[m.group(2)] if m else "unknown")
    return NeighbourTable(path, index, score, record)


def find_table(paths: DataPaths, k: int, n: int, features_sha256: str) -> NeighbourTable | None:
    """The table later stages use, or None when no table fits (then they search the features).

    Candidates: ``top_{k'}_similar.npy`` and ``top_{k'}_from_matrix.npy`` with k' >= k. A table
    whose record names other features is skipped as stale; one without a record (written before
    records existed) is used only after every recorded one. Order: recorded first, the streamed
    route first, the smallest k', the name.
    """
    candidates = []
    for path in paths.root.glob("top_*.npy"):
        m = _NAME_RE.fullmatch(path.name)
        if not m or int(m.group(1)) < k or m.group(2) not in _SUFFIXES_OF_KIND[paths.kind]:
            continue
        rec_path = record_path(path)
        recorded = rec_path.exists()
        route = _ROUTE_OF_NAME[m.group(2)]
        candidates.append((not recorded, route != "streamed", int(m.group(1)), path.name, path))
    for *_, path in sorted(candidates):
        try:
            table = load_table(path, n)
        except UserError as exc:
            log.warning("not using %s", exc)
            continue
        recorded_sha = table.record.get("features_sha256")
        if recorded_sha is not None and recorded_sha != features_sha256:
            log.warning("not using %s: it was computed from other features (stale); rerun "
                        "optimized_similarity.py", path)
            continue
        if recorded_sha is None:
            log.warning("%s has no record of the features it came from (%s missing); using it",
                        path, record_path(path).name)
        return table
    return None


def boosted_path(paths: DataPaths, k: int) -> Path:
    """Where ``optimized_similarity.py --boost`` writes its table by default."""
    return paths.root / f"top_{k}_boosted.npy"


def named_table(path: str | os.PathLike[str], emb, k: int) -> NeighbourTable:
    """A table the user named (``--neighbours PATH``), checked against ``emb`` (an ``Embeddings``):
    the same rows, at least ``k`` neighbours, computed from these features."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--neighbours {path}: no such file")
    table = load_table(path, len(emb))
    if table.k < k:
        raise UserError(f"--neighbours {path} holds {table.k} neighbours per painting, fewer than --k {k}")
    recorded = table.record.get("features_sha256")
    if recorded is not None and recorded != emb.sha256:
        raise UserError(f"--neighbours {path} was computed from other features than {emb.paths.features} "
                        "(stale); recompute it with optimized_similarity.py")
    return table


def compare_tables(a: NeighbourTable, b: NeighbourTable, features: np.ndarray, tol: float) -> dict:
    """How far two routes' tables agree: rows with the same neighbour set, and rows whose
    differing neighbours score more than ``tol`` away from b's k-th score (real disagreements,
    as opposed to near-ties that rounding may swap)."""
    if a.index.shape != b.index.shape:
        raise UserError(f"{a.path} {a.index.shape} and {b.path} {b.index.shape} cannot be compared: "
                        "they differ in rows or k")
    same = beyond = 0
    for i, (x, y) in enumerate(zip(a.index, b.index)):
        diff = set(x.tolist()) ^ set(y.tolist())
        if not diff:
            same += 1
            continue
        kth = float(b.score[i, -1])
        row = np.asarray(features[i], dtype=np.float64)
        beyond += any(abs(float(row @ np.asarray(features[j], dtype=np.float64)) - kth) > tol
                      for j in diff)
    n = len(a.index)
    return {"rows": n, "identical_rows": same, "identical_fraction": same / n if n else 1.0,
            "rows_beyond_tolerance": beyond, "tolerance": tol}


def neighbours_of_all(emb, k: int, device: str = "auto",
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k neighbours of every row of ``emb`` (an ``Embeddings``), self excluded: from the
    table :func:`find_table` picks, else computed by the exact kernel. Returns (index int64
    [N, k], score float32 [N, k], where they came from, in words)."""
    from . import knn

    n = len(emb)
    k = knn.validate_k(k, n)
    table = find_table(emb.paths, k, n, emb.sha256)
    if table is not None:
        return (np.asarray(table.index[:, :k], dtype=np.int64), np.asarray(table.score[:, :k], dtype=np.float32),
                table.describe())
    log.info("no usable neighbour table in %s: computing the top-%d neighbours from %s", emb.paths.root, k,
             emb.paths.features)
    index, score = knn.top_k_neighbors(emb.features, k, device=device, exclude_self=True, progress=progress)
    return (np.asarray(index, dtype=np.int64), np.asarray(score, dtype=np.float32),
            f"an exact search of {emb.paths.features.name}")
