"""Thumbnails for the explorer, made locally from the collection's images (bounded decoding,
atomic writes), and remade only when the image is newer than its thumbnail."""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

#: Longest edge of a thumbnail in pixels (cards show 180 px; the map zooms to about this).
THUMB_SIZE = 256


def _one(src: Path, dest: Path, size: int) -> str:
    from ..artifacts import atomic_path
    from ..images import ImageDecodeError, load_rgb

    try:
        if dest.exists() and dest.stat().st_mtime >= os.stat(src).st_mtime:
            return "kept"
    except OSError:
        pass
    try:
        img = load_rgb(src)
    except (ImageDecodeError, OSError) as exc:
        log.warning("no thumbnail for %s: %s", src, exc)
        return "unreadable"
    img.thumbnail((size, size))
    with atomic_path(dest, suffix=".jpg") as tmp:
        img.save(tmp, "JPEG", quality=82, optimize=True)
    return "made"


def make_thumbs(jobs: list[tuple[Path, Path]], size: int = THUMB_SIZE, workers: int = 2,
                progress: bool = True, desc: str = "thumbnails") -> tuple[Counter, list[str]]:
    """Make each (image, thumbnail) pair's thumbnail: (counts of made / kept / unreadable, the
    status of each job in order)."""
    from tqdm.auto import tqdm

    for folder in {dest.parent for _, dest in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    statuses: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in tqdm(pool.map(lambda j: _one(j[0], j[1], size), jobs), total=len(jobs),
                           desc=desc, unit="img", disable=not progress):
            statuses.append(result)
    return Counter(statuses), statuses
