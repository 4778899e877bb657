"""Where every artifact lives under ``--data-dir``, and how it is written and read.

Names and formats are spelled here once; docs/artifacts.md is the human-readable contract.
Every write goes to a temporary file in the same directory and is renamed into place
(``os.replace`` is atomic on POSIX), so a killed stage never leaves a half-written artifact
under its final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MANIFEST_COLUMNS = [
    "uuid", "objectid", "title", "attribution", "displaydate", "medium", "classification",
    "url", "file", "status", "error", "width", "height", "bytes",
]

#: dtype of the neighbour table for a given k (see ``neighbor_dtype``).
NEIGHBOR_FIELDS = ("index", "score")


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's 0600 would hide artifacts)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@dataclass(frozen=True)
class DataPaths:
    """Every artifact path of one data directory."""

    root: Path

    @classmethod
    def of(cls, data_dir: str | os.PathLike[str]) -> "DataPaths":
        return cls(Path(data_dir))

    # stage 1: download
    @property
    def csv_dir(self) -> Path:
        return self.root / "nga"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def inspection(self) -> Path:
        return self.root / "inspection.json"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    # stage 3: features
    @property
    def features(self) -> Path:
        return self.root / "features.npy"

    @property
    def image_names(self) -> Path:
        return self.root / "image_names.npy"

    @property
    def features_meta(self) -> Path:
        return self.root / "features_meta.json"

    @property
    def features_errors(self) -> Path:
        return self.root / "features_errors.csv"

    @property
    def features_progress_dir(self) -> Path:
        return self.root / "features_progress"

    # stages 4-6: similarity
    @property
    def similarity(self) -> Path:
        return self.root / "similarity_scores.h5"

    def neighbors(self, k: int = 10) -> Path:
        return self.root / f"top_{k}_similar.npy"

    def images_source(self, meta: dict | None) -> Path:
        """The folder holding the images behind ``image_names.npy``.

        ``images/`` for a collection embedded from the manifest; the folder recorded in
        ``features_meta.json`` (``source = "images-dir:<path>"``) for one embedded with
        ``extract_features.py --images-dir``. Callers join it with a name's basename only.
        """
        source = str((meta or {}).get("source", ""))
        if source.startswith("images-dir:"):
            return Path(source[len("images-dir:"):])
        return self.images_dir

    # stage 8: evaluation
    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched.
    ``suffix`` keeps an extension some writers insist on (``np.save`` appends ``.npy``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """``np.save`` through a temp file; object arrays are refused (they would need pickle)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError(f"refusing to save an object array to {path}: it would need pickle")
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())


def load_npy(path: str | os.PathLike[str], mmap: bool = False) -> np.ndarray:
    """Load an artifact array, never unpickling; a missing file names the stage to run."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first "
                                "(see docs/artifacts.md)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        raise ValueError(f"{path} is not a plain NumPy array file ({exc})") from exc


def neighbor_dtype(k: int) -> np.dtype:
    """The neighbour table's record: ``index`` int32[k] (rows of image_names.npy), ``score`` float32[k]."""
    return np.dtype([("index", np.int32, (k,)), ("score", np.float32, (k,))])


def make_neighbor_table(index: np.ndarray, score: np.ndarray) -> np.ndarray:
    index = np.asarray(index)
    score = np.asarray(score)
    if index.shape != score.shape or index.ndim != 2:
        raise ValueError(f"index {index.shape} and score {score.shape} must both be [N, k]")
    table = np.empty(index.shape[0], dtype=neighbor_dtype(index.shape[1]))
    table["index"] = index
    table["score"] = score
    return table


def save_neighbors(path: str | os.PathLike[str], index: np.ndarray, score: np.ndarray) -> None:
    save_npy_atomic(path, make_neighbor_table(index, score))


def load_neighbors(path: str | os.PathLike[str]) -> np.ndarray:
    """Load and check a neighbour table written by extract_top_10.py / optimized_similarity.py."""
    table = load_npy(path)
    names = table.dtype.names or ()
    if tuple(names) != NEIGHBOR_FIELDS or table.ndim != 1:
        raise ValueError(f"{path} is not a neighbour table (expected a 1-D structured array with "
                         f"fields {NEIGHBOR_FIELDS}, got dtype {table.dtype})")
    return table


def read_manifest(path: str | os.PathLike[str]):
    """Read ``manifest.csv`` as strings (no NaN guessing), checking its columns."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run download_images.py first")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def write_manifest(path: str | os.PathLike[str], df) -> None:
    """Write ``manifest.csv`` atomically with the contract's column order first."""
    cols = MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]
    with atomic_path(path, suffix=".csv") as tmp:
        df.reindex(columns=cols).to_csv(tmp, index=False)
