"""Resizing an image band by band, exactly as one ``cv2.resize`` of the whole image, without holding it whole.

* The source/target height ratio is reduced to ``p / q``; bands start at output rows that are multiples of ``q``
  (source rows that are multiples of ``p``), so a band's slice sees the same kernel phases as the whole image.
* Each slice carries ``margin`` >= 8 source rows of context above and below (a multiple of ``p``; Lanczos-4
  reads 4 rows each side, cubic 2, area only rows inside its cell), so rows away from the slice's own edges never
  see the edge; the rows at the image's top and bottom see the same border rule as the whole image.

OpenCV computes each output row's kernel phase in double precision from its row number; with the slices aligned
to the ratio's period the phases come out the same (tests compare with whole-image resizes and find them equal).
Where ``p / q`` is not exact in binary a phase could differ in its last bit, which moves a float result by ~1e-7
and an 8- or 16-bit value by at most one step.

Pure numpy/OpenCV; imports nothing of ``engine`` or ``ui``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import cv2
import numpy as np

__all__ = ["BAND_ROWS", "BandResizer", "resize_rows"]

#: Output rows per resized band (rounded up to the ratio's period ``q``).
BAND_ROWS = 64


def _margin(p: int) -> int:
    return p * math.ceil(8 / p)


def _span(src_len: int, dst_len: int, first: int, count: int) -> tuple[int, int, int, int]:
    """Along one axis resized from ``src_len`` to ``dst_len`` pixels: the source slice ``[lo, hi)`` (aligned to the
    ratio's period, with :func:`_margin` pixels of context), its resized length, and where output pixel ``first``
    lies in it. Pure."""
    ratio = Fraction(src_len, dst_len)
    p, q = ratio.numerator, ratio.denominator
    start, end = first // q * q, -(-(first + count) // q) * q
    lo = max(0, start * p // q - _margin(p))
    hi = min(src_len, end * p // q + _margin(p))
    return lo, hi, (hi - lo) * q // p, (start * p // q - lo) * q // p + (first - start)


def resize_rows(src: np.ndarray, dst_size: tuple[int, int], first: int, count: int, interpolation: int,
                convert: Callable[[np.ndarray], np.ndarray] | None = None,
                columns: tuple[int, int] | None = None) -> np.ndarray:
    """Rows ``[first, first + count)`` of ``cv2.resize(convert(src), dst_size, interpolation=interpolation)``,
    computed from a slice of ``src`` (the rows' sources and their context) only.

    Args:
        src: HxW[xC] float32 image (any array ``cv2.resize`` takes).
        dst_size: (width, height) of the whole resized image.
        first, count: the output rows wanted (0 <= first, first + count <= height).
        interpolation: an OpenCV interpolation flag.
        convert: applied to the slice before resizing (e.g. to float), so that only the slice is converted.
        columns: ``(first, count)`` of the output columns wanted, computed from a slice of the source's columns
            the same way; None: every column.
    """
    dst_w, dst_h = dst_size
    lo, hi, height, skip = _span(src.shape[0], dst_h, first, count)
    left, right, width, skip_x = _span(src.shape[1], dst_w, *columns) if columns else (0, src.shape[1], dst_w, 0)
    part = src[lo:hi, left:right] if convert is None else convert(src[lo:hi, left:right])
    block = cv2.resize(np.ascontiguousarray(part), (width, height), interpolation=interpolation)
    return block[skip:skip + count, skip_x:skip_x + (columns[1] if columns else dst_w)]


def output_step(src_rows: int, dst_rows: int, band_rows: int = BAND_ROWS) -> int:
    """Output rows per band when ``src_rows`` rows are resized to ``dst_rows``: ``band_rows`` rounded up to the
    ratio's period (the output rows made from a whole number of source rows). Pure."""
    period = Fraction(src_rows, dst_rows).denominator
    return period * max(1, math.ceil(band_rows / period))


class BandResizer:
    """Resize a top-to-bottom stream of source rows to ``dst_size`` band by band (see the module docstring).

    Args:
        src_size: (width, height) of the whole source image.
        dst_size: (width, height) of the target.
        band_rows: output rows per band (rounded up to the ratio's period).
        interpolation: an OpenCV flag; default Lanczos-4 when enlarging, area when shrinking both sides.

    Values are not clipped (Lanczos overshoots a little, as with ``cv2.resize``).
    """

    def __init__(self, src_size: tuple[int, int], dst_size: tuple[int, int], band_rows: int = BAND_ROWS,
                 interpolation: int | None = None):
        (self.src_w, self.src_h), (self.dst_w, self.dst_h) = src_size, dst_size
        self.identity = src_size == dst_size
        shrinking = self.dst_w < self.src_w and self.dst_h < self.src_h
        if interpolation is None:
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
        self.interpolation = interpolation
        ratio = Fraction(self.src_h, self.dst_h)
        self.p, self.q = ratio.numerator, ratio.denominator
        self.margin = _margin(self.p)
        self.out_step = output_step(self.src_h, self.dst_h, band_rows)
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
            out.append((first, resized[skip:skip + count]))
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
