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

from .embeddings import Embeddings
from .errors import UserError
from .iiif import UUID_RE
from .manifest import manifest_by_name

log = logging.getLogger(__name__)

#: Largest body fetched for ``--image URL`` (a painting photo is a few MB; this stops a runaway).
MAX_URL_BYTES = 50 * 1024 * 1024
#: Seconds ``--image URL`` may take in all (a server sending one byte per second is cut off).
URL_DEADLINE = 120.0

PREFIXES = ("row", "file", "uuid", "objectid")


@dataclass
class Collection:
    """The embedded collection of one data directory, with its manifest loaded on first use."""

    emb: Embeddings
    _manifest: Any = field(default=None, repr=False)
    _manifest_loaded: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str]) -> "Collection":
        return cls(Embeddings.load(data_dir))

    @property
    def paths(self):
        return self.emb.paths

    @property
    def names(self) -> np.ndarray:
        return self.emb.names

    @property
    def features(self) -> np.ndarray:
        return self.emb.features

    def __len__(self) -> int:
        return len(self.emb)

    @property
    def manifest(self):
        """``manifest.csv`` indexed by image file name (``<uuid>.jpg``), or None when absent."""
        if not self._manifest_loaded:
            self._manifest_loaded = True
            if self.paths.manifest.exists():
                self._manifest = manifest_by_name(self.paths.manifest)
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
        """The image of a row (a manifest field never becomes a path)."""
        return self.emb.image_path(row)


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
    """Top-k neighbours of a collection row (self excluded): (rows, scores, where they came from).

    From the neighbour table the one lookup finds (``paintsim.neighbours.find_table``), else by an
    exact search of the features.
    """
    from . import knn, neighbours

    k = knn.validate_k(k, len(coll))
    table = neighbours.find_table(coll.paths, k, len(coll), coll.emb.sha256)
    if table is not None:
        return table.index[row, :k].astype(np.int64), table.score[row, :k].astype(np.float32), table.describe()
    log.info("no neighbour table with k >= %d in %s: searching %s directly", k, coll.paths.root,
             coll.paths.features)
    idx, score = knn.search(np.asarray(coll.features[row:row + 1], dtype=np.float32), coll.features,
                            k + 1, device=device)
    idx, score = idx[0], score[0]
    keep = idx != row
    return (idx[keep][:k].astype(np.int64), score[keep][:k].astype(np.float32),
            f"an exact search of {coll.paths.features.name}")


# --------------------------------------------------------------------------- outside images

def load_outside_image(source: str, max_bytes: int = MAX_URL_BYTES):
    """Open ``--image``: a local file, or an http(s) URL fetched with a size and time limit; RGB."""
    from .images import ImageDecodeError, decode_rgb, load_rgb

    try:
        if re.match(r"^https?://", source, flags=re.IGNORECASE):
            return decode_rgb(fetch_url(source, max_bytes), source)
        if "://" in source:
            raise UserError(f"--image {source}: only local files and http(s) URLs are supported")
        if not Path(source).is_file():
            raise UserError(f"--image {source}: no such file")
        return load_rgb(source, within="/")  # the user named this file: a link may lead anywhere
    except ImageDecodeError as exc:
        raise UserError(f"--image: {exc}") from exc


def fetch_url(url: str, max_bytes: int = MAX_URL_BYTES, deadline: float = URL_DEADLINE) -> bytes:
    """GET ``url`` through the project's HTTP client, capped in size and in total time."""
    from .fetch import FetchConfig, fetch, make_session

    config = FetchConfig(max_bytes=max_bytes, deadline=deadline, max_retries=2)
    with make_session(1, config.user_agent) as session:
        res = fetch(session, url, config)
    if not res.ok:
        raise UserError(f"--image {url}: {res.error}")
    return res.data or b""


def embed_outside_image(coll: Collection, img, device: str = "auto", weights: str | None = None) -> np.ndarray:
    """Embed an outside image exactly as the collection was embedded (``features_meta.json``)."""
    from .embedder import Embedder

    embedder = Embedder.for_collection(coll.emb, device=device, weights=weights)
    return np.asarray(embedder.embed([img]), dtype=np.float32)


def search_outside(coll: Collection, vec: np.ndarray, k: int, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Top-k collection rows for an embedded outside image (nothing excluded)."""
    from . import knn

    idx, score = knn.search(vec, coll.features, k, device=device)
    return idx[0].astype(np.int64), score[0].astype(np.float32)


def safe_tag(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug of ``text`` (for figure names that say which query they show)."""
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (tag[:max_len] or "query")
