"""Input validation: image headers, numeric settings, file names and video files.

Everything here is pure or reads only what it must (an image *header*, a file's size), so it is cheap enough to
run on every request before any pixel is decoded. Failures raise the app's domain exceptions from
:mod:`utils.errors` (``UnsupportedFormatError``, ``InputTooLargeError``, ``InvalidInputError``), all
``ValueError`` s whose messages say what to do, so callers let them through unchanged. This module imports neither
``engine`` nor ``ui``.
"""

from __future__ import annotations

import io
import os
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Union

from PIL import Image

from utils.errors import InputTooLargeError, InvalidInputError, UnsupportedFormatError

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "ImageHeader",
    "ImageSource",
    "check_image_header",
    "check_png_chunks",
    "format_megapixels",
    "pixel_limit_message",
    "png_ihdr",
    "probe_image",
    "sanitize_filename",
    "validate_video_file",
]

#: Image formats accepted as input, as PIL names them, sniffed from the content (never from the extension).
ALLOWED_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")

#: What the user reads in messages, in the same order.
_ALLOWED_HUMAN = "PNG, JPEG, WebP, TIFF or BMP"

#: PIL formats that are another face of an allowed one (cameras write JPEGs that PIL opens as MPO).
_FORMAT_ALIASES = {"MPO": "JPEG"}

FILENAME_MAX_CHARS = 200
_FILENAME_MAX_BYTES = 255  # common file-system limit on one name, in UTF-8 bytes

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]


# --------------------------------------------------------------------------------------------------- image header
@dataclass(frozen=True)
class ImageHeader:
    """What an image header says, read without decoding any pixel.

    Attributes:
        format: PIL format name, one of :data:`ALLOWED_IMAGE_FORMATS` (``"MPO"`` is reported as ``"JPEG"``).
        width: width in pixels.
        height: height in pixels.
        mode: PIL mode of the decoded image (``"RGB"``, ``"RGBA"``, ``"L"``, ``"I;16"``, ``"P"``...). For 16-bit
            colour PNG/TIFF PIL reports ``"RGB"``/``"RGBA"``; the loader reads those at full depth.
        n_frames: number of frames or pages (1 for still images); only the first is ever processed.
    """

    format: str
    width: int
    height: int
    mode: str
    n_frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


def format_megapixels(pixels: float) -> str:
    """``2_500_000_000`` → ``"2500 MP"``, ``12_345_678`` → ``"12.3 MP"``, ``40_000`` → ``"0.04 MP"``."""
    mp = pixels / 1e6
    text = f"{mp:.0f}" if mp >= 100 else f"{mp:.1f}" if mp >= 1 else f"{mp:.2f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} MP"


def _format_megabytes(n_bytes: float) -> str:
    if n_bytes < 1024 * 1024:
        return f"{n_bytes / 1024:.0f} KB" if n_bytes >= 1024 else f"{n_bytes:.0f} bytes"
    text = f"{n_bytes / (1024 * 1024):.1f}"
    return f"{text[:-2] if text.endswith('.0') else text} MB"


def pixel_limit_message(width: int, height: int, max_pixels: int) -> str:
    """The message for an image over ``max_pixels``; shared with the loader."""
    return (f"The image is too large: {width}×{height} = {format_megapixels(width * height)}; the limit is "
            f"{format_megapixels(max_pixels)}. Downscale it first, or raise REALESRGAN_MAX_INPUT_PIXELS.")


def check_image_header(source: ImageSource, *, max_pixels: int, max_bytes: int | None = None) -> ImageHeader:
    """Sniff an image's format and size from its header, refusing what must not be decoded.

    Only the header is read (PIL's ``open`` is lazy), so a 50000×50000 PNG is refused at once without allocating
    its pixels. The format comes from the content; the extension is ignored. Our own pixel limit is checked on
    the header; PIL's decompression-bomb protection stays in force when the pixels are later decoded.

    Args:
        source: a path, the file's bytes, or a binary file object (read from its current position, which is
            restored afterwards).
        max_pixels: largest accepted ``width * height``.
        max_bytes: largest accepted file size in bytes; None for no limit.

    Returns:
        The header of the first frame.

    Raises:
        InputTooLargeError: the file or the image is over a limit.
        UnsupportedFormatError: the content is not PNG, JPEG, WebP, TIFF or BMP.
        InvalidInputError: the file is empty, its header claims an allowed format but cannot be parsed, or the
            path does not exist or is not a file.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    return probe_image(source, max_pixels=max_pixels, max_bytes=max_bytes)


def probe_image(source: ImageSource, *, max_pixels: int | None, max_bytes: int | None = None) -> ImageHeader:
    """:func:`check_image_header` where ``max_pixels`` may be None (format and sanity checks only)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        size = _file_size(path)
        _check_bytes(size, max_bytes)
        with path.open("rb") as fp:
            return _probe_stream(fp, size, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_bytes(len(data), max_bytes)
        return _probe_stream(io.BytesIO(data), len(data), max_pixels)
    if hasattr(source, "read") and hasattr(source, "seek"):
        start = source.tell()
        try:
            size = source.seek(0, io.SEEK_END) - start
            source.seek(start)
            _check_bytes(size, max_bytes)
            return _probe_stream(_Window(source, start), size, max_pixels)
        finally:
            source.seek(start)
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")


def _file_size(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidInputError(f"File not found: {path}.") from None
    if not path.is_file():
        raise InvalidInputError(f"Not a regular file: {path}.")
    return st.st_size


def _check_bytes(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise InputTooLargeError(f"The file is too large: {_format_megabytes(size)}; the limit is "
                                 f"{_format_megabytes(max_bytes)}. Compress or downscale it first, or raise "
                                 "REALESRGAN_MAX_UPLOAD_MB.", actual=size, limit=max_bytes)


class _Window(io.RawIOBase):
    """A read-only view of a file object that starts at ``start`` (so PIL sees position 0 there)."""

    def __init__(self, fp: IO[bytes], start: int):
        super().__init__()
        self._fp, self._start = fp, start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._fp.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            return self._fp.seek(self._start + offset) - self._start
        return self._fp.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._fp.tell() - self._start


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Signatures of common non-image (or not-allowed) files PIL does not know, to name them in messages.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"PK\x03\x04", "ZIP"),
)


def png_ihdr(prefix: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, bit_depth, colour_type)`` from a PNG's first 29 bytes, or None if not a PNG."""
    if len(prefix) < 29 or not prefix.startswith(_PNG_SIGNATURE) or prefix[12:16] != b"IHDR":
        return None
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", prefix[16:26])
    return width, height, bit_depth, colour_type


_PNG_MAX_CHUNK = 2**31 - 1  # the PNG specification's largest chunk length
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel by colour type


def png_raw_bytes(width: int, height: int, bit_depth: int, colour_type: int) -> int:
    """Bytes of a PNG's filtered, uncompressed image data (one filter byte per row), as its IHDR declares it."""
    bits_per_row = width * _PNG_CHANNELS.get(colour_type, 4) * bit_depth
    return height * (1 + (bits_per_row + 7) // 8)


def check_png_chunks(fp: IO[bytes], size: int, ihdr: tuple[int, int, int, int]) -> None:
    """Walk a PNG's chunk headers (no data is read) and refuse a file whose chunks lie about their lengths.

    A decoder trusts a chunk's length to size its buffers, so a 3 KB file whose IDAT claims 4 GB makes libpng
    allocate 4 GB before it finds out. Refused here: a chunk longer than the PNG maximum or than what is left of
    the file, and compressed image data (IDAT) much larger than the pixels the header declares (deflate never
    needs more than a few bytes per 64 KB over the raw size).

    Args:
        fp: the file, positioned anywhere (it is read from offset 8).
        size: the file's size in bytes.
        ihdr: ``(width, height, bit_depth, colour_type)`` from :func:`png_ihdr`.

    Raises:
        InvalidInputError: a chunk length that cannot be true.
    """
    raw = png_raw_bytes(*ihdr)
    idat_budget = raw + raw // 100 + 65536
    idat_total = 0
    offset = 8
    fp.seek(offset)
    while offset + 8 <= size:
        head = fp.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if length > _PNG_MAX_CHUNK or offset + 12 + length > size:
            raise InvalidInputError(
                f"The PNG image could not be decoded; it may be damaged or not an image (a "
                f"{kind.decode('latin-1')!r} chunk claims {_format_megabytes(length)}, more than the whole file of "
                f"{_format_megabytes(size)}). Re-export the image and try again.")
        if kind == b"IDAT":
            idat_total += length
            if idat_total > idat_budget:
                raise InvalidInputError(
                    f"The PNG image could not be decoded; it may be damaged or not an image (it holds "
                    f"{_format_megabytes(idat_total)} of compressed pixels, more than its {ihdr[0]}×{ihdr[1]} "
                    "pixels can need). Re-export the image and try again.")
        if kind == b"IEND":
            break
        offset += 12 + length
        fp.seek(offset)


def _probe_stream(fp: IO[bytes], size: int, max_pixels: int | None) -> ImageHeader:
    if size == 0:
        raise InvalidInputError("The file is empty (0 bytes): it may not have finished copying or downloading. "
                                "Choose it again once it has.")
    prefix = fp.read(32)
    fp.seek(0)

    # PNG: the size is at a fixed place; check it before PIL, which needs more of the file than the IHDR.
    ihdr = png_ihdr(prefix)
    if ihdr is not None and max_pixels is not None and ihdr[0] * ihdr[1] > max_pixels:
        raise InputTooLargeError(pixel_limit_message(ihdr[0], ihdr[1], max_pixels),
                                 actual=ihdr[0] * ihdr[1], limit=max_pixels)

    if ihdr is not None:
        check_png_chunks(fp, size, ihdr)
        fp.seek(0)
    im = _open_header(fp, prefix)
    width, height = im.size
    fmt = _FORMAT_ALIASES.get(im.format or "", im.format or "")
    if width < 1 or height < 1:
        raise InvalidInputError(f"The {fmt} header says {width}×{height} pixels; the image could not be decoded; "
                                "it may be damaged or not an image.")
    if max_pixels is not None and width * height > max_pixels:
        raise InputTooLargeError(pixel_limit_message(width, height, max_pixels), actual=width * height,
                                 limit=max_pixels)
    try:
        n_frames = int(getattr(im, "n_frames", 1))
    except Exception:  # a broken frame index: the first frame may still decode; the loader will tell
        n_frames = 1
    return ImageHeader(format=fmt, width=width, height=height, mode=im.mode, n_frames=n_frames)


def _open_header(fp: IO[bytes], prefix: bytes) -> Image.ImageFile.ImageFile:
    """Parse the header with the first allowed PIL plugin that accepts ``prefix``; no pixel is decoded.

    Calls the plugin factory directly (what ``Image.open`` does) so that *our* limit, not PIL's bomb check,
    decides on the size and the message can give the dimensions; PIL's check still runs at decode time.
    """
    Image.preinit()
    if any(fmt not in Image.OPEN for fmt in ALLOWED_IMAGE_FORMATS):
        Image.init()
    for fmt in ALLOWED_IMAGE_FORMATS:
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix[:16]) if accept else True
        if isinstance(verdict, str) or not verdict:
            continue
        fp.seek(0)
        try:
            return factory(fp, None)
        except (SyntaxError, IndexError, TypeError, struct.error, EOFError, OSError, ValueError) as exc:
            raise InvalidInputError(f"The {fmt} image could not be decoded; it may be damaged or not an image "
                                    f"({exc}).") from None
    raise UnsupportedFormatError(_unsupported_message(prefix))


def _unsupported_message(prefix: bytes) -> str:
    what = _name_other_format(prefix)
    if what:
        return f"{what} files are not supported; use {_ALLOWED_HUMAN} (the type is detected from the content)."
    return (f"The file is not a supported image; use {_ALLOWED_HUMAN} "
            "(the type is detected from the content, not the extension).")


def _name_other_format(prefix: bytes) -> str | None:
    head = prefix.lstrip()
    for signature, name in _OTHER_SIGNATURES:
        if head[: len(signature)].lower() == signature.lower():
            return name
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt in ALLOWED_IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(prefix[:16]):
                return fmt
        except Exception:  # a plugin's sniffer choking on odd bytes just means "not this format"
            continue
    return None


# ------------------------------------------------------------------------------------------------------ file names
_RESERVED_CHARS = re.compile(r'[<>:"/\\|?*]')
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)
_EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


def sanitize_filename(name: str, *, default: str = "image") -> str:
    """Turn an untrusted name (an upload's name, a user's text) into a safe single file name.

    Keeps the last path component only (so ``../../etc/passwd`` becomes ``passwd``), removes control and
    invisible format characters (``\\x00``, ``\\n``, right-to-left overrides), replaces characters Windows
    forbids with ``_``, strips leading dots (no hidden files, no ``..``) and trailing dots/spaces, prefixes
    Windows device names (``CON`` → ``_CON``), keeps a plain extension (``.png``), and caps the result at
    200 characters and 255 UTF-8 bytes, shortening the stem rather than the extension.

    Args:
        name: the untrusted name.
        default: stem used when nothing usable is left.

    Returns:
        A non-empty name with no directory part.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"A file name must be text, got {type(name).__name__}.")
    text = unicodedata.normalize("NFC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"))
    text = re.split(r"[/\\]", text)[-1]
    text = _RESERVED_CHARS.sub("_", text).strip()

    stem, ext = os.path.splitext(text)
    if not _EXTENSION.match(ext):
        stem, ext = text, ""
    stem = stem.lstrip(". ").rstrip(". ")
    if not stem:
        stem = default
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    ext = ext.lower()

    budget = FILENAME_MAX_CHARS - len(ext)
    stem = stem[:budget]
    while len((stem + ext).encode("utf-8")) > _FILENAME_MAX_BYTES:
        stem = stem[:-1]
    stem = stem.rstrip(". ") or default
    return stem + ext


# ----------------------------------------------------------------------------------------------------------- video
def validate_video_file(path: str | os.PathLike, max_bytes: int) -> Path:
    """Check that a video file exists, is a non-empty regular file and is not over ``max_bytes``.

    This is the cheap first gate; decoding problems are found later by probing with ffmpeg.

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        InvalidInputError: missing, a directory, empty or unreadable.
        InputTooLargeError: over ``max_bytes``.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"Video file not found: {p}.")
    if not p.is_file():
        raise InvalidInputError(f"Not a regular file: {p}; choose a video file.")
    size = p.stat().st_size
    if size == 0:
        raise InvalidInputError(f"The video file {p.name} is empty (0 bytes): it may not have finished copying or "
                                "downloading. Choose it again once it has.")
    if size > max_bytes:
        raise InputTooLargeError(f"The video is too large: {_format_megabytes(size)}; the limit is "
                                 f"{_format_megabytes(max_bytes)}. Trim or compress it first, or raise "
                                 "REALESRGAN_MAX_VIDEO_MB.", actual=size, limit=max_bytes)
    if not os.access(p, os.R_OK):
        raise InvalidInputError(f"The video file {p} is not readable; check its permissions.")
    return p
