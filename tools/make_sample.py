"""Build data/sample/ (the embedded offline sample) from ../shared/nga_sample/.

Run once by a maintainer; the result is committed. The 79 thumbnails are real NGA paintings
(CC0). Their published_images.csv / objects.csv rows are written in NGA's exact column layout
(headers copied from the real NGA rows in shared/). The shared metadata carries no titles or
dates, so ``title`` holds the sample's iconographic theme and ``displaydate`` is empty.
"""
from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(src: Path = ROOT.parent / "shared" / "nga_sample", dst: Path = ROOT / "data" / "sample") -> None:
    meta = list(csv.DictReader(open(src / "metadata.csv", newline="", encoding="utf-8")))
    pub_header = next(csv.reader(open(src / "published_images_sample.csv", newline="", encoding="utf-8")))
    obj_header = next(csv.reader(open(src / "objects_sample.csv", newline="", encoding="utf-8")))
    (dst / "images").mkdir(parents=True, exist_ok=True)
    pubs, objs = [], []
    for row in meta:
        oid, uuid = row["objectid"], row["uuid"]
        shutil.copyfile(src / row["file"], dst / "images" / f"{oid}.jpg")
        pub = dict.fromkeys(pub_header, "")
        pub.update(uuid=uuid, iiifurl=f"https://api.nga.gov/iiif/{uuid}", iiifthumburl=row["iiifthumburl"],
                   viewtype="primary", sequence="0", width=row["width"], height=row["height"],
                   depictstmsobjectid=oid)
        pubs.append(pub)
        obj = dict.fromkeys(obj_header, "")
        artist = row["artist"]
        obj.update(objectid=oid, accessioned="1", title=row["theme"] or "Untitled", attribution=artist,
                   attributioninverted=artist, classification="Painting",
                   visualbrowserclassification="painting", isvirtual="0")
        objs.append(obj)
    for name, header, rows in (("published_images.csv", pub_header, pubs), ("objects.csv", obj_header, objs)):
        with open(dst / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, quoting=csv.QUOTE_MINIMAL)
            writer.writeheader()
            writer.writerows(rows)
    shutil.copyfile(src / "metadata.csv", dst / "metadata.csv")
    print(f"wrote {len(meta)} paintings to {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
