"""Tests for utils.image_io: decoding to HxWxC with depth/alpha/metadata, encoding, atomic saving, format choice."""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from utils.image_io import (
    EncodedImage,
    LoadedImage,
    apply_orientation,
    choose_output_format,
    encode_image,
    load_image,
    save_image,
    to_8bit,
)
from utils.errors import InputTooLargeError, InvalidInputError, InvalidSettingsError, UnsupportedFormatError

DATA = Path(__file__).parent / "data" / "images"
TREE_16BIT = DATA / "tree_alpha_16bit_crop.png"  # 48x40 RGBA, 16 bits, soft alpha edges
CHILDREN_RGBA = DATA / "children_alpha_crop.png"  # 48x40 RGBA, 8 bits, soft alpha edges
ORIENTATION = 0x0112


def _rng_pixels(shape, dtype, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


@functools.cache
def _srgb_icc() -> bytes:
    """One sRGB profile for the whole run: lcms stamps each profile it makes with the time, so two made a second
    apart differ (a comparison of a written profile with a new one failed when a second boundary fell between)."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif(orientation: int, make: str = "TestCam") -> bytes:
    exif = Image.Exif()
    exif[0x010F] = make
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _parse_exif(data: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.load(data)
    return exif


# ------------------------------------------------------------------------------------------- lossless round trips
LOSSLESS_CASES = [
    ((9, 7), np.uint8, "L"),
    ((9, 7, 2), np.uint8, "LA"),
    ((9, 7, 3), np.uint8, "RGB"),
    ((9, 7, 4), np.uint8, "RGBA"),
    ((9, 7), np.uint16, "L"),
    ((9, 7, 2), np.uint16, "LA"),
    ((9, 7, 3), np.uint16, "RGB"),
    ((9, 7, 4), np.uint16, "RGBA"),
]


@pytest.mark.parametrize("shape, dtype, mode", LOSSLESS_CASES)
def test_png_round_trip_is_exact(shape, dtype, mode):
    pixels = _rng_pixels(shape, dtype)
    encoded = encode_image(pixels, "png")
    loaded = load_image(encoded.data)
    expected = pixels if pixels.ndim == 3 else pixels[..., None]
    assert loaded.pixels.dtype == dtype and loaded.mode == mode
    assert loaded.bit_depth == 8 * np.dtype(dtype).itemsize == encoded.bit_depth
    assert loaded.has_alpha == (mode in ("LA", "RGBA"))
    np.testing.assert_array_equal(loaded.pixels, expected)
    assert loaded.format == "PNG"


@pytest.mark.parametrize("shape, dtype, mode", [c for c in LOSSLESS_CASES if c[2] != "LA" or c[1] == np.uint8])
def test_tiff_round_trip_is_exact(shape, dtype, mode):
    pixels = _rng_pixels(shape, dtype, seed=1)
    loaded = load_image(encode_image(pixels, "tiff").data)
    assert loaded.mode == mode and loaded.pixels.dtype == dtype and loaded.format == "TIFF"
    np.testing.assert_array_equal(loaded.pixels, pixels if pixels.ndim == 3 else pixels[..., None])


def test_16bit_gray_alpha_tiff_is_written_as_rgba():
    pixels = _rng_pixels((5, 6, 2), np.uint16)
    loaded = load_image(encode_image(pixels, "tiff").data)
    assert loaded.mode == "RGBA" and loaded.bit_depth == 16
    for c in range(3):
        np.testing.assert_array_equal(loaded.pixels[..., c], pixels[..., 0])
    np.testing.assert_array_equal(loaded.pixels[..., 3], pixels[..., 1])


def test_16bit_rgba_sample_round_trips_through_png_and_tiff(tmp_path):
    original = cv2.cvtColor(cv2.imread(str(TREE_16BIT), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    loaded = load_image(TREE_16BIT)
    assert loaded.pixels.dtype == np.uint16 and loaded.mode == "RGBA" and loaded.source_name == TREE_16BIT.name
    np.testing.assert_array_equal(loaded.pixels, original)
    # the sample really uses 16 bits: values that 8 bits cannot hold, and partial alpha
    assert (loaded.pixels % 257 != 0).any()
    assert ((loaded.pixels[..., 3] > 0) & (loaded.pixels[..., 3] < 65535)).any()
    for fmt in ("png", "tiff"):
        saved = save_image(loaded.pixels, tmp_path / f"out.{fmt}")
        assert saved.bit_depth == 16 and not saved.reduced_to_8bit
        again = load_image(saved.path)
        np.testing.assert_array_equal(again.pixels, original)


def test_8bit_rgba_sample_round_trip(tmp_path):
    loaded = load_image(CHILDREN_RGBA)
    assert loaded.pixels.dtype == np.uint8 and loaded.mode == "RGBA" and loaded.pixels.shape == (40, 48, 4)
    np.testing.assert_array_equal(loaded.pixels, np.asarray(Image.open(CHILDREN_RGBA)))
    for fmt in ("png", "tiff"):
        again = load_image(save_image(loaded.pixels, tmp_path / f"out.{fmt}").path)
        np.testing.assert_array_equal(again.pixels, loaded.pixels)
    webp = load_image(encode_image(loaded.pixels, "webp", quality=90).data)
    assert webp.mode == "RGBA"
    assert np.abs(webp.pixels[..., 3].astype(int) - loaded.pixels[..., 3]).max() <= 2  # WebP alpha is lossless


def test_bit_depth_comes_from_the_file_not_the_values():
    dark16 = np.full((4, 4, 3), 200, np.uint16)  # every value < 256 but the file is 16-bit
    loaded = load_image(encode_image(dark16, "png").data)
    assert loaded.pixels.dtype == np.uint16 and loaded.bit_depth == 16
    bright8 = np.full((4, 4, 3), 255, np.uint8)
    assert load_image(encode_image(bright8, "png").data).pixels.dtype == np.uint8


@pytest.mark.parametrize("shape, dtype", [((1, 1), np.uint8), ((1, 1, 4), np.uint8), ((1, 1, 3), np.uint16)])
@pytest.mark.parametrize("fmt", ["png", "tiff", "jpg", "webp"])
def test_one_pixel_images(shape, dtype, fmt):
    pixels = np.full(shape, np.iinfo(dtype).max // 3, dtype)
    loaded = load_image(encode_image(pixels, fmt).data)
    assert loaded.pixels.shape[:2] == (1, 1)


# ----------------------------------------------------------------------------------------------- lossy formats
def _riff_chunks(data: bytes) -> dict[bytes, bytes]:
    chunks, at = {}, 12
    while at < len(data):
        size = int.from_bytes(data[at + 4:at + 8], "little")
        chunks[data[at:at + 4]] = data[at + 8:at + 8 + size]
        at += 8 + size + (size & 1)
    return chunks


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_webp_is_the_bitstream_pil_writes_with_less_memory(channels):
    """WebP goes through OpenCV's libwebp (straight to YUV, no ARGB copy): its VP8 and alpha chunks are those of PIL's
    encoder at the same quality and method, and its ICC and EXIF chunks PIL's too."""
    import cv2

    rng = np.random.default_rng(channels)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (96, 130, 4), dtype=np.uint8), (0, 0), 2)
    pixels = smooth[..., :channels] if channels != 2 else smooth[..., [0, 3]]
    icc, exif = _srgb_icc(), _exif(1, "Kept")
    ours = _riff_chunks(encode_image(pixels, "webp", quality=90, icc_profile=icc, exif=exif).data)
    im = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    im = im.convert({1: "RGB", 2: "RGBA"}[channels]) if channels < 3 else im
    buffer = io.BytesIO()
    im.save(buffer, "WEBP", quality=90, method=4, icc_profile=icc, exif=exif)
    pil = _riff_chunks(buffer.getvalue())
    for kind in (b"VP8 ", b"ALPH", b"ICCP", b"EXIF"):
        assert ours.get(kind) == pil.get(kind), kind
    assert (b"ALPH" in ours) == (channels in (2, 4))


@pytest.mark.parametrize("fmt, channels", [("webp", 3), ("webp", 4), ("jpg", 3)])
def test_lent_pixels_are_encoded_in_place_and_given_back(fmt, channels):
    """``in_place`` (the engine's results): red and blue are swapped in the pixels for libwebp or libjpeg and back,
    instead of a BGR(A) copy: the same file, the pixels as they were, also when encoding fails, and no copy
    allocated."""
    import tracemalloc

    import cv2
    from utils import image_io

    rng = np.random.default_rng(channels)
    # 1200 rows: the swap goes in several bands; smooth, as an upscale is, so the encoded bytes (all that the lent
    # path allocates, twice: OpenCV's array and its bytes) stay a few per cent of the pixels, and what other threads
    # allocate meanwhile has megabytes of room
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (1200, 800, 4), dtype=np.uint8), (0, 0), 8)
    pixels = np.ascontiguousarray(smooth[..., :channels])
    before = pixels.copy()
    copied = encode_image(pixels, fmt, quality=90).data
    tracemalloc.start()
    try:
        lent = encode_image(pixels, fmt, quality=90, in_place=True).data
        lent_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        encode_image(pixels, fmt, quality=90)
        copy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lent == copied
    np.testing.assert_array_equal(pixels, before)
    assert copy_peak >= pixels.nbytes > 4 * lent_peak  # numpy's allocations: the copy, or the encoded bytes only
    with pytest.raises(RuntimeError):
        with image_io._red_blue_swapped(pixels) as swapped:
            assert swapped is pixels
            np.testing.assert_array_equal(pixels[..., 0], before[..., 2])
            np.testing.assert_array_equal(pixels[..., 2], before[..., 0])
            raise RuntimeError("the encoder failed")
    np.testing.assert_array_equal(pixels, before)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("quality", [95, 80])
def test_jpeg_is_the_file_pil_writes_without_its_copy(channels, quality):
    """JPEG goes through OpenCV's libjpeg-turbo row by row: byte for byte the file PIL writes (4:4:4 from quality 90,
    4:2:0 below, the same ICC and EXIF segments); transparent pixels are flattened onto white first."""
    import cv2

    rng = np.random.default_rng(channels)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (96, 130, 4), dtype=np.uint8), (0, 0), 2)
    pixels = smooth[..., :channels] if channels != 2 else smooth[..., [0, 3]]
    icc, exif = _srgb_icc(), _exif(1, "Kept")
    for meta in ({}, {"icc_profile": icc, "exif": exif}):
        ours = encode_image(pixels, "jpg", quality=quality, **meta)
        flat = load_image(encode_image(pixels, "png").data).pixels
        if channels in (2, 4):  # PIL's side of the comparison: the same flattening onto white
            flat = np.clip(np.rint(flat[..., :-1] * (flat[..., -1:] / 255.0) + 255 * (1 - flat[..., -1:] / 255.0)),
                           0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        if flat.shape[2] == 1:  # one component has no subsampling (PIL's option only marks its SOF 2x2)
            Image.fromarray(flat[..., 0]).save(buffer, "JPEG", quality=quality, **meta)
        else:
            Image.fromarray(flat).save(buffer, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **meta)
        assert ours.data == buffer.getvalue()
        assert ours.alpha_flattened == (channels in (2, 4))


def test_a_jpeg_icc_profile_too_large_for_one_segment_is_still_embedded():
    pixels = np.full((8, 8, 3), 100, np.uint8)
    icc = _srgb_icc() + bytes(70000)  # over one APP2 segment: PIL splits it, OpenCV cannot
    with Image.open(io.BytesIO(encode_image(pixels, "jpg", icc_profile=icc).data)) as im:
        assert im.info["icc_profile"] == icc


def test_jpeg_flattens_alpha_onto_white_and_says_so():
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 0] = 255  # red...
    pixels[:, :4, 3] = 0  # ...transparent on the left half, opaque on the right
    pixels[:, 4:, 3] = 255
    encoded = encode_image(pixels, "jpg", quality=100)
    assert encoded.alpha_flattened and encoded.warnings and "white" in encoded.warnings[0]
    decoded = load_image(encoded.data).pixels.astype(int)
    assert decoded.shape == (8, 8, 3)
    assert (np.abs(decoded[:, :3] - 255) <= 6).all()  # white where it was transparent
    assert (np.abs(decoded[:, 5:] - [255, 0, 0]) <= 6).all()  # red where opaque


def test_16bit_to_jpeg_and_webp_is_reduced_to_8bit_with_a_flag():
    pixels = np.full((6, 6, 3), 257 * 100, np.uint16)
    for fmt in ("jpg", "webp"):
        encoded = encode_image(pixels, fmt, quality=100)
        assert encoded.reduced_to_8bit and encoded.bit_depth == 8
        assert np.abs(load_image(encoded.data).pixels.astype(int) - 100).max() <= 2
    assert encode_image(pixels, "png", keep_16bit=False).bit_depth == 8
    assert not encode_image(pixels, "png").reduced_to_8bit


def test_to_8bit_rounds():
    values = np.array([0, 128, 129, 257, 65535], np.uint16)
    np.testing.assert_array_equal(to_8bit(values), [0, 0, 1, 1, 255])


def test_lossy_quality_changes_size_and_is_validated():
    pixels = _rng_pixels((32, 32, 3), np.uint8)
    assert len(encode_image(pixels, "jpg", quality=30).data) < len(encode_image(pixels, "jpg", quality=95).data)
    for bad in (0, 101, 9.5, True):
        with pytest.raises(InvalidSettingsError, match="quality"):
            encode_image(pixels, "jpg", quality=bad)


# ------------------------------------------------------------------------------------------------ orientation
def _asymmetric_image() -> np.ndarray:
    """32x16 (WxH) RGB: red left half, blue right half, a green top band on the left - JPEG-proof blocks."""
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    pixels[:8, :16] = (0, 255, 0)
    return pixels


def test_jpeg_exif_orientation_6_is_applied_and_reset():
    stored = _asymmetric_image()
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", quality=95, exif=_exif(6))
    loaded = load_image(buffer.getvalue())
    # orientation 6: rotate 90 degrees clockwise to display, so 32x16 stored becomes 16 wide, 32 tall
    assert loaded.pixels.shape == (32, 16, 3)
    top_right, bottom_left = loaded.pixels[2, 13].astype(int), loaded.pixels[29, 2].astype(int)
    assert (np.abs(top_right - [0, 255, 0]) < 40).all()  # the stored top-left (green) is now top-right
    assert (np.abs(bottom_left - [0, 0, 255]) < 40).all()  # the stored right half (blue) is now at the bottom
    exif = _parse_exif(loaded.exif)
    assert exif[ORIENTATION] == 1 and exif[0x010F] == "TestCam"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil_for_all_eight_values(orientation):
    stored = _rng_pixels((3, 5, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG", exif=_exif(orientation))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    np.testing.assert_array_equal(load_image(buffer.getvalue()).pixels, expected)
    np.testing.assert_array_equal(apply_orientation(stored, orientation), expected)


def test_orientation_applied_on_16bit_path():
    stored = _rng_pixels((3, 5, 4), np.uint16)
    data = encode_image(stored, "png", exif=_exif(8)).data
    loaded = load_image(data)
    assert loaded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(loaded.pixels, np.rot90(stored, k=1))
    assert _parse_exif(loaded.exif)[ORIENTATION] == 1


# --------------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "tiff"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_icc_profile_is_kept_on_output(tmp_path, fmt, dtype):
    icc = _srgb_icc()
    saved = save_image(_rng_pixels((6, 5, 3), dtype), tmp_path / f"icc.{fmt}", icc_profile=icc)
    assert Image.open(saved.path).info.get("icc_profile") == icc
    assert load_image(saved.path).icc_profile == icc


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "tiff"])
def test_exif_is_kept_on_output(fmt):
    loaded = load_image(encode_image(_rng_pixels((6, 5, 3), np.uint8), fmt, exif=_exif(1, "Kept")).data)
    assert _parse_exif(loaded.exif)[0x010F] == "Kept"


def test_16bit_png_keeps_metadata_and_16bit_tiff_reports_dropped_exif():
    pixels = _rng_pixels((4, 4, 3), np.uint16)
    png = load_image(encode_image(pixels, "png", icc_profile=_srgb_icc(), exif=_exif(1, "Deep")).data)
    assert png.icc_profile == _srgb_icc() and _parse_exif(png.exif)[0x010F] == "Deep"
    tiff = encode_image(pixels, "tiff", icc_profile=_srgb_icc(), exif=_exif(1))
    assert tiff.metadata_dropped and any("EXIF" in w for w in tiff.warnings)
    assert load_image(tiff.data).icc_profile == _srgb_icc()


# ------------------------------------------------------------------------------------------- mode conversions
def test_palette_with_transparency_becomes_rgba_and_without_becomes_rgb():
    rgb = Image.fromarray(_rng_pixels((6, 6, 3), np.uint8) // 64 * 64).quantize(8)
    assert load_image(rgb).mode == "RGB"
    buffer = io.BytesIO()
    rgb.save(buffer, "PNG", transparency=0)
    loaded = load_image(buffer.getvalue())
    assert loaded.mode == "RGBA"
    index = np.asarray(rgb)
    np.testing.assert_array_equal(loaded.pixels[..., 3] == 0, index == 0)


def test_one_bit_la_and_cmyk_are_converted():
    one_bit = Image.fromarray(np.eye(4, dtype=bool))
    np.testing.assert_array_equal(load_image(one_bit).pixels[..., 0], np.eye(4, dtype=np.uint8) * 255)
    la = Image.new("LA", (3, 2), (100, 50))
    assert load_image(la).mode == "LA" and load_image(la).pixels[0, 0].tolist() == [100, 50]
    buffer = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(buffer, "JPEG", quality=100)  # pure red in CMYK
    loaded = load_image(buffer.getvalue())
    assert loaded.mode == "RGB" and loaded.icc_profile is None
    assert (np.abs(loaded.pixels[0, 0].astype(int) - [255, 0, 0]) <= 8).all()


def test_float_tiff_is_refused_with_advice():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((3, 3), np.float32)).save(buffer, "TIFF")
    with pytest.raises(UnsupportedFormatError, match="8- or 16-bit"):
        load_image(buffer.getvalue())


def test_pil_image_source_is_not_modified():
    im = Image.open(io.BytesIO(encode_image(_asymmetric_image(), "png", exif=_exif(6)).data))
    loaded = load_image(im)
    assert loaded.pixels.shape == (32, 16, 3) and im.size == (32, 16) and loaded.format == "PNG"


# --------------------------------------------------------------------------------------------------- numpy input
def test_numpy_inputs():
    gray = load_image(np.zeros((3, 4), np.uint8))
    assert gray.pixels.shape == (3, 4, 1) and gray.mode == "L" and gray.format is None
    rgba16 = load_image(np.zeros((3, 4, 4), np.uint16))
    assert rgba16.mode == "RGBA" and rgba16.bit_depth == 16 and rgba16.has_alpha
    floats = load_image(np.array([[0.0, 0.5, 1.0, 0.001]], np.float32))
    assert floats.pixels[..., 0].tolist() == [[0, 128, 255, 0]] and floats.pixels.dtype == np.uint8
    assert load_image(np.array([[True, False]])).pixels[..., 0].tolist() == [[255, 0]]
    big_endian = np.array([[1, 65535]], dtype=">u2")
    assert load_image(big_endian).pixels[..., 0].tolist() == [[1, 65535]]


@pytest.mark.parametrize("bad", [
    np.zeros((3, 4, 5), np.uint8),
    np.zeros((3,), np.uint8),
    np.zeros((0, 4, 3), np.uint8),
    np.zeros((3, 4), np.int32),
    np.full((3, 4), 1.5, np.float32),
    np.full((3, 4), np.nan, np.float64),
])
def test_bad_numpy_inputs_are_refused(bad):
    with pytest.raises(InvalidInputError):
        load_image(bad)


def test_loaded_image_checks_its_fields():
    with pytest.raises(ValueError, match="mode"):
        LoadedImage(pixels=np.zeros((2, 2, 3), np.uint8), mode="RGBA", bit_depth=8, has_alpha=True)
    with pytest.raises(ValueError, match="bit_depth"):
        LoadedImage(pixels=np.zeros((2, 2, 3), np.uint8), mode="RGB", bit_depth=16, has_alpha=False)


# ---------------------------------------------------------------------------------------------- refusals on load
def test_max_pixels_on_every_source_kind():
    pixels = np.zeros((10, 10, 3), np.uint8)
    for source in (pixels, Image.fromarray(pixels), encode_image(pixels, "png").data):
        assert load_image(source, max_pixels=100).width == 10
        with pytest.raises(InputTooLargeError, match="10×10"):
            load_image(source, max_pixels=99)


def test_huge_png_header_refused_by_loader():
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 6, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(
        ">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(InputTooLargeError, match="50000×50000 = 2500 MP"):
        load_image(data, max_pixels=40_000_000)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("fmt", ["png", "jpg", "tiff"])
def test_truncated_file_is_corrupt(fmt):
    data = encode_image(_rng_pixels((64, 64, 3), np.uint8), fmt, quality=90).data
    with pytest.raises(InvalidInputError, match="could not be decoded; it may be damaged or not an image") as info:
        load_image(data[: len(data) // 2])
    assert type(info.value) is InvalidInputError


def test_truncated_16bit_png_is_corrupt():
    data = TREE_16BIT.read_bytes()
    with pytest.raises(InvalidInputError) as info:
        load_image(data[: len(data) // 2])
    assert type(info.value) is InvalidInputError  # damaged, not "unsupported" or "too large"


def test_gif_is_unsupported(tmp_path):
    path = tmp_path / "anim.png"
    Image.new("P", (4, 4)).save(path, "GIF")
    with pytest.raises(UnsupportedFormatError, match="GIF"):
        load_image(path)


def test_missing_file_and_wrong_type():
    with pytest.raises(InvalidInputError, match="not found"):
        load_image("/nonexistent/dir/x.png")
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- atomic saving
def test_save_reports_bytes_and_leaves_no_temp_files(tmp_path):
    pixels = _rng_pixels((8, 8, 3), np.uint8)
    saved = save_image(pixels, tmp_path / "out.png")
    assert saved.bytes_written == (tmp_path / "out.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert save_image(pixels, tmp_path / "out.JPEG").format == "jpg"  # format from the extension


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_saving_a_png_or_tiff_holds_no_copy_of_the_image(tmp_path, fmt):
    """A PNG or a TIFF is compressed from the pixels strip by strip: what Python and numpy allocate while saving
    stays a small part of the image (an encoder's whole copy or the encoded bytes, about the image's size for noise,
    would not; PIL's LZW TIFF writer held its copy, the encoded bytes and their copy: 2.7x the pixels); the file
    decodes to the pixels and has the usual permissions of a new file."""
    import tracemalloc

    pixels = _rng_pixels((1500, 2000, 3), np.uint8)  # noise: the encoded file is as large as the pixels
    tracemalloc.start()
    try:
        saved = save_image(pixels, tmp_path / f"noise.{fmt}")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert saved.bytes_written > 0.9 * pixels.nbytes
    assert peak < 0.5 * pixels.nbytes  # blocks of 64 rows, their filtered copies, ~1 MB of compressed data
    np.testing.assert_array_equal(load_image(saved.path).pixels, pixels)
    umask = os.umask(0)
    os.umask(umask)
    assert (saved.path.stat().st_mode & 0o777) == 0o666 & ~umask


def test_flattening_for_jpeg_and_reducing_to_8_bits_go_band_by_band():
    """Alpha flattened for a JPEG and 16 bits reduced to 8 are converted band by band (the whole image's float
    copies took 52 bytes a pixel)."""
    import tracemalloc

    from utils import image_io

    rgba = _rng_pixels((1500, 2000, 4), np.uint16)
    tracemalloc.start()
    try:
        flat = image_io._flatten_on_white(rgba)
        reduced = image_io.to_8bit(rgba)
        _current, convert_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert convert_peak < 3 * flat.nbytes  # the two outputs and one band's temporaries
    colour, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 65535
    assert np.abs(flat - (colour * alpha + 65535 * (1 - alpha))).max() <= 0.51
    np.testing.assert_array_equal(reduced, ((rgba.astype(np.uint32) + 128) // 257).astype(np.uint8))


def test_failed_write_leaves_existing_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    target.write_bytes(b"previous contents")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_image(_rng_pixels((8, 8, 3), np.uint8), target)
    assert target.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_replace_failure_cleans_up(tmp_path):
    (tmp_path / "taken.png").mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        save_image(_rng_pixels((4, 4, 3), np.uint8), tmp_path / "taken.png")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.png"]


def test_encoding_error_never_touches_the_file(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(InvalidInputError):
        save_image(np.zeros((4, 4, 7), np.uint8), target)
    with pytest.raises(InvalidSettingsError, match="output format"):
        save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.gif")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_save_and_encode_share_one_encoder(tmp_path):
    pixels = _rng_pixels((8, 8, 4), np.uint16)
    encoded = encode_image(pixels, "png", icc_profile=_srgb_icc())
    saved = save_image(pixels, tmp_path / "a.png", icc_profile=_srgb_icc())
    assert isinstance(encoded, EncodedImage)
    assert saved.path.read_bytes() == encoded.data


# ------------------------------------------------------------------------------------------------ format choice
@pytest.mark.parametrize("requested, input_format, has_alpha, bit_depth, expected", [
    ("auto", "PNG", False, 8, "png"),
    ("auto", "JPEG", False, 8, "jpg"),
    ("auto", "MPO", False, 8, "jpg"),
    ("auto", "WEBP", False, 8, "webp"),
    ("auto", "WEBP", True, 8, "webp"),
    ("auto", "JPEG", True, 8, "png"),
    ("auto", "TIFF", False, 16, "png"),
    ("auto", "BMP", False, 8, "png"),
    ("auto", None, True, 8, "png"),
    ("auto", "PNG", True, 16, "png"),
    ("JPEG", "PNG", True, 16, "jpg"),
    ("tif", "JPEG", False, 8, "tiff"),
    ("webp", None, False, 8, "webp"),
])
def test_choose_output_format(requested, input_format, has_alpha, bit_depth, expected):
    assert choose_output_format(requested, input_format, has_alpha, bit_depth) == expected


@pytest.mark.parametrize("requested, input_format, size, expected", [
    ("auto", "WEBP", (16383, 9), "webp"),
    ("auto", "WEBP", (9, 16384), "png"),
    ("auto", "JPEG", (65500, 9), "jpg"),
    ("auto", "JPEG", (65501, 9), "png"),
    ("auto", "PNG", (70000, 9), "png"),
    ("webp", "WEBP", (16384, 9), "webp"),  # an explicit choice stays: check_encodable refuses it with what to do
])
def test_choose_output_format_automatic_falls_back_to_png_for_sizes_a_format_cannot_hold(
        requested, input_format, size, expected):
    assert choose_output_format(requested, input_format, False, 8, size) == expected


def test_an_automatic_transparent_webp_too_large_to_compress_its_alpha_goes_to_png():
    """libwebp's alpha compressor holds ~24 bytes a pixel: over 4096² an automatic transparent WebP is a PNG, and
    the reason says so; opaque WebPs and explicit requests stay WebP."""
    from utils.image_io import WEBP_COMPRESSED_ALPHA_PIXELS, auto_format_change

    assert WEBP_COMPRESSED_ALPHA_PIXELS == 4096 * 4096
    assert choose_output_format("auto", "WEBP", True, 8, (4096, 4096)) == "webp"
    assert choose_output_format("auto", "WEBP", True, 8, (4097, 4096)) == "png"
    assert choose_output_format("auto", "WEBP", False, 8, (8000, 8000)) == "webp"
    assert choose_output_format("webp", "PNG", True, 8, (8000, 8000)) == "webp"
    assert "24 bytes of memory a pixel" in auto_format_change("webp", (8000, 8000), True)
    assert "at most 16383 pixels a side" in auto_format_change("webp", (16384, 9), False)
    assert auto_format_change("webp", (4096, 4096), True) is None and auto_format_change("png", (9, 9), True) is None


@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("lent", [True, False])
def test_a_webp_s_alpha_can_be_stored_uncompressed(channels, lent):
    """Over :data:`WEBP_COMPRESSED_ALPHA_PIXELS` a WebP's alpha goes uncompressed into its ALPH chunk (the colour is
    encoded opaque): PIL and OpenCV read the alpha exactly and the metadata as given, and lent pixels come back."""
    import cv2
    from utils import image_io

    rng = np.random.default_rng(channels)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (301, 157, 4), dtype=np.uint8), (0, 0), 2)
    pixels = np.ascontiguousarray(smooth if channels == 4 else smooth[..., [0, 3]])
    before = pixels.copy()
    icc, exif = _srgb_icc(), _exif(1, "Kept")
    data = image_io._encode_webp(pixels, 90, icc, exif, reorder=lent, compress_alpha=False)
    np.testing.assert_array_equal(pixels, before)
    chunks = _riff_chunks(data)
    assert list(chunks) == [b"VP8X", b"ICCP", b"ALPH", b"VP8 ", b"EXIF"]
    assert chunks[b"VP8X"][0] == 0x20 | 0x10 | 0x08 and chunks[b"ALPH"][0] == 0  # ICC, alpha, EXIF; raw alpha
    assert len(data) == 8 + int.from_bytes(data[4:8], "little")
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGBA"))
        assert im.info["icc_profile"] == icc and im.getexif()[0x010F] == "Kept"
    np.testing.assert_array_equal(decoded[..., 3], pixels[..., -1])
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., 3],
                                  pixels[..., -1])
    colour = pixels[..., :3] if channels == 4 else np.repeat(pixels[..., :1], 3, axis=2)
    error = decoded[..., :3].astype(float) - colour
    assert 10 * np.log10(255.0 ** 2 / np.mean(error ** 2)) > 35  # the colour is the lossy VP8 at quality 90
    compressed = _riff_chunks(image_io._encode_webp(pixels, 90, icc, exif, reorder=lent))
    assert compressed[b"ALPH"][0] & 3 == 1 and len(compressed[b"ALPH"]) < len(chunks[b"ALPH"])  # VP8L-compressed


def test_an_explicit_webp_over_the_limit_stores_its_alpha_uncompressed_and_says_so(tmp_path):
    pixels = np.zeros((4097, 4096, 4), np.uint8)  # one row over 4096²
    pixels[1000:3000, 1000:3000] = 200
    saved = save_image(pixels, tmp_path / "big.webp", in_place=True)
    assert saved.alpha_uncompressed and any("transparency was stored uncompressed" in w for w in saved.warnings)
    data = saved.path.read_bytes()
    assert _riff_chunks(data)[b"ALPH"][0] == 0 and saved.bytes_written == len(data) > 4097 * 4096
    with Image.open(saved.path) as im:
        np.testing.assert_array_equal(np.asarray(im)[..., 3], pixels[..., 3])


def test_an_image_libwebp_cannot_encode_is_saved_as_png_and_nothing_is_lost(tmp_path):
    """libwebp refuses some images (over 16383 px a side; very large detailed ones overflow its 512 KB first
    partition, found on a 16000² output after minutes of work): the result is written as PNG instead, and says so."""
    pixels = np.random.default_rng(5).integers(0, 256, (3, 16384, 3), dtype=np.uint8)
    before = pixels.copy()
    saved = save_image(pixels, tmp_path / "wide.webp", in_place=True)
    assert saved.path == tmp_path / "wide.png" and saved.format == "png" and saved.webp_failed
    assert any("saved as PNG instead" in w for w in saved.warnings)
    assert not (tmp_path / "wide.webp").exists()
    np.testing.assert_array_equal(load_image(saved.path).pixels, before)
    np.testing.assert_array_equal(pixels, before)  # the lent pixels were given back
    encoded = encode_image(pixels, "webp")
    assert encoded.format == "png" and encoded.webp_failed


def test_choose_output_format_refuses_unknown():
    with pytest.raises(InvalidSettingsError, match="png, jpg, webp, tiff"):
        choose_output_format("gif", "PNG", False, 8)


def test_tiff_keeps_exif_with_sub_folders_and_orientation_is_applied():
    exif = Image.Exif()
    exif[0x010F] = "Cam"
    exif[ORIENTATION] = 6
    exif.get_ifd(0x8769)[0x9003] = "2020:01:02 03:04:05"  # DateTimeOriginal, in the Exif sub-folder
    stored = _rng_pixels((3, 5, 3), np.uint8)
    encoded = encode_image(stored, "tiff", exif=exif.tobytes())
    loaded = load_image(encoded.data)
    np.testing.assert_array_equal(loaded.pixels, np.rot90(stored, k=-1))
    kept = _parse_exif(loaded.exif)
    assert kept[0x010F] == "Cam" and kept[ORIENTATION] == 1
    assert kept.get_ifd(0x8769)[0x9003] == "2020:01:02 03:04:05"
