"""``manifest.csv``: one row per selected image, its metadata and where its file is. Read and
written only here, as strings (no NaN or number guessing); the download stage is its one writer.

``key`` names a row in the collection and its image file (``images/<key>.jpg``): NGA's uuid, or
the key of a row of one's own collection (``paintsim.collection``). After the contract's columns
come ``fetched_from`` (``http`` or ``images-from``) and any columns of a user's own metadata.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .artifacts import atomic_path
from .errors import UserError

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "key", "uuid", "objectid", "title", "attribution", "displaydate", "medium", "classification",
    "url", "file", "status", "error", "width", "height", "bytes",
]
#: Our own column after the contract's: how the image was obtained (``http`` or ``images-from``).
FETCHED_FROM = "fetched_from"
OWN_COLUMNS = (FETCHED_FROM,)
#: Columns that name one painting: what ``--query COLUMN:VALUE`` may always match.
ID_COLUMNS = ("key", "uuid", "objectid")


def read_manifest(path: str | os.PathLike[str]):
    """Read ``manifest.csv`` as strings, checking its columns; a bad file is one clear line."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run download_images.py first")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc}); rerun download_images.py") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise UserError(f"{path} is not a readable CSV ({str(exc).strip()}); rerun "
                        "download_images.py") from None
    if "key" not in df.columns:
        df.insert(0, "key", "")
    if "file" in df.columns and "uuid" in df.columns and (df["key"] == "").any():
        # written before keys existed: the file stem, else the uuid
        derived = df["file"].map(lambda f: Path(f).stem if f else "")
        derived = derived.where(derived != "", df["uuid"])
        df["key"] = df["key"].where(df["key"] != "", derived)
    if FETCHED_FROM not in df.columns and "source" in df.columns \
            and df["source"].isin(["http", "images-from"]).all():
        df = df.rename(columns={"source": FETCHED_FROM})  # its name before user columns were kept
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def manifest_by_name(path: str | os.PathLike[str]):
    """The manifest indexed by image file name (``<uuid>.jpg``, the basename of ``file``), first
    row of each name kept: how a row of ``image_names.npy`` finds its metadata."""
    df = read_manifest(path)
    df = df.assign(name=df["file"].map(lambda f: Path(f).name))
    df = df[df["name"] != ""]
    return df.drop_duplicates("name").set_index("name", drop=False)


def write_manifest(path: str | os.PathLike[str], df) -> None:
    """Write ``manifest.csv`` atomically with the contract's column order first."""
    cols = MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]
    df = df.fillna("")
    with atomic_path(path, suffix=".csv") as tmp:
        df.reindex(columns=cols).to_csv(tmp, index=False)


def previous_rows(path: Path) -> dict[str, dict]:
    """An earlier run's manifest rows by key (lower case); none when it is absent or unreadable."""
    if not path.exists():
        return {}
    try:
        df = read_manifest(path)
    except UserError as exc:
        log.warning("ignoring the unreadable previous manifest (%s)", exc)
        return {}
    return {r["key"].lower(): r for r in df.to_dict("records") if r["key"]}
