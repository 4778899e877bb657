"""Decode and validate images with bounded decompression.

Every stage that opens an image goes through here, so one limit guards against decompression
bombs everywhere: an image whose header claims more than ``MAX_PIXELS`` pixels is refused before
its pixels are decoded. Truncated files are errors, never silently padded.
"""
from __future__ import annotations

import io
import os
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


def _check_and_load(img: Image.Image, source: str, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{source}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(f"{source}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{source}: truncated or corrupt image data ({exc})") from exc
    return img


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data`` fully into a PIL image, or raise :class:`ImageDecodeError` saying why."""
    if not data:
        raise ImageDecodeError(f"{source}: empty body")
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
        raise ImageDecodeError(f"{source}: got HTML/XML/JSON instead of an image")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{source}: not a recognised image ({exc})") from exc
    return _check_and_load(img, source, max_pixels)


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
