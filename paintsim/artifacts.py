"""Where every artifact lives under ``--data-dir``, and the low-level file I/O they all share.

Names are spelled here once; docs/artifacts.md is the human-readable contract. Each artifact has
its own module that writes and reads it (``manifest``, ``embeddings``, ``neighbours``, ``matrix``);
those modules go through the functions below, so every write is atomic (a temporary file in the
same directory, fsynced, then ``os.replace``: a killed stage never leaves a half-written file
under its final name) and every read of an array refuses pickle and names the file it failed on.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import UserError


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's 0600 would hide artifacts)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


#: The kinds of item a data dir embeds: whole paintings (stage 3), faces and poses (their own
#: stages). Each has its own features, names, meta, errors, progress and neighbour tables:
#: (features, names, meta, errors, progress dir, neighbour-table suffix).
KINDS = {
    "paintings": ("features.npy", "image_names.npy", "features_meta.json", "features_errors.csv",
                  "features_progress", "similar"),
    "faces": ("face_features.npy", "face_names.npy", "face_meta.json", "faces_errors.csv",
              "faces_progress", "faces"),
    "poses": ("pose_features.npy", "pose_names.npy", "pose_meta.json", "poses_errors.csv",
              "poses_progress", "poses"),
}


@dataclass(frozen=True)
class DataPaths:
    """Every artifact path of one data directory; ``kind`` picks whose features and neighbour
    tables ``features``, ``image_names``, ``features_meta``, ``neighbors`` ... name."""

    root: Path
    kind: str = "paintings"

    @classmethod
    def of(cls, data_dir: str | os.PathLike[str], kind: str = "paintings") -> "DataPaths":
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls(Path(data_dir), kind)

    def of_kind(self, kind: str) -> "DataPaths":
        return DataPaths.of(self.root, kind)

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
        return self.root / KINDS[self.kind][0]

    @property
    def image_names(self) -> Path:
        """The names of the rows of ``features`` (image file names; ``<image>#<i>`` for faces, poses)."""
        return self.root / KINDS[self.kind][1]

    @property
    def features_meta(self) -> Path:
        return self.root / KINDS[self.kind][2]

    @property
    def features_errors(self) -> Path:
        return self.root / KINDS[self.kind][3]

    @property
    def features_progress_dir(self) -> Path:
        return self.root / KINDS[self.kind][4]

    @property
    def features_pca(self) -> Path:
        """The PCA a fused extraction projected its rows through (``paintsim.fusion``; paintings only)."""
        return self.root / "features_pca.npz"

    @property
    def table_suffix(self) -> str:
        return KINDS[self.kind][5]

    # stages 4-6: similarity
    @property
    def similarity(self) -> Path:
        return self.root / "similarity_scores.h5"

    def neighbors(self, k: int = 10) -> Path:
        """The streamed neighbour table (optimized_similarity.py): ``top_{k}_similar.npy``, or
        ``top_{k}_faces.npy`` / ``top_{k}_poses.npy``."""
        return self.root / f"top_{k}_{self.table_suffix}.npy"

    def neighbors_from_matrix(self, k: int = 10) -> Path:
        """The neighbour table read from the full matrix (extract_top_10.py)."""
        return self.root / f"top_{k}_from_matrix.npy"

    @property
    def map_2d(self) -> Path:
        """The 2-D map of the collection (paintsim.mapping), float32 [N, 2]."""
        return self.root / "map_2d.npy"

    @property
    def map_meta(self) -> Path:
        """The map's side record: method, parameters, features checksum, trustworthiness."""
        return self.root / "map_2d.json"

    # stage 8: evaluation
    @property
    def site_dir(self) -> Path:
        return self.root / "site"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"


# ------------------------------------------------------------------------------------- writing
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
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several files that belong together: every file is written whole
    under its temporary name first (a full disk fails there and changes nothing); then they are
    renamed into place in the order given, so the last one (a meta file) lands last."""
    with contextlib.ExitStack() as stack:
        # ExitStack renames in reverse order of entry: enter the last path first
        tmps = [stack.enter_context(atomic_path(p, suffix=Path(p).suffix)) for p in reversed(paths)]
        yield tmps[::-1]


def _fsynced(path: Path, mode: str, write) -> None:
    with open(path, mode) as fh:
        try:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno is None:  # numpy's tofile reports a short write without its reason
                try:
                    fh.flush()
                    os.write(fh.fileno(), b"\0")  # ask the kernel again, for the errno
                except OSError as again:
                    raise OSError(again.errno, again.strerror, str(path)) from exc
            if exc.filename is None:
                exc.filename = str(path)
            raise


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """``np.save`` to ``path`` (fsynced, no pickle); object arrays are refused. Use it on a
    temporary path from :func:`atomic_path`, or call :func:`save_npy_atomic`."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError(f"refusing to save an object array to {path}: it would need pickle")
    _fsynced(Path(path), "wb", lambda fh: np.save(fh, array, allow_pickle=False))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """JSON (indented, sorted keys) to ``path``, fsynced; see :func:`write_json_atomic`."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    _fsynced(Path(path), "wb", lambda fh: fh.write(text.encode("utf-8")))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        _fsynced(tmp, "wb", lambda fh: fh.write(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


#: What a spreadsheet takes for the start of a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> str:
    """A cell that a spreadsheet shows as text: a leading ``'`` before ``=``, ``+``, ``-``, ``@``,
    tab or carriage return. Numbers are left as they are (``-0.5`` stays a number)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return str(value)
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def write_csv_for_people(path: str | os.PathLike[str], header: list[str], rows) -> None:
    """A CSV meant to be opened in a spreadsheet (error lists, neighbour lists), atomically,
    every cell quoted and made :func:`spreadsheet_safe`; ``rows`` may be a generator (streamed, so
    a million-row neighbour list never sits in memory). Data files read back by the pipeline
    (``manifest.csv``) are written exactly instead."""
    def write(fh) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow([spreadsheet_safe(h) for h in header])
        for row in rows:
            writer.writerow([spreadsheet_safe(v) for v in row])
        text.flush()
        text.detach()

    with atomic_path(path, suffix=".csv") as tmp:
        _fsynced(tmp, "wb", write)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        write_json(tmp, obj)


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """:func:`save_npy` through a temp file renamed into place."""
    with atomic_path(path, suffix=".npy") as tmp:
        save_npy(tmp, array)


def save_npz_atomic(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed) through a temp file."""
    with atomic_path(path, suffix=".npz") as tmp:
        _fsynced(tmp, "wb", lambda fh: np.savez(fh, **arrays))


# ------------------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON artifact; malformed or non-UTF-8 content is a :class:`UserError` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid UTF-8 JSON ({exc}); delete it and rerun the stage "
                        "that writes it") from None


def read_json_object(path: str | os.PathLike[str]) -> dict:
    """:func:`read_json` for a file that must hold a JSON object."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def load_npy(path: str | os.PathLike[str], mmap: bool = False) -> np.ndarray:
    """Load an artifact array, never unpickling; a missing file names the stage to run."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first "
                                "(see docs/artifacts.md)")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a plain NumPy array file ({exc}); rerun the stage that "
                        "writes it") from None


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read into memory, never unpickling (ValueError if damaged)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
