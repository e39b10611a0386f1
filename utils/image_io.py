"""Reading and writing images with their bit depth, alpha, colour profile and EXIF intact.

:func:`load_image` turns a path, bytes, a PIL image or a numpy array into a :class:`LoadedImage`: ``HxWxC``
pixels (C = 1, 2, 3 or 4 for Gray, Gray+Alpha, RGB, RGBA), ``uint8`` or ``uint16`` as decoded — the depth comes
from the file's declared format, never from pixel values. EXIF orientation is applied before returning, so
pixels are upright and the kept EXIF says orientation 1.

:func:`encode_image` (in memory) and :func:`save_image` (atomic write to disk) share one encoder. 16-bit arrays
stay 16-bit in PNG and TIFF; JPEG and WebP hold 8 bits only. JPEG cannot hold alpha: it is flattened onto white
and the result says so (``alpha_flattened``), so callers can warn the user instead of failing the job.

Metadata: the ICC profile is kept by every writer. EXIF is kept by every writer except 16-bit colour TIFF
(``metadata_dropped`` is then set); a TIFF source's EXIF is rebuilt from its descriptive tags (Make, Model,
DateTime..., the Exif and GPS folders). A TIFF whose EXIF has sub-folders is written uncompressed, because PIL's
compressing TIFF writer cannot store them.

Nothing here imports ``engine`` or ``ui``; failures raise the domain exceptions of :mod:`utils.errors`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Iterable, Iterator, Literal, Union, get_args

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps

from utils.atomic import replaced_when_complete, write_atomic
from utils.errors import InputTooLargeError, InvalidInputError, InvalidSettingsError, UnsupportedFormatError
from utils.validation import ALLOWED_IMAGE_FORMATS, pixel_limit_message, png_ihdr, probe_image

logger = logging.getLogger(__name__)

__all__ = [
    "ChannelMode",
    "EncodedImage",
    "ImageFormat",
    "LoadedImage",
    "MAX_SIDE",
    "SavedImage",
    "WEBP_COMPRESSED_ALPHA_PIXELS",
    "apply_orientation",
    "as_pixels",
    "auto_format_change",
    "check_encodable",
    "choose_output_format",
    "encode_image",
    "encoding_bytes",
    "format_of_path",
    "load_image",
    "normalize_format",
    "save_image",
    "save_png_rows",
    "save_rows",
    "save_tiff_strips",
    "to_8bit",
    "write_atomic",
]

ImageFormat = Literal["png", "jpg", "webp", "tiff"]
ChannelMode = Literal["L", "LA", "RGB", "RGBA"]
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray]

_MODE_BY_CHANNELS: dict[int, ChannelMode] = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_FORMAT_NAMES: dict[str, ImageFormat] = {
    "png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp", "tif": "tiff", "tiff": "tiff",
}
_PIL_SAVE_NAME: dict[ImageFormat, str] = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}
_EXIF_PREFIX = b"Exif\x00\x00"


def _exif_tiff(exif: bytes) -> bytes:
    """An EXIF block without the JPEG marker's ``Exif\\0\\0`` prefix: the TIFF structure itself."""
    return exif[len(_EXIF_PREFIX):] if exif.startswith(_EXIF_PREFIX) else exif


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COMPRESS_LEVEL = 4
"""zlib level of every PNG written (8 and 16 bits, whole or streamed). On a 1024² photo output, level 4 encodes
in 0.13 s to 1.244 MB where zlib's default 6 takes 0.38 s for 1.210 MB: 3x faster for files 3% larger (level 1:
0.08 s, 1.362 MB). A ×4 output of a 1 MP photo saves ~4 s per image, which is what a GPU batch waits for."""
_ORIENTATION_TAG = 0x0112
#: TIFF tags that are EXIF-like descriptions rather than file structure, kept as a TIFF source's EXIF.
_TIFF_DESCRIPTIVE_TAGS = (0x010E, 0x010F, 0x0110, 0x0112, 0x0131, 0x0132, 0x013B, 0x8298)
_EXIF_SUB_IFDS = (0x8769, 0x8825)  # Exif and GPS


# ------------------------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class LoadedImage:
    """A decoded image, upright, with what is needed to write it back faithfully.

    Attributes:
        pixels: ``HxWxC`` array, C in {1, 2, 3, 4} ordered Gray / Gray+Alpha / RGB / RGBA, ``uint8`` or
            ``uint16``. It may share memory with an array given to :func:`load_image`; do not modify it.
        mode: ``"L"``, ``"LA"``, ``"RGB"`` or ``"RGBA"`` (the channel layout; depth is in ``bit_depth``).
        bit_depth: 8 or 16, matching ``pixels.dtype``.
        has_alpha: True when the last channel is alpha (modes ``LA`` and ``RGBA``).
        icc_profile: the embedded ICC profile, or None (treat as sRGB).
        exif: the EXIF block (``b"Exif\\0\\0"`` + TIFF data) with orientation reset to 1, or None.
        format: the sniffed source format (``"PNG"``, ``"JPEG"``...), or None for arrays.
        source_name: the file name of the source, when known.
    """

    pixels: np.ndarray
    mode: ChannelMode
    bit_depth: int
    has_alpha: bool
    icc_profile: bytes | None = None
    exif: bytes | None = None
    format: str | None = None
    source_name: str | None = None

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.ndim != 3 or p.shape[2] not in _MODE_BY_CHANNELS:
            raise ValueError(f"pixels must be an HxWxC array with C in 1..4, got {getattr(p, 'shape', p)!r}")
        if p.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"pixels must be uint8 or uint16, got {p.dtype}")
        if self.mode != _MODE_BY_CHANNELS[p.shape[2]]:
            raise ValueError(f"mode {self.mode!r} does not match {p.shape[2]} channels")
        if self.bit_depth != 8 * p.dtype.itemsize:
            raise ValueError(f"bit_depth {self.bit_depth} does not match dtype {p.dtype}")
        if self.has_alpha != (p.shape[2] in (2, 4)):
            raise ValueError(f"has_alpha={self.has_alpha} does not match mode {self.mode}")

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])


@dataclass(frozen=True, kw_only=True)
class FormatLosses:
    """What writing an image in its format could not keep, or kept otherwise than usual (shared by
    :class:`EncodedImage` and :class:`SavedImage`).

    Attributes:
        alpha_flattened: alpha was composited onto white because the format (JPEG) cannot hold it.
        reduced_to_8bit: a 16-bit input was written with 8 bits (JPEG/WebP, or ``keep_16bit=False``).
        metadata_dropped: an EXIF block was given but the writer could not embed it (16-bit colour TIFF).
        alpha_uncompressed: a WebP larger than :data:`WEBP_COMPRESSED_ALPHA_PIXELS` holds its alpha uncompressed.
        webp_failed: libwebp could not encode the image, so it was written as PNG.
    """

    alpha_flattened: bool = False
    reduced_to_8bit: bool = False
    metadata_dropped: bool = False
    alpha_uncompressed: bool = False
    webp_failed: bool = False

    @property
    def warnings(self) -> tuple[str, ...]:
        """Messages for the user about what the format could not keep."""
        out = []
        if self.alpha_flattened:
            out.append(f"{self.format.upper()} cannot store transparency; it was flattened onto white "
                       "(choose PNG or WebP to keep it)")
        if self.reduced_to_8bit:
            out.append("the 16-bit image was saved with 8 bits per channel (choose PNG or TIFF to keep 16 bits)")
        if self.metadata_dropped:
            out.append("the EXIF data could not be embedded in a 16-bit TIFF (choose PNG to keep it)")
        if self.alpha_uncompressed:
            out.append("the WebP's transparency was stored uncompressed (1 byte a pixel, a larger file): "
                       "compressing it at this size would take libwebp about 24 bytes of memory a pixel")
        if self.webp_failed:
            out.append("libwebp could not encode this image (a WebP holds at most 16383 pixels a side, and its "
                       "first partition at most 512 KB, which very large detailed images overflow), so it was saved "
                       "as PNG instead")
        return tuple(out)


@dataclass(frozen=True)
class EncodedImage(FormatLosses):
    """An encoded image in memory: its bytes, the format and bit depth written, and what was lost."""

    data: bytes
    format: ImageFormat
    bit_depth: int


@dataclass(frozen=True)
class SavedImage(FormatLosses):
    """The result of :func:`save_image`: where it went, how many bytes, the format and bit depth, and what was
    lost on the way."""

    path: Path
    bytes_written: int
    format: ImageFormat
    bit_depth: int


# ----------------------------------------------------------------------------------------------------------- load
def load_image(source: ImageInput, *, max_pixels: int | None = None) -> LoadedImage:
    """Decode an image into upright ``HxWxC`` pixels, keeping bit depth, alpha, ICC profile and EXIF.

    Conversions: palette (``P``/``PA``) → RGB, or RGBA when it has transparency; 1-bit → Gray 0/255; ``L``/``RGB``
    with a transparent colour (tRNS) → ``LA``/``RGBA``; CMYK → RGB through its ICC profile when it has one (the
    CMYK profile is then dropped), else PIL's plain conversion; YCbCr/LAB/HSV → RGB. 16-bit PNG/TIFF stay
    ``uint16`` (colour ones are decoded with OpenCV, since PIL holds 16-bit grayscale only). 32-bit integer and
    float files are refused. Multi-frame files (APNG, animated WebP, multi-page TIFF) give their first frame.

    Numpy arrays: ``HxW`` or ``HxWxC`` (C in 1..4, assumed Gray/GrayA/RGB/RGBA order), ``uint8`` or ``uint16``
    kept as they are; ``bool`` → 0/255 ``uint8``; float arrays must lie in [0, 1] and become
    ``uint8 = round(x * 255)``; any other dtype is refused.

    Args:
        source: a path, the file's bytes, a binary file object, a PIL image or a numpy array.
        max_pixels: largest accepted ``width * height``; None for no limit of ours (PIL's bomb check remains).

    Returns:
        The decoded image.

    Raises:
        InputTooLargeError: over ``max_pixels``, or over PIL's decompression-bomb limit.
        UnsupportedFormatError: not PNG/JPEG/WebP/TIFF/BMP, or a pixel type we do not handle.
        InvalidInputError: the file could not be decoded, a missing file, or an array of the wrong shape, dtype
            or range.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels)
        name = Path(source.filename).name if getattr(source, "filename", "") else None
        fmt = "JPEG" if source.format == "MPO" else source.format
        return _from_pil(source, fmt, name)
    data, name = _read_source(source)
    header = probe_image(data, max_pixels=max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_IMAGE_FORMATS)) as im:
            if _declared_bit_depth(im, data) > 8 and not im.mode.startswith("I;16"):
                return _from_cv2(data, im, header.format, name)
            return _from_pil(im, header.format, name)
    except Image.DecompressionBombError:
        raise InputTooLargeError(f"The image is too large: {header.width}×{header.height}, over the decoder's "
                                 f"safety limit of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels. Downscale it "
                                 "first.", actual=header.pixels, limit=2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    except InvalidInputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error) as exc:
        raise InvalidInputError(f"The {header.format} image could not be decoded; it may be damaged or not an "
                                f"image ({exc}).") from None


def _read_source(source: object) -> tuple[bytes, str | None]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return path.read_bytes(), path.name
        except FileNotFoundError:
            raise InvalidInputError(f"File not found: {path}.") from None
        except IsADirectoryError:
            raise InvalidInputError(f"Not a regular file: {path}.") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return source.read(), Path(name).name if isinstance(name, str) else None  # type: ignore[union-attr]
    raise TypeError(f"cannot load an image from {type(source).__name__}; "
                    "pass a path, bytes, a file object, a PIL image or a numpy array")


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise InputTooLargeError(pixel_limit_message(width, height, max_pixels), actual=width * height,
                                 limit=max_pixels)


def _declared_bit_depth(im: Image.Image, data: bytes) -> int:
    """Bits per sample as the file declares them (PNG IHDR, TIFF BitsPerSample); 8 for everything else."""
    if im.format == "PNG":
        ihdr = png_ihdr(data[:29])
        return ihdr[2] if ihdr else 8
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(int(b) for b in bits)
    return 8


def _from_pil(im: Image.Image, fmt: str | None, name: str | None) -> LoadedImage:
    icc = im.info.get("icc_profile") or None
    exif = _reset_orientation(im.info.get("exif") or _tiff_exif(im))
    upright = ImageOps.exif_transpose(im)  # decodes; returns a copy, the caller's image is untouched
    converted, icc = _to_standard_mode(upright, icc)
    if converted.mode.startswith("I;16"):
        pixels = np.asarray(converted).astype(np.uint16)[..., None]
    else:
        pixels = np.asarray(converted)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
    return _make(np.ascontiguousarray(pixels), icc, exif, fmt, name)


def _to_standard_mode(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """Convert any PIL mode to L, LA, RGB, RGBA or I;16. Returns the image and the ICC profile still valid."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA") or mode.startswith("I;16"):
        if mode in ("L", "RGB") and "transparency" in im.info:
            return im.convert(mode + "A"), icc
        return im, icc
    if mode == "1":
        return im.convert("L"), icc
    if mode in ("P", "PA"):
        return im.convert("RGBA" if im.has_transparency_data else "RGB"), icc
    if mode == "La":
        return im.convert("LA"), icc
    if mode == "RGBa":
        return im.convert("RGBA"), icc
    if mode == "RGBX":
        return im.convert("RGB"), icc
    if mode == "CMYK":
        if icc:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB"), None
            except (ImageCms.PyCMSError, OSError) as exc:
                logger.warning("CMYK profile could not be applied (%s); using a plain conversion", exc)
        return im.convert("RGB"), None
    if mode in ("YCbCr", "HSV", "LAB"):
        try:
            return im.convert("RGB"), None
        except ValueError:
            raise UnsupportedFormatError(f"{mode} images are not supported; convert it to RGB first.") from None
    if mode == "I" and _fits_16bit(im):
        return Image.fromarray(np.asarray(im).astype(np.uint16)), icc
    raise UnsupportedFormatError(f"{mode} ({'float' if mode == 'F' else '32-bit'}) images are not supported; "
                                 "convert it to 8- or 16-bit PNG or TIFF first.")


def _fits_16bit(im: Image.Image) -> bool:
    """A mode-``I`` image that the file declared 16-bit (older PIL reads 16-bit PNGs as ``I``)."""
    bits = getattr(im, "tag_v2", {}).get(258) if hasattr(im, "tag_v2") else None
    if bits is not None:
        return max(bits if isinstance(bits, tuple) else (bits,)) <= 16
    return im.format == "PNG"


def _from_cv2(data: bytes, im: Image.Image, fmt: str, name: str | None) -> LoadedImage:
    """16-bit colour PNG/TIFF, which PIL would cut to 8 bits: decode with OpenCV, keep PIL's metadata."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise InvalidInputError(f"The 16-bit {fmt} image could not be decoded; it may be damaged or not an image.")
    if decoded.dtype != np.uint16:
        raise UnsupportedFormatError(f"{decoded.dtype} {fmt} images are not supported; convert it to 8- or 16-bit.")
    if decoded.ndim == 2:
        decoded = decoded[..., None]
    channels = decoded.shape[2]
    if channels == 3:
        pixels = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    elif channels == 4:
        pixels = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA)
        ihdr = png_ihdr(data[:29])
        if ihdr is not None and ihdr[3] == 4:  # a 16-bit gray+alpha PNG, which OpenCV expands to BGRA
            pixels = np.ascontiguousarray(pixels[..., [0, 3]])
    else:
        pixels = decoded
    if im.mode in ("L", "RGB") and "transparency" in im.info:
        logger.warning("the 16-bit image's transparent colour (tRNS) is ignored")
    pixels = apply_orientation(pixels, _orientation(im))
    exif = _reset_orientation(im.info.get("exif") or _tiff_exif(im))
    return _make(np.ascontiguousarray(pixels), im.info.get("icc_profile") or None, exif, fmt, name)


def _tiff_exif(im: Image.Image) -> bytes | None:
    """A TIFF keeps EXIF as its own tags: collect the descriptive ones and the Exif/GPS folders as an EXIF block."""
    if not hasattr(im, "tag_v2"):
        return None
    try:
        tags = im.getexif()
        kept = Image.Exif()
        for tag in _TIFF_DESCRIPTIVE_TAGS:
            if tag in tags:
                kept[tag] = tags[tag]
        for ifd in _EXIF_SUB_IFDS:
            sub = tags.get_ifd(ifd)
            if sub:
                kept[ifd] = dict(sub)
        return kept.tobytes() if len(kept) else None
    except Exception as exc:  # damaged tags must not cost the user the image
        logger.info("dropping unreadable TIFF metadata (%s)", exc)
        return None


def _orientation(im: Image.Image) -> int:
    """EXIF orientation without decoding (PNG's ``getexif`` would decode the whole image)."""
    raw = im.info.get("exif")
    if raw:
        try:
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_ORIENTATION_TAG, 1))
        except Exception:  # unreadable EXIF: treat as upright, like PIL does
            return 1
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        return int(tags.get(_ORIENTATION_TAG, 1))
    return 1


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Make ``HxWxC`` pixels upright for an EXIF orientation 1..8 (the same transforms as PIL's exif_transpose).

    Returns a view where possible.
    """
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(pixels, k=-1)
    if orientation == 7:
        return pixels.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(pixels, k=1)
    return pixels


def _reset_orientation(exif: bytes | None) -> bytes | None:
    """Return the EXIF block with orientation set to 1 (pixels are upright now), or None if unusable."""
    if not exif:
        return None
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        if parsed.get(_ORIENTATION_TAG, 1) == 1:
            return _EXIF_PREFIX + _exif_tiff(exif)
        parsed[_ORIENTATION_TAG] = 1
        return parsed.tobytes()
    except Exception as exc:  # a damaged EXIF block must not cost the user the image
        logger.info("dropping unreadable EXIF data (%s)", exc)
        return None


def _make(pixels: np.ndarray, icc: bytes | None, exif: bytes | None, fmt: str | None,
          name: str | None) -> LoadedImage:
    channels = pixels.shape[2]
    return LoadedImage(pixels=pixels, mode=_MODE_BY_CHANNELS[channels], bit_depth=8 * pixels.dtype.itemsize,
                       has_alpha=channels in (2, 4), icc_profile=icc, exif=exif, format=fmt, source_name=name)


def _from_array(array: np.ndarray, max_pixels: int | None) -> LoadedImage:
    pixels = as_pixels(array)
    _check_pixels(pixels.shape[1], pixels.shape[0], max_pixels)
    return _make(pixels, None, None, None, None)


def as_pixels(array: np.ndarray) -> np.ndarray:
    """Validate and normalise an array to ``HxWxC`` ``uint8``/``uint16`` (see :func:`load_image` for the rules).

    Raises:
        InvalidInputError: wrong shape, empty, unsupported dtype, or a float array outside [0, 1] or with NaN.
    """
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"Expected a numpy array, got {type(array).__name__}.")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in _MODE_BY_CHANNELS:
        raise InvalidInputError(f"An image array must be HxW or HxWxC with C in 1..4, got shape {array.shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"The image array is empty (shape {array.shape}).")
    if array.dtype == np.bool_:
        return np.where(array, np.uint8(255), np.uint8(0))
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidInputError("The float image array contains NaN or infinity.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InvalidInputError(f"Float image arrays must lie in [0, 1], got values from {low:g} to {high:g}; "
                                    "scale it, or pass uint8 (0..255) or uint16 (0..65535).")
        return np.rint(array * 255.0).astype(np.uint8)
    if array.dtype.newbyteorder("=") == np.dtype(np.uint16) and array.dtype != np.uint16:
        array = array.astype(np.uint16)  # big-endian uint16 → native
    if array.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"Image arrays must be uint8, uint16 or float in [0, 1], got {array.dtype}.")
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------------------------- output format
def normalize_format(name: str) -> ImageFormat:
    """``"JPEG"``/``".jpg"``/``"jpeg"`` → ``"jpg"``, ``"tif"`` → ``"tiff"``... for any writable format.

    Raises:
        InvalidSettingsError: not one of png, jpg, webp, tiff.
    """
    key = str(name).strip().lower().lstrip(".")
    if key not in _FORMAT_NAMES:
        raise InvalidSettingsError(f"The output format must be one of {', '.join(get_args(ImageFormat))}, "
                                   f"got {name!r}.")
    return _FORMAT_NAMES[key]


def format_of_path(path: str | os.PathLike) -> ImageFormat | None:
    """The writable format a file name's extension names (``.tif`` → ``"tiff"``), or None."""
    return _FORMAT_NAMES.get(Path(path).suffix.lower().lstrip("."))


MAX_SIDE: dict[ImageFormat, int] = {"jpg": 65500, "webp": 16383}
"""The longest side each format can hold (libjpeg's and libwebp's limits); PNG and TIFF hold any output."""


def choose_output_format(requested: str, input_format: str | None, has_alpha: bool, bit_depth: int,
                         size: tuple[int, int] | None = None) -> ImageFormat:
    """Pick the output format. An explicit request wins; ``"auto"`` keeps quality and the user's choice.

    ``"auto"``: 16-bit → png; JPEG input without alpha → jpg; WebP input → webp (it holds alpha); anything else
    (PNG, TIFF, BMP, arrays, alpha) → png, which is lossless and holds alpha and 16 bits. An output ``size``
    (width, height) that the chosen format cannot hold (:data:`MAX_SIDE`: a WebP over 16383 px), or a transparent
    WebP too large to compress its alpha within the memory goal (:func:`auto_format_change`) → png as well; an
    explicit request for a format too small is refused by :func:`check_encodable`.

    Raises:
        InvalidSettingsError: ``requested`` is not auto, png, jpg/jpeg, webp or tiff/tif.
    """
    if str(requested).strip().lower() != "auto":
        return normalize_format(requested)
    source = (input_format or "").strip().upper().lstrip(".")
    source = {"JPG": "JPEG", "MPO": "JPEG", "TIF": "TIFF"}.get(source, source)
    if bit_depth > 8:
        return "png"
    chosen: ImageFormat = "png"
    if source == "JPEG" and not has_alpha:
        chosen = "jpg"
    elif source == "WEBP":
        chosen = "webp"
    if size is not None and auto_format_change(chosen, size, has_alpha):
        return "png"
    return chosen


def auto_format_change(chosen: ImageFormat, size: tuple[int, int], has_alpha: bool) -> str | None:
    """Why the automatic format ``chosen`` gives way to PNG for an output of ``size`` (width, height), or None:
    ``chosen`` cannot hold the size (:data:`MAX_SIDE`), or it is a transparent WebP over
    :data:`WEBP_COMPRESSED_ALPHA_PIXELS`. Pure."""
    width, height = size
    limit = MAX_SIDE.get(chosen)
    if limit is not None and max(width, height) > limit:
        return f"A {chosen.upper()} image holds at most {limit} pixels a side and this output is {width}×{height}"
    if chosen == "webp" and has_alpha and width * height > WEBP_COMPRESSED_ALPHA_PIXELS:
        return (f"Compressing the transparency of a {width}×{height} WebP would take libwebp about 24 bytes of "
                f"memory a pixel")
    return None


# ---------------------------------------------------------------------------------------------------------- encode
_CONVERT_ROWS = 256
"""Rows converted at a time by :func:`to_8bit` and :func:`_flatten_on_white`: their wide temporaries (uint32,
float32) follow this band, not the image (a whole RGBA image flattened for JPEG took 52 bytes per pixel)."""


def _by_bands(pixels: np.ndarray, channels: int, dtype, convert) -> np.ndarray:
    """``convert`` applied to :data:`_CONVERT_ROWS` rows of ``pixels`` at a time, into one ``HxWx channels``
    array of ``dtype``."""
    out = np.empty(pixels.shape[:2] + (channels,), dtype)
    for top in range(0, pixels.shape[0], _CONVERT_ROWS):
        out[top:top + _CONVERT_ROWS] = convert(pixels[top:top + _CONVERT_ROWS])
    return out


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """``uint16`` → ``uint8`` by rounding ``x / 257`` (65535 → 255, 257 → 1); ``uint8`` is returned as is.
    ``HxW`` or ``HxWxC``."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.ndim == 2:
        return to_8bit(pixels[:, :, None])[:, :, 0]

    def reduce(rows: np.ndarray) -> np.ndarray:
        return ((rows.astype(np.uint32) + 128) // 257).astype(np.uint8)

    return _by_bands(pixels, pixels.shape[2], np.uint8, reduce) if pixels.ndim == 3 else reduce(pixels)


def _flatten_on_white(pixels: np.ndarray) -> np.ndarray:
    """Composite Gray+Alpha / RGBA onto white; returns Gray / RGB of the same dtype."""
    top = float(np.iinfo(pixels.dtype).max)

    def flatten(rows: np.ndarray) -> np.ndarray:
        colour = rows[..., :-1].astype(np.float32)
        alpha = rows[..., -1:].astype(np.float32) / top
        return np.clip(np.rint(colour * alpha + top * (1.0 - alpha)), 0, top)

    return _by_bands(pixels, pixels.shape[2] - 1, pixels.dtype, flatten)


_ENCODER_BYTES_PER_PIXEL: dict[ImageFormat, tuple[float, float, float, float]] = {
    "png": (1, 1, 1, 1), "tiff": (1, 1, 1, 1), "jpg": (1, 2, 1, 5), "webp": (6, 31, 2, 27)}
"""What encoding an 8-bit image holds per pixel besides its pixels, by channels (gray, gray+alpha, RGB, RGBA),
measured (peak RSS of ``encode_image``/``save_image`` on 3000² and 5000² upscaled images), as the engine saves its
results (``in_place``): PNG and TIFF compress strip by strip and hold their encoded bytes (0.1-0.8 bytes); so does
JPEG (:func:`_encode_jpeg`: 0.1; PIL's copy held 3.4 more), alpha first flattened onto white (a copy: RGBA 4.6,
gray+alpha 1.3; 6.3 through PIL). WebP (:func:`_encode_webp`) holds libwebp's YUV planes and tokens (RGB 1.7,
gray 5.3 with OpenCV's BGR expansion); alpha adds libwebp's lossless alpha encoder, ~24 bytes a pixel whatever the
alpha (a hard mask, a gradient, a sprite's: RGBA 26.2, gray+alpha 30.2 with its BGRA expansion). Without
``in_place`` RGB(A) JPEG and WebP add their BGR(A) copy (3-4 bytes)."""


_WEBP_RAW_ALPHA_BYTES_PER_PIXEL = {2: 6, 4: 4}
"""What a WebP with uncompressed alpha holds per pixel besides its pixels (gray+alpha, RGBA; measured at 5000²:
5.2 and 3.4): the colour's encoding (libwebp's YUV planes and tokens, gray expanded to BGR), the alpha plane's copy
and the file being put together."""


def check_encodable(width: int, height: int, fmt: str) -> None:
    """Refuse an output size its format cannot hold, before anything is computed for it.

    Raises:
        InvalidSettingsError: the output's longer side is over :data:`MAX_SIDE` for ``fmt``.
    """
    name = normalize_format(fmt)
    limit = MAX_SIDE.get(name)
    if limit is not None and max(width, height) > limit:
        raise InvalidSettingsError(
            f"A {name.upper()} image holds at most {limit} pixels a side, and this output would be {width}×{height}. "
            f"Choose PNG or TIFF (output format png or tiff), or a smaller scale.")


def encoding_bytes(width: int, height: int, channels: int, bit_depth: int, fmt: str) -> int:
    """The memory that encoding a ``width`` x ``height`` image of ``channels`` channels and ``bit_depth`` bits as
    ``fmt`` holds besides its pixels (:data:`_ENCODER_BYTES_PER_PIXEL`, plus the 8-bit copy that JPEG and WebP make
    of 16-bit pixels). Pure."""
    name = normalize_format(fmt)
    per_pixel = _ENCODER_BYTES_PER_PIXEL[name][channels - 1]
    if name == "webp" and channels in (2, 4) and width * height > WEBP_COMPRESSED_ALPHA_PIXELS:
        per_pixel = _WEBP_RAW_ALPHA_BYTES_PER_PIXEL[channels]
    if name in ("jpg", "webp") and bit_depth > 8:
        per_pixel += channels  # to_8bit's copy
    return int(math.ceil(per_pixel * width * height))


def encode_image(pixels: np.ndarray, format: str, *, quality: int = 95, icc_profile: bytes | None = None,
                 exif: bytes | None = None, keep_16bit: bool = True, in_place: bool = False) -> EncodedImage:
    """Encode pixels in memory.

    Args:
        pixels: ``HxW`` or ``HxWxC`` (C in 1..4, Gray/GrayA/RGB/RGBA), ``uint8`` or ``uint16`` (float in [0, 1]
            is accepted as in :func:`load_image`).
        format: png, jpg (jpeg), webp or tiff (tif).
        quality: 1..100, for jpg and webp (lossy). JPEG at 90 or more is written without chroma subsampling.
        icc_profile: ICC profile to embed (all formats).
        exif: EXIF block to embed, with or without the ``Exif\\0\\0`` prefix (all formats except 16-bit colour
            TIFF, where it is dropped and ``metadata_dropped`` is set).
        keep_16bit: write ``uint16`` pixels as 16-bit PNG/TIFF; False writes 8 bits.
        in_place: the WebP and JPEG encoders may swap red and blue in ``pixels`` while they run, and swap them
            back before returning (also when they fail), instead of holding a BGR copy (3-4 bytes a pixel). Only
            for pixels no other thread reads meanwhile: the engine's own results.

    Returns:
        The bytes and what had to change (alpha flattened onto white for JPEG, 16 → 8 bits, metadata dropped).

    Raises:
        InvalidSettingsError: unknown format or quality out of range.
        InvalidInputError: pixels of the wrong shape or dtype.
    """
    fmt = normalize_format(format)
    arr, reduced, flattened = _prepared(pixels, fmt, quality, keep_16bit)

    dropped = raw_alpha = False
    # a copy of the caller's pixels (16 bits made 8, alpha flattened) is ours to reorder, theirs only when lent
    reorder = in_place or not np.may_share_memory(arr, pixels)
    if fmt == "png":
        buffer = io.BytesIO()
        _write_png_pixels(buffer, arr, icc_profile, exif)
        data = buffer.getvalue()
    elif fmt == "tiff" and _tiff_in_strips(arr, exif):
        buffer = io.BytesIO()
        _write_tiff_pixels(buffer, arr, icc_profile)
        data = buffer.getvalue()
    elif fmt == "webp":
        raw_alpha = arr.shape[2] in (2, 4) and arr.shape[0] * arr.shape[1] > WEBP_COMPRESSED_ALPHA_PIXELS
        try:
            data = _encode_webp(arr, int(quality), icc_profile, exif, reorder=reorder, compress_alpha=not raw_alpha)
        except _EncoderFailed:
            # libwebp's VP8 holds the modes of every 16x16 block in its first partition, at most 512 KB: some
            # outputs over ~120 MP overflow it (a 16000² upscaled gradient did, 11000² did not). Nothing is lost.
            logger.warning("libwebp could not encode a %dx%d image; it is written as PNG", arr.shape[1],
                           arr.shape[0])
            del arr
            png = encode_image(pixels, "png", icc_profile=icc_profile, exif=exif, keep_16bit=keep_16bit)
            return replace(png, webp_failed=True)
    elif fmt == "jpg" and _jpeg_metadata_fits_one_segment(icc_profile, exif):
        data = _encode_jpeg(arr, int(quality), icc_profile, exif, reorder=reorder)
    elif arr.dtype == np.uint16 and arr.shape[2] > 1:  # PIL holds 16-bit grayscale only
        data = _encode_tiff16(arr, icc_profile)
        if exif:
            dropped = True
            logger.warning("16-bit TIFF written without its EXIF (the 16-bit TIFF writer cannot embed it); "
                           "choose PNG to keep it")
    else:
        data = _encode_pil(arr, fmt, int(quality), icc_profile, exif)
    return EncodedImage(data=data, format=fmt, bit_depth=8 * arr.dtype.itemsize, alpha_flattened=flattened,
                        reduced_to_8bit=reduced, metadata_dropped=dropped, alpha_uncompressed=raw_alpha)


def _prepared(pixels: np.ndarray, fmt: ImageFormat, quality: int, keep_16bit: bool) -> tuple[np.ndarray, bool, bool]:
    """The pixels as ``fmt`` holds them: ``(HxWxC array, reduced to 8 bits, alpha flattened onto white)``.

    Raises:
        InvalidSettingsError: quality out of range. InvalidInputError: pixels of the wrong shape or dtype.
    """
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise InvalidSettingsError(f"The quality must be a whole number from 1 to 100, got {quality!r}.")
    arr = as_pixels(pixels)
    reduced = arr.dtype == np.uint16 and (fmt in ("jpg", "webp") or not keep_16bit)
    if reduced:
        arr = to_8bit(arr)
    flattened = fmt == "jpg" and arr.shape[2] in (2, 4)
    if flattened:
        arr = _flatten_on_white(arr)
    return arr, reduced, flattened


WEBP_COMPRESSED_ALPHA_PIXELS = 4096 * 4096
"""The largest WebP (in pixels) whose alpha is compressed. libwebp's lossless alpha encoder holds ~24 bytes a pixel
whatever the alpha (0.4 GB at 4096²), which over ~30 MP takes a job past 1 GB + twice its output's bytes. Larger
transparent outputs go to PNG when the format is automatic (:func:`auto_format_change`); an explicit WebP stores its
alpha uncompressed (an ALPH chunk of 1 byte a pixel, :func:`_with_raw_alpha`): encoding then holds ~4 bytes a
pixel, and the file is larger (25.9 MB for a 5000² upscaled drawing with a round mask, whose PNG is 9.1 MB)."""


def _encode_webp(arr: np.ndarray, quality: int, icc: bytes | None, exif: bytes | None, *, reorder: bool,
                 compress_alpha: bool = True) -> bytes:
    """Lossy WebP (method 4) through OpenCV's libwebp, which imports BGR(A) pixels straight into YUV; ``reorder``:
    ``arr``'s red and blue are swapped in place for it and back (:func:`_red_blue_swapped`) instead of copied.
    Besides the pixels it holds libwebp's YUV planes and tokens (RGB ~2 bytes a pixel, the BGR copy 3 more) and,
    for alpha, the lossless encoder's buffers (~24 bytes a pixel whatever the alpha: :data:`_ENCODER_BYTES_PER_PIXEL`)
    where PIL's encoder (its copy, libwebp's ARGB, YUV and tokens) held 12.3 for RGB. The same VP8 and alpha
    bitstreams as PIL at the same quality, and the same ICC and EXIF chunks (compared byte for byte).
    ``compress_alpha`` False: the colour is encoded opaque (libwebp leaves out the alpha of an opaque image) and the
    alpha added uncompressed (see :data:`WEBP_COMPRESSED_ALPHA_PIXELS`)."""
    channels = arr.shape[2]

    def encoded(pixels: np.ndarray) -> bytes:
        return _opencv_encode(".webp", pixels, icc, exif, [cv2.IMWRITE_WEBP_QUALITY, quality])

    if channels in (2, 4) and not compress_alpha:
        if channels == 4 and reorder and arr.flags.c_contiguous:
            alpha = arr[..., 3].copy()
            try:
                arr[..., 3] = 255
                with _red_blue_swapped(arr):
                    colour = encoded(arr)
            finally:
                arr[..., 3] = alpha
        else:
            alpha = arr[..., -1]
            colour = encoded(cv2.cvtColor(arr, cv2.COLOR_RGBA2BGR) if channels == 4
                             else np.ascontiguousarray(arr[..., 0]))
        return _with_raw_alpha(colour, alpha)
    if channels in (3, 4):
        with _as_bgr(arr, reorder) as bgr:
            return encoded(bgr)
    if channels == 2:
        return encoded(np.concatenate([arr[..., :1]] * 3 + [arr[..., 1:]], axis=2))  # gray+alpha as BGRA
    return encoded(arr[..., 0])  # OpenCV expands gray itself


def _opencv_encode(extension: str, pixels: np.ndarray, icc: bytes | None, exif: bytes | None,
                   params: list[int]) -> bytes:
    """``pixels`` (BGR(A) or gray) encoded by OpenCV as ``extension``, with the ICC profile and EXIF block given.

    Raises:
        _EncoderFailed: the encoder failed.
    """
    kinds, chunks = [], []
    if icc:
        kinds.append(cv2.IMAGE_METADATA_ICCP)
        chunks.append(np.frombuffer(icc, np.uint8))
    if exif:  # OpenCV takes the TIFF structure without the JPEG marker's prefix, as a WebP EXIF chunk holds it
        kinds.append(cv2.IMAGE_METADATA_EXIF)
        chunks.append(np.frombuffer(_exif_tiff(exif), np.uint8))
    ok, data = cv2.imencodeWithMetadata(extension, pixels, kinds, chunks, params)
    if not ok:
        name = {".webp": "WebP", ".jpg": "JPEG"}.get(extension, extension)
        raise _EncoderFailed(f"The {name} encoder failed on a {pixels.shape[1]}x{pixels.shape[0]} image.")
    return data.tobytes()


class _EncoderFailed(ValueError):
    """OpenCV's encoder returned no image (it logs libwebp's or libjpeg's reason itself)."""


_JPEG_SEGMENT_ICC_BYTES, _JPEG_SEGMENT_EXIF_BYTES = 65519, 65527
"""The largest ICC profile and EXIF block (without its prefix) one JPEG APPn segment holds (65533 bytes less the
segment's signature); PIL splits a larger profile over several segments, OpenCV does not."""


def _jpeg_metadata_fits_one_segment(icc: bytes | None, exif: bytes | None) -> bool:
    return len(icc or b"") <= _JPEG_SEGMENT_ICC_BYTES and len(_exif_tiff(exif or b"")) <= _JPEG_SEGMENT_EXIF_BYTES


def _encode_jpeg(arr: np.ndarray, quality: int, icc: bytes | None, exif: bytes | None, *, reorder: bool) -> bytes:
    """Baseline JPEG through OpenCV's libjpeg-turbo, 4:4:4 from quality 90 and 4:2:0 below: byte for byte the file
    PIL writes (the same tables, JFIF, EXIF and ICC segments), compressed row by row from the pixels, so it holds
    only its encoded bytes where PIL held its copy of the image (4 bytes a pixel) too. Gray or RGB ``arr``
    (alpha is flattened first); ``reorder`` as for :func:`_encode_webp`."""
    sampling = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if quality >= 90 else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    if arr.shape[2] == 1:
        return _opencv_encode(".jpg", arr[..., 0], icc, exif, params)
    with _as_bgr(arr, reorder) as bgr:
        return _opencv_encode(".jpg", bgr, icc, exif, params)


_WEBP_CHUNK_ORDER = (b"VP8X", b"ICCP", b"ALPH", b"VP8 ", b"EXIF", b"XMP ")
_VP8X_FLAGS = {b"ICCP": 0x20, b"ALPH": 0x10, b"EXIF": 0x08, b"XMP ": 0x04}


def _with_raw_alpha(webp: bytes, alpha: np.ndarray) -> bytes:
    """An opaque lossy WebP (``webp``, its ``VP8`` chunk and any metadata) with ``alpha`` (``HxW`` uint8) added as
    an uncompressed ALPH chunk, in the extended format's order (VP8X first, with the alpha flag)."""
    chunks: dict[bytes, bytes] = {}
    at = 12
    while at + 8 <= len(webp):
        size = int.from_bytes(webp[at + 4:at + 8], "little")
        chunks[webp[at:at + 4]] = webp[at + 8:at + 8 + size]
        at += 8 + size + (size & 1)
    if b"VP8 " not in chunks:
        raise ValueError("The WebP encoder wrote no lossy colour chunk to add the alpha to.")
    height, width = alpha.shape
    flags = sum(bit for kind, bit in _VP8X_FLAGS.items() if kind in chunks or kind == b"ALPH")
    chunks[b"VP8X"] = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    sizes = {kind: len(chunks[kind]) for kind in _WEBP_CHUNK_ORDER if kind in chunks}
    sizes[b"ALPH"] = 1 + width * height  # a header byte (no pre-processing, no filter, no compression), the plane
    out = bytearray(12 + sum(8 + size + (size & 1) for size in sizes.values()))  # zeros: the pads and ALPH's header
    out[:12] = b"RIFF" + (len(out) - 8).to_bytes(4, "little") + b"WEBP"
    at = 12
    for kind in (kind for kind in _WEBP_CHUNK_ORDER if kind in sizes):
        out[at:at + 8] = kind + sizes[kind].to_bytes(4, "little")
        if kind == b"ALPH":
            out[at + 9:at + 8 + sizes[kind]] = memoryview(np.ascontiguousarray(alpha)).cast("B")
        else:
            out[at + 8:at + 8 + sizes[kind]] = chunks[kind]
        at += 8 + sizes[kind] + (sizes[kind] & 1)
    return bytes(out)


_SWAP_ROWS = 256
"""Rows of the bands :func:`_red_blue_swapped` reorders at a time (OpenCV's in-place conversion of a band)."""


@contextmanager
def _as_bgr(arr: np.ndarray, reorder: bool) -> Iterator[np.ndarray]:
    """RGB(A) ``arr`` as OpenCV's encoders take it, BGR(A): ``arr`` itself with red and blue swapped in place for
    the ``with`` block when ``reorder`` (and it is C-contiguous), else a copy."""
    if reorder and arr.flags.c_contiguous:
        with _red_blue_swapped(arr):
            yield arr
    else:
        yield cv2.cvtColor(arr, cv2.COLOR_RGB2BGR if arr.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)


@contextmanager
def _red_blue_swapped(pixels: np.ndarray) -> Iterator[np.ndarray]:
    """RGB(A) ``pixels`` (C-contiguous) as BGR(A) in place for the ``with`` block, then as they were, also when the
    block raises or is interrupted part-way through the swap (only the rows swapped are swapped back)."""
    code = cv2.COLOR_RGB2BGR if pixels.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    done = 0
    try:
        while done < pixels.shape[0]:
            band = pixels[done:done + _SWAP_ROWS]
            cv2.cvtColor(band, code, dst=band)
            done += band.shape[0]
        yield pixels
    finally:
        for top in range(0, done, _SWAP_ROWS):
            band = pixels[top:min(top + _SWAP_ROWS, done)]
            cv2.cvtColor(band, code, dst=band)


def _encode_pil(arr: np.ndarray, fmt: ImageFormat, quality: int, icc: bytes | None, exif: bytes | None) -> bytes:
    im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)  # 16-bit gray becomes PIL's I;16
    options: dict[str, object] = {}
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = _EXIF_PREFIX + _exif_tiff(exif)
    if fmt == "jpg":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "png":
        options.update(compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "tiff":
        options.update(compression="tiff_lzw")
    buffer = io.BytesIO()
    try:
        im.save(buffer, _PIL_SAVE_NAME[fmt], **options)
    except RuntimeError:
        if fmt != "tiff" or "exif" not in options:
            raise
        # PIL's libtiff (compressing) writer cannot write EXIF sub-folders; its own writer can, uncompressed.
        logger.info("writing the TIFF uncompressed to keep its EXIF data")
        options.pop("compression")
        buffer = io.BytesIO()
        im.save(buffer, "TIFF", **options)
    return buffer.getvalue()


def _tiff_in_strips(pixels: np.ndarray, exif: bytes | None) -> bool:
    """Whether a TIFF of ``pixels`` is compressed strip by strip (:func:`save_tiff_strips`: no copy of the image,
    deflate): all but images with EXIF (PIL's writer keeps it, uncompressed) and gray+alpha (16-bit is written as
    RGBA by :func:`_encode_tiff16`, PIL writes 8-bit)."""
    return not exif and (pixels.ndim == 2 or pixels.shape[2] != 2)


def _encode_tiff16(arr: np.ndarray, icc: bytes | None) -> bytes:
    """16-bit RGB(A) TIFF with tifffile, which marks alpha as alpha (ExtraSamples) and embeds ICC profiles.

    Gray+alpha is written as RGBA: few readers (PIL included) open 16-bit gray+alpha TIFFs.
    """
    import tifffile

    if arr.shape[2] == 2:
        arr = np.concatenate([arr[..., :1]] * 3 + [arr[..., 1:]], axis=2)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, arr, photometric="rgb", extrasamples=["unassalpha"] if arr.shape[2] == 4 else None,
                     compression="zlib", iccprofile=icc or None)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------------ save
def save_image(pixels: np.ndarray, path: str | os.PathLike, *, format: str | None = None, quality: int = 95,
               icc_profile: bytes | None = None, exif: bytes | None = None, keep_16bit: bool = True,
               in_place: bool = False) -> SavedImage:
    """Encode and write an image atomically: a killed process never leaves a half-written file at ``path``.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, then moved over ``path`` with
    ``os.replace``; on any failure the temporary file is removed and an existing ``path`` is left as it was. A PNG
    or a TIFF (without EXIF) is compressed from the pixels strip by strip (:func:`save_png_rows`,
    :func:`save_tiff_strips`), so saving it holds no copy of the image (an encoder's whole copy, PIL's 4 bytes per
    RGB pixel, and the encoded bytes added ~1.4x the pixels' size for PNG, 2.7x for PIL's LZW TIFF).
    :func:`encoding_bytes` says what each format holds.

    Args:
        pixels: as for :func:`encode_image`.
        path: destination; its folder must exist.
        format: png, jpg, webp or tiff; None to take it from the extension of ``path``.
        quality, icc_profile, exif, keep_16bit, in_place: as for :func:`encode_image`.

    Returns:
        The path, the number of bytes written and the flags of :class:`EncodedImage`. An image libwebp cannot
        encode is written as PNG, at ``path`` with the suffix ``.png`` (``webp_failed``).

    Raises:
        InvalidSettingsError: unknown format (or extension) or quality out of range.
        InvalidInputError: pixels of the wrong shape or dtype.
        OSError: the folder is missing or not writable, the disk is full...
    """
    target = Path(path)
    fmt = normalize_format(format if format is not None else target.suffix or "?")
    if fmt == "png":
        arr, reduced, _flattened = _prepared(pixels, fmt, quality, keep_16bit)
        with replaced_when_complete(target) as fh:
            _write_png_pixels(fh, arr, icc_profile, exif)
        return SavedImage(path=target, bytes_written=target.stat().st_size, format="png",
                          bit_depth=8 * arr.dtype.itemsize, reduced_to_8bit=reduced)
    if fmt == "tiff" and _tiff_in_strips(pixels, exif):
        arr, reduced, _flattened = _prepared(pixels, fmt, quality, keep_16bit)
        with replaced_when_complete(target) as fh:
            _write_tiff_pixels(fh, arr, icc_profile)
        return SavedImage(path=target, bytes_written=target.stat().st_size, format="tiff",
                          bit_depth=8 * arr.dtype.itemsize, reduced_to_8bit=reduced)
    encoded = encode_image(pixels, fmt, quality=quality, icc_profile=icc_profile, exif=exif, keep_16bit=keep_16bit,
                           in_place=in_place)
    if encoded.webp_failed:  # the bytes are a PNG: so is the file's name
        target = target.with_suffix(".png")
    written = write_atomic(target, encoded.data)
    return SavedImage(path=target, bytes_written=written, format=encoded.format, bit_depth=encoded.bit_depth,
                      alpha_flattened=encoded.alpha_flattened, reduced_to_8bit=encoded.reduced_to_8bit,
                      metadata_dropped=encoded.metadata_dropped, alpha_uncompressed=encoded.alpha_uncompressed,
                      webp_failed=encoded.webp_failed)


# ------------------------------------------------------------------------------------------------ streamed TIFF
STREAMED_FORMATS: tuple[ImageFormat, ...] = ("tiff", "png")  # what save_rows writes without the whole image


def save_rows(rows: "Iterable[np.ndarray]", path: str | os.PathLike, fmt: str, *, size: tuple[int, int],
              channels: int, dtype, icc_profile: bytes | None = None) -> SavedImage:
    """Write an image from row blocks that arrive top to bottom, never holding it whole (peak memory: one strip
    and one block, whatever the image's size), as a TIFF (:func:`save_tiff_strips`) or a PNG
    (:func:`save_png_rows`), ``fmt`` being one of :data:`STREAMED_FORMATS`."""
    name = normalize_format(fmt)
    if name == "tiff":
        return save_tiff_strips(rows, path, size=size, channels=channels, dtype=dtype, icc_profile=icc_profile)
    if name == "png":
        return save_png_rows(rows, path, size=size, channels=channels, dtype=dtype, icc_profile=icc_profile)
    raise InvalidInputError(f"A streamed output is written as {' or '.join(f.upper() for f in STREAMED_FORMATS)}, "
                            f"not {fmt}.")


def _checked_rows(rows: "Iterable[np.ndarray]", size: tuple[int, int], channels: int,
                  dtype: np.dtype) -> "Iterator[np.ndarray]":
    """The blocks of ``rows``, each checked against the image's width, channels and dtype, and their rows
    counted: exactly the image's height in all."""
    width, height = size
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)) or channels not in _MODE_BY_CHANNELS:
        raise InvalidInputError(f"A streamed image holds uint8/uint16 with 1..4 channels, got {dtype}, {channels}.")
    seen = 0
    for block in rows:
        if block.ndim != 3 or block.shape[1:] != (width, channels) or block.dtype != dtype:
            raise InvalidInputError(f"Row block of shape {block.shape} and {block.dtype} does not fit a "
                                    f"{width}x{height}x{channels} {dtype} image.")
        seen += block.shape[0]
        if seen > height:
            break
        yield block
    if seen != height:
        raise InvalidInputError(f"The streamed image had {seen} rows, expected {height}.")


def save_tiff_strips(rows: "Iterable[np.ndarray]", path: str | os.PathLike, *, size: tuple[int, int],
                     channels: int, dtype, icc_profile: bytes | None = None, rows_per_strip: int = 64) -> SavedImage:
    """Write a TIFF from row blocks that arrive top to bottom, never holding the image whole (peak memory: one
    strip and one block, whatever the image's size).

    Strips of ``rows_per_strip`` rows are deflate-compressed here and handed to tifffile as they fill; the file
    goes to a temporary name in the same folder and is moved over ``path`` only once complete (a failure or a
    killed process leaves no partial file at ``path``).

    Args:
        rows: ``hxWxC`` blocks (any heights, C = ``channels``, of ``dtype``) that together make the image.
        path: destination; its folder must exist.
        size: (width, height) of the whole image.
        channels: 1..4 (Gray, Gray+Alpha, RGB, RGBA); alpha is marked as unassociated alpha.
        dtype: uint8 or uint16.
        icc_profile: ICC profile to embed.
        rows_per_strip: rows per strip.

    Raises:
        InvalidInputError: a block of the wrong shape or dtype, or not exactly ``height`` rows in all.
        OSError: the folder is missing or not writable, the disk is full...
    """
    with replaced_when_complete(path) as handle:
        _write_tiff(handle, rows, size=size, channels=channels, dtype=dtype, icc_profile=icc_profile,
                    rows_per_strip=rows_per_strip)
    target = Path(path)
    return SavedImage(path=target, bytes_written=target.stat().st_size, format="tiff",
                      bit_depth=8 * np.dtype(dtype).itemsize)


def _write_tiff(fh: IO[bytes], rows: "Iterable[np.ndarray]", *, size: tuple[int, int], channels: int, dtype,
                icc_profile: bytes | None, rows_per_strip: int = 64) -> None:
    """The TIFF of :func:`save_tiff_strips`, written to ``fh``: deflate strips compressed as the rows arrive."""
    import tifffile

    width, height = size
    dtype = np.dtype(dtype)

    def strips():
        pending, held, seen = [], 0, 0
        for block in _checked_rows(rows, size, channels, dtype):
            seen += block.shape[0]
            pending.append(block)
            held += block.shape[0]
            while held >= rows_per_strip or (seen == height and held):
                joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                strip, rest = joined[:rows_per_strip], joined[rows_per_strip:]
                yield zlib.compress(np.ascontiguousarray(strip).tobytes(), 6)
                pending, held = ([rest] if len(rest) else []), len(rest)

    photometric = "rgb" if channels >= 3 else "minisblack"
    extra = ["unassalpha"] if channels in (2, 4) else None
    tifffile.imwrite(fh, data=strips(), shape=(height, width, channels), dtype=dtype, photometric=photometric,
                     extrasamples=extra, rowsperstrip=rows_per_strip, compression="zlib",
                     iccprofile=icc_profile or None)


def _write_tiff_pixels(fh: IO[bytes], pixels: np.ndarray, icc_profile: bytes | None) -> None:
    """:func:`_write_tiff` of whole ``HxWxC`` pixels, 64 rows (views, no copy) at a time."""
    height, width, channels = pixels.shape
    _write_tiff(fh, (pixels[top:top + 64] for top in range(0, height, 64)), size=(width, height),
                channels=channels, dtype=pixels.dtype, icc_profile=icc_profile)


_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # gray, gray+alpha, RGB, RGBA
_PNG_IDAT_BYTES = 1 << 20  # compressed bytes gathered into one IDAT chunk


def save_png_rows(rows: "Iterable[np.ndarray]", path: str | os.PathLike, *, size: tuple[int, int],
                  channels: int, dtype, icc_profile: bytes | None = None, exif: bytes | None = None,
                  compress_level: int = PNG_COMPRESS_LEVEL) -> SavedImage:
    """Write a PNG from row blocks that arrive top to bottom, never holding the image whole (peak memory: one
    block and the compressor's window, whatever the image's size).

    Every row is filtered with PNG's *Up* filter (the byte difference to the row above, carried across blocks)
    and deflated by one running ``zlib`` stream, cut into IDAT chunks of about 1 MB; 16-bit samples are written
    big-endian as PNG requires. The file goes to a temporary name in the same folder and is moved over ``path``
    only once complete.

    Args:
        rows: ``hxWxC`` blocks (any heights, C = ``channels``, of ``dtype``), RGB order, that make the image.
        path: destination; its folder must exist.
        size: (width, height) of the whole image.
        channels: 1..4 (Gray, Gray+Alpha, RGB, RGBA).
        dtype: uint8 or uint16.
        icc_profile: ICC profile to embed (an ``iCCP`` chunk).
        exif: EXIF block to embed (an ``eXIf`` chunk), with or without the ``Exif\\0\\0`` prefix.
        compress_level: zlib level 0..9.

    Raises:
        InvalidInputError: a block of the wrong shape or dtype, or not exactly ``height`` rows in all.
        OSError: the folder is missing or not writable, the disk is full...
    """
    dtype = np.dtype(dtype)
    with replaced_when_complete(path) as fh:
        _write_png(fh, rows, size=size, channels=channels, dtype=dtype, icc_profile=icc_profile, exif=exif,
                   compress_level=compress_level)
    target = Path(path)
    return SavedImage(path=target, bytes_written=target.stat().st_size, format="png", bit_depth=8 * dtype.itemsize)


def _write_png(fh: IO[bytes], rows: "Iterable[np.ndarray]", *, size: tuple[int, int], channels: int, dtype: np.dtype,
               icc_profile: bytes | None, exif: bytes | None, compress_level: int = PNG_COMPRESS_LEVEL) -> None:
    """The one PNG encoder (see :func:`save_png_rows`): the file's bytes from row blocks, written to ``fh``."""
    width, height = size
    blocks = _checked_rows(rows, size, channels, dtype)  # checks the dtype and channels on its first step
    header = struct.pack(">IIBBBBB", width, height, 8 * dtype.itemsize, _PNG_COLOUR_TYPE.get(channels, 0), 0, 0, 0)
    fh.write(_PNG_SIGNATURE)
    _write_chunk(fh, b"IHDR", header)
    if icc_profile:
        _write_chunk(fh, b"iCCP", b"icc\x00\x00" + zlib.compress(icc_profile))
    if exif:
        _write_chunk(fh, b"eXIf", _exif_tiff(exif))
    deflate, pending, above = zlib.compressobj(compress_level), [], None
    for block in blocks:
        data = np.ascontiguousarray(block.astype(">u2", copy=False) if dtype.itemsize == 2 else block)
        lines = data.reshape(block.shape[0], -1).view(np.uint8)
        previous = np.empty_like(lines)
        previous[1:] = lines[:-1]
        previous[0] = above if above is not None else 0
        filtered = np.empty((lines.shape[0], lines.shape[1] + 1), np.uint8)
        filtered[:, 0] = 2  # the Up filter
        np.subtract(lines, previous, out=filtered[:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's
        above = lines[-1].copy()
        pending.append(deflate.compress(filtered.tobytes()))
        if sum(map(len, pending)) >= _PNG_IDAT_BYTES:
            _write_chunk(fh, b"IDAT", b"".join(pending))
            pending = []
    pending.append(deflate.flush())
    _write_chunk(fh, b"IDAT", b"".join(pending))
    _write_chunk(fh, b"IEND", b"")


def _write_chunk(fh: IO[bytes], kind: bytes, data: bytes) -> None:
    """One PNG chunk: length, type, data and the CRC of type and data, written without joining them."""
    fh.write(struct.pack(">I", len(data)) + kind)
    fh.write(data)
    fh.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF))


def _write_png_pixels(fh: IO[bytes], pixels: np.ndarray, icc_profile: bytes | None, exif: bytes | None) -> None:
    """:func:`_write_png` of whole ``HxWxC`` pixels, 64 rows (views, no copy) at a time."""
    height, width, channels = pixels.shape
    _write_png(fh, (pixels[top:top + 64] for top in range(0, height, 64)), size=(width, height), channels=channels,
               dtype=pixels.dtype, icc_profile=icc_profile, exif=exif)
