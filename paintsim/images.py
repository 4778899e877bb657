"""Decode and validate images with bounded decompression.

Every stage that opens an image goes through here, so one limit guards against decompression
bombs everywhere: an image whose header claims more than ``MAX_PIXELS`` pixels is refused before
its pixels are decoded. Truncated files are errors, never silently padded.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

#: Largest image (in pixels) any stage will decode. NGA's IIIF server scales on its side, so a
#: downloaded painting is at most a few megapixels; 64 MP leaves room for users' own scans.
MAX_PIXELS = 64_000_000

# Never decode truncated data as if it were whole; make PIL's own bomb check match ours.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif")


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (with the reason)."""


def _check_size(img: Image.Image, source: str, max_pixels: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{source}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(f"{source}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")


def _load(img: Image.Image, source: str) -> Image.Image:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{source}: truncated or corrupt image data ({exc})") from exc
    return img


def _check_and_load(img: Image.Image, source: str, max_pixels: int) -> Image.Image:
    _check_size(img, source, max_pixels)
    return _load(img, source)


def _open_bytes(data: bytes, source: str) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{source}: empty body")
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
        raise ImageDecodeError(f"{source}: got HTML/XML/JSON instead of an image")
    try:
        return Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{source}: not a recognised image ({exc})") from exc


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data`` fully into a PIL image, or raise :class:`ImageDecodeError` saying why."""
    return _check_and_load(_open_bytes(data, source), source, max_pixels)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def verify_image(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Prove ``data`` is a whole image, without paying for a full-size decode of a JPEG.

    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling): every entropy-coded block is still
    read, so a truncated or cut-short file fails exactly as a full decode would, at about half the
    CPU. Other formats are decoded in full. The size reported is the image's own.
    """
    img = _open_bytes(data, source)
    _check_size(img, source, max_pixels)
    info = ImageInfo(img.format or "", *img.size)
    if info.format == "JPEG":
        img.draft(img.mode, ((info.width + 7) // 8, (info.height + 7) // 8))
    _load(img, source)
    return info


def open_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, bounded; raise :class:`ImageDecodeError` on failure."""
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{path}: file not found") from exc
    except (Image.UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{path}: not a recognised image ({exc})") from exc
    return _check_and_load(img, str(path), max_pixels)


def load_rgb(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB (paintings may be greyscale, CMYK or palette images)."""
    img = open_image(path, max_pixels)
    return img if img.mode == "RGB" else img.convert("RGB")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
