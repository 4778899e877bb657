"""What the explorer shows of each painting: title, artist, date (and a year to filter on),
medium, its page and thumbnail names, and a link to its record at the source.

Everything here comes from CSVs and stays untrusted: text is escaped by the templates (and set
with ``textContent`` by the page scripts); a link is kept only when it is an http(s) URL.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

#: NGA's page for an object, by objectid (the record link of an NGA painting).
NGA_OBJECT_PAGE = "https://www.nga.gov/collection/art-object-page.{objectid}.html"
#: Manifest columns (of one's own metadata) that may hold a link to a painting's record, by priority.
RECORD_URL_COLUMNS = ("record_url", "object_url", "web_url", "permalink", "link", "page", "url_record",
                      "user_url")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_YEAR = re.compile(r"(?<!\d)(\d{3,4})(?!\d)")


def page_stem(key: str) -> str:
    """A file-name-safe, stable stem for a painting's page and thumbnail: the key itself when
    safe, else a slug plus a hash of the key (keys of an --images-dir collection are file stems)."""
    if _SAFE.match(key) and not key.lower().endswith((".html", ".htm")):
        return key
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.")[:60]
    return f"{slug or 'p'}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:10]}"


def year_of(date: str) -> int | None:
    """The first plausible year in a display date ("c. 1505", "1480/1490", "1650s"), else None."""
    for m in _YEAR.finditer(str(date or "")):
        y = int(m.group(1))
        if 100 <= y <= 2100:
            return y
    return None


def safe_link(value: str) -> str:
    """``value`` when it is an absolute http(s) URL (never ``javascript:`` or a local path), else ""."""
    text = str(value or "").strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        return ""
    if parts.scheme.lower() in ("http", "https") and parts.netloc and not any(c.isspace() for c in text):
        return text
    return ""


@dataclass
class Painting:
    row: int
    key: str
    stem: str
    title: str
    artist: str
    date: str
    year: int | None
    medium: str
    record_url: str

    @property
    def record_host(self) -> str:
        return urlsplit(self.record_url).netloc if self.record_url else ""

    @property
    def page(self) -> str:
        return f"paintings/{self.stem}.html"

    @property
    def thumb(self) -> str:
        return f"thumbs/{self.stem}.jpg"


def record_link(rec: dict, columns: tuple[str, ...] = RECORD_URL_COLUMNS) -> str:
    """The painting's record at its source: a link column of one's own, else NGA's object page."""
    for col in columns:
        link = safe_link(rec.get(col, ""))
        if link:
            return link
    objectid = str(rec.get("objectid", "") or "")
    if objectid.isdigit() and _from_nga(str(rec.get("url", "") or "")):
        return NGA_OBJECT_PAGE.format(objectid=objectid)
    return ""


def _from_nga(url: str) -> bool:
    """Only an image NGA served makes the objectid NGA's: a user's own uuid and objectid columns do not."""
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return False
    return host == "nga.gov" or host.endswith(".nga.gov")


def paintings(coll, record_column: str | None = None) -> list[Painting]:
    """One :class:`Painting` per row of the collection (``paintsim.query.Collection``)."""
    m = coll.manifest
    columns = (record_column,) if record_column else RECORD_URL_COLUMNS
    out: list[Painting] = []
    stems: set[str] = set()
    for row in range(len(coll)):
        info = coll.info(row)
        name = info["name"]
        rec = m.loc[name].to_dict() if m is not None and name in m.index else {}
        key = info["key"] or Path(name).stem
        stem = page_stem(key)
        if stem.lower() in stems:  # two keys that differ only by case on a case-blind disk
            stem = f"{stem}-{row}"
        stems.add(stem.lower())
        out.append(Painting(row=row, key=key, stem=stem, title=info["title"] or Path(name).stem,
                            artist=info["attribution"], date=info["displaydate"],
                            year=year_of(info["displaydate"]), medium=str(rec.get("medium", "") or ""),
                            record_url=record_link(rec, columns)))
    return out
