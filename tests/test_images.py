"""Bounded, whole-file image checks shared by every stage."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from paintsim.images import ImageDecodeError, decode_image, verify_image
from helpers import SAMPLE_DIR


def _jpeg(size=(384, 512)) -> bytes:
    img = Image.open(SAMPLE_DIR / "images" / "5.jpg").convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_verify_image_reports_the_full_size_of_a_whole_jpeg():
    info = verify_image(_jpeg())
    assert (info.format, info.width, info.height) == ("JPEG", 384, 512)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_verify_image_rejects_a_truncated_jpeg_like_a_full_decode(keep):
    data = _jpeg()
    cut = data[: int(len(data) * keep)]
    with pytest.raises(ImageDecodeError, match="truncated"):
        verify_image(cut)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(cut)


def test_verify_image_rejects_html_and_oversized_images():
    with pytest.raises(ImageDecodeError, match="HTML"):
        verify_image(b"<!DOCTYPE html><html><body>503</body></html>")
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        verify_image(_jpeg(), max_pixels=384 * 512 - 1)


def test_verify_image_decodes_other_formats_in_full():
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), "red").save(buf, "PNG")
    info = verify_image(buf.getvalue())
    assert (info.format, info.width, info.height) == ("PNG", 30, 20)
    with pytest.raises(ImageDecodeError):
        verify_image(buf.getvalue()[:-30])
