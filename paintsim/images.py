"""Read, decode and normalise images, bounded: the one way any stage opens an image.

* Files: only regular files are opened (never a device, a FIFO or a socket), at most
  ``MAX_FILE_BYTES``, and a symbolic link is followed only to a file inside the folder tree it
  sits in, so ``images/x.jpg -> /dev/zero`` or a link out of the data dir is refused.
* Decoding: an image whose header claims more than ``MAX_PIXELS`` pixels, or a shape more
  elongated than ``MAX_ASPECT_RATIO`` (resizing its short side to a model's input would ask for
  gigabytes), is refused before its pixels are decoded. Truncated files are errors, never padded.
* Pixels: :func:`to_rgb` applies the EXIF orientation and scales 16-bit, 32-bit and float images
  to 8 bits instead of clipping them to white or black.
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

#: Largest image (in pixels) any stage will decode. NGA's IIIF server scales on its side, so a
#: downloaded painting is at most a few megapixels; 64 MP leaves room for users' own scans.
MAX_PIXELS = 64_000_000
#: Most elongated image any stage accepts (long side / short side). Handscrolls reach about 30:1.
MAX_ASPECT_RATIO = 50
#: Largest image file any stage reads (a 64 MP TIFF of 16-bit RGB is 384 MB; the rest far less).
MAX_FILE_BYTES = 512 * 2**20

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
    check_aspect(w, h, source)


def check_aspect(w: int, h: int, source: str) -> None:
    """Refuse a shape more elongated than ``MAX_ASPECT_RATIO``: resizing its short side to a
    model's input would need far more memory than the file."""
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageDecodeError(f"{source}: {w}x{h} is more elongated than {MAX_ASPECT_RATIO}:1 (resizing "
                               "it for a model would need far more memory than the file)")


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
    width: int     # as displayed: after the EXIF orientation
    height: int


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1


def verify_image(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Prove ``data`` is a whole image, without paying for a full-size decode of a JPEG.

    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling): every entropy-coded block is still
    read, so a truncated or cut-short file fails exactly as a full decode would, at about half the
    CPU. Other formats are decoded in full. The size reported is the image's own, turned by its
    EXIF orientation.
    """
    img = _open_bytes(data, source)
    _check_size(img, source, max_pixels)
    w, h = img.size
    if _orientation(img) in (5, 6, 7, 8):
        w, h = h, w
    info = ImageInfo(img.format or "", w, h)
    if info.format == "JPEG":
        img.draft(img.mode, ((img.size[0] + 7) // 8, (img.size[1] + 7) // 8))
    _load(img, source)
    return info


def read_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES,
              within: str | os.PathLike[str] | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, or :class:`ImageDecodeError` saying why.

    ``within``: the folder a symbolic link may lead into (default: the file's own folder).
    A FIFO is opened without blocking, then refused; a device is refused, never read.
    """
    path = Path(path)
    root = Path(within if within is not None else path.parent).resolve()
    real = path.resolve()
    if path.is_symlink() and root not in real.parents:
        raise ImageDecodeError(f"{path}: a symbolic link to {real}, outside {root}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(f"{path}: not a regular file (a device, FIFO, socket or folder)")
        if st.st_size > max_bytes:
            raise ImageDecodeError(f"{path}: {st.st_size} bytes exceeds the {max_bytes}-byte limit")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{path}: more than the {max_bytes}-byte limit")
    return data


def open_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS,
               within: str | os.PathLike[str] | None = None) -> Image.Image:
    """Read (see :func:`read_file`) and fully decode an image file, bounded."""
    return decode_image(read_file(path, within=within), str(path), max_pixels)


#: A float image whose largest sample is at most this is in fractions of white: highlights a
#: little over 1 (from a colour transform or an HDR export) are clipped, not read as 0..255.
FLOAT_FRACTION_MAX = 2.0


def _to_8bit(arr: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Samples to 0..255. ``bits`` when the mode says it (16); otherwise floats up to
    ``FLOAT_FRACTION_MAX`` are fractions, and integers are 8-, 16- or 32-bit by their largest value."""
    x = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(x.max()) if x.size else 0.0
    if bits is None:
        bits = 0 if arr.dtype.kind == "f" and top <= FLOAT_FRACTION_MAX else 8 if top <= 255 else 16 if top <= 65535 else 31
    scale = 255.0 if bits == 0 else 255.0 / (2**bits - 1)
    return np.clip(x * scale, 0, 255).round().astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` upright (EXIF orientation applied) as 8-bit RGB, high-bit-depth samples scaled."""
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode == "F" or img.mode.startswith("I"):
        img = Image.fromarray(_to_8bit(np.asarray(img), 16 if img.mode.startswith("I;16") else None), "L")
    return img.convert("RGB")


def decode_rgb(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """:func:`decode_image`, then :func:`to_rgb`."""
    return to_rgb(decode_image(data, source, max_pixels))


def load_rgb(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS,
             within: str | os.PathLike[str] | None = None) -> Image.Image:
    """Open an image file as upright 8-bit RGB (paintings may be greyscale, CMYK, 16-bit or palette)."""
    return to_rgb(open_image(path, max_pixels, within))


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_folder(folder: str | os.PathLike[str]) -> list[Path]:
    """Every non-hidden file (or link) directly in ``folder``, sorted by name: the images of a
    collection embedded with ``extract_features.py --images-dir`` (non-images are listed too, and
    reported as unreadable by whoever reads them)."""
    d = Path(folder)
    if not d.is_dir():
        raise NotADirectoryError(f"{d}: not a directory")
    return [p for p in sorted(d.iterdir(), key=lambda p: p.name)
            if not p.name.startswith(".") and (p.is_file() or p.is_symlink())]
