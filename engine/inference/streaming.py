"""Finishing the network's output band by band: resize to the target size and convert to the output dtype.

The tiled engine (:class:`engine.upscaler.BandStream`) gives finished rows at the network's scale, top to bottom.
:class:`utils.band_resize.BandResizer` turns them into rows of the target size exactly as one ``cv2.resize`` of
the whole image would (Lanczos-4 up, area down; see that module for why it is seam-free), then they are clipped
to [0, 1] as :func:`engine.inference.pipeline.resize_float` does.

:class:`OutputCanvas` is the preallocated output (the input's channel layout and dtype); writers convert each
band straight into it. Pure numpy/OpenCV; no torch.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from utils.band_resize import BandResizer


def to_dtype(rows: np.ndarray, dtype) -> np.ndarray:
    """float rows in [0, 1] → ``uint8``/``uint16`` (round half to even, as ``np.round``); float32 passes through."""
    if np.dtype(dtype) == np.float32:
        return rows.astype(np.float32, copy=False)
    top = 65535.0 if np.dtype(dtype) == np.uint16 else 255.0
    return np.clip(np.round(rows * top), 0, top).astype(dtype)


def colour_rows(rows: np.ndarray, channels: int, dtype) -> np.ndarray:
    """Float RGB rows in [0, 1] → ``channels`` (1: gray, 3: RGB) of ``dtype``."""
    if channels == 1:
        rows = cv2.cvtColor(np.ascontiguousarray(rows), cv2.COLOR_RGB2GRAY)[:, :, None]
    return to_dtype(rows, dtype)


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
        self.pixels[top:top + rows.shape[0], :, :self.colour_channels] = colour_rows(
            rows, self.colour_channels, self.pixels.dtype)

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
            self.put(first, np.clip(out, 0.0, 1.0))

    def close(self) -> None:
        for first, out in self.resizer.finish():
            self.put(first, np.clip(out, 0.0, 1.0))


class FanOut:
    """One band writer per image of a batch (each takes its own image's bands)."""

    def __init__(self, writers: list[BandWriter]):
        self.writers = writers

    def __call__(self, image: int, top: int, rows: np.ndarray) -> None:
        self.writers[image](image, top, rows)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
