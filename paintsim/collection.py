"""A collection of one's own: a metadata CSV read into the manifest's shape.

Two routes end in the same ``manifest.csv`` as NGA's: a folder of images with a CSV naming each
file (``--images-from DIR --metadata CSV``), and a CSV of image URLs or IIIF image-service bases
(``--urls CSV``). Known columns are mapped onto the manifest's (title; artist, creator, ... onto
``attribution``; date onto ``displaydate``; ...), by flag or by common name; every other column is
kept under its own name (``user_<name>`` when the name is one of the manifest's own). CSV fields
are looked up, never joined into paths: a folder is indexed first and a row finds its file there.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadValue, UserError
from .iiif import BadRowError, check_http_url, check_image_url, check_uuid, image_url
from .images import IMAGE_SUFFIXES
from .manifest import MANIFEST_COLUMNS, OWN_COLUMNS

log = logging.getLogger(__name__)

#: Manifest fields filled from a user's CSV, and the column names (compared without case, spaces,
#: ``_`` or ``-``) that fill them when no flag names the column. The first name present wins.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "title": ("title", "object title", "artwork title", "work title", "painting title"),
    "attribution": ("attribution", "artist", "creator", "author", "maker", "painter", "artist name",
                    "artist display name", "artist display"),
    "displaydate": ("displaydate", "display date", "date", "dated", "year", "creation date", "object date"),
    "medium": ("medium", "technique", "materials", "medium display"),
    "classification": ("classification", "object type", "object name"),
    "objectid": ("objectid", "object id", "object number id"),
    "uuid": ("uuid",),
}
#: Columns that name a row's image file (folder route) when no --id-column is given.
FILE_ALIASES = ("file", "filename", "file name", "image", "image file", "image name", "path", "filepath")
#: Columns that hold a row's image URL (URL route) when no --url-column is given.
URL_ALIASES = ("url", "image url", "imageurl", "iiif", "iiifurl", "iiif url", "image", "primary image",
               "primaryimage", "image link")
#: Columns that identify a row (URL route) when no --id-column is given.
ID_ALIASES = ("id", "identifier", "objectid", "object id", "accession number", "accession", "uuid")
#: Longest readable part of a key (the image's file stem); a hash makes it unique.
KEY_MAX = 80


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower()).strip()


def find_column(columns, aliases) -> str | None:
    """The first column whose normalised name is one of ``aliases`` (in alias order)."""
    by_norm: dict[str, str] = {}
    for c in columns:
        by_norm.setdefault(_norm(c), c)
    for a in aliases:
        if _norm(a) in by_norm:
            return by_norm[_norm(a)]
    return None


def read_metadata(path: str | os.PathLike[str]):
    """A user's CSV (TSV when it ends in .tsv), every field a string; one clear line when unreadable."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                         sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8 CSV") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise UserError(f"{path} is not a readable CSV ({str(exc).strip()})") from None
    df.columns = [str(c).strip() for c in df.columns]
    dup = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup:
        raise UserError(f"{path}: column(s) {', '.join(dup)} appear twice")
    if df.empty:
        raise UserError(f"{path}: no rows")
    return df


def map_columns(columns, chosen: dict[str, str | None]) -> dict[str, str]:
    """Manifest field -> the user's column: ``chosen`` (from flags, must exist), else by common name.

    Raises :class:`BadValue` named ``<field>_column`` for a chosen column that is not there.
    """
    columns = list(columns)
    out: dict[str, str] = {}
    for fieldname, aliases in FIELD_ALIASES.items():
        want = chosen.get(fieldname)
        if want:
            if want not in columns:
                raise BadValue(f"{'artist' if fieldname == 'attribution' else fieldname}_column", want,
                               f"not a column of the CSV ({', '.join(columns)})")
            out[fieldname] = want
        else:
            col = find_column([c for c in columns if c not in out.values()], aliases)
            if col is not None:
                out[fieldname] = col
    return out


def kept_name(column: str) -> str:
    """The manifest name of a user's column that is not mapped: its own, unless ours already."""
    return f"user_{column}" if column in MANIFEST_COLUMNS or column in OWN_COLUMNS else column


def make_key(value: str, taken: set[str]) -> str:
    """A file-name-safe, unique (case-insensitively) key for ``value``: the value itself when it
    is already safe and free, otherwise a slug plus a short hash of the value."""
    text = str(value).strip()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:KEY_MAX]
    key = slug
    if not slug or slug != text or slug.lower() in taken:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
        key = f"{slug}-{digest[:8]}" if slug else f"id-{digest[:12]}"
        n = 8
        while key.lower() in taken:  # a hash prefix shared by two values: lengthen it
            n += 4
            key = f"{slug}-{digest[:n]}" if slug else f"id-{digest[:n]}"
    taken.add(key.lower())
    return key


# ------------------------------------------------------------------------------------- the folder
class FolderIndex:
    """The image files under a folder (recursively, links to folders not followed), found by
    relative path, by file name or by stem, all without case. Lookups never build a path."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory")
        self.by_rel: dict[str, Path] = {}
        by_name: dict[str, list[Path]] = {}
        by_stem: dict[str, list[Path]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                if fn.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if not (p.is_file() or p.is_symlink()):
                    continue
                rel = p.relative_to(self.root).as_posix()
                self.by_rel[rel.lower()] = p
                by_name.setdefault(fn.lower(), []).append(p)
                by_stem.setdefault(p.stem.lower(), []).append(p)
        self.by_name, self.by_stem = by_name, by_stem

    def __len__(self) -> int:
        return len(self.by_rel)

    def find(self, value: str) -> Path:
        """The file a CSV field names; :class:`BadRowError` when none or several match."""
        text = str(value).strip().replace("\\", "/")
        while text.startswith("./"):
            text = text[2:]
        if not text:
            raise BadRowError("no file named (empty field)")
        key = text.lower()
        if key in self.by_rel:
            return self.by_rel[key]
        for table, what in ((self.by_name, "file name"), (self.by_stem, "stem")):
            hits = table.get(key, [])
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                shown = ", ".join(h.relative_to(self.root).as_posix() for h in hits[:4])
                raise BadRowError(f"{value!r} matches several images by {what} ({shown}); "
                                  "name the file by its path within the folder")
        raise BadRowError(f"no image {value!r} in {self.root}")


# ---------------------------------------------------------------------------------- the entries
@dataclass
class Entry:
    """One row of the coming manifest, with where its image comes from (or why it cannot)."""

    row: dict
    key: str | None = None
    url: str = ""
    local: Path | None = None
    error: str = ""


def _base_row(rec: dict, mapping: dict[str, str], skip: set[str]) -> dict:
    row = {c: "" for c in MANIFEST_COLUMNS}
    for fieldname, col in mapping.items():
        row[fieldname] = str(rec.get(col, "")).strip()
    mapped = set(mapping.values()) | skip
    for col, value in rec.items():
        if col not in mapped:
            row[kept_name(col)] = value
    return row


def folder_entries(df, index: FolderIndex, id_column: str | None, chosen: dict[str, str | None],
                   metadata_name: str = "the metadata CSV") -> list[Entry]:
    """Rows of a metadata CSV beside a folder: each finds its image in ``index`` by ``id_column``
    (a file name, a stem, or a path within the folder)."""
    id_column = id_column or find_column(df.columns, FILE_ALIASES)
    if id_column is None:
        raise BadValue("id_column", "(not given)", f"{metadata_name} has no column naming the image file "
                       f"(looked for {', '.join(FILE_ALIASES)}; columns: {', '.join(df.columns)})")
    if id_column not in df.columns:
        raise BadValue("id_column", id_column, f"not a column of {metadata_name} ({', '.join(df.columns)})")
    mapping = map_columns(df.columns, chosen)
    mapping = {f: c for f, c in mapping.items() if c != id_column}
    taken: set[str] = set()
    used: dict[Path, int] = {}
    out: list[Entry] = []
    for line, rec in enumerate(df.to_dict("records"), start=2):
        entry = Entry(_base_row(rec, mapping, set()))
        out.append(entry)
        try:
            path = index.find(rec[id_column])
        except BadRowError as exc:
            entry.error = f"line {line}: {exc}"
            continue
        if path in used:
            entry.error = f"line {line}: {path.name} is already the image of line {used[path]}"
            continue
        used[path] = line
        entry.local = path
        entry.key = make_key(path.stem, taken)
    unlisted = len(index) - len(used)
    if unlisted:
        log.info("%d image(s) in %s are not named in %s and are left out", unlisted, index.root, metadata_name)
    return out


def url_entries(df, url_column: str | None, id_column: str | None, chosen: dict[str, str | None],
                size: int, kind: str = "auto", metadata_name: str = "the URL CSV") -> list[Entry]:
    """Rows of a CSV of image URLs or IIIF image-service bases (``kind`` auto: a URL ending in
    ``/info.json`` is a IIIF base, any other an image)."""
    if kind not in ("auto", "image", "iiif"):
        raise BadValue("url_kind", kind, "must be auto, image or iiif")
    url_column = url_column or find_column(df.columns, URL_ALIASES)
    if url_column is None or url_column not in df.columns:
        raise BadValue("url_column", url_column or "(not given)", f"{metadata_name} has no such column (columns: "
                       f"{', '.join(df.columns)})")
    if id_column is not None and id_column not in df.columns:
        raise BadValue("id_column", id_column, f"not a column of {metadata_name} ({', '.join(df.columns)})")
    if id_column is None:
        guess = find_column([c for c in df.columns if c != url_column], ID_ALIASES)
        if guess is not None and (df[guess].str.strip() != "").all() and df[guess].str.strip().is_unique:
            id_column = guess
    mapping = map_columns(df.columns, chosen)
    mapping = {f: c for f, c in mapping.items() if c != url_column}
    taken: set[str] = set()
    seen: dict[str, int] = {}
    out: list[Entry] = []
    for line, rec in enumerate(df.to_dict("records"), start=2):
        entry = Entry(_base_row(rec, mapping, set()))
        out.append(entry)
        raw = str(rec[url_column]).strip()
        try:
            is_iiif = kind == "iiif" or (kind == "auto" and raw.rstrip("/").endswith("/info.json"))
            if is_iiif:
                base = raw.rstrip("/")
                base = base[: -len("/info.json")] if base.endswith("/info.json") else base
                url = image_url(check_http_url(base), size)
            else:
                url = check_image_url(raw)
        except (BadRowError, ValueError) as exc:
            entry.error = f"line {line}: {exc}"
            continue
        ident = str(rec[id_column]).strip() if id_column else url
        if ident in seen:
            entry.error = f"line {line}: {'URL' if not id_column else id_column} {ident!r} repeats line {seen[ident]}"
            continue
        seen[ident] = line
        entry.url = url
        entry.key = make_key(ident, taken) if id_column else \
            f"url-{hashlib.sha1(url.encode('utf-8')).hexdigest()[:16]}"
        entry.row["url"] = url
    return out


def limit_entries(entries: list[Entry], limit: int | None, sample: int | None, seed: int) -> list[Entry]:
    """The first ``limit`` rows, or a seeded random ``sample`` of them in CSV order."""
    if sample is not None and sample < len(entries):
        import numpy as np

        keep = np.sort(np.random.default_rng(seed).choice(len(entries), size=sample, replace=False))
        entries = [entries[i] for i in keep]
    if limit is not None:
        entries = entries[:limit]
    return entries


def nga_entries(selection, size: int) -> list[Entry]:
    """Entries of NGA's paintings (the pandas selection of :mod:`paintsim.nga`): the uuid is the
    key, the image URL is built from the IIIF base."""
    out: list[Entry] = []
    for sel in selection.to_dict("records"):
        row = {c: "" for c in MANIFEST_COLUMNS}
        for c in ("uuid", "objectid", "title", "attribution", "displaydate", "medium", "classification"):
            row[c] = str(sel.get(c, "") or "")
        entry = Entry(row)
        out.append(entry)
        try:
            entry.key = check_uuid(sel["uuid"])
            entry.url = image_url(sel["iiifurl"], size, sel.get("maxpixels"), sel.get("width"), sel.get("height"))
        except (BadRowError, ValueError) as exc:
            entry.key, entry.error = None, str(exc)
            continue
        row["uuid"], row["url"] = entry.key, entry.url
    return out
