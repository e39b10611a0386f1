"""Tests for utils.validation: header sniffing and limits, file names, video files."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image

from utils.errors import EngineError, InputTooLargeError, InvalidInputError, UnsupportedFormatError
from utils.validation import (
    ALLOWED_IMAGE_FORMATS,
    ImageHeader,
    check_image_header,
    format_megapixels,
    sanitize_filename,
    validate_video_file,
)

DATA = Path(__file__).parent / "data" / "images"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int, *, with_iend: bool) -> bytes:
    """A PNG signature and a valid IHDR (with CRC) and no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    return data + _png_chunk(b"IEND", b"") if with_iend else data


def _encode(fmt: str, size=(6, 4), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "red").save(buffer, fmt)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- exception tree
def test_refusals_are_the_domain_exceptions_and_value_errors():
    """validation raises the app's own exceptions (no tree of its own to translate), still ValueErrors."""
    for cls in (UnsupportedFormatError, InputTooLargeError):
        assert issubclass(cls, InvalidInputError)
    assert issubclass(InvalidInputError, EngineError) and issubclass(InvalidInputError, ValueError)


# -------------------------------------------------------------------------------------------------- image headers
@pytest.mark.parametrize("fmt, expected", [("PNG", "PNG"), ("JPEG", "JPEG"), ("WEBP", "WEBP"), ("TIFF", "TIFF"),
                                           ("BMP", "BMP")])
def test_header_of_each_allowed_format(fmt, expected):
    header = check_image_header(_encode(fmt), max_pixels=100)
    assert header == ImageHeader(format=expected, width=6, height=4, mode="RGB", n_frames=1)
    assert expected in ALLOWED_IMAGE_FORMATS


def test_header_from_path_and_file_object(tmp_path):
    path = tmp_path / "picture.jpg"  # a PNG with a JPEG name: the content decides
    path.write_bytes(_encode("PNG"))
    assert check_image_header(path, max_pixels=100).format == "PNG"
    assert check_image_header(str(path), max_pixels=100).format == "PNG"

    stream = io.BytesIO(b"junk" + _encode("PNG"))
    stream.seek(4)
    assert check_image_header(stream, max_pixels=100).width == 6
    assert stream.tell() == 4  # position restored for the caller


@pytest.mark.parametrize("with_iend", [True, False])
def test_huge_png_header_is_refused_without_allocating(with_iend):
    data = _png_header_only(50000, 50000, with_iend=with_iend)
    tracemalloc.start()
    try:
        with pytest.raises(InputTooLargeError) as info:
            check_image_header(data, max_pixels=40_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # 2500 MP of RGB would be 7.5 GB
    message = str(info.value)
    assert "50000×50000 = 2500 MP" in message
    assert "40 MP" in message and "REALESRGAN_MAX_INPUT_PIXELS" in message
    assert info.value.actual == 2_500_000_000 and info.value.limit == 40_000_000


def test_huge_header_of_other_format_names_its_size():
    # A BMP header claiming 30000x30000 (only 54 bytes): over PIL's own bomb limit, still reported with its size.
    bmp = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 30000, 30000, 1, 24, 0,
                                                                      0, 2835, 2835, 0, 0)
    with pytest.raises(InputTooLargeError, match="30000×30000 = 900 MP"):
        check_image_header(bmp, max_pixels=40_000_000)


def test_pixels_at_limit_pass_and_one_over_fails():
    data = _encode("PNG", size=(10, 10))
    assert check_image_header(data, max_pixels=100).pixels == 100
    with pytest.raises(InputTooLargeError):
        check_image_header(data, max_pixels=99)


def test_bytes_limit(tmp_path):
    data = _encode("PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with pytest.raises(InputTooLargeError, match="REALESRGAN_MAX_UPLOAD_MB"):
        check_image_header(path, max_pixels=100, max_bytes=len(data) - 1)
    assert check_image_header(path, max_pixels=100, max_bytes=len(data)).format == "PNG"


@pytest.mark.parametrize("payload, named", [
    (_encode("GIF"), "GIF"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    (b"just some text, not an image at all", None),
])
def test_not_allowed_formats_are_refused_naming_the_allowed_ones(payload, named):
    with pytest.raises(UnsupportedFormatError) as info:
        check_image_header(payload, max_pixels=10**6)
    message = str(info.value)
    assert "PNG, JPEG, WebP, TIFF or BMP" in message
    if named:
        assert named in message


def test_gif_with_image_extension_is_still_refused(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(_encode("GIF"))
    with pytest.raises(UnsupportedFormatError, match="GIF"):
        check_image_header(path, max_pixels=10**6)


def test_corrupt_and_empty_files():
    with pytest.raises(InvalidInputError, match="could not be decoded; it may be damaged or not an image") as info:
        check_image_header(_encode("PNG")[:20], max_pixels=100)  # cut inside the IHDR
    assert type(info.value) is InvalidInputError  # damaged, not "unsupported"
    with pytest.raises(InvalidInputError, match="empty") as info:
        check_image_header(b"", max_pixels=100)
    assert type(info.value) is InvalidInputError


def test_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        check_image_header(tmp_path / "nope.png", max_pixels=100)
    with pytest.raises(InvalidInputError, match="Not a regular file"):
        check_image_header(tmp_path, max_pixels=100)


def test_header_reports_frames_of_multi_page_tiff():
    buffer = io.BytesIO()
    first = Image.new("RGB", (5, 5))
    first.save(buffer, "TIFF", save_all=True, append_images=[Image.new("RGB", (5, 5))] * 2)
    assert check_image_header(buffer.getvalue(), max_pixels=100).n_frames == 3


def test_real_sample_headers():
    assert check_image_header(DATA / "tree_alpha_16bit_crop.png", max_pixels=10**6) == ImageHeader(
        "PNG", 48, 40, "RGBA", 1)


def test_format_megapixels():
    assert format_megapixels(2_500_000_000) == "2500 MP"
    assert format_megapixels(12_345_678) == "12.3 MP"
    assert format_megapixels(40_000_000) == "40 MP"
    assert format_megapixels(40_000) == "0.04 MP"


# ------------------------------------------------------------------------------------------------------ file names
@pytest.mark.parametrize("raw, expected", [
    ("photo.png", "photo.png"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\system.ini", "system.ini"),
    ("/abs/path/img.JPG", "img.jpg"),
    ("a\x00b\nc\x1f.png", "abc.png"),
    ("evil\u202egnp.exe", "evilgnp.exe"),  # right-to-left override removed
    ('what?<>:"|*.png', "what_______.png"),
    ("..", "image"),
    ("...png", "png"),
    (".hidden.png", "hidden.png"),
    ("", "image"),
    ("   ", "image"),
    ("trailing. . ", "trailing"),
    ("CON.png", "_CON.png"),
    ("photo.tar.gz", "photo.tar.gz"),
    ("name.with spaces", "name.with spaces"),
])
def test_sanitize_filename(raw, expected):
    assert sanitize_filename(raw) == expected


def test_sanitize_filename_caps_length_keeping_the_extension():
    out = sanitize_filename("x" * 500 + ".webp")
    assert len(out) == 200 and out.endswith(".webp")
    wide = sanitize_filename("\u6f22" * 199 + ".png")  # 3 UTF-8 bytes a character
    assert wide.endswith(".png") and len(wide.encode("utf-8")) <= 255


def test_sanitize_filename_result_is_always_a_single_safe_name():
    for raw in ["a/b/c", "../", "\\\\server\\share\\x.png", "C:\\x.png", "\x7f", "./.", "nul"]:
        out = sanitize_filename(raw)
        assert out and "/" not in out and "\\" not in out and not out.startswith(".")
        assert all(ord(ch) >= 32 and ord(ch) != 127 for ch in out)


def test_sanitize_filename_refuses_non_text():
    with pytest.raises(InvalidInputError):
        sanitize_filename(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- video
def test_validate_video_file(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 2048)
    assert validate_video_file(video, max_bytes=2048) == video
    with pytest.raises(InputTooLargeError, match="REALESRGAN_MAX_VIDEO_MB"):
        validate_video_file(video, max_bytes=2047)
    with pytest.raises(InvalidInputError, match="not found"):
        validate_video_file(tmp_path / "missing.mp4", max_bytes=10)
    with pytest.raises(InvalidInputError, match="Not a regular file"):
        validate_video_file(tmp_path, max_bytes=10)
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(InvalidInputError, match="empty"):
        validate_video_file(empty, max_bytes=10)
