"""IIIF Image API 2.1 URLs for NGA's published images, and the checks that keep CSV fields safe.

NGA serves every published image through IIIF: ``{iiifurl}/full/!S,S/0/default.jpg`` asks for the
whole image scaled to fit an S x S box. A row may carry ``maxpixels`` (the largest dimension NGA
will serve for that image, e.g. 640 for images that are not open access): we never ask beyond it,
nor beyond the image's own size (IIIF 2.1 servers may upscale, which only wastes bandwidth).
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_OBJECTID_RE = re.compile(r"^[0-9]{1,12}$")


class BadRowError(ValueError):
    """A table row that cannot be used safely (bad uuid, bad URL, ...); the message says why."""


def check_uuid(value: str) -> str:
    """Return the canonical (lower-case) uuid, or raise :class:`BadRowError`.

    The uuid becomes a file name (``images/<uuid>.jpg``), so only the canonical 8-4-4-4-12 hex form
    is accepted: no braces, no ``urn:`` prefix, nothing that could hold a path separator.
    """
    text = str(value).strip()
    if not UUID_RE.match(text):
        raise BadRowError(f"uuid {value!r} is not a UUID")
    return text.lower()


def check_objectid(value: str) -> str:
    """Return the object id if it is a plain non-negative integer, else raise :class:`BadRowError`."""
    text = str(value).strip()
    if not _OBJECTID_RE.match(text):
        raise BadRowError(f"objectid {value!r} is not a number")
    return str(int(text))


def check_image_url(value: str) -> str:
    """Return ``value`` if it is an absolute http(s) URL with a host and no spaces or control
    characters (a direct image link may carry a query, unlike a IIIF base)."""
    text = str(value).strip()
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise BadRowError(f"URL {value!r} is malformed ({exc})") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise BadRowError(f"URL {value!r} is not an http(s) URL")
    if any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise BadRowError(f"URL {value!r} holds spaces or control characters")
    return text


def check_http_url(value: str) -> str:
    """Return a IIIF base: :func:`check_image_url` without a query or fragment, no trailing slash."""
    text = check_image_url(value)
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise BadRowError(f"URL {value!r} is not a plain IIIF base URL")
    return text.rstrip("/")


def _positive_int(value) -> int | None:
    try:
        number = int(float(str(value).strip()))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def request_size(size: int, maxpixels=None, width=None, height=None) -> int:
    """The box edge to ask for: ``size``, capped by the row's ``maxpixels`` and the image's own size."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    edge = size
    cap = _positive_int(maxpixels)
    if cap is not None:
        edge = min(edge, cap)
    w, h = _positive_int(width), _positive_int(height)
    if w is not None and h is not None:
        edge = min(edge, max(w, h))
    return edge


def image_url(iiifurl: str, size: int = 512, maxpixels=None, width=None, height=None) -> str:
    """``{iiifurl}/full/!S,S/0/default.jpg`` (IIIF Image API 2.1), S capped as in :func:`request_size`."""
    base = check_http_url(iiifurl)
    edge = request_size(size, maxpixels, width, height)
    return f"{base}/full/!{edge},{edge}/0/default.jpg"
