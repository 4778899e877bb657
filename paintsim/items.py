"""Which images a stage reads (the manifest's ok rows, confined to the data dir, or a folder), and
their bounded decoding in DataLoader workers, where a bad image is a reason, never an exception."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .artifacts import DataPaths
from .embedder import Preprocessing
from .errors import UserError
from .images import ImageDecodeError, decode_rgb, is_image_file, list_folder, read_file
from .manifest import read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    name: str        # the file name, unique in one run; goes into image_names.npy
    file: str        # as reported in features_errors.csv (manifest's relative path, or the file name)
    path: Path
    size: int        # -1 when the file is missing
    mtime_ns: int


def _stat_item(name: str, file: str, path: Path) -> Item:
    try:
        st = path.stat()
        return Item(name, file, path, int(st.st_size), int(st.st_mtime_ns))
    except OSError:
        return Item(name, file, path, -1, 0)


def items_from_manifest(paths: DataPaths) -> list[Item]:
    """The manifest's rows with status ok, in manifest order; paths confined to the data dir."""
    df = read_manifest(paths.manifest)
    items: list[Item] = []
    seen: set[str] = set()
    for row_no, (file, status) in enumerate(zip(df["file"], df["status"]), start=2):
        if status != "ok":
            continue
        rel = Path(file)
        # a path of the data dir by its words; a symbolic link in it is judged when it is read
        if not file or rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise UserError(f"{paths.manifest} line {row_no}: file {file!r} is not a path inside {paths.root}")
        name = rel.name
        if name in seen:
            log.warning("%s line %d: %s listed twice; using the first row", paths.manifest, row_no, name)
            continue
        seen.add(name)
        items.append(_stat_item(name, file, paths.root / rel))
    return items


def items_from_dir(images_dir: str | os.PathLike[str]) -> list[Item]:
    """Every regular, non-hidden file of ``images_dir`` (not recursive), sorted by name."""
    try:
        return [_stat_item(p.name, p.name, p) for p in list_folder(images_dir)]
    except NotADirectoryError as exc:
        raise UserError(f"--images-dir {exc}") from None


class ImageDataset:
    """Decode (bounded) and preprocess one item; failures come back as a reason, not an exception."""

    def __init__(self, items: Sequence[Item], preprocessing: Preprocessing, faces: dict | None = None,
                 margin: float = 0.3):
        self.items = list(items)
        self.preprocessing = preprocessing
        self.faces, self.margin = faces, margin   # --crop faces: each image's faces (faces.csv)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            if item.size < 0:
                raise ImageDecodeError(f"{item.file}: file not found")
            if not is_image_file(item.path):
                raise ImageDecodeError(f"{item.file}: not an image file name (suffix {item.path.suffix!r})")
            data = read_file(item.path)
            if not data:
                raise ImageDecodeError(f"{item.file}: empty file")
            img = decode_rgb(data, str(item.path))
            if self.faces is not None and self.faces.get(item.name):
                from .faces import faces_box  # the box around all its faces; the whole painting without

                box = faces_box(self.faces[item.name], self.margin, img.size)
                if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:  # a box outside the image: the whole painting
                    img = img.crop(box)
            return i, self.preprocessing(img), ""
        except ImageDecodeError as exc:
            return i, None, str(exc).replace(str(item.path), item.file)
        except Exception as exc:  # noqa: BLE001 - one bad image never stops a run
            return i, None, f"{item.file}: {type(exc).__name__}: {exc}"


def collate(samples):
    import torch

    ok = [(i, x) for i, x, _ in samples if x is not None]
    errors = [(i, e) for i, x, e in samples if x is None]
    idx = [i for i, _ in ok]
    batch = torch.stack([x for _, x in ok]) if ok else None
    return idx, batch, errors

