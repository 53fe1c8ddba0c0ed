"""Uploads built to hurt: every kind is refused from its header with a status and the field named,
before a pixel is decoded (and never with a 500)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app.api.errors import ApiError
from serve_app.config import RequestLimits
from serve_app.service.encoding import decode_init_image

LIMITS = RequestLimits(min_size=64, max_width=256, max_height=256, max_pixels=65536, max_upload_pixels=1024 * 1024)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and that holds no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def encoded(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def refused(data: bytes, media_type: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_init_image(data, LIMITS, None, None, "init_image", media_type)
    assert info.value.field == "init_image"
    return info.value


@pytest.mark.parametrize("side", [1100, 20000, 60000])
def test_a_header_claiming_too_many_pixels_is_413_whatever_pil_thinks_of_it(side):
    # 20000 and 60000 are past PIL's own decompression-bomb bound: it refuses them in Image.open.
    error = refused(png_header_only(side, side))
    assert error.status == 413 and error.code == "payload_too_large" and "1048576" in error.message


def test_truncated_files_are_422():
    whole = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    error = refused(whole[: len(whole) // 2])
    assert error.status == 422 and "truncated" in error.message


def test_animations_are_refused_by_frame_count():
    frames = [Image.new("RGB", (64, 64), (i * 80, 0, 0)) for i in range(3)]
    for fmt in ("PNG", "WEBP"):
        data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:])
        error = refused(data)
        assert error.status == 422 and "3 frames" in error.message


def test_more_bits_per_channel_than_8_are_refused():
    deep = Image.fromarray(np.full((64, 64), 40000, np.uint16))
    error = refused(encoded(deep, "PNG"))
    assert error.status == 422 and "mode" in error.message


def test_a_file_that_is_not_what_its_content_type_says_is_refused():
    jpeg = encoded(Image.new("RGB", (64, 64)), "JPEG")
    error = refused(jpeg, "image/png")
    assert error.status == 422 and "image/png" in error.message and "JPEG" in error.message
    decode_init_image(jpeg, LIMITS, None, None, "init_image", "image/jpeg")  # what it says: fine
    decode_init_image(jpeg, LIMITS, None, None, "init_image", "application/octet-stream")  # says nothing


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"not an image at all", "is not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "is not an image"),
        (encoded(Image.new("RGB", (64, 64)), "GIF"), "format GIF"),
        (encoded(Image.new("RGB", (64, 64)), "BMP"), "format BMP"),
    ],
)
def test_other_formats_and_garbage_are_422_naming_the_field(data, says):
    error = refused(data)
    assert error.status == 422 and says in error.message


def test_an_ordinary_image_still_passes_with_alpha_and_palette():
    for mode in ("RGBA", "P", "L"):
        pixels = decode_init_image(encoded(Image.new(mode, (80, 64)), "PNG"), LIMITS, None, None)
        assert pixels.shape == (64, 80, 3) and pixels.dtype == np.uint8
