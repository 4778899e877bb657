"""Check a built site: every ``href`` and ``src`` of every page, and every file the data file
names, resolves to a file of the site. Links out (``http(s)``) are listed, never followed."""
from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.refs.append((tag, value))


def page_refs(path: Path) -> list[tuple[str, str]]:
    parser = _Refs()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.refs


def data_rows(site: Path) -> tuple[list[str], list[list]]:
    """The fields and rows of ``data/paintings.js``."""
    text = (site / "data" / "paintings.js").read_text(encoding="utf-8")
    obj = json.loads(text[text.index("=") + 1:].strip().rstrip(";"))
    return obj["fields"], obj["rows"]


def check_site(site: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(broken references as "page: ref", outside links). A reference is broken when it is not a
    relative path to an existing file inside the site, or when it is an absolute or ``file:`` URL."""
    site = Path(site).resolve()
    broken: list[str] = []
    outside: list[str] = []
    for page in sorted(site.rglob("*.html")):
        for tag, ref in page_refs(page):
            parts = urlsplit(ref)
            if parts.scheme in ("http", "https") and tag == "a":
                outside.append(f"{page.relative_to(site)}: {ref}")
                continue
            if parts.scheme or parts.netloc or ref.startswith("/"):
                broken.append(f"{page.relative_to(site)}: {ref} (not a relative path)")
                continue
            if not parts.path:  # "#anchor"
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if site not in target.parents or not target.is_file():
                broken.append(f"{page.relative_to(site)}: {ref}")
    fields, rows = data_rows(site)
    f = {name: i for i, name in enumerate(fields)}
    for r in rows:
        stem = r[f["stem"]]
        wanted = [f"paintings/{stem}.html"] + ([f"thumbs/{stem}.jpg"] if r[f["thumb"]] else [])
        for rel in wanted:
            if not (site / rel).is_file():
                broken.append(f"data/paintings.js: {rel}")
    return broken, outside
