"""Hostile images for the fuzz tests and ``bench/fuzz_decoders.py``: decompression bombs, lying headers and
seeded byte mutations of small valid files. Pure functions of a seed; nothing is written unless asked.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Iterator

import numpy as np
from PIL import Image

#: Formats the mutation corpus is built from (PIL names).
MUTATION_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")


def png_chunk(kind: bytes, payload: bytes, length: int | None = None) -> bytes:
    """One PNG chunk; ``length`` overrides the declared length (to lie about it)."""
    declared = len(payload) if length is None else length
    return struct.pack(">I", declared) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth,
                                                                  colour_type, 0, 0, 0))


def lying_idat_png() -> bytes:
    """The 2.7 KB 16-bit RGB PNG whose IDAT length reads 0xFFFFFFFF (libpng allocated ~4 GB for it)."""
    rows = b"".join(b"\x00" + bytes(range(256)) * 3 * 2 for _ in range(8))[: 8 * (1 + 32 * 6)]
    data = zlib.compress(rows * 20)
    return png_header(32, 8, 16, 2) + png_chunk(b"IDAT", data, length=0xFFFFFFFF) + png_chunk(b"IEND", b"")


def bombs() -> dict[str, bytes]:
    """Headers that promise far more pixels (or bytes) than any limit allows, plus the lying-IDAT PNG."""
    out = {"png-50000x50000": png_header(50000, 50000) + png_chunk(b"IEND", b""),
           "png-16bit-idat-4gb": lying_idat_png(),
           "png-idat-over-pixels": png_header(4, 4) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 300_000, 0))
           + png_chunk(b"IEND", b"")}
    gif = bytearray(b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;")
    out["gif-65535x65535"] = bytes(gif)
    tiff = io.BytesIO()
    Image.new("L", (8, 8)).save(tiff, format="TIFF")
    raw = bytearray(tiff.getvalue())
    _patch_tiff_size(raw, 100000, 100000)
    out["tiff-100000x100000"] = bytes(raw)
    jpeg = bytearray(_encode(np.zeros((8, 8, 3), np.uint8), "JPEG"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65500, 65500)
    out["jpeg-65500x65500"] = bytes(jpeg)
    frames = [Image.new("P", (4, 4), i % 256) for i in range(5000)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out["gif-5000-frames"] = buf.getvalue()
    return out


def _patch_tiff_size(raw: bytearray, width: int, height: int) -> None:
    """Rewrite ImageWidth/ImageLength of a little-endian TIFF's first IFD in place."""
    ifd = struct.unpack_from("<I", raw, 4)[0]
    count = struct.unpack_from("<H", raw, ifd)[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", raw, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:
                struct.pack_into("<HHIHH", raw, entry, tag, 4, 1, 0, 0)
            struct.pack_into("<I", raw, entry + 8, value)
            struct.pack_into("<H", raw, entry + 2, 4)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def seed_images(size: int = 24) -> dict[str, bytes]:
    """One small valid file per format in :data:`MUTATION_FORMATS` (a gradient with noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 10, yy * 10, (xx + yy) * 5], axis=2) + rng.integers(0, 20, (size, size, 3))
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    return {fmt: _encode(pixels, fmt) for fmt in MUTATION_FORMATS}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation: flipped bits, overwritten bytes, a truncation, a duplicated or deleted span, or a
    header field set to an extreme value."""
    buf = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif kind == 2:
        buf = buf[: rng.randrange(1, len(buf))]
    elif kind == 3:
        start = rng.randrange(len(buf))
        end = min(len(buf), start + rng.randint(1, 64))
        buf[start:start] = buf[start:end] * rng.randint(1, 4)
    elif kind == 4:
        start = rng.randrange(len(buf))
        del buf[start:start + rng.randint(1, 64)]
    else:  # an extreme 32-bit value somewhere in the first 64 bytes (sizes, lengths, offsets live there)
        i = rng.randrange(min(len(buf) - 4, 60))
        struct.pack_into(">I", buf, i, rng.choice((0, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 1)))
    return bytes(buf)


def mutations(count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``count`` mutated files, spread evenly over the formats: ``(name, data)``."""
    rng = random.Random(seed)
    seeds = seed_images()
    for i in range(count):
        fmt = MUTATION_FORMATS[i % len(MUTATION_FORMATS)]
        yield f"{fmt.lower()}-{seed}-{i}", mutate(seeds[fmt], rng)
