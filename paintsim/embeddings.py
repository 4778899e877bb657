"""The embedded collection: ``features.npy`` + ``image_names.npy`` + ``features_meta.json``.

Written only by :func:`write_embeddings` (the extraction stage) and read only by
:meth:`Embeddings.load`, which validates everything once: shapes, dtypes, finite unit-norm rows,
names aligned with rows, and the SHA-256 checksums the meta records for both arrays, so a damaged
or half-replaced file is named instead of silently used. Every later stage starts from one
:class:`Embeddings` value: the rows, their file names, the recipe that made them, and the folder
their images live in.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import DataPaths, atomic_paths, load_npy, read_json_object, save_npy, write_json
from .errors import UserError

log = logging.getLogger(__name__)

#: Rows must have an L2 norm within this distance of 1 (features.npy is L2-normalised float32).
UNIT_NORM_TOL = 1e-3


def _rows_text(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" (and {len(rows) - limit} more)" if len(rows) > limit else ""
    return shown + more


def validate_features(features: np.ndarray, names: np.ndarray | None = None,
                      source: str = "features.npy") -> np.ndarray:
    """Check features once and return them as C-contiguous float32 ``[N, D]``.

    Raises :class:`UserError` naming ``source`` and the offending row numbers (0-based) for a
    wrong shape or dtype, non-finite rows, zero rows, rows that are not unit-norm, or names that
    are not aligned with the rows. Streams in blocks, so a memory map stays a memory map.
    """
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise UserError(f"{source}: expected a 2-D array [N, D] of embeddings, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{source}: expected floating-point embeddings, got dtype {arr.dtype}")
    n, d = arr.shape
    if n < 2 or d < 1:
        raise UserError(f"{source}: need at least 2 rows and 1 column to find neighbours, "
                        f"got shape {arr.shape}")
    nonfinite, zero, off = [], [], []
    chunk = max(1, (32 * 2**20) // (4 * d))
    for start in range(0, n, chunk):
        block = np.asarray(arr[start:start + chunk])
        finite = np.isfinite(block).all(axis=1)
        safe = block if finite.all() else np.where(np.isfinite(block), block, 0)
        norms = np.sqrt(np.einsum("ij,ij->i", safe, safe, dtype=np.float64))
        rows = np.arange(start, start + len(block))
        nonfinite.append(rows[~finite])
        zero.append(rows[finite & (norms == 0)])
        off.append(rows[finite & (norms != 0) & (np.abs(norms - 1.0) > UNIT_NORM_TOL)])
    nonfinite, zero, off = (np.concatenate(x) for x in (nonfinite, zero, off))
    if len(nonfinite):
        raise UserError(f"{source}: {len(nonfinite)} row(s) contain NaN or infinity: rows "
                        f"{_rows_text(nonfinite)}; re-extract those images or drop them")
    if len(zero):
        raise UserError(f"{source}: {len(zero)} row(s) are all zeros (no direction, no cosine "
                        f"similarity): rows {_rows_text(zero)}")
    if len(off):
        raise UserError(f"{source}: {len(off)} row(s) are not unit-norm (|norm - 1| > "
                        f"{UNIT_NORM_TOL}): rows {_rows_text(off)}; features must be L2-normalised")
    if names is not None:
        names_arr = np.asarray(names)
        if names_arr.ndim != 1 or len(names_arr) != n:
            count = names_arr.shape[0] if names_arr.ndim else 0
            raise UserError(f"image names are not aligned with {source}: {count} name(s) (shape "
                            f"{names_arr.shape}) for {n} feature rows; rerun extract_features.py so "
                            "both files come from the same run")
    if arr.dtype == np.float32 and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=np.float32)


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes: which features (or names) an output came from."""
    h = hashlib.sha256(f"{array.shape}|{array.dtype.str}".encode())
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    step = 64 * 2**20
    for start in range(0, flat.size, step):
        h.update(memoryview(flat[start:start + step]))
    return h.hexdigest()


@dataclass
class Embeddings:
    """One data directory's embedded collection, validated."""

    paths: DataPaths
    features: np.ndarray            # float32 [N, D], unit rows (memory-mapped when loaded so)
    names: np.ndarray               # str [N]: the image file name of each row
    meta: dict[str, Any] = field(default_factory=dict)   # features_meta.json, {} when absent
    _sha256: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str], *, mmap: bool = True,
             require_meta: bool = False, kind: str = "paintings") -> "Embeddings":
        """Load and validate the three files (the meta is optional unless ``require_meta``) of
        whole paintings, or of ``kind`` faces or poses (``face_features.npy``, ...)."""
        paths = DataPaths.of(data_dir, kind)
        features = load_npy(paths.features, mmap=mmap)
        names = load_npy(paths.image_names)
        meta: dict[str, Any] = {}
        if paths.features_meta.exists():
            meta = read_json_object(paths.features_meta)
        elif require_meta:
            raise UserError(f"{paths.features_meta} is missing: it records the backbone, weights and "
                            "preprocessing of the features; rerun extract_features.py")
        features = validate_features(features, names, source=str(paths.features))
        if names.dtype.kind not in "US":
            raise UserError(f"{paths.image_names}: expected an array of file names, got dtype {names.dtype}")
        emb = cls(paths, features, names.astype(str), meta)
        emb._check_checksums(names)
        return emb

    def _check_checksums(self, raw_names: np.ndarray) -> None:
        for key, array, path in (("features_sha256", self.features, self.paths.features),
                                 ("names_sha256", raw_names, self.paths.image_names)):
            recorded = self.meta.get(key)
            if recorded is None:
                continue
            actual = array_sha256(array)
            if actual != recorded:
                raise UserError(f"{path} does not match the checksum {self.paths.features_meta.name} "
                                "records for it (changed or damaged since extraction, or an "
                                "interrupted write); rerun extract_features.py")
            if key == "features_sha256":
                self._sha256 = actual

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def sha256(self) -> str:
        """The features' checksum (recorded by extraction, else computed once)."""
        if self._sha256 is None:
            self._sha256 = array_sha256(self.features)
        return self._sha256

    @property
    def images_dir(self) -> Path:
        """The folder holding the images behind the rows: ``images/``, the folder of
        ``extract_features.py --images-dir`` recorded in the meta (``source = images-dir:<path>``),
        or the ``images/`` of the data dir whose manifest was embedded into another folder
        (``extract_features.py --output-dir``: ``source = manifest:<data dir>``)."""
        source = str(self.meta.get("source", ""))
        if source.startswith("images-dir:"):
            return Path(source[len("images-dir:"):])
        if source.startswith("manifest:"):
            return DataPaths.of(source[len("manifest:"):]).images_dir
        return self.paths.images_dir

    @property
    def data_dir(self) -> Path:
        """The data dir whose manifest the rows came from (the features' own folder unless
        ``extract_features.py --output-dir`` put them elsewhere: ``source = manifest:<data dir>``)."""
        source = str(self.meta.get("source", ""))
        if source.startswith("manifest:"):
            return Path(source[len("manifest:"):])
        return self.paths.root

    def image_path(self, row: int) -> Path:
        """The image of a row: only the basename of its name is ever joined to the folder."""
        return self.images_dir / Path(self.image_name(row)).name

    def image_name(self, row: int) -> str:
        """The image file a row belongs to: its name, or for a face or pose ``<image>#<i>`` the image."""
        name = str(self.names[row])
        return name if self.paths.kind == "paintings" else name.rsplit("#", 1)[0]


def write_embeddings(paths: DataPaths, features: np.ndarray, names: list[str] | np.ndarray,
                     meta: dict[str, Any]) -> dict[str, Any]:
    """Write the three files so that the old ones stay valid until the new ones are complete.

    Every file is first written whole under a temporary name (a full disk fails here and
    changes nothing); only then are they renamed into place, the meta last. The meta records
    both arrays' checksums, so a kill between two renames is caught by the next load.
    Returns the meta written.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    names_arr = np.array(list(names), dtype=str)
    meta = dict(meta, count=int(len(names_arr)), dimension=int(features.shape[1]),
                features_sha256=array_sha256(features), names_sha256=array_sha256(names_arr))
    with atomic_paths(paths.features, paths.image_names, paths.features_meta) as (f_tmp, n_tmp, m_tmp):
        save_npy(f_tmp, features)
        save_npy(n_tmp, names_arr)
        write_json(m_tmp, meta)
    return meta
