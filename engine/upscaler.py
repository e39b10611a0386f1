"""Tiled super-resolution inference: tile planning, feathered blending, OOM fallback, inference preparation.

Everything here is a pure function or a frozen dataclass; nothing per request is stored on a shared object, so
two threads may run :func:`upscale_image` on the same (eval-mode) network at once.

How a large image is processed
------------------------------
``pad_multiple``, ``tile``, ``overlap``, ``batch_size`` and ``min_tile`` below are fields of :class:`TileOptions`,
the one object that carries a run's options.

1. The HxWx3 image is padded at the bottom/right (reflection; replication for tiny images) to a multiple of
   ``pad_multiple`` (RRDBNet x2 unshuffles 2x2 blocks, x1 4x4 blocks).
2. :func:`plan_tiles` covers it with tiles that all have the same shape (so they can be batched): the number of
   tiles per axis is the fewest that respects ``tile`` and ``overlap``, and the tile length is then shrunk to the
   smallest that still covers the axis, the tiles spread evenly (edge tiles shifted inward, never shrunk).
   Neighbours overlap by at least ``overlap`` input pixels.
3. Tiles go to the device ``batch_size`` at a time, in raster order; outputs come back to the CPU, are
   multiplied by a :func:`blend_window` and accumulated with their weights in a buffer one tile row high
   (:class:`BandStream`, one buffer per image reused for every tile row); once the next tile row starts, the rows
   above it are final: they are divided by their weights and given out in bands of :data:`FINAL_CHUNK_ROWS`, so
   float memory follows the image's width, not its area.
   The window is 1 at image borders and in a tile's interior; across an overlap of width ``o`` it is 0 for the
   ``o/4`` pixels next to the tile border (the most wrong ones: they saw zero padding instead of image) and
   rises as a raised cosine over the middle ``o/2``, so two neighbours' weights sum to one.
4. If a forward pass runs out of memory the whole image is redone with half the tile, down to ``min_tile``.

Memory model (``auto_tile``)
----------------------------
Peak activation memory grows linearly with the number of input pixels of a forward pass. Measured on CPU
(growth of peak RSS over one forward pass of 96x96 and 192x192 inputs, torch.inference_mode, fp32,
channels_last), per input pixel: RRDBNet x4 ~ 10.7 KB (the 4x upsampled 64-channel features dominate),
SRVGGNetCompact x4 ~ 0.8-1.4 KB.
Half/bfloat16 halves them. :data:`ACTIVATION_BYTES_PER_PIXEL` holds these constants with a safety factor applied
in :func:`auto_tile`. The catalog's RRDBNet runs its upsampling stage in bands of rows
(:func:`engine.models.networks.tail_rows`), so one of its passes holds less (:func:`pass_memory_bytes`, what the
memory plan counts); tiles are still sized with the whole-pass figure, because in the tile loop a larger tile grew
the peak by about that much (x4plus on 800x600, ``main.py enhance``: tile 192 instead of 144, +26k input pixels
per pass, +280 MB, ~10.8 KB each).
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InvalidInputError, InvalidSettingsError, OutOfMemoryError
from utils.gpu import is_out_of_memory

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVATION_BYTES_PER_PIXEL", "bytes_per_pixel", "estimate_memory_bytes", "TileBox", "TilePlan", "TileOptions",
    "UpscaleStats", "RunBatch", "plan_tiles", "blend_window", "upscale_image", "upscale_image_ex", "upscale_images_ex",
    "output_is_bad", "auto_tile", "available_bytes", "prepare_for_inference", "default_run_batch", "Band",
    "pass_memory_bytes",
    "BandStream", "FINAL_CHUNK_ROWS", "unit_peak", "tile_shape",
]

ProgressCallback = Callable[[int, int], None]
RunBatch = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``run_batch(net, batch) -> output``: one forward pass. ``batch`` is BxCxhxw on the device in the compute dtype;
the output is Bx3x(h*scale)x(w*scale). Injectable so tests (and callers) can wrap the forward pass."""

ACTIVATION_BYTES_PER_PIXEL: dict[str, int] = {"RRDBNet": 10_700, "SRVGGNetCompact": 1_400}
"""Peak fp32 activation bytes per *input* pixel of one forward pass (x4 models; see the module docstring)."""

BANDED_PASS_BYTES: dict[str, tuple[int, int]] = {"RRDBNet": (3_600, 120 * 2 ** 20)}
"""Per architecture whose upsampling stage runs in bands (the catalog's RRDBNet): (fp32 bytes per input pixel of
the rest of a pass, the most the stage's bands take: two maps of ``engine.models.networks.TAIL_BAND_BYTES`` and
their context rows). The bands reuse what the body frees, so a pass holds the larger of the two, and never more
than the whole-pass figure. Measured (growth of peak RSS over one pass): 3.0-3.1 KB per pixel at 300² and 480²,
0.84-1.04 GB instead of 1.29-1.71 GB for ``main.py enhance`` of a 256² photo with x4plus."""

_DEAD_MARGIN_FRACTION = 0.25  # share of an overlap, next to a tile border, that gets zero weight


# ----------------------------------------------------------------------------------------------- tile maths


@dataclass(frozen=True)
class TileBox:
    """One tile in input pixel coordinates of the (padded) image.

    ``overlap`` is (top, bottom, left, right): how many input pixels this tile shares with its neighbour on
    that side, 0 where the side is an image border.
    """

    y: int
    x: int
    h: int
    w: int
    overlap: tuple[int, int, int, int]

    @property
    def edges(self) -> tuple[bool, bool, bool, bool]:
        """(top, bottom, left, right): True where that side lies on the image border."""
        return tuple(o == 0 for o in self.overlap)  # type: ignore[return-value]


@dataclass(frozen=True)
class TilePlan:
    """All tiles of one image; every tile has shape ``tile_h`` x ``tile_w``. Iterable and sized like a list."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    boxes: tuple[TileBox, ...]

    def __iter__(self):
        return iter(self.boxes)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> TileBox:
        return self.boxes[index]

    @property
    def compute_ratio(self) -> float:
        """Input pixels processed over image pixels (1.0 for a single tile)."""
        return len(self.boxes) * self.tile_h * self.tile_w / (self.height * self.width)


def _plan_axis(size: int, tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """Tile length and start offsets along one axis (all values multiples of ``multiple``).

    ``tile`` is the stride (the part of the image each tile is responsible for, as RealESRGANer's ``tile``); a
    tile reads up to ``overlap`` more pixels of context, shared with its neighbour and blended.
    """
    if tile <= 0 or size <= tile + overlap:
        return size, [0]
    units, tile_u = size // multiple, max(tile // multiple, 1)
    overlap_u = min(-(-overlap // multiple), tile_u) if overlap > 0 else 0
    count = math.ceil((units - overlap_u) / tile_u)
    length_u = min(tile_u + overlap_u, -(-(units + (count - 1) * overlap_u) // count))
    starts = [round(i * (units - length_u) / (count - 1)) for i in range(count)] if count > 1 else [0]
    return length_u * multiple, [s * multiple for s in starts]


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> TilePlan:
    """Cover a ``height`` x ``width`` image with equally shaped, overlapping tiles.

    Args:
        height, width: image size in pixels (already padded to ``multiple``).
        tile: the most image pixels a tile is responsible for along each side (as RealESRGANer's ``tile``); a
            tile reads up to ``tile + overlap`` pixels. 0 means one tile for the whole image.
        overlap: least overlap between neighbouring tiles, input pixels (0 <= overlap <= tile); it is the
            context each seam gets, blended with a feathered window.
        multiple: tile sizes and offsets are multiples of this (the network's pad multiple).

    Returns:
        A :class:`TilePlan`; tiles are in row-major order.

    Raises:
        InvalidSettingsError: a negative tile/overlap, or an overlap larger than the tile.
    """
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"Cannot tile an empty image ({height}x{width}).")
    if tile < 0 or overlap < 0 or multiple < 1:
        raise InvalidSettingsError(f"tile ({tile}), overlap ({overlap}) must be >= 0 and multiple ({multiple}) >= 1.")
    if tile and overlap > tile:
        raise InvalidSettingsError(f"overlap ({overlap}) must not exceed the tile ({tile}); "
                                   "use a larger tile or a smaller overlap.")
    if height % multiple or width % multiple:
        raise InvalidSettingsError(f"image {height}x{width} is not padded to a multiple of {multiple}.")
    tile_h, ys = _plan_axis(height, tile, overlap, multiple)
    tile_w, xs = _plan_axis(width, tile, overlap, multiple)
    boxes = []
    for iy, y in enumerate(ys):
        top = ys[iy - 1] + tile_h - y if iy > 0 else 0
        bottom = y + tile_h - ys[iy + 1] if iy + 1 < len(ys) else 0
        for ix, x in enumerate(xs):
            left = xs[ix - 1] + tile_w - x if ix > 0 else 0
            right = x + tile_w - xs[ix + 1] if ix + 1 < len(xs) else 0
            boxes.append(TileBox(y, x, tile_h, tile_w, (top, bottom, left, right)))
    return TilePlan(height, width, tile_h, tile_w, tuple(boxes))


def tile_shape(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> tuple[int, int, float]:
    """``(tile_h, tile_w, compute_ratio)`` of :func:`plan_tiles` for the same arguments, without building its boxes:
    the input pixels one forward pass reads and the pixels computed over the image's. Pure."""
    tile_h, ys = _plan_axis(height, tile, overlap, multiple)
    tile_w, xs = _plan_axis(width, tile, overlap, multiple)
    return tile_h, tile_w, len(ys) * tile_h * len(xs) * tile_w / (height * width)


def _ramp(length: int, overlap_a: int, overlap_b: int) -> np.ndarray:
    """1-D weights of ``length`` output pixels with feathered ends of ``overlap_a`` / ``overlap_b`` pixels."""
    pos = np.arange(length, dtype=np.float64) + 0.5
    weight = np.ones(length, dtype=np.float64)
    for overlap, dist in ((overlap_a, pos), (overlap_b, length - pos)):
        if overlap <= 0:
            continue
        margin = _DEAD_MARGIN_FRACTION * overlap
        t = np.clip((dist - margin) / (overlap - 2 * margin), 0.0, 1.0)
        weight *= 0.5 - 0.5 * np.cos(np.pi * t)
    return weight


def blend_window(tile_h: int, tile_w: int, overlap: int | Sequence[int], scale: int,
                 edges: Sequence[bool] = (False, False, False, False)) -> np.ndarray:
    """Feathered blending weights for one output tile.

    Args:
        tile_h, tile_w: tile size in *input* pixels.
        overlap: overlap with the neighbours in input pixels: one int for all sides, or (top, bottom, left, right).
        scale: output/input size ratio.
        edges: (top, bottom, left, right); True where that side is an image border (weight 1 up to the border).

    Returns:
        (tile_h*scale) x (tile_w*scale) float32 weights in [0, 1]. Across an overlap of ``o`` output pixels the
        weight is 0 for the outer ``o/4``, then a raised cosine up to 1 at ``3o/4``; the weights of two
        neighbours sharing that overlap sum to 1.
    """
    wy, wx = _window_axes(tile_h, tile_w, overlap, scale, edges)
    return np.outer(wy, wx).astype(np.float32)


def _window_axes(tile_h: int, tile_w: int, overlap: int | Sequence[int], scale: int,
                 edges: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """The float64 row and column ramps whose outer product is :func:`blend_window` (same arguments)."""
    sides = [overlap] * 4 if isinstance(overlap, int) else list(overlap)
    if len(sides) != 4 or len(edges) != 4:
        raise InvalidSettingsError("overlap and edges take four values: (top, bottom, left, right).")
    top, bottom, left, right = (0 if edge else side * scale for side, edge in zip(sides, edges))
    return _ramp(tile_h * scale, top, bottom), _ramp(tile_w * scale, left, right)


# ------------------------------------------------------------------------------------------------ inference


_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _whole_number(name: str, value: object, minimum: int, meaning: str) -> int:
    """``value`` as an int >= ``minimum``, or an :class:`InvalidSettingsError` that says what to give."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise InvalidSettingsError(f"TileOptions.{name} ({meaning}) must be a whole number >= {minimum}, got "
                                   f"{value!r}; pass an int of at least {minimum}.")
    return number


@dataclass(frozen=True)
class TileOptions:
    """How one network runs over an image: its scale, the tiling, and where and in what dtype it runs.

    Validated on construction; every function of this module that runs the network takes one of these.

    Attributes:
        scale: the network's output/input size ratio (>= 1).
        tile: largest tile side in input pixels (the stride, as RealESRGANer's ``tile``); 0 runs the whole
            image in one pass.
        overlap: least overlap between neighbouring tiles in input pixels (blended, see :func:`blend_window`);
            clamped to the tile.
        batch_size: tiles per forward pass (>= 1).
        device: where the network runs (a name such as ``"cuda:0"`` is read as a :class:`torch.device`).
        dtype: the network's parameter dtype: float32, float16 or bfloat16.
        pad_multiple: the network needs input sizes divisible by this (RRDBNet x2: 2, x1: 4).
        min_tile: smallest tile the out-of-memory fallback tries (>= 8).
        in_flight: forward passes started before the oldest one's output is blended: None is 1 on CUDA (the GPU
            computes the next batch while the CPU blends this one) and 0 elsewhere (on the CPU the blend would
            take the network's cores, and an output more would be held).

    Raises:
        InvalidSettingsError: (a ``ValueError``) a value out of range; the message names the field.
    """

    scale: int
    tile: int = 0
    overlap: int = 16
    batch_size: int = 4
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    pad_multiple: int = 1
    min_tile: int = 32
    in_flight: int | None = None

    def __post_init__(self) -> None:
        for name, minimum, meaning in (("scale", 1, "output/input size ratio"),
                                       ("tile", 0, "tile side in input pixels, 0 for no tiling"),
                                       ("overlap", 0, "overlap between tiles in input pixels"),
                                       ("batch_size", 1, "tiles per forward pass"),
                                       ("pad_multiple", 1, "input size multiple the network needs"),
                                       ("min_tile", 8, "smallest tile of the out-of-memory fallback")):
            object.__setattr__(self, name, _whole_number(name, getattr(self, name), minimum, meaning))
        if self.in_flight is not None:
            object.__setattr__(self, "in_flight", _whole_number("in_flight", self.in_flight, 0,
                                                                "forward passes started ahead of the blending"))
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise InvalidSettingsError(f"TileOptions.device {self.device!r} is no device ({error}); use \"cpu\", "
                                       f"\"cuda\", \"cuda:N\" or \"mps\".") from None
        object.__setattr__(self, "device", device)
        if self.dtype not in _COMPUTE_DTYPES:
            raise InvalidSettingsError(f"TileOptions.dtype must be torch.float32, torch.float16 or torch.bfloat16, "
                                       f"got {self.dtype!r}; use the dtype the network was prepared in.")


@dataclass(frozen=True)
class UpscaleStats:
    """What one :func:`upscale_image_ex` call did. ``tile_used`` is 0 when the whole image ran at once."""

    tile_used: int
    batches: int
    tiles: int
    seconds: float
    retries: int
    compute_ratio: float


def default_run_batch(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The plain forward pass: ``net(batch)``."""
    return net(batch)


Band = tuple[int, int, np.ndarray]
"""``(image index, first output row, rows)``: finished output rows of one image, ``rows`` an hxWx3 float32 RGB
array in [0, 1] at the network's scale (the image's unpadded width), bands of one image in order, top to bottom."""


class BandStream:
    """The output of a tiled run, band by band, as soon as each band is final (iterate it once).

    Tiles run in raster order; each tile row's outputs are blended into a float buffer one tile row high (plus
    the overlap carried from the row above, moved up in place), so the float memory is ``(tile + overlap) * scale``
    rows of the output's width, not the whole output; finished rows are given out :data:`FINAL_CHUNK_ROWS` at a
    time. The arithmetic per pixel is the same as blending the whole image at once (the same windows added in the
    same order, divided by the same weight sums, which are recomputed per band rather than kept: see
    :class:`_WeightRows`), so the result is bit-identical.

    After the iteration, :attr:`stats` holds the run's :class:`UpscaleStats`. On out-of-memory before any band was
    given out, the run restarts with half the tile (down to ``options.min_tile``); after that it raises
    :class:`OutOfMemoryError`, as a consumer may already have written the earlier bands.
    """

    def __init__(self, net: nn.Module, images: Sequence[np.ndarray], options: TileOptions, *,
                 progress: ProgressCallback | None = None, run_batch: RunBatch = default_run_batch):
        _check_images(images, options)
        self.net, self.images, self.options = net, images, options
        self.progress, self.run_batch = progress, run_batch
        self.height, self.width = images[0].shape[:2]
        self.stats: UpscaleStats | None = None

    def __iter__(self):
        options, device = self.options, self.options.device
        start = time.perf_counter()
        padded_h = self.height + (-self.height) % options.pad_multiple
        padded_w = self.width + (-self.width) % options.pad_multiple
        current = options.tile if 0 < options.tile < max(padded_h, padded_w) else 0
        retries = 0
        while True:
            plan = plan_tiles(padded_h, padded_w, current, min(options.overlap, current), options.pad_multiple)
            given = 0
            try:
                with torch.inference_mode():
                    run = _run_plan(self.net, self.images, plan, options, self.run_batch, self.progress)
                    for band in run:
                        given += 1
                        yield band
                batches = run.batches
                break
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                smaller = (current or max(padded_h, padded_w)) // 2 // 8 * 8
                if smaller < options.min_tile or given:
                    raise OutOfMemoryError(
                        f"Out of memory on {device} even with {current or 'no'}-pixel tiles ({error}). Use a smaller "
                        f"tile (>= {options.min_tile}), half precision, batch size 1, or run on the CPU.") from error
                logger.warning("Out of memory with tile %s on %s; retrying with tile %d.", current or "off", device,
                               smaller)
                current, retries = smaller, retries + 1
        self.stats = UpscaleStats(tile_used=current if len(plan) > 1 else 0, batches=batches,
                                  tiles=len(plan) * len(self.images), seconds=time.perf_counter() - start,
                                  retries=retries, compute_ratio=plan.compute_ratio)


def _check_images(images: Sequence[np.ndarray], options: TileOptions) -> None:
    if not images:
        raise InvalidInputError("No images to upscale.")
    first_shape = images[0].shape
    for image in images:
        if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] == 0 or image.shape[1] == 0:
            raise InvalidInputError(f"Expected HxWx3 RGB or HxWx1 gray images, got shape {image.shape}.")
        if image.dtype not in _SOURCE_DTYPES:
            raise InvalidInputError(f"Expected float32 in [0, 1], uint8 or uint16 pixels, got {image.dtype}.")
        if image.shape != first_shape:
            raise InvalidInputError(f"Images upscaled together must share one size: {first_shape} vs {image.shape}.")
    if not isinstance(options, TileOptions):
        raise InvalidSettingsError(f"options must be a TileOptions, got {type(options).__name__}; build one with "
                                   f"TileOptions(scale=..., tile=..., ...).")


FINAL_CHUNK_ROWS = 64
"""Output rows per band given out: finished rows are normalised and converted to an HxWx3 array this many at a
time, so the copies a consumer makes follow the image's width, not the tile's height."""


class _RowBuffer:
    """One image's blend buffer over output rows ``[top, top + rows)``: the tiles' weighted sums.

    One buffer serves every tile row of the image: :meth:`advance` moves the rows the next tile row shares with
    this one (the overlap) to the top and zeroes the rest, so nothing is allocated per tile row. The weights the
    sums are divided by are not kept: :class:`_WeightRows` recomputes them for each finished band.
    """

    def __init__(self, rows: int, width: int):
        self.top = 0
        self.accum = torch.zeros((3, rows, width), dtype=torch.float32)

    def advance(self, top: int) -> None:
        """Start the tile row whose first output row is ``top`` (rows above it were given out)."""
        rows = self.accum.shape[1]
        offset = top - self.top
        shared = max(0, rows - offset)
        if shared:
            carried = self.accum[:, offset:]
            self.accum[:, :shared].copy_(carried.clone() if offset < shared else carried)
        self.accum[:, shared:].zero_()
        self.top = top

    def final_rows(self, end: int, height: int, width: int, weights: _WeightRows):
        """Bands of rows ``[top, min(end, height))`` normalised and clamped: ``(first row, hxWx3 float32)``."""
        count = min(end, height) - self.top
        for first in range(0, count, FINAL_CHUNK_ROWS):
            last = min(count, first + FINAL_CHUNK_ROWS)
            accum = self.accum[:, first:last, :width]  # final rows: normalised in place, nothing else reads them
            accum.div_(weights.rows(self.top + first, self.top + last)[:, :, :width].clamp_min_(1e-12))
            yield self.top + first, np.ascontiguousarray(accum.clamp_(0.0, 1.0).permute(1, 2, 0).numpy())


class _WeightRows:
    """The sums of a plan's blend windows over any run of output rows, computed when those rows are final.

    The windows of the tiles that cover the rows are added in the plan's order, as a weight map kept for the
    whole image would have added them, so each sum is bit-identical to that map's; keeping no map saves 4 bytes
    per pixel of the blend buffer (a quarter of it) for a few small products per finished band.
    """

    def __init__(self, plan: TilePlan, scale: int):
        self.plan, self.scale = plan, scale
        self._axes: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def window(self, box: TileBox, rows: slice = slice(None)) -> torch.Tensor:
        """``box``'s :func:`blend_window` (its ``rows`` only), from ramps computed once per tile geometry."""
        key = (box.h, box.w, box.overlap, box.edges)
        if key not in self._axes:
            self._axes[key] = _window_axes(box.h, box.w, box.overlap, self.scale, box.edges)
        wy, wx = self._axes[key]
        return torch.from_numpy(np.outer(wy[rows], wx).astype(np.float32))

    def rows(self, first: int, last: int) -> torch.Tensor:
        """1 x (last - first) x (plan width x scale) float32 weight sums of output rows ``[first, last)``."""
        scale = self.scale
        sums = torch.zeros((1, last - first, self.plan.width * scale), dtype=torch.float32)
        for box in self.plan.boxes:
            y0 = box.y * scale
            lo, hi = max(first, y0), min(last, y0 + box.h * scale)
            if lo < hi:
                sums[0, lo - first:hi - first, box.x * scale:(box.x + box.w) * scale].add_(
                    self.window(box, slice(lo - y0, hi - y0)))
        return sums


def _whole_rows(tile_out: torch.Tensor, height: int, width: int):
    """Bands of a single tile's output (no blending), clamped, :data:`FINAL_CHUNK_ROWS` at a time. Not in place: a
    network's output may be a broadcast view (a gray model's one channel expanded to RGB)."""
    for first in range(0, height, FINAL_CHUNK_ROWS):
        rows = tile_out[:, first:min(height, first + FINAL_CHUNK_ROWS), :width].clamp(0.0, 1.0)
        yield first, np.ascontiguousarray(rows.permute(1, 2, 0).numpy())


_SOURCE_DTYPES = {np.dtype(np.float32): 1.0, np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
"""The pixel types a network source may hold, with the value that is 1.0 in the network's [0, 1] range."""


def unit_peak(image: np.ndarray) -> float:
    """The largest value of a network source (float32 in [0, 1], uint8 or uint16 pixels) on the [0, 1] scale."""
    return float(np.max(image)) / _SOURCE_DTYPES[image.dtype] if image.size else 0.0


class _Source:
    """One image as the network reads it: padded to the pad multiple (reflection; replication for tiny images), and
    each tile turned into 1x3xhxw float32 RGB in [0, 1] only when it is read. 8- and 16-bit pixels are converted
    per tile (the same ``astype(float32) / 255`` or ``/ 65535`` as a whole-image conversion, so the values are
    identical) and gray is read as three equal channels, so no float copy of the whole image is ever made."""

    def __init__(self, image: np.ndarray, multiple: int):
        h, w = image.shape[:2]
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "edge"  # torch's "reflect" / "replicate"
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
        self.pixels, self.top = image, _SOURCE_DTYPES[image.dtype]

    def tile(self, box: TileBox) -> torch.Tensor:
        part = self.pixels[box.y:box.y + box.h, box.x:box.x + box.w]
        if self.top != 1.0:
            part = np.ascontiguousarray(part, dtype=np.float32)
            np.divide(part, np.float32(self.top), out=part)
        tensor = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).permute(2, 0, 1)[None]
        return tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor


def _launch(run_batch: RunBatch, net: nn.Module, parts: list[torch.Tensor],
            options: TileOptions) -> Callable[[], torch.Tensor]:
    """Start one forward pass on ``parts`` (1x3xhxw float tiles on the CPU); returns what waits for its output as a
    float32 CPU tensor. On CUDA nothing waits here: the tiles go up from pinned memory and the output comes back
    into pinned memory without blocking, an event marking when it is there, so the host can blend the previous
    batch while the GPU computes this one. Elsewhere the pass runs now (the CPU is the device)."""
    cuda = options.device.type == "cuda"
    batch = torch.cat(parts)
    if cuda:
        batch = batch.pin_memory()
    batch = batch.to(device=options.device, dtype=options.dtype, non_blocking=cuda)
    output = run_batch(net, batch.contiguous(memory_format=torch.channels_last))
    if not cuda:
        ready = output.to(device="cpu", dtype=torch.float32)
        return lambda: ready
    output = output.float()
    host = torch.empty(output.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(output, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> torch.Tensor:
        copied.synchronize()
        return host

    return wait


class _PlanRun:
    """Iterates the bands of one tiling plan; :attr:`batches` counts the forward calls made."""

    def __init__(self, net, images, plan, options, run_batch, progress):
        self.net, self.images, self.plan, self.options = net, images, plan, options
        self.run_batch, self.progress = run_batch, progress
        self.batches = 0

    def __iter__(self):
        net, images, plan, options = self.net, self.images, self.plan, self.options
        scale, batch_size = options.scale, options.batch_size
        height, width = images[0].shape[0] * scale, images[0].shape[1] * scale
        out_w = plan.width * scale
        blended = len(plan) > 1
        first_of_row = {i for i, box in enumerate(plan.boxes) if i == 0 or plan.boxes[i - 1].y != box.y}
        multiple = options.pad_multiple
        jobs = [(n, i) for n in range(len(images)) for i in range(len(plan))]  # same-shape tiles of every image
        buffers: dict[int, _RowBuffer] = {}
        weights = _WeightRows(plan, scale)
        sources: dict[int, _Source] = {}
        in_flight = options.in_flight if options.in_flight is not None else int(options.device.type == "cuda")
        launched: deque = deque()  # (first job, chunk, boxes, wait for the output), in order

        def blend(first: int, chunk: list, boxes: list, wait: Callable[[], torch.Tensor]):
            output = wait()
            for (n, i), box, tile_out in zip(chunk, boxes, output):
                if not blended:  # one tile: its output is the image
                    yield from ((n, top, rows) for top, rows in _whole_rows(tile_out, height, width))
                    continue
                if i in first_of_row:
                    buf = buffers.get(n)
                    if buf is None:
                        buffers[n] = _RowBuffer(box.h * scale, out_w)
                    else:  # everything above this tile row is final
                        yield from ((n, top, rows)
                                    for top, rows in buf.final_rows(box.y * scale, height, width, weights))
                        buf.advance(box.y * scale)
                buf = buffers[n]
                ys = slice(box.y * scale - buf.top, (box.y + box.h) * scale - buf.top)
                xs = slice(box.x * scale, (box.x + box.w) * scale)
                buf.accum[:, ys, xs].addcmul_(tile_out, weights.window(box))
                if i == len(plan) - 1:
                    done = buffers.pop(n)
                    yield from ((n, top, rows) for top, rows in done.final_rows(height, height, width, weights))
            del output
            if self.progress is not None:
                self.progress(min(first + batch_size, len(jobs)), len(jobs))

        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first:first + batch_size]
            boxes = [plan.boxes[i] for _, i in chunk]
            parts = []
            for (n, i), b in zip(chunk, boxes):
                if n not in sources:
                    sources[n] = _Source(images[n], multiple)
                parts.append(sources[n].tile(b))
                if i == len(plan) - 1:  # its last tile is cut: the padded copy can go
                    sources.pop(n)
            launched.append((first, chunk, boxes, _launch(self.run_batch, net, parts, options)))
            del parts
            self.batches += 1
            if len(launched) > in_flight:
                yield from blend(*launched.popleft())
        while launched:
            yield from blend(*launched.popleft())


def _run_plan(net: nn.Module, images: Sequence[np.ndarray], plan: TilePlan, options: TileOptions,
              run_batch: RunBatch, progress: ProgressCallback | None) -> _PlanRun:
    """The bands of every image for one tiling ``plan``, several tiles per forward call (see :class:`BandStream`).

    ``options`` gives the scale, the tiles per call, the device and the dtype (its tile and overlap are already
    in ``plan``).
    """
    return _PlanRun(net, images, plan, options, run_batch, progress)


def upscale_image_ex(net: nn.Module, image: np.ndarray, options: TileOptions, *,
                     progress: ProgressCallback | None = None,
                     run_batch: RunBatch = default_run_batch) -> tuple[np.ndarray, UpscaleStats]:
    """Upscale one image, tiling if asked, halving the tile on out-of-memory; see :func:`upscale_image`.

    Args:
        net: eval-mode network on ``options.device`` in ``options.dtype``; not modified.
        image: HxWx3 RGB or HxWx1 gray on the CPU: float32 in [0, 1], or 8- or 16-bit pixels, which are
            converted tile by tile (no float copy of the whole image; the same values as converting it whole).
        options: scale, tiling, device and dtype (see :class:`TileOptions`).
        progress: called as ``progress(tiles_done, tiles_total)`` after each batch.
        run_batch: the forward pass (default ``net(batch)``); a hook for tests and callers, see :data:`RunBatch`.

    Returns:
        ``(output, stats)``: the (H*scale)x(W*scale)x3 float32 RGB image in [0, 1] and an :class:`UpscaleStats`.
    """
    outputs, stats = upscale_images_ex(net, [image], options, progress=progress, run_batch=run_batch)
    return outputs[0], stats


def upscale_images_ex(net: nn.Module, images: Sequence[np.ndarray], options: TileOptions, *,
                      progress: ProgressCallback | None = None,
                      run_batch: RunBatch = default_run_batch) -> tuple[list[np.ndarray], UpscaleStats]:
    """Upscale several images of one size together (video frames): their tiles share forward calls.

    Same arguments and guarantees as :func:`upscale_image_ex`, with ``images`` a sequence of images of one size
    and pixel type; each output equals what :func:`upscale_image` gives for that image alone (up
    to the summation order of batched convolutions). The whole float outputs are assembled from a
    :class:`BandStream`; callers that want less memory consume the stream instead.

    Returns:
        ``(outputs, stats)``: one (H*scale)x(W*scale)x3 float32 RGB image in [0, 1] per input, in order, and one
        :class:`UpscaleStats` for the whole call.
    """
    stream = BandStream(net, images, options, progress=progress, run_batch=run_batch)
    scale = options.scale
    height, width = stream.height * scale, stream.width * scale
    outputs = [np.empty((height, width, 3), dtype=np.float32) for _ in images]
    for n, top, rows in stream:
        outputs[n][top:top + rows.shape[0]] = rows
    return outputs, stream.stats


def upscale_image(net: nn.Module, image: np.ndarray, options: TileOptions, *,
                  progress: ProgressCallback | None = None) -> np.ndarray:
    """Run a super-resolution network over an image, in batched overlapping tiles.

    Args:
        net: eval-mode network on ``options.device`` in ``options.dtype`` (see :func:`prepare_for_inference`);
            not modified.
        image: HxWx3 RGB or HxWx1 gray on the CPU, float32 in [0, 1] or 8/16-bit pixels (see
            :func:`upscale_image_ex`); only tiles move to the device.
        options: the network's scale, the tiling (tile, overlap, tiles per batch, the out-of-memory fallback's
            smallest tile), device, dtype and pad multiple; see :class:`TileOptions`.
        progress: called as ``progress(tiles_done, tiles_total)`` after each batch.

    Returns:
        (H*scale)x(W*scale)x3 float32 RGB in [0, 1].

    Raises:
        InvalidInputError: the image is not HxWx3.
        InvalidSettingsError: ``options`` is not a :class:`TileOptions`.
        OutOfMemoryError: even ``options.min_tile`` tiles did not fit.
    """
    output, _ = upscale_image_ex(net, image, options, progress=progress)
    return output


def output_is_bad(output: np.ndarray, source: np.ndarray | None = None, black_level: float = 1.0 / 255) -> bool:
    """True when a (half-precision) result is unusable and should be redone in fp32.

    Args:
        output: the upscaled image, any shape, float.
        source: the input image; when given and not itself black, an all-black ``output`` is bad.
        black_level: values at or below this count as black.

    Returns:
        True for NaN/Inf anywhere, or an all-black output from a non-black input.
    """
    if not np.all(np.isfinite(output)):
        return True
    if source is not None and output.size and float(np.max(output)) <= black_level:
        return float(np.max(source)) > black_level
    return False


# ------------------------------------------------------------------------------------ memory & preparation


def _arch_name(model: str | nn.Module) -> str:
    return model if isinstance(model, str) else type(model).__name__


def available_bytes(device: str | torch.device) -> int:
    """Free memory for activations on ``device``: CUDA free memory, or available system RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def bytes_per_pixel(model: str | nn.Module, dtype: torch.dtype = torch.float32, scale: int = 4) -> int:
    """Peak activation memory per *input* pixel for an architecture (see :data:`ACTIVATION_BYTES_PER_PIXEL`).

    ×2/×1 RRDBNet runs its body on an unshuffled, 4×/16× smaller grid, so it costs less per pixel; 2-byte dtypes
    halve the figure.
    """
    arch = _arch_name(model)
    per_pixel = ACTIVATION_BYTES_PER_PIXEL.get(arch, ACTIVATION_BYTES_PER_PIXEL["RRDBNet"])
    if arch == "RRDBNet" and scale < 4:
        per_pixel = per_pixel * scale * scale // 16 + 2_000  # body on a smaller grid, HR stage scale^2
    return per_pixel * (torch.finfo(dtype).bits // 8) // 4


def estimate_memory_bytes(model: str | nn.Module, height: int, width: int, dtype: torch.dtype = torch.float32,
                          scale: int = 4, batch_size: int = 1) -> int:
    """Activation memory for running ``batch_size`` inputs of ``height``×``width`` through ``model`` at once."""
    return int(bytes_per_pixel(model, dtype, scale) * height * width * batch_size)


def pass_memory_bytes(model: str | nn.Module, height: int, width: int, dtype: torch.dtype = torch.float32,
                      scale: int = 4, batch_size: int = 1) -> int:
    """What one forward pass of ``batch_size`` inputs of ``height``×``width`` holds: :func:`estimate_memory_bytes`,
    less for an architecture whose upsampling stage runs in bands (:data:`BANDED_PASS_BYTES`)."""
    whole = estimate_memory_bytes(model, height, width, dtype, scale, batch_size)
    if _arch_name(model) not in BANDED_PASS_BYTES:
        return whole
    per_pixel, most = BANDED_PASS_BYTES[_arch_name(model)]
    pixels = height * width * batch_size
    per_pixel = per_pixel * min(scale, 4) ** 2 // 16 * (torch.finfo(dtype).bits // 8) // 4  # body on an unshuffled grid
    return int(min(whole, max(per_pixel * pixels, most)))


def auto_tile(model: str | nn.Module, height: int, width: int, *, free_bytes: int,
              dtype: torch.dtype = torch.float32, scale: int = 4, batch_size: int = 1, safety: float = 0.5) -> int:
    """Largest tile (a multiple of 8) whose activations fit in memory; 0 when the whole image fits. Pure.

    Args:
        model: architecture name (``ModelSpec.arch``) or the network itself.
        height, width: input image size.
        free_bytes: memory available, e.g. ``available_bytes(device)``.
        dtype: compute dtype (2-byte types halve the estimate).
        scale: the network's scale (see :func:`bytes_per_pixel`).
        batch_size: tiles per forward pass.
        safety: fraction of the free memory to plan for (allocator slack, other jobs).

    Returns:
        0, or a tile side >= 8 (8 when even that does not fit: the OOM fallback then reports the problem).
    """
    per_pixel = bytes_per_pixel(model, dtype, scale)
    budget = free_bytes * safety
    if height * width * per_pixel <= budget:
        return 0
    side = int(math.sqrt(budget / (per_pixel * batch_size)))
    return max(8, side // 8 * 8)


def prepare_for_inference(net: nn.Module, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, *, in_place: bool = False) -> nn.Module:
    """A copy of ``net`` ready for fast inference: eval mode, no grads, on ``device`` in ``dtype``, channels_last.

    The input network is not modified, so one cached fp32 network can serve several precisions; a caller that owns
    a freshly built network passes ``in_place=True`` and saves a copy of every weight (the model manager: 0.2 s
    and the weights' size in RAM for RealESRGAN_x4plus). channels_last
    (NHWC) lets oneDNN/cuDNN run convolutions without a layout reorder around every layer (about 1.3x on this
    CPU; bfloat16 on AVX512-BF16 CPUs about 2x more). Numerically the same network (only summation order
    differs).

    Args:
        net: a super-resolution network (float32 weights).
        device: target device.
        dtype: float32, float16 (CUDA) or bfloat16.

    Returns:
        A new module (``net`` itself when ``in_place``); pass it to :func:`upscale_image` with the same ``dtype``
        in its :class:`TileOptions`.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidSettingsError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
    if not in_place:
        prepared = copy.deepcopy(net).eval().requires_grad_(False)
        return prepared.to(device=torch.device(device), dtype=dtype, memory_format=torch.channels_last)
    before = {t.data_ptr() for t in (*net.parameters(), *net.buffers())}
    prepared = net.eval().requires_grad_(False).to(device=torch.device(device), dtype=dtype,
                                                   memory_format=torch.channels_last)
    # A network built from a memory-mapped weights file maps it through every tensor .to() left as it was (the
    # biases, say): those get their own memory, so that the file is unmapped (64 MB of RSS for x4plus).
    with torch.no_grad():
        for tensor in (*prepared.parameters(), *prepared.buffers()):
            if tensor.data_ptr() in before:
                tensor.data = tensor.data.clone()
    return prepared

