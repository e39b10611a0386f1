"""Finishing the network's output band by band: resize to the target size and convert to the output dtype.

The tiled engine (:class:`engine.upscaler.BandStream`) gives finished rows at the network's scale, top to bottom.
:class:`BandResizer` turns that stream into rows of the target size exactly as one ``cv2.resize`` of the whole
image would (Lanczos-4 up, area down), without ever holding the whole float image:

* the source/target height ratio is reduced to ``p / q``; bands start at output rows that are multiples of ``q``
  (source rows that are multiples of ``p``), so a band's slice sees the same kernel phases as the whole image;
* each slice carries ``margin`` >= 8 source rows of context above and below (a multiple of ``p``; the Lanczos-4
  kernel reads 4 rows each side, the area filter only rows inside its cell), so rows away from the slice's own
  edges never see the edge; the rows at the image's top and bottom see the same border rule as the whole image.

OpenCV computes each output row's kernel phase in double precision from its row number, so a band's phase can
differ from the whole image's in the last bit when ``p / q`` is not exact in binary; the resulting float
difference is ~1e-7, which moves an 8- or 16-bit value by at most one step (and practically never).

:class:`OutputCanvas` is the preallocated output (the input's channel layout and dtype); writers convert each
band straight into it. Pure numpy/OpenCV; no torch.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import cv2
import numpy as np

#: Output rows per resized band (rounded up to the ratio's period ``q``).
BAND_ROWS = 64


class BandResizer:
    """Resize a top-to-bottom stream of source rows to ``dst_size`` band by band (see the module docstring).

    Args:
        src_size: (width, height) of the whole source image.
        dst_size: (width, height) of the target.
        band_rows: output rows per band (rounded up to the ratio's period).
    """

    def __init__(self, src_size: tuple[int, int], dst_size: tuple[int, int], band_rows: int = BAND_ROWS):
        (self.src_w, self.src_h), (self.dst_w, self.dst_h) = src_size, dst_size
        self.identity = src_size == dst_size
        shrinking = self.dst_w < self.src_w and self.dst_h < self.src_h
        self.interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
        ratio = Fraction(self.src_h, self.dst_h)
        self.p, self.q = ratio.numerator, ratio.denominator
        self.margin = self.p * math.ceil(8 / self.p)
        self.out_step = self.q * max(1, math.ceil(band_rows / self.q))
        self.src_step = self.out_step * self.p // self.q
        self._pending: list[np.ndarray] = []
        self._pending_top = 0  # source row of the first pending row
        self._received = 0
        self._next_out = 0

    @property
    def buffer_rows(self) -> int:
        """Source rows held at most (for the memory plan)."""
        return self.src_step + 2 * self.margin

    def push(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Take the next source rows (hxWxC float32); returns the finished ``(first output row, rows)`` bands."""
        if rows.shape[0] == 0:
            return []
        if self.identity:
            top = self._received
            self._received += rows.shape[0]
            return [(top, rows)]
        self._pending.append(rows)
        self._received += rows.shape[0]
        return self._drain(final=False)

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """The remaining bands once every source row was pushed."""
        if self.identity:
            return []
        if self._received != self.src_h:
            raise ValueError(f"BandResizer got {self._received} of {self.src_h} source rows")
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[int, np.ndarray]]:
        out = []
        while self._next_out < self.dst_h:
            first = self._next_out
            count = min(self.out_step, self.dst_h - first)
            start_src = first * self.p // self.q
            lo = max(0, start_src - self.margin)
            hi = min(self.src_h, start_src + self.src_step + self.margin)
            if hi > self._received and not final:
                break
            block = self._rows(lo, hi)
            height = (hi - lo) * self.q // self.p
            resized = cv2.resize(block, (self.dst_w, height), interpolation=self.interpolation)
            if resized.ndim == 2:
                resized = resized[:, :, None]
            skip = (start_src - lo) * self.q // self.p
            out.append((first, np.clip(resized[skip:skip + count], 0.0, 1.0)))
            self._next_out = first + count
            self._forget(max(0, self._next_out * self.p // self.q - self.margin))
        return out

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        if len(self._pending) > 1:
            self._pending = [np.concatenate(self._pending)]
        return self._pending[0][lo - self._pending_top:hi - self._pending_top]

    def _forget(self, below: int) -> None:
        """Drop pending source rows above ``below`` (no later band reads them)."""
        if below <= self._pending_top or not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending = [block[below - self._pending_top:].copy()]
        self._pending_top = below


def to_dtype(rows: np.ndarray, dtype) -> np.ndarray:
    """float rows in [0, 1] → ``uint8``/``uint16`` (round half to even, as ``np.round``); float32 passes through."""
    if np.dtype(dtype) == np.float32:
        return rows.astype(np.float32, copy=False)
    top = 65535.0 if np.dtype(dtype) == np.uint16 else 255.0
    return np.clip(np.round(rows * top), 0, top).astype(dtype)


class OutputCanvas:
    """The preallocated output image (HxWxC, the input's layout) that band writers fill.

    Args:
        size: (width, height).
        channels: 1..4 (Gray, Gray+Alpha, RGB, RGBA).
        dtype: uint8, uint16 or float32.
    """

    def __init__(self, size: tuple[int, int], channels: int, dtype):
        self.width, self.height = size
        self.channels = channels
        self.pixels = np.empty((self.height, self.width, channels), dtype=dtype)
        self.has_alpha = channels in (2, 4)
        self.colour_channels = channels - 1 if self.has_alpha else channels

    def colour_writer(self, src_size: tuple[int, int], image: int = 0) -> "BandWriter":
        """A writer of the colour (RGB float bands at ``src_size``) into the colour channels."""
        return BandWriter(BandResizer(src_size, (self.width, self.height)), self._put_colour, image)

    def alpha_writer(self, src_size: tuple[int, int], image: int = 0) -> "BandWriter":
        """A writer of alpha (float bands with 1 or 3 equal channels at ``src_size``) into the alpha channel."""
        return BandWriter(BandResizer(src_size, (self.width, self.height)), self._put_alpha, image)

    def _put_colour(self, top: int, rows: np.ndarray) -> None:
        if self.colour_channels == 1:
            rows = cv2.cvtColor(np.ascontiguousarray(rows), cv2.COLOR_RGB2GRAY)[:, :, None]
        self.pixels[top:top + rows.shape[0], :, :self.colour_channels] = to_dtype(rows, self.pixels.dtype)

    def _put_alpha(self, top: int, rows: np.ndarray) -> None:
        alpha = rows.mean(axis=2, keepdims=True) if rows.shape[2] > 1 else rows
        self.pixels[top:top + rows.shape[0], :, -1:] = to_dtype(alpha, self.pixels.dtype)


class BandWriter:
    """Feeds one image's bands through a :class:`BandResizer` into ``put(first_row, rows)``.

    Called as ``writer(image_index, first_row, rows)`` with the engine's bands (other images' bands are ignored);
    :meth:`close` flushes the last rows.
    """

    def __init__(self, resizer: BandResizer, put: Callable[[int, np.ndarray], None], image: int = 0):
        self.resizer, self.put, self.image = resizer, put, image

    def __call__(self, image: int, top: int, rows: np.ndarray) -> None:
        if image != self.image:
            return
        for first, out in self.resizer.push(rows):
            self.put(first, out)

    def close(self) -> None:
        for first, out in self.resizer.finish():
            self.put(first, out)


class FanOut:
    """One band writer per image of a batch (each takes its own image's bands)."""

    def __init__(self, writers: list[BandWriter]):
        self.writers = writers

    def __call__(self, image: int, top: int, rows: np.ndarray) -> None:
        self.writers[image](image, top, rows)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
