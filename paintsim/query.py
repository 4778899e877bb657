"""Which painting is the user asking about, and what are its neighbours?

A query names a painting of the collection (a row of ``image_names.npy``, an image file name, an
id of the manifest such as a uuid, an NGA objectid or one's own item id, or a part of a title), a
seeded random painting, or an
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

PREFIXES = ("row", "file", "key", "uuid", "objectid", "title")
#: Random pairs that measure what a score means in this collection (display_similar.py).
LEVEL_PAIRS = 5000


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
        """Title, artist, date, objectid, uuid and key of a row (empty strings when unknown)."""
        name = str(self.names[row])
        out = {"name": name, "title": "", "attribution": "", "displaydate": "", "objectid": "",
               "uuid": "", "key": Path(name).stem, "file": f"images/{name}"}
        m = self.manifest
        if m is not None and name in m.index:
            rec = m.loc[name]
            for key in ("title", "attribution", "displaydate", "objectid", "uuid", "key", "file"):
                out[key] = str(rec.get(key, "") or out[key])
        elif UUID_RE.match(out["key"]):
            out["uuid"] = out["key"]
        return out

    def image_path(self, row: int) -> Path:
        """The image of a row (a manifest field never becomes a path)."""
        return self.emb.image_path(row)


# --------------------------------------------------------------------------- resolving --query

#: Candidates listed when a query matches several paintings.
MAX_CANDIDATES = 10


def _id_columns(m) -> list[str]:
    """The manifest's columns that name one painting: key, uuid, objectid, and any column of the
    user's own whose filled values are all different (an inventory number, an item id)."""
    from .manifest import FETCHED_FROM, ID_COLUMNS, MANIFEST_COLUMNS

    cols = [c for c in ID_COLUMNS if c in m.columns]
    for c in m.columns:
        if c in MANIFEST_COLUMNS or c == FETCHED_FROM or c == "name":
            continue
        filled = m[c][m[c] != ""]
        if len(filled) >= 2 and filled.is_unique:
            cols.append(c)
    return cols


def resolve_query(query: str, coll: Collection) -> int:
    """Map ``--query`` to a row of ``image_names.npy``, or raise a UserError saying why not.

    Accepted: a row index, an image file name (``<key>.jpg`` or ``images/<key>.jpg``), the value of
    any id column of the manifest (key, uuid, objectid, or a column of one's own such as an item
    id), or a part of a title. Any of them may be written with a prefix (``row:12``, ``file:...``,
    ``title:...``, ``<column>:value`` for any manifest column). A bare number that is both a row
    index and an id of another painting is ambiguous and must be prefixed; a title that matches
    several paintings lists them.
    """
    q = str(query).strip()
    if not q:
        raise UserError("--query is empty")
    n = len(coll)
    m = coll.manifest
    columns = {c.lower(): c for c in (m.columns if m is not None else ()) if c != "name"}
    kind = None
    if ":" in q:
        head, rest = q.split(":", 1)
        if head.strip().lower() in set(PREFIXES) | {"title"} | set(columns):
            kind, q = head.strip().lower(), rest.strip()
    hint = (f"not in the collection ({n} images listed in {coll.paths.image_names}); "
            "to search with an image from outside the collection use --image PATH_OR_URL")
    row_of_name = {str(nm): i for i, nm in reversed(list(enumerate(coll.names)))}

    def rows_of(names) -> list[int]:
        return sorted({row_of_name[nm] for nm in names if nm in row_of_name})

    def by_row() -> int | None:
        if re.fullmatch(r"-?\d+", q):
            i = int(q)
            if -n <= i < n:
                return i % n
        return None

    def by_file() -> list[int]:
        base = Path(q).name
        return [int(h) for h in np.flatnonzero(coll.names == base)[:1]]

    def by_column(col: str, value: str) -> list[int]:
        hits: list[int] = []
        if col in ("uuid", "key"):  # the stem of an image name is its key (NGA: its uuid)
            stems = np.char.partition(coll.names.astype(str), ".")[:, 0]
            hits = [int(h) for h in np.flatnonzero(np.char.lower(stems) == value.lower())]
        if m is not None and col in m.columns:
            vals = m[col].str.strip()
            match = vals.str.lower() == value.lower() if col in ("uuid", "key") else vals == value
            hits += rows_of(m.index[match])
        return sorted(set(hits))

    def by_title(text: str) -> list[int]:
        if m is None:
            return []
        titles = m["title"].str.lower()
        exact = rows_of(m.index[titles == text.lower()])
        return exact if len(exact) == 1 else rows_of(m.index[titles.str.contains(text.lower(), regex=False)])

    def one(rows: list[int], what: str) -> int:
        if len(rows) > 1:
            lines = []
            for r in rows[:MAX_CANDIDATES]:
                i = coll.info(r)
                lines.append(f"row:{r} ({i['title'] or i['name']!r} by {i['attribution'] or 'unknown'}; "
                             f"key {i['key']})")
            more = f" and {len(rows) - MAX_CANDIDATES} more" if len(rows) > MAX_CANDIDATES else ""
            raise UserError(f"--query {what} matches {len(rows)} paintings: {'; '.join(lines)}{more}; "
                            "name one by row:N or key:KEY")
        return rows[0]

    if kind == "row":
        row = by_row()
        if row is None:
            raise UserError(f"--query row:{q}: the collection has rows 0..{n - 1}")
        return row
    if kind is not None:
        if kind == "file":
            rows = by_file()
        elif kind == "title":
            rows = by_title(q)
        else:
            rows = by_column(columns.get(kind, kind), q)
            if kind == "objectid" and len(rows) > 1:
                log.info("objectid %s has %d images in the collection (rows %s); using the first",
                         q, len(rows), ", ".join(map(str, rows[:10])))
                rows = rows[:1]
        if not rows:
            raise UserError(f"--query {kind}:{q}: {hint}")
        return one(rows, f"{kind}:{q}")

    if m is not None:
        ids = {c: by_column(c, q) for c in _id_columns(m)}
    else:
        ids = {"key": by_column("key", q)}
    ids = {c: r for c, r in ids.items() if r}
    if "objectid" in ids:
        ids["objectid"] = ids["objectid"][:1]  # several views of one object: its first image
    if re.fullmatch(r"-?\d+", q):
        as_row = by_row()
        other = next(((c, r[0]) for c, r in ids.items() if r[0] != as_row), None)
        if as_row is not None and other is not None:
            a, b = coll.info(as_row), coll.info(other[1])
            raise UserError(f"--query {q} is ambiguous: row {as_row} ({a['title']!r} by {a['attribution']}) "
                            f"or {other[0]} {q} ({b['title']!r} by {b['attribution']}); "
                            f"write row:{q} or {other[0]}:{q}")
        if as_row is not None:
            return as_row
        if not ids:
            raise UserError(f"--query {q}: neither a row (0..{n - 1}) nor the id of a painting "
                            f"in the collection; {hint}")
    rows = by_file()
    if not rows:
        found = sorted({r for hits in ids.values() for r in hits})
        rows = found if found else ([] if UUID_RE.match(q) else by_title(q))
    if not rows:
        raise UserError(f"--query {q}: {hint}")
    return one(rows, repr(q))


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


def all_neighbours(coll: Collection, k: int, device: str = "auto",
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k neighbours of every row (self excluded): (index [N, k], score [N, k], where from)."""
    from .neighbours import neighbours_of_all

    return neighbours_of_all(coll.emb, k, device=device, progress=progress)


def random_pair_level(coll: Collection, pairs: int = LEVEL_PAIRS, seed: int = 0) -> dict[str, float]:
    """Mean and 95th percentile of the similarity of seeded random pairs of distinct paintings:
    the level a neighbour's score must be read against (real embeddings put it well above 0)."""
    n = len(coll)
    if n < 2:
        return {"mean": float("nan"), "p95": float("nan"), "pairs": 0}
    rng = np.random.default_rng(seed)
    i = rng.integers(n, size=pairs)
    j = (i + rng.integers(1, n, size=pairs)) % n  # never i itself
    order = np.argsort(i, kind="stable")  # sorted reads of a memory-mapped file
    fi = np.asarray(coll.features[np.sort(i)], dtype=np.float32)
    fj = np.asarray(coll.features[j[order]], dtype=np.float32)
    sims = np.einsum("pd,pd->p", fi, fj)
    return {"mean": float(sims.mean()), "p95": float(np.percentile(sims, 95)), "pairs": int(pairs)}


def describe(info: dict[str, str]) -> str:
    """A painting as a person names it: 'Title' by Artist (date)."""
    title = info.get("title") or info.get("key") or info.get("name", "")
    text = f"{title!r} by {info.get('attribution') or 'unknown artist'}"
    return text + (f" ({info['displaydate']})" if info.get("displaydate") else "")


#: Columns of neighbours.csv (display_similar.py --all).
NEIGHBOURS_CSV_COLUMNS = ["query_row", "query_key", "query_title", "query_attribution", "rank",
                          "neighbour_row", "neighbour_key", "neighbour_title", "neighbour_attribution",
                          "score"]


def write_neighbours_csv(coll: Collection, index: np.ndarray, score: np.ndarray, path) -> int:
    """Every painting's neighbours with the titles and artists of both, as one spreadsheet-safe
    CSV, streamed; returns the number of rows written."""
    from .artifacts import write_csv_for_people

    infos = [coll.info(r) for r in range(len(coll))]
    keys = [i["key"] for i in infos]
    titles = [i["title"] for i in infos]
    artists = [i["attribution"] for i in infos]

    def rows():
        for q in range(index.shape[0]):
            for rank, (r, s) in enumerate(zip(index[q], score[q]), 1):
                r = int(r)
                yield (q, keys[q], titles[q], artists[q], rank, r, keys[r], titles[r], artists[r],
                       round(float(s), 4))

    write_csv_for_people(path, NEIGHBOURS_CSV_COLUMNS, rows())
    return int(index.size)


def face_neighbours(coll: Collection, faces, face_row: int, k: int,
                    device: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """The ``k`` nearest faces in other paintings of face ``face_row`` of ``faces`` (the faces'
    ``Embeddings``): from ``top_{k}_faces.npy`` when it fits, else an exact search."""
    from . import knn, neighbours

    groups = np.array([faces.image_name(i) for i in range(len(faces))])
    table = neighbours.find_table(faces.paths, k, len(faces), faces.sha256)
    if table is not None:
        return table.index[face_row, :k].astype(np.int64), table.score[face_row, :k].astype(np.float32), table.describe()
    wide = min(len(faces), k + int(np.unique(groups, return_counts=True)[1].max()))
    idx, score = knn.search(np.asarray(faces.features[face_row:face_row + 1], dtype=np.float32), faces.features,
                            wide, device=device)
    keep = groups[idx[0]] != groups[face_row]
    return (idx[0][keep][:k].astype(np.int64), score[0][keep][:k].astype(np.float32),
            f"an exact search of {faces.paths.features.name}")


def painting_row_of(coll: Collection, image_name: str) -> int | None:
    hits = np.flatnonzero(coll.names == image_name)
    return int(hits[0]) if hits.size else None


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
