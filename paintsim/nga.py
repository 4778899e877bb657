"""NGA open-data tables: fetch them, parse them, check them, and select the paintings to download.

The tables come from github.com/NationalGalleryOfArt/opendata (branch ``main``, folder ``data/``):
``published_images.csv`` (one row per published image; ``depictstmsobjectid`` names the object)
and ``objects.csv`` (one row per object; ``classification`` says "Painting", "Print", ...). Their
text fields (provenance, dimensions) hold newlines inside quotes, so they are parsed by pandas'
CSV reader, never line by line, and every field is read as a string (no NaN or float guessing).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import UserError

log = logging.getLogger(__name__)

#: Raw files of the NGA open-data repository (branch main, folder data/).
NGA_TABLES_URL = "https://raw.githubusercontent.com/NationalGalleryOfArt/opendata/main/data"
PUBLISHED_IMAGES = "published_images.csv"
OBJECTS = "objects.csv"
TABLES = (PUBLISHED_IMAGES, OBJECTS)
#: Largest table accepted (objects.csv is the big one, a few hundred MB with its provenance texts).
TABLE_MAX_BYTES = 4 * 2**30

REQUIRED_COLUMNS = {
    PUBLISHED_IMAGES: ("uuid", "iiifurl", "viewtype", "depictstmsobjectid"),
    OBJECTS: ("objectid", "title", "attribution", "classification"),
}
#: Read when present; a missing optional column is simply empty.
OPTIONAL_COLUMNS = {
    PUBLISHED_IMAGES: ("sequence", "width", "height", "maxpixels", "openaccess"),
    OBJECTS: ("displaydate", "medium", "openaccess"),
}

#: Columns of the selection handed to the download stage.
SELECTION_COLUMNS = ["uuid", "objectid", "title", "attribution", "displaydate", "medium",
                     "classification", "iiifurl", "maxpixels", "width", "height", "viewtype",
                     "sequence"]

_TRUE = {"1", "true", "t", "yes", "y"}


# ----------------------------------------------------------------------------------------- fetch
def fetch_tables(csv_dir: str | os.PathLike[str], base_url: str = NGA_TABLES_URL, config=None,
                 progress: bool = True) -> list[Path]:
    """Download whichever of the two tables ``csv_dir`` lacks; return the paths fetched.

    Each file streams through the project's HTTP client (retries, timeouts, User-Agent) to a temp
    file beside its final name and is renamed into place only when whole, so an interrupted
    download never leaves a truncated table.
    """
    from dataclasses import replace

    from .fetch import FetchConfig, fetch_to_file, make_session

    csv_dir = Path(csv_dir)
    missing = [name for name in TABLES if not (csv_dir / name).is_file()]
    if not missing:
        return []
    # the tables are large text files: no image-sized cap, a generous deadline
    config = replace(config or FetchConfig(), max_bytes=TABLE_MAX_BYTES, deadline=3600.0)
    fetched = []
    with make_session(1, config.user_agent) as session:
        for name in missing:
            url = f"{base_url.rstrip('/')}/{name}"
            dest = csv_dir / name
            log.info("fetching %s -> %s", url, dest)
            res = fetch_to_file(session, url, dest, config, progress=progress)
            if res.ok:
                fetched.append(dest)
            elif res.http_status is not None:
                raise UserError(f"could not fetch {url}: {res.error}; download it by hand into "
                                f"{csv_dir}/ or pass --csv-dir")
            else:
                raise UserError(f"could not fetch the NGA table {url} ({res.error}). Are you offline? "
                                f"Download {name} from "
                                "https://github.com/NationalGalleryOfArt/opendata/tree/main/data "
                                f"into {csv_dir}/ or pass --csv-dir DIR")
    return fetched


# ----------------------------------------------------------------------------------------- parse
def read_table(path: str | os.PathLike[str], name: str | None = None) -> pd.DataFrame:
    """Read one NGA table as strings, keeping only the columns we use, checking the required ones.

    A missing file or column is a :class:`UserError` naming the file and the column.
    """
    path = Path(path)
    name = name or path.name
    if name not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown NGA table {name!r}")
    if not path.is_file():
        raise UserError(f"{path}: NGA table {name} is missing (let download_images.py fetch it by "
                        "leaving out --csv-dir, or put it there)")
    try:
        header = pd.read_csv(path, nrows=0, dtype=str).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read as CSV ({exc})") from exc
    columns = [str(c).strip().lower() for c in header]
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in columns]
    if missing:
        raise UserError(f"{path}: required column {', '.join(repr(c) for c in missing)} is missing "
                        f"(NGA's {name} must have {', '.join(REQUIRED_COLUMNS[name])})")
    wanted = set(REQUIRED_COLUMNS[name]) | set(OPTIONAL_COLUMNS[name])
    keep = [orig for orig, low in zip(header, columns) if low in wanted]
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=keep, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: malformed CSV ({exc})") from exc
    df.columns = [str(c).strip().lower() for c in df.columns]
    for col in OPTIONAL_COLUMNS[name]:
        if col not in df.columns:
            df[col] = ""
    return df


def load_tables(csv_dir: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``published_images.csv`` and ``objects.csv`` from ``csv_dir``."""
    csv_dir = Path(csv_dir)
    return read_table(csv_dir / PUBLISHED_IMAGES), read_table(csv_dir / OBJECTS)


# ---------------------------------------------------------------------------------------- select
@dataclass(frozen=True)
class Selection:
    """What to download: the rows, plus counts that explain how they were chosen."""

    rows: pd.DataFrame
    paintings: int
    images_of_paintings: int
    dropped_not_open_access: int


def _open_access_mask(series: pd.Series) -> pd.Series:
    return series.str.strip().str.lower().isin(_TRUE)


def _num(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series.str.strip(), errors="coerce")


def select_paintings(published: pd.DataFrame, objects: pd.DataFrame, all_views: bool = False,
                     limit: int | None = None, sample: int | None = None, seed: int = 0,
                     classification: str = "Painting") -> Selection:
    """Join paintings to their published images and pick the rows to download.

    - objects whose ``classification`` equals ``classification`` (case-insensitive, trimmed);
    - joined on ``published_images.depictstmsobjectid = objects.objectid``;
    - the primary view only (one per object, lowest ``sequence``), or every view with ``all_views``;
    - rows whose ``openaccess`` (in either table, when the column has values) is not true are dropped;
    - ``sample`` picks a reproducible random subset (``seed``), then ``limit`` keeps the first N.
    Rows are ordered by object id, then sequence, then uuid, so runs are deterministic.
    """
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be >= 0, got {limit}")
    if sample is not None and sample < 0:
        raise UserError(f"--sample must be >= 0, got {sample}")
    objs = objects[objects["classification"].str.strip().str.lower() == classification.lower()]
    objs = objs.assign(_oid=objs["objectid"].str.strip()).drop_duplicates("_oid")
    pubs = published.assign(_oid=published["depictstmsobjectid"].str.strip())
    pubs = pubs.rename(columns={"openaccess": "openaccess_image"})
    objs = objs.rename(columns={"openaccess": "openaccess_object"})
    merged = pubs.merge(objs.drop(columns=["objectid"]), on="_oid", how="inner")
    merged["objectid"] = merged["_oid"]
    images_of_paintings = len(merged)

    dropped = 0
    for col in ("openaccess_image", "openaccess_object"):
        # "respected when the column exists": a column that is present but entirely empty says nothing
        if col in merged.columns and (merged[col].str.strip() != "").any():
            keep = _open_access_mask(merged[col])
            dropped += int((~keep).sum())
            merged = merged[keep]

    merged = merged.assign(_oidn=_num(merged["_oid"]), _seq=_num(merged["sequence"]).fillna(0))
    merged = merged.sort_values(["_oidn", "_oid", "_seq", "uuid"], kind="stable")
    if not all_views:
        merged = merged[merged["viewtype"].str.strip().str.lower() == "primary"]
        merged = merged.drop_duplicates("_oid", keep="first")
    merged = merged.drop_duplicates("uuid", keep="first")
    if sample is not None and sample < len(merged):
        merged = merged.sample(n=sample, random_state=seed).sort_values(["_oidn", "_oid", "_seq", "uuid"],
                                                                        kind="stable")
    if limit is not None:
        merged = merged.head(limit)
    rows = merged.reindex(columns=SELECTION_COLUMNS).fillna("").reset_index(drop=True)
    return Selection(rows=rows, paintings=int(objs["_oid"].nunique()),
                     images_of_paintings=images_of_paintings, dropped_not_open_access=dropped)
