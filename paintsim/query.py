"""Which painting is the user asking about, and what are its neighbours?

A query names a painting of the collection (a row of ``image_names.npy``, an image file name, an
image uuid, or an NGA objectid, resolved through ``manifest.csv``), a seeded random painting, or an
outside image (a file or an http(s) URL) embedded with the model recorded in
``features_meta.json``. Neighbours come from the neighbour table when it is there and deep enough,
otherwise from an exact search of ``features.npy``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import DataPaths, load_neighbors, load_npy, read_json, read_manifest
from .cli import UserError
from .iiif import UUID_RE

log = logging.getLogger(__name__)


#: Largest body fetched for ``--image URL`` (a painting photo is a few MB; this stops a runaway).
MAX_URL_BYTES = 50 * 1024 * 1024
URL_TIMEOUT = (10, 60)
USER_AGENT = "paintsim/0.1 (painting similarity; display_similar.py --image)"

PREFIXES = ("row", "file", "uuid", "objectid")


@dataclass
class Collection:
    """The embedded collection of one data directory, loaded lazily and without pickle."""

    paths: DataPaths
    names: np.ndarray
    features: np.ndarray  # memory-mapped float32 [N, D]
    _manifest: Any = field(default=None, repr=False)
    _manifest_loaded: bool = field(default=False, repr=False)
    _image_dir: Path | None = field(default=None, repr=False)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str]) -> "Collection":
        paths = DataPaths.of(data_dir)
        names = load_npy(paths.image_names)
        features = load_npy(paths.features, mmap=True)
        if features.ndim != 2 or names.ndim != 1 or len(names) != features.shape[0]:
            raise UserError(f"{paths.features} {features.shape} and {paths.image_names} {names.shape} "
                            "do not match: rerun extract_features.py")
        if not np.issubdtype(features.dtype, np.floating):
            raise UserError(f"{paths.features} holds {features.dtype}, expected float32 embeddings")
        return cls(paths=paths, names=names.astype(str), features=features)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def manifest(self):
        """``manifest.csv`` indexed by image file name (``<uuid>.jpg``), or None when absent."""
        if not self._manifest_loaded:
            self._manifest_loaded = True
            if self.paths.manifest.exists():
                df = read_manifest(self.paths.manifest)
                df = df.assign(name=df["file"].map(lambda f: Path(f).name))
                self._manifest = df.drop_duplicates("name").set_index("name", drop=False)
            else:
                log.warning("%s is missing: captions will show file names only", self.paths.manifest)
        return self._manifest

    def info(self, row: int) -> dict[str, str]:
        """Title, artist, date, objectid and uuid of a row (empty strings when unknown)."""
        name = str(self.names[row])
        out = {"name": name, "title": "", "attribution": "", "displaydate": "", "objectid": "",
               "uuid": Path(name).stem, "file": f"images/{name}"}
        m = self.manifest
        if m is not None and name in m.index:
            rec = m.loc[name]
            for key in ("title", "attribution", "displaydate", "objectid", "uuid", "file"):
                out[key] = str(rec.get(key, "") or out[key])
        return out

    def image_path(self, row: int) -> Path:
        """The image of a row: its basename inside ``images/`` (or the ``--images-dir`` recorded in
        ``features_meta.json``); a manifest field never becomes a path."""
        if self._image_dir is None:
            meta = read_json(self.paths.features_meta) if self.paths.features_meta.exists() else None
            self._image_dir = self.paths.images_source(meta)
        return self._image_dir / Path(str(self.names[row])).name


# --------------------------------------------------------------------------- resolving --query

def resolve_query(query: str, coll: Collection) -> int:
    """Map ``--query`` to a row of ``image_names.npy``, or raise a UserError saying why not.

    Accepted: a row index, an image file name (``<uuid>.jpg`` or ``images/<uuid>.jpg``), an image
    uuid, or an NGA objectid; any of them may be written with an explicit prefix (``row:12``,
    ``file:...``, ``uuid:...``, ``objectid:1155``). A bare number that is both a row index and an
    objectid of another painting is ambiguous and must be prefixed.
    """
    q = str(query).strip()
    if not q:
        raise UserError("--query is empty")
    kind = None
    if ":" in q and q.split(":", 1)[0].lower() in PREFIXES:
        kind, q = q.split(":", 1)
        kind, q = kind.lower(), q.strip()
    n = len(coll)
    hint = (f"not in the collection ({n} images listed in {coll.paths.image_names}); "
            "to search with an image from outside the collection use --image PATH_OR_URL")

    def by_row() -> int | None:
        if re.fullmatch(r"-?\d+", q):
            i = int(q)
            if -n <= i < n:
                return i % n
        return None

    def by_file() -> int | None:
        base = Path(q).name
        hits = np.flatnonzero(coll.names == base)
        return int(hits[0]) if hits.size else None

    def by_uuid() -> int | None:
        if not UUID_RE.match(q):
            return None
        stems = np.char.partition(coll.names, ".")[:, 0]
        hits = np.flatnonzero(np.char.lower(stems) == q.lower())
        if hits.size:
            return int(hits[0])
        m = coll.manifest
        if m is not None:
            rows = m[m["uuid"].str.lower() == q.lower()]
            for name in rows.index:
                hits = np.flatnonzero(coll.names == name)
                if hits.size:
                    return int(hits[0])
        return None

    def by_objectid() -> int | None:
        if not re.fullmatch(r"\d+", q):
            return None
        m = coll.manifest
        if m is None:
            return None
        names = list(m.index[m["objectid"] == q])
        rows = [int(h) for name in names for h in np.flatnonzero(coll.names == name)]
        if len(rows) > 1:
            log.info("objectid %s has %d images in the collection (rows %s); using the first",
                     q, len(rows), ", ".join(map(str, rows[:10])))
        return rows[0] if rows else None

    if kind == "row":
        row = by_row()
        if row is None:
            raise UserError(f"--query row:{q}: the collection has rows 0..{n - 1}")
        return row
    if kind is not None:
        row = {"file": by_file, "uuid": by_uuid, "objectid": by_objectid}[kind]()
        if row is None:
            raise UserError(f"--query {kind}:{q}: {hint}")
        return row

    if UUID_RE.match(q):
        row = by_uuid()
    elif re.fullmatch(r"-?\d+", q):
        as_row, as_object = by_row(), by_objectid()
        if as_row is not None and as_object is not None and as_row != as_object:
            a, b = coll.info(as_row), coll.info(as_object)
            raise UserError(f"--query {q} is ambiguous: row {as_row} ({a['title']!r} by {a['attribution']}) "
                            f"or NGA objectid {q} ({b['title']!r} by {b['attribution']}); "
                            f"write row:{q} or objectid:{q}")
        row = as_row if as_row is not None else as_object
        if row is None:
            raise UserError(f"--query {q}: neither a row (0..{n - 1}) nor the objectid of a painting "
                            f"in the collection; {hint}")
    else:
        row = by_file()
    if row is None:
        raise UserError(f"--query {q}: {hint}")
    return row


def random_query(coll: Collection, seed: int) -> int:
    """A row drawn with ``numpy.random.default_rng(seed)``: the same seed, the same painting."""
    return int(np.random.default_rng(seed).integers(len(coll)))


# --------------------------------------------------------------------------- neighbours

def neighbors_of_row(coll: Collection, row: int, k: int, device: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k neighbours of a collection row (self excluded): (rows, scores, source)."""
    if not 1 <= k < len(coll):
        raise UserError(f"--k {k}: must be between 1 and {len(coll) - 1} (the collection has {len(coll)} images)")
    for table_path in sorted(coll.paths.root.glob("top_*_similar.npy"), key=_table_k):
        table_k = _table_k(table_path)
        if table_k < k:
            continue
        try:
            table = load_neighbors(table_path)
        except ValueError as exc:
            log.warning("ignoring %s: %s", table_path, exc)
            continue
        if len(table) != len(coll) or table["index"].shape[1] < k:
            log.warning("ignoring %s: %d rows for %d images (stale; rerun optimized_similarity.py)",
                        table_path, len(table), len(coll))
            continue
        if _older_than(table_path, coll.paths.features):
            log.warning("%s is older than %s: it may be stale", table_path, coll.paths.features)
        rec = table[row]
        return rec["index"][:k].astype(np.int64), rec["score"][:k].astype(np.float32), str(table_path)
    from . import knn
    from .cli import resolve_device

    log.info("no neighbour table with k >= %d in %s: searching %s directly", k, coll.paths.root,
             coll.paths.features)
    idx, score = knn.search(np.asarray(coll.features[row:row + 1], dtype=np.float32), coll.features,
                            k + 1, device=resolve_device(device))
    idx, score = idx[0], score[0]
    keep = idx != row
    return idx[keep][:k].astype(np.int64), score[keep][:k].astype(np.float32), str(coll.paths.features)


def _table_k(path: Path) -> int:
    m = re.fullmatch(r"top_(\d+)_similar\.npy", path.name)
    return int(m.group(1)) if m else -1


def _older_than(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_mtime < b.stat().st_mtime
    except OSError:
        return False


# --------------------------------------------------------------------------- outside images

def load_outside_image(source: str, max_bytes: int = MAX_URL_BYTES):
    """Open ``--image``: a local file, or an http(s) URL fetched with a size limit; RGB PIL image."""
    from .images import ImageDecodeError, decode_image, load_rgb

    try:
        if re.match(r"^https?://", source, flags=re.IGNORECASE):
            img = decode_image(fetch_url(source, max_bytes), source)
            return img if img.mode == "RGB" else img.convert("RGB")
        if "://" in source:
            raise UserError(f"--image {source}: only local files and http(s) URLs are supported")
        if not Path(source).is_file():
            raise UserError(f"--image {source}: no such file")
        return load_rgb(source)
    except ImageDecodeError as exc:
        raise UserError(f"--image: {exc}") from exc


def fetch_url(url: str, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """GET ``url`` with timeouts, refusing bodies over ``max_bytes``; errors become UserError."""
    import requests

    try:
        with requests.get(url, stream=True, timeout=URL_TIMEOUT, headers={"User-Agent": USER_AGENT}) as resp:
            if resp.status_code != 200:
                raise UserError(f"--image {url}: HTTP {resp.status_code} {resp.reason}")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise UserError(f"--image {url}: {int(declared)} bytes exceeds the limit of {max_bytes}")
            chunks, total = [], 0
            for chunk in resp.iter_content(chunk_size=1 << 16):
                total += len(chunk)
                if total > max_bytes:
                    raise UserError(f"--image {url}: body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as exc:
        raise UserError(f"--image {url}: could not fetch it ({exc.__class__.__name__}: {exc})") from exc


def embed_outside_image(coll: Collection, img, device: str = "auto", weights: str | None = None) -> np.ndarray:
    """Embed an outside image exactly as the collection was embedded (``features_meta.json``)."""
    from .extract import Embedder

    if not coll.paths.features_meta.exists():
        raise UserError(f"{coll.paths.features_meta} is missing: it records the backbone, weights and "
                        "preprocessing needed to embed an outside image; rerun extract_features.py")
    meta = read_json(coll.paths.features_meta)
    embedder = Embedder.from_meta(meta, device=device, weights=weights)
    vec = np.asarray(embedder.embed([img]), dtype=np.float32)
    if vec.shape != (1, coll.features.shape[1]):
        raise UserError(f"the embedder gives {vec.shape[1:]} features but {coll.paths.features} has "
                        f"{coll.features.shape[1]}: features_meta.json does not describe features.npy")
    return vec


def search_outside(coll: Collection, vec: np.ndarray, k: int, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Top-k collection rows for an embedded outside image (nothing excluded)."""
    from . import knn
    from .cli import resolve_device

    if not 1 <= k <= len(coll):
        raise UserError(f"--k {k}: must be between 1 and {len(coll)}")
    idx, score = knn.search(vec, coll.features, k, device=resolve_device(device))
    return idx[0].astype(np.int64), score[0].astype(np.float32)


def safe_tag(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug of ``text`` (for figure names that say which query they show)."""
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (tag[:max_len] or "query")
