"""Seeded, mild perturbations of a painting image: the "same painting, different photograph" test.

A good embedding maps a painting and a slightly different reproduction of it (another crop, a
tilted camera, other white balance, a softer lens, another JPEG encoder) to nearby points. These
functions make such copies reproducibly from a ``numpy.random.Generator``, so tests and the
evaluation stage (perturbed-copy recovery) measure the same thing.

Strengths (all drawn uniformly from the stated ranges with the given generator):

==========  =================================================================================
``crop``    keep 85 % of the width and 85 % of the height, at a random offset
``rotate``  rotate by +-1..2.5 degrees (bicubic), then crop the largest centred box free of the
            blank corners, so no fill colour leaks in
``jitter``  brightness, contrast and saturation each scaled by a factor in [0.9, 1.1]
``blur``    Gaussian blur with radius 0.5..1.0 % of the longer side (1-2 px on a 200 px thumb)
``jpeg``    re-encode as JPEG at quality 60..85
``combo``   crop, rotate, jitter and jpeg in that order (a second photograph's usual differences)
==========  =================================================================================

The strengths are those of a second photograph of the same painting, not data augmentation: at
200 px, MobileNetV2 already finds four panels of one Simone Martini polyptych in the sample within
cosine 0.85 of each other, and stronger settings (+-3..6 degrees, JPEG 40..70) swap such panels.

A kind may also be a ``+``-joined list applied left to right, e.g. ``"crop+blur"``.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

#: The single perturbations, plus ``combo``; any ``+``-joined sequence of these is also accepted.
PERTURBATIONS = ("crop", "rotate", "jitter", "blur", "jpeg", "combo")

#: What ``combo`` applies, in order.
COMBO = ("crop", "rotate", "jitter", "jpeg")

CROP_FRACTION = 0.85
ROTATE_DEGREES = (1.0, 2.5)
JITTER_RANGE = (0.9, 1.1)
BLUR_RADIUS_FRACTION = (0.005, 0.010)
JPEG_QUALITY = (60, 85)


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def crop(img: Image.Image, rng: np.random.Generator, fraction: float = CROP_FRACTION) -> Image.Image:
    """Keep ``fraction`` of each side at a random offset."""
    w, h = img.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _rotated_inner_size(w: int, h: int, angle_rad: float) -> tuple[int, int]:
    """Largest axis-aligned rectangle inside a ``w x h`` rectangle rotated by ``angle_rad``."""
    if w <= 0 or h <= 0:
        return 0, 0
    long_side, short_side = (w, h) if w >= h else (h, w)
    sin_a, cos_a = abs(math.sin(angle_rad)), abs(math.cos(angle_rad))
    if short_side <= 2.0 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        x = 0.5 * short_side
        wr, hr = (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
    else:
        cos_2a = cos_a * cos_a - sin_a * sin_a
        wr, hr = (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a
    return max(1, int(wr)), max(1, int(hr))


def rotate(img: Image.Image, rng: np.random.Generator,
           degrees: tuple[float, float] = ROTATE_DEGREES) -> Image.Image:
    """Rotate by a random small angle (either direction) and crop away the blank corners."""
    angle = float(rng.uniform(*degrees)) * (1 if rng.random() < 0.5 else -1)
    w, h = img.size
    rotated = _rgb(img).rotate(angle, resample=Image.BICUBIC, expand=False)
    iw, ih = _rotated_inner_size(w, h, math.radians(angle))
    iw, ih = min(iw, w), min(ih, h)
    x0, y0 = (w - iw) // 2, (h - ih) // 2
    return rotated.crop((x0, y0, x0 + iw, y0 + ih))


def jitter(img: Image.Image, rng: np.random.Generator,
           strength: tuple[float, float] = JITTER_RANGE) -> Image.Image:
    """Scale brightness, contrast and saturation by random factors near 1."""
    out = _rgb(img)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(*strength)))
    return out


def blur(img: Image.Image, rng: np.random.Generator,
         radius_fraction: tuple[float, float] = BLUR_RADIUS_FRACTION) -> Image.Image:
    """Gaussian blur whose radius scales with the image size."""
    radius = float(rng.uniform(*radius_fraction)) * max(img.size)
    return _rgb(img).filter(ImageFilter.GaussianBlur(radius=radius))


def jpeg(img: Image.Image, rng: np.random.Generator,
         quality: tuple[int, int] = JPEG_QUALITY) -> Image.Image:
    """Re-encode as a JPEG of random (low-ish) quality and decode it again."""
    buf = io.BytesIO()
    _rgb(img).save(buf, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


_SINGLE: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": crop, "rotate": rotate, "jitter": jitter, "blur": blur, "jpeg": jpeg,
}


def parse_kind(kind: str) -> tuple[str, ...]:
    """Expand a kind (``combo``, ``crop``, ``crop+blur`` ...) into the single steps it applies."""
    steps: list[str] = []
    for part in (p.strip() for p in kind.split("+")):
        if part == "combo":
            steps.extend(COMBO)
        elif part in _SINGLE:
            steps.append(part)
        else:
            raise ValueError(f"unknown perturbation {part!r}; choose from {', '.join(PERTURBATIONS)} "
                             "or join several with '+'")
    return tuple(steps)


def perturb(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """Return a perturbed RGB copy of ``img``; the same ``rng`` state gives the same copy."""
    out = _rgb(img).copy()
    for step in parse_kind(kind):
        out = _SINGLE[step](out, rng)
    return _rgb(out)
