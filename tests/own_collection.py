"""A collection of one's own, as a new user brings it: a folder of PNG, TIFF and WebP images (in
subfolders too) and a metadata CSV with no objectid, made from the embedded NGA sample."""
from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
from PIL import Image

from helpers import SAMPLE_DIR

FORMATS = ("png", "tiff", "webp", "jpg")
MUSEUMS = ("Rijksmuseum", "Met", "Art Institute", "Smithsonian", "Cleveland")


def sample_records() -> list[dict]:
    """The sample's paintings with title, artist and date, in objectid order."""
    meta = pd.read_csv(SAMPLE_DIR / "metadata.csv", dtype=str, keep_default_na=False)
    objects = pd.read_csv(SAMPLE_DIR / "objects.csv", dtype=str, keep_default_na=False)
    df = meta.merge(objects[["objectid", "title", "displaydate"]], on="objectid", how="left")
    df = df.sort_values("objectid", key=lambda s: s.astype(int))
    return df.to_dict("records")


def make_own_folder(root: Path, n: int | None = None, unknown_every: int = 0) -> tuple[Path, Path]:
    """``root/images`` (PNG/TIFF/WebP/JPEG, a quarter in a subfolder) and ``root/metadata.csv``
    (``file,title,artist,source,item_id,date``); every ``unknown_every``-th artist is "Unknown".
    Returns (folder, csv)."""
    folder = root / "images"
    (folder / "more").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, rec in enumerate(sample_records()[:n]):
        fmt = FORMATS[i % len(FORMATS)]
        name = f"artic_{rec['objectid']}.{fmt}"
        rel = f"more/{name}" if i % 4 == 3 else name
        img = Image.open(SAMPLE_DIR / rec["file"]).convert("RGB")
        if fmt == "png" and i % 8 == 0:
            img = img.convert("P", palette=Image.Palette.ADAPTIVE)  # palette PNGs, as museums ship them
        img.save(folder / rel, format="JPEG" if fmt == "jpg" else fmt.upper())
        artist = "Unknown" if unknown_every and i % unknown_every == 0 else rec["artist"]
        rows.append({"file": name if i % 4 != 3 else rel, "title": rec["title"], "artist": artist,
                     "source": MUSEUMS[i % len(MUSEUMS)], "item_id": f"IT-{1000 + i}",
                     "date": rec["displaydate"]})
    meta = root / "metadata.csv"
    with open(meta, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder, meta
