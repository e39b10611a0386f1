"""Metrics that tell whether an enhancement helped: file metrics, LR consistency, NIQE, LPIPS and identity.

An upscaler has no ground truth, so quality is judged three ways:

* **File metrics** (:func:`file_metrics`): sizes, scale factor, file sizes and their change, formatted as the
  design's table (``"1920x1080"``, ``"2.0x"``, ``"456.2 KB"``, ``"+170.6%"``) with raw numeric twins for JSON.
* **LR consistency** (:func:`lr_consistency`): the output downscaled to the input size (``cv2.INTER_AREA``)
  compared with the input, PSNR and SSIM. High values mean the output did not invent or move content.
* **No-reference quality** (:func:`niqe`): NIQE as basicsr computes it, with its shipped pristine-model
  parameters (works offline; lower is better). The input is bicubic-upscaled to the output size first, so
  ``niqe_input`` and ``niqe_output`` compare like with like.
* **LPIPS** (:func:`lpips_distance`): the perceptual distance (Zhang et al. 2018, AlexNet v0.1, the ``lpips``
  package's network) between the input and the output brought back to the input size, the perceptual twin of
  LR-consistency PSNR/SSIM (lower is more faithful). Needs the LPIPS network (AlexNet trunk and linear layers).
* **Identity similarity**: cosine similarity of ArcFace (facexlib IR-SE50) embeddings of each face cut from
  the input and from the output at the same aligned position (1 = same person); a warning below
  :data:`IDENTITY_WARN_THRESHOLD`.

Conventions shared by every function here:

* Images are ``HxW`` or ``HxWxC`` numpy arrays, C in {1, 2, 3, 4} ordered Gray / Gray+Alpha / RGB / RGBA (the
  layout of :mod:`utils.image_io`), ``uint8`` (range 0..255) or ``uint16`` (range 0..65535). The range comes from
  the dtype, never from pixel values. Alpha is ignored: metrics describe the colour channels.
* Quality metrics are computed on **luminance**: Y of BT.601 YCbCr as MATLAB's ``rgb2ycbcr`` computes it (the
  ``test_y_channel`` convention of basicsr and of the super-resolution literature), on the 0..255 scale; a gray
  image is used as is. When one image is gray and the other colour, the gray one is expanded to RGB first, so
  both go through the same conversion.
* **PSNR** of identical images is infinite; it is reported capped at :data:`PSNR_CAP_DB` (100 dB), so output
  stays valid JSON.
* **NIQE** is computed on a centre crop of at most :data:`NIQE_MAX_SIDE` pixels a side (a whole number of
  NIQE's 96-pixel blocks), the same crop for input and output. A crop, not a downscale, because downscaling
  would hide exactly the blur and artefacts NIQE measures; the bound keeps it cheap on large outputs.
* Every value returned is JSON-safe: ``float``/``int``/``str``/``None``/lists/dicts, never NaN or infinity
  (``json.dumps(..., allow_nan=False)`` works). A metric that cannot be computed is ``None`` and its reason is
  in ``"warnings"`` — never a made-up number.

Nothing here imports ``engine`` or ``ui`` or loads weights: the caller passes the LPIPS and ArcFace networks
already built (the engine loads them through its model manager) and they are only read. NIQE imports
neither torch, scipy nor basicsr's package (it reads basicsr's parameter file); LPIPS imports torch when used.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np

from utils.band_resize import BandResizer, resize_rows

logger = logging.getLogger(__name__)

__all__ = [
    "IDENTITY_WARN_THRESHOLD",
    "NIQE_MAX_SIDE",
    "PSNR_CAP_DB",
    "calculate_image_metrics",
    "file_metrics",
    "format_bytes",
    "get_image_info",
    "lpips_distance",
    "lr_consistency",
    "niqe",
    "quality_metrics",
]

PSNR_CAP_DB = 100.0
"""PSNR reported for identical images (and the ceiling of any PSNR), in dB."""

NIQE_BLOCK = 96
"""NIQE's block side (basicsr's and the official MATLAB code's)."""

NIQE_MAX_SIDE = 8 * NIQE_BLOCK
"""NIQE is computed on a centre crop at most this many pixels a side (768: 64 blocks)."""

NIQE_MIN_SIDE = 2 * NIQE_BLOCK
"""Smallest side NIQE accepts: fewer than 2x2 blocks gives no usable covariance."""

IDENTITY_WARN_THRESHOLD = 0.6
"""Cosine similarity of ArcFace embeddings below which the restored face is reported as maybe another person."""

LPIPS_MIN_SIDE = 32
"""Smallest side LPIPS accepts: AlexNet's strides and pools leave nothing of a smaller image."""

LPIPS_MAX_SIDE = 1024
"""LPIPS is computed on a centre crop at most this many pixels a side (the same crop of both images)."""

_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_DTYPE_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_ARCFACE_SIZE = 112


# ------------------------------------------------------------------------------------------------ array helpers
def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` as ``HxWxC`` (a view), after checking its dtype and layout."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype not in _DTYPE_MAX:
        raise TypeError(f"{name} must be uint8 or uint16, got {image.dtype}; convert it with utils.image_io first")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in _MODES or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must be HxW or HxWxC with C in 1..4, got shape {image.shape}")
    return image


def _to_float255(image: np.ndarray) -> np.ndarray:
    """``HxWxC`` uint8/uint16 → ``HxWxC'`` float32 on the 0..255 scale, alpha dropped (C' is 1 or 3)."""
    colour = image[:, :, :3] if image.shape[2] >= 3 else image[:, :, :1]
    return colour.astype(np.float32) * np.float32(255.0 / _DTYPE_MAX[image.dtype])


def _match_channels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand the gray one of two float ``HxWxC`` images to 3 channels when the other one is colour."""
    if a.shape[2] == 1 and b.shape[2] == 3:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 3 and b.shape[2] == 1:
        b = np.repeat(b, 3, axis=2)
    return a, b


def _luminance(image: np.ndarray) -> np.ndarray:
    """Float ``HxWx1`` or ``HxWx3`` RGB on 0..255 → ``HxW`` float32 luminance on 0..255.

    RGB uses MATLAB's ``rgb2ycbcr`` Y (studio range), computed step by step as basicsr's ``to_y_channel`` (same
    float32 rounding, so NIQE matches basicsr's published values); gray is returned as is.
    """
    if image.shape[2] == 1:
        return image[:, :, 0].astype(np.float32)
    rgb = image.astype(np.float32) / np.float32(255.0)
    y = (np.dot(rgb, [65.481, 128.553, 24.966]) + 16.0) / 255.0
    return y.astype(np.float32) * np.float32(255.0)


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------- file metrics
def format_bytes(n: int | float) -> str:
    """Format a byte count as the design's file-size column: kilobytes with one decimal.

    ``format_bytes(467_149)`` → ``"456.2 KB"``; large files stay in KB (``"1234.5 KB"``), as in the design.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"a byte count cannot be negative, got {n}")
    return f"{n / 1024:.1f} KB"


def _format_size(size: tuple[int, int]) -> str:
    w, h = size
    return f"{int(w)}x{int(h)}"


def file_metrics(original_size: tuple[int, int], enhanced_size: tuple[int, int],
                 original_bytes: int | None = None, enhanced_bytes: int | None = None) -> dict[str, Any]:
    """The design's file metrics, formatted for display, with raw numeric twins for JSON consumers.

    Args:
        original_size: ``(width, height)`` of the input in pixels.
        enhanced_size: ``(width, height)`` of the output in pixels.
        original_bytes: encoded size of the input file, or None when unknown (e.g. an in-memory array).
        enhanced_bytes: encoded size of the output file, or None when unknown.

    Returns:
        ``original_size`` / ``enhanced_size`` (``"1920x1080"``), ``scale_factor`` (``"2.0x"``, from the widths),
        ``original_filesize`` / ``enhanced_filesize`` (``"456.2 KB"``, ``"n/a"`` when unknown) and
        ``size_change`` (``"+170.6%"``, ``"n/a"`` when either size is unknown or the original is empty); and
        the raw values ``original_width``, ``original_height``, ``enhanced_width``, ``enhanced_height``,
        ``scale_factor_value`` (width ratio), ``scale_factor_y_value`` (height ratio), ``original_bytes``,
        ``enhanced_bytes`` and ``size_change_percent`` (None when unknown).

    Raises:
        ValueError: a size is not two positive integers, or a byte count is negative.
    """
    for name, size in (("original_size", original_size), ("enhanced_size", enhanced_size)):
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"{name} must be (width, height) with positive values, got {size!r}")
    for name, n in (("original_bytes", original_bytes), ("enhanced_bytes", enhanced_bytes)):
        if n is not None and n < 0:
            raise ValueError(f"{name} cannot be negative, got {n}")
    (ow, oh), (ew, eh) = original_size, enhanced_size
    scale_x, scale_y = ew / ow, eh / oh
    change = None
    if original_bytes and enhanced_bytes is not None:
        change = (enhanced_bytes - original_bytes) / original_bytes * 100.0
    return {
        "original_size": _format_size(original_size),
        "enhanced_size": _format_size(enhanced_size),
        "scale_factor": f"{scale_x:.1f}x",
        "original_filesize": format_bytes(original_bytes) if original_bytes is not None else "n/a",
        "enhanced_filesize": format_bytes(enhanced_bytes) if enhanced_bytes is not None else "n/a",
        "size_change": f"{change:+.1f}%" if change is not None else "n/a",
        "original_width": int(ow),
        "original_height": int(oh),
        "enhanced_width": int(ew),
        "enhanced_height": int(eh),
        "scale_factor_value": float(scale_x),
        "scale_factor_y_value": float(scale_y),
        "original_bytes": None if original_bytes is None else int(original_bytes),
        "enhanced_bytes": None if enhanced_bytes is None else int(enhanced_bytes),
        "size_change_percent": change,
    }


def get_image_info(image: np.ndarray) -> dict[str, Any]:
    """Describe an image array: ``width``, ``height``, ``channels``, ``mode`` (L/LA/RGB/RGBA), ``bit_depth``
    (8 or 16, from the dtype) and ``has_alpha``.

    Args:
        image: ``HxW`` or ``HxWxC`` uint8/uint16, C in 1..4.

    Raises:
        TypeError: not a uint8/uint16 numpy array.
        ValueError: not an image layout.
    """
    img = _check_image(image)
    h, w, c = img.shape
    return {"width": int(w), "height": int(h), "channels": int(c), "mode": _MODES[c],
            "bit_depth": 8 * img.dtype.itemsize, "has_alpha": c in (2, 4)}


# ----------------------------------------------------------------------------------------------- LR consistency
METRIC_BAND_ROWS = 128
"""Rows of the input size that LR consistency works on at a time: its float64 luminance and SSIM statistics
(about ten copies) follow this band, not the image (a 2000x1500 x4 job's comparison: 71 MB at 256 rows, 43 MB
at 128 rows, 1.35 and 1.6 s)."""

METRIC_SHRINK_ROWS = 16
"""Rows of the input size that the output is shrunk back to at a time: the output's source rows, as float, follow
this band (at x4, 64 rows of the output's width; the resizer's default of 64 rows held 129 MB for a 2000x1500 x4
job, 16 rows 71 MB, in the same time)."""

_SSIM_RADIUS = 5
"""Half the 11x11 SSIM window: a band reads this many rows of context each side, and SSIM is averaged over the
window positions fully inside the image (as basicsr)."""


def _psnr_of_mse(mse: float) -> float:
    """PSNR in dB on the 0..255 scale for a mean squared error, capped at :data:`PSNR_CAP_DB`."""
    if mse <= 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0 * 255.0 / mse))


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of two ``HxW`` float64
    images on the 0..255 scale at the window positions fully inside them: ``(H - 10) x (W - 10)``."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(2 * _SSIM_RADIUS + 1, 1.5)
    window = np.outer(kernel, kernel.transpose())
    r = _SSIM_RADIUS

    def filt(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[r:-r, r:-r]

    mu1, mu2 = filt(a), filt(b)
    mu1_sq, mu2_sq, mu12 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = filt(a * a) - mu1_sq
    sigma2_sq = filt(b * b) - mu2_sq
    sigma12 = filt(a * b) - mu12
    return ((2 * mu12 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))


def lr_consistency(original: np.ndarray, enhanced: np.ndarray) -> dict[str, float | None]:
    """Fidelity to the input: the output downscaled to the input size (``cv2.INTER_AREA``) against the input.

    Both are compared on luminance (see the module docstring), 0..255 scale, whatever their bit depth.

    Args:
        original: the input, ``HxW[xC]`` uint8/uint16.
        enhanced: the output, ``H'xW'[xC]`` uint8/uint16, any size (normally an integer multiple).

    Returns:
        ``{"psnr": dB capped at 100, "ssim": in [-1, 1] or None when the input is under 11x11 pixels}``.

    Raises:
        TypeError, ValueError: an argument is not a uint8/uint16 image.
    """
    return _compare_bands(_check_image(original, "original"), _check_image(enhanced, "enhanced"))[0]


def _shrink_to(image255: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float ``HxWxC`` image resized to ``size`` = (height, width) with ``cv2.INTER_AREA`` (as is if equal)."""
    h, w = size
    if image255.shape[:2] == (h, w):
        return image255
    out = cv2.resize(image255, (w, h), interpolation=cv2.INTER_AREA)
    return out[:, :, None] if out.ndim == 2 else out


def _shrunk_rows(image: np.ndarray, size: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`_shrink_to` of ``_to_float255(image)`` as ``(first row, float rows)`` bands, top to bottom: only a
    band of the output is ever float. ``image`` is HxWxC uint8/uint16; ``size`` = (height, width). The rows equal
    the whole-image result's (see :mod:`utils.band_resize`)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        for top in range(0, h, METRIC_BAND_ROWS):
            yield top, _to_float255(image[top:top + METRIC_BAND_ROWS])
        return
    resizer = BandResizer((w, h), (size[1], size[0]), band_rows=METRIC_SHRINK_ROWS, interpolation=cv2.INTER_AREA)
    step = max(1, resizer.src_step)
    for top in range(0, h, step):
        yield from resizer.push(_to_float255(image[top:top + step]))
    yield from resizer.finish()


class _RowWindow:
    """Rows ``[lo, hi)`` of an image that arrives as ``(first row, rows)`` bands, top to bottom, for windows that
    only move down: rows above a window are let go."""

    def __init__(self, bands: Iterable[tuple[int, np.ndarray]]):
        self._bands = iter(bands)
        self._rows: np.ndarray | None = None
        self._first = self._end = 0  # the image rows held: [first, end)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        parts, first = [], lo
        if self._rows is not None and self._end > lo:
            parts.append(self._rows[lo - self._first:])
        while self._end < hi:
            start, band = next(self._bands)
            self._end = start + band.shape[0]
            if self._end > lo:
                first = first if parts else start
                parts.append(band)
        self._rows, self._first = (parts[0] if len(parts) == 1 else np.concatenate(parts)), first
        return self._rows[lo - first:hi - first]


def _compare_bands(original: np.ndarray, enhanced: np.ndarray, crop_side: int = 0
                   ) -> tuple[dict[str, float | None], np.ndarray | None, np.ndarray | None]:
    """LR consistency of ``original`` and ``enhanced`` shrunk back to its size, and the centre crops of both at
    the input size (at most ``crop_side`` a side; None for 0), :data:`METRIC_BAND_ROWS` input rows at a time:
    only a band of either is ever float (both ``HxWxC`` uint8/uint16, checked).

    Each band's luminance (with :data:`_SSIM_RADIUS` rows of context each side for SSIM) is the whole image's,
    so the sums are the whole image's up to their order.
    """
    height, width = original.shape[:2]
    back = _RowWindow(_shrunk_rows(enhanced, (height, width)))
    crop_h, crop_w = min(height, crop_side), min(width, crop_side)
    crop_top, crop_left = (height - crop_h) // 2, (width - crop_w) // 2
    crops: list[tuple[np.ndarray, np.ndarray]] = []

    def bands() -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray]]:
        for top, bottom, lo, hi in _band_spans(height):
            orig, shrunk = _to_float255(original[lo:hi]), back.rows(lo, hi)
            first, last = max(top, crop_top), min(bottom, crop_top + crop_h)
            if first < last:
                cut = (slice(first - lo, last - lo), slice(crop_left, crop_left + crop_w))
                crops.append((orig[cut].copy(), shrunk[cut].copy()))
            yield top, bottom, lo, orig, shrunk

    lr = _lr_consistency_bands(bands(), height, width)
    if not crops:
        return lr, None, None
    return lr, np.concatenate([a for a, _ in crops]), np.concatenate([b for _, b in crops])


def _lr_consistency_float(orig255: np.ndarray, back255: np.ndarray) -> dict[str, float | None]:
    """:func:`lr_consistency` of the input and the output already shrunk back to its size (float, 0..255)."""
    height, width = orig255.shape[:2]

    bands = ((top, bottom, lo, orig255[lo:hi], back255[lo:hi]) for top, bottom, lo, hi in _band_spans(height))
    return _lr_consistency_bands(bands, height, width)


def _band_spans(height: int) -> Iterator[tuple[int, int, int, int]]:
    """``(top, bottom, lo, hi)`` of each band of :data:`METRIC_BAND_ROWS` rows: its rows ``[top, bottom)`` and
    the rows ``[lo, hi)`` it reads, with :data:`_SSIM_RADIUS` rows of context each side."""
    for top in range(0, height, METRIC_BAND_ROWS):
        bottom = min(height, top + METRIC_BAND_ROWS)
        yield top, bottom, max(0, top - _SSIM_RADIUS), min(height, bottom + _SSIM_RADIUS)


def _lr_consistency_bands(bands: Iterable[tuple[int, int, int, np.ndarray, np.ndarray]], height: int,
                          width: int) -> dict[str, float | None]:
    """LR consistency summed over ``(top, bottom, lo, input rows, shrunk output rows)`` bands that cover the
    ``height`` rows in order, each band's rows starting at ``lo`` with :data:`_SSIM_RADIUS` rows of context."""
    radius = _SSIM_RADIUS
    with_ssim = min(height, width) >= 2 * radius + 1
    squared = ssim_sum = 0.0
    for top, bottom, lo, orig_rows, back_rows in bands:
        orig, back = _match_channels(orig_rows, back_rows)
        y_orig, y_back = _luminance(orig).astype(np.float64), _luminance(back).astype(np.float64)
        squared += float(np.sum((y_orig[top - lo:bottom - lo] - y_back[top - lo:bottom - lo]) ** 2))
        if with_ssim:  # window centres in [top, bottom) that lie >= radius inside the image
            first, last = max(top, radius), min(bottom, height - radius)
            if first < last:
                rows = slice(first - radius - lo, last + radius - lo)
                ssim_sum += float(np.sum(_ssim_map(y_orig[rows], y_back[rows])))
    ssim = ssim_sum / ((height - 2 * radius) * (width - 2 * radius)) if with_ssim else None
    return {"psnr": _psnr_of_mse(squared / (height * width)), "ssim": ssim}


# ------------------------------------------------------------------------------------------------------- NIQE
# NIQE as basicsr computes it (``basicsr.metrics.niqe``: the official MATLAB code's features, blocks and pristine
# model), vectorised over blocks, and without importing basicsr: its package import pulls in all of its
# architectures, datasets and scipy.stats, 1-2 s of every CLI run for a metric that takes 0.05 s. The pristine
# parameters are basicsr's shipped file; tests pin the value to basicsr's own ``calculate_niqe``.
_AGGD_SHAPES = np.arange(0.2, 10.001, 0.001)
"""The AGGD shape parameters NIQE searches (basicsr's and the MATLAB code's grid)."""

_PAIR_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
"""Neighbour offsets of NIQE's paired products: horizontal, vertical and the two diagonals."""


@functools.lru_cache(maxsize=1)
def _niqe_pristine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """basicsr's pristine model (mu, cov) and 7x7 gaussian window, read from its package files once, read-only."""
    import importlib.util

    spec = importlib.util.find_spec("basicsr")  # locates the package without running its heavy __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("NIQE needs basicsr's niqe_pris_params.npz; install basicsr (it is a required package)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "metrics", "niqe_pris_params.npz")
    with np.load(path) as params:
        arrays = tuple(np.array(params[k]) for k in ("mu_pris_param", "cov_pris_param", "gaussian_window"))
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=1)
def _aggd_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every shape ``a`` of :data:`_AGGD_SHAPES`: the moment ratio Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) that
    identifies it, the scale factor sqrt(Gamma(1/a) / Gamma(3/a)) and the mean factor Gamma(2/a) / Gamma(1/a)."""
    g1, g2, g3 = (np.vectorize(math.gamma, otypes=[np.float64])(k / _AGGD_SHAPES) for k in (1, 2, 3))
    tables = (np.square(g2) / (g1 * g3), np.sqrt(g1 / g3), g2 / g1)
    for table in tables:
        table.setflags(write=False)
    return tables


def _aggd_params(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric generalised gaussian fit of each of ``N`` blocks (``NxHxW``): shape, left and right scale, and
    the mean factor of the shape.

    A block without negative (or positive) values gets NaN scales, as basicsr's (NIQE then drops its features).
    """
    ratios, scales, means = _aggd_tables()
    flat = blocks.reshape(len(blocks), -1).astype(np.float64)
    square = np.square(flat)
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt((square * (flat < 0)).sum(1) / (flat < 0).sum(1))
        right = np.sqrt((square * (flat > 0)).sum(1) / (flat > 0).sum(1))
        ratio = left / right
        r_hat = np.square(np.abs(flat).mean(1)) / square.mean(1)
        r_norm = r_hat * (ratio ** 3 + 1) * (ratio + 1) / np.square(ratio ** 2 + 1)
        best = np.argmin(np.square(ratios[None, :] - r_norm[:, None]), axis=1)
    return _AGGD_SHAPES[best], left * scales[best], right * scales[best], means[best]


def _niqe_block_features(normalised: np.ndarray, block: int) -> np.ndarray:
    """NIQE's 18 features of every ``block``-sided block of a normalised (MSCN) image: ``n_blocks x 18``."""
    h, w = normalised.shape
    blocks = normalised[:h // block * block, :w // block * block].reshape(h // block, block, w // block, block)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(-1, block, block)
    shape, left, right, _mean = _aggd_params(blocks)
    columns = [shape, (left + right) / 2]
    for shift in _PAIR_SHIFTS:
        shape, left, right, mean = _aggd_params(blocks * np.roll(blocks, shift, axis=(1, 2)))
        columns += [shape, (right - left) * mean, left, right]
    return np.stack(columns, axis=1)


def _matlab_half_weights(length: int) -> np.ndarray:
    """``ceil(length / 2) x length`` float32 matrix of MATLAB's ``imresize(x, 0.5)`` (antialiased bicubic).

    Each output sample is MATLAB's widened cubic kernel (width 8) around its centre, normalised to sum 1, with the
    taps that fall outside the signal folded back onto their mirror images (MATLAB's symmetric padding).
    """
    scale, width = 0.5, 4 / 0.5
    out = math.ceil(length * scale)
    centre = np.arange(1, out + 1, dtype=np.float32) / scale + 0.5 * (1 - 1 / scale)
    taps = np.floor(centre - width / 2)[:, None] + np.arange(math.ceil(width) + 2, dtype=np.float32)[None, :]
    x = np.abs((centre[:, None] - taps) * scale)
    cubic = ((1.5 * x ** 3 - 2.5 * x ** 2 + 1) * (x <= 1)
             + (-0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2) * ((x > 1) & (x <= 2)))
    weights = (scale * cubic).astype(np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    index = taps.astype(np.int64) - 1  # MATLAB counts from 1
    index = np.where(index < 0, -index - 1, index)
    index = np.where(index >= length, 2 * length - index - 1, index)
    matrix = np.zeros((out, length), np.float32)
    np.add.at(matrix, (np.repeat(np.arange(out), index.shape[1]), index.ravel()), weights.ravel())
    return matrix


def _filter_as_float32(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """float32 ``image`` filtered by a symmetric ``window`` in double precision, edges replicated, as float32.

    What ``scipy.ndimage.convolve(mode="nearest")`` gives basicsr (a symmetric window: correlation is convolution).
    On flat regions NIQE's normalised values are rounding residue, so matching basicsr means matching its precision.
    """
    return cv2.filter2D(image.astype(np.float64), -1, window, borderType=cv2.BORDER_REPLICATE).astype(np.float32)


def _niqe_of_luminance(y: np.ndarray) -> float:
    """NIQE of a rounded ``HxW`` float32 luminance image on 0..255 (at least 2x2 blocks); NaN when degenerate."""
    mu_pristine, cov_pristine, window = _niqe_pristine()
    h, w = y.shape
    image = y[:h // NIQE_BLOCK * NIQE_BLOCK, :w // NIQE_BLOCK * NIQE_BLOCK]
    features = []
    for block in (NIQE_BLOCK, NIQE_BLOCK // 2):
        mu = _filter_as_float32(image, window)
        sigma = np.sqrt(np.abs(_filter_as_float32(np.square(image), window) - np.square(mu)))
        features.append(_niqe_block_features((image - mu) / (sigma + 1), block))
        if block == NIQE_BLOCK:
            rows, columns = _matlab_half_weights(image.shape[0]), _matlab_half_weights(image.shape[1])
            image = rows @ (image / np.float32(255.0)) @ columns.T * np.float32(255.0)
    distorted = np.concatenate(features, axis=1)
    usable = distorted[~np.isnan(distorted).any(axis=1)]
    if len(usable) < 2:  # flat-colour blocks have no scale, so no covariance (basicsr's SVD fails there)
        return math.nan
    mu_distorted = np.nanmean(distorted, axis=0)
    cov_distorted = np.cov(usable, rowvar=False)
    difference = (mu_pristine - mu_distorted).ravel()
    return float(np.sqrt(difference @ np.linalg.pinv((cov_pristine + cov_distorted) / 2) @ difference))


def _centre_crop(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = min(h, max_side), min(w, max_side)
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]


def _niqe_float(image255: np.ndarray) -> float:
    """NIQE of a float ``HxWxC`` (C 1 or 3) image on the 0..255 scale; see :func:`niqe`."""
    h, w = image255.shape[:2]
    if min(h, w) < NIQE_MIN_SIDE:
        raise ValueError(f"NIQE needs at least {NIQE_MIN_SIDE}x{NIQE_MIN_SIDE} pixels, the image is {w}x{h}")
    crop = _centre_crop(image255, NIQE_MAX_SIDE)
    y = _luminance(crop).round()  # basicsr rounds, to match MATLAB's results
    if float(y.std()) == 0.0:
        return math.nan  # a flat image has no natural-scene statistics to compare
    with np.errstate(all="ignore"):
        try:
            return _niqe_of_luminance(y)
        except np.linalg.LinAlgError:  # degenerate features (almost featureless image)
            return math.nan


def niqe(image: np.ndarray) -> float:
    """No-reference NIQE (Mittal et al. 2013): basicsr's features, blocks and pristine parameters.

    Lower is better (sharp natural photos score about 3 to 5; blurred or noisy ones higher). Computed on
    luminance of a centre crop of at most :data:`NIQE_MAX_SIDE` pixels a side (see the module docstring).

    Args:
        image: ``HxW[xC]`` uint8/uint16, at least :data:`NIQE_MIN_SIDE` pixels a side.

    Returns:
        The NIQE score; NaN for a featureless (flat) image, where NIQE is undefined (:func:`quality_metrics`
        reports that as None with a warning).

    Raises:
        TypeError: not a uint8/uint16 numpy array.
        ValueError: not an image layout, or smaller than :data:`NIQE_MIN_SIDE` a side.
    """
    return _niqe_float(_to_float255(_check_image(image)))


# ------------------------------------------------------------------------------------------------------ LPIPS
def _on_network_device(network: Any, tensor: Any) -> Any:
    """``tensor`` moved to the device of ``network``'s parameters (a plain callable gets it as is, on the CPU)."""
    parameters = getattr(network, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return tensor if first is None else tensor.to(first.device)


def _lpips_input(image255: np.ndarray) -> Any:
    """Float ``HxWxC`` (C 1 or 3) on 0..255 → ``1x3xHxW`` float32 tensor in [-1, 1] (LPIPS' input)."""
    import torch

    rgb = np.repeat(image255, 3, axis=2) if image255.shape[2] == 1 else image255
    return torch.from_numpy(np.ascontiguousarray((rgb / 127.5 - 1.0).transpose(2, 0, 1)[None], dtype=np.float32))


def lpips_distance(a: np.ndarray, b: np.ndarray, network: Any) -> float:
    """LPIPS distance of two images of the same size (0 for identical images; larger is more different).

    Args:
        a, b: ``HxW[xC]`` uint8/uint16, the same height and width, at least :data:`LPIPS_MIN_SIDE` a side;
            compared on a centre crop of at most :data:`LPIPS_MAX_SIDE` a side.
        network: the LPIPS network (the ``lpips`` package's ``LPIPS``, AlexNet v0.1, float32, loaded by the
            caller), or any callable taking two ``1x3xHxW float32`` tensors in [-1, 1] and returning their
            distance as a one-element tensor. Only read.

    Raises:
        TypeError, ValueError: not images, different sizes, or too small.
    """
    return _lpips_float(_to_float255(_check_image(a, "a")), _to_float255(_check_image(b, "b")), network)


def _lpips_float(fa: np.ndarray, fb: np.ndarray, network: Any) -> float:
    """:func:`lpips_distance` of two float ``HxWxC`` images on 0..255."""
    import torch

    if fa.shape[:2] != fb.shape[:2]:
        raise ValueError(f"LPIPS compares images of one size, got {fa.shape[1]}x{fa.shape[0]} and "
                         f"{fb.shape[1]}x{fb.shape[0]}")
    if min(fa.shape[:2]) < LPIPS_MIN_SIDE:
        raise ValueError(f"LPIPS needs at least {LPIPS_MIN_SIDE}x{LPIPS_MIN_SIDE} pixels, the image is "
                         f"{fa.shape[1]}x{fa.shape[0]}")
    fa, fb = _match_channels(_centre_crop(fa, LPIPS_MAX_SIDE), _centre_crop(fb, LPIPS_MAX_SIDE))
    with torch.inference_mode():
        x, y = (_on_network_device(network, _lpips_input(f)) for f in (fa, fb))
        return float(network(x, y).item())


# --------------------------------------------------------------------------------------------------- identity
def _face_embedding_input(face: np.ndarray) -> np.ndarray:
    """A face crop ``HxW[xC]`` uint8/uint16 → ``3x112x112`` float32 RGB in [-1, 1] (ArcFace's input)."""
    img = _to_float255(_check_image(face, "face"))
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = cv2.resize(img, (_ARCFACE_SIZE, _ARCFACE_SIZE), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray((img / 127.5 - 1.0).transpose(2, 0, 1), dtype=np.float32)


def _identity_similarities(face_pairs: Sequence[tuple[np.ndarray, np.ndarray]], network: Any) -> list[float]:
    """Cosine similarity of ArcFace embeddings for each (input face, output face) pair."""
    import torch

    batch = np.stack([_face_embedding_input(f) for pair in face_pairs for f in pair])
    with torch.inference_mode():
        emb = torch.nn.functional.normalize(network(_on_network_device(network, torch.from_numpy(batch))).float(),
                                            dim=1)
    return [min(1.0, max(-1.0, float((emb[2 * i] * emb[2 * i + 1]).sum()))) for i in range(len(face_pairs))]


# ----------------------------------------------------------------------------------------------------- combined
def quality_metrics(original: np.ndarray, enhanced: np.ndarray, *,
                    face_pairs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                    lpips_network: Any = None, identity_network: Any = None) -> dict[str, Any]:
    """LR consistency, NIQE of input and output, LPIPS and identity similarity, JSON-safe.

    Args:
        original: the input, ``HxW[xC]`` uint8/uint16.
        enhanced: the output, ``H'xW'[xC]`` uint8/uint16.
        face_pairs: ``(input face crop, output face crop)`` pairs, each ``HxW[xC]`` uint8/uint16 RGB, for the
            identity similarity; None or empty when no faces were enhanced.
        lpips_network: the LPIPS network (see :func:`lpips_distance`); None → ``lpips`` None with the reason.
        identity_network: facexlib's ArcFace IR-SE50 network (float32, loaded by the caller), or any callable
            taking ``Nx3x112x112 float32`` RGB faces in [-1, 1] and returning ``NxD`` embeddings; only read.
            None → ``identity_similarity`` None with the reason.

    Returns:
        ``lr_psnr`` (dB, capped at 100), ``lr_ssim``, ``niqe_input`` (bicubic-upscaled input), ``niqe_output``,
        ``lpips`` (input against the output at the input size), ``identity_similarity`` (mean over pairs) and
        ``identity_similarity_per_face``, each None
        when not computable, and ``warnings``: a list of human-readable reasons (and a low-identity warning).

    Raises:
        TypeError, ValueError: an image is not a uint8/uint16 image array.
    """
    warnings: list[str] = []
    original = _check_image(original, "original")
    enhanced = _check_image(enhanced, "enhanced")
    oh, ow = original.shape[:2]
    # The output shrunk back to the input's size is compared band by band; LPIPS gets the centre crops of both.
    with_lpips = lpips_network is not None and min(oh, ow) >= LPIPS_MIN_SIDE
    lr, orig_crop, back_crop = _compare_bands(original, enhanced, LPIPS_MAX_SIDE if with_lpips else 0)
    if lr["ssim"] is None:
        warnings.append("LR-consistency SSIM not computed: the input is smaller than 11x11 pixels")

    niqe_in = niqe_out = None
    h, w = enhanced.shape[:2]
    if min(h, w) < NIQE_MIN_SIDE:
        warnings.append(f"NIQE not computed: the output ({w}x{h}) is smaller than "
                        f"{NIQE_MIN_SIDE}x{NIQE_MIN_SIDE} pixels")
    else:
        # Only NIQE's centre crop of the output and of the bicubic baseline is ever made (bounded memory).
        crop_h, crop_w = min(h, NIQE_MAX_SIDE), min(w, NIQE_MAX_SIDE)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        upscaled = resize_rows(original, (w, h), top, crop_h, cv2.INTER_CUBIC, convert=_to_float255,
                               columns=(left, crop_w))
        if upscaled.ndim == 2:
            upscaled = upscaled[:, :, None]
        upscaled = np.clip(upscaled, 0.0, 255.0)
        enh = _to_float255(enhanced[top:top + crop_h, left:left + crop_w])
        upscaled, enh = _match_channels(upscaled, enh)
        niqe_in = _finite_or_none(_niqe_float(upscaled))
        niqe_out = _finite_or_none(_niqe_float(enh))
        if niqe_in is None or niqe_out is None:
            warnings.append("NIQE undefined for a featureless (flat) image")

    lpips: float | None = None
    if lpips_network is None:
        warnings.append("LPIPS not computed: no usable LPIPS weights on this machine (get them with: python "
                        "main.py models download lpips-alexnet)")
    elif min(oh, ow) < LPIPS_MIN_SIDE:
        warnings.append(f"LPIPS not computed: the input ({ow}x{oh}) is smaller than "
                        f"{LPIPS_MIN_SIDE}x{LPIPS_MIN_SIDE} pixels")
    else:
        try:
            lpips = _finite_or_none(_lpips_float(orig_crop, back_crop, lpips_network))
        except (ImportError, OSError, RuntimeError, ValueError, KeyError) as exc:
            logger.warning("LPIPS failed: %s", exc)
            warnings.append(f"LPIPS not computed: its network could not be used ({str(exc)[:120]})")

    identity: float | None = None
    per_face: list[float] | None = None
    if not face_pairs:
        warnings.append("identity similarity not computed: no face pairs were given")
    elif identity_network is None:
        warnings.append("identity similarity not computed: no usable face-recognition (ArcFace) weights on this "
                        "machine (get them with: python main.py models download arcface-ir-se50)")
    else:
        try:
            sims = _identity_similarities(face_pairs, identity_network)
        except (ImportError, OSError, RuntimeError, ValueError, KeyError) as exc:
            logger.warning("identity similarity failed: %s", exc)
            warnings.append(f"identity similarity not computed: the ArcFace network could not be used "
                            f"({str(exc)[:120]})")
            sims = []
        per_face = [round(s, 4) for s in sims if math.isfinite(s)] or None
        identity = _finite_or_none(float(np.mean(sims))) if sims else None
        if identity is not None and identity < IDENTITY_WARN_THRESHOLD:
            warnings.append(f"identity similarity {identity:.2f} is below {IDENTITY_WARN_THRESHOLD}: "
                            "the restored face may not look like the same person; lower the face strength")

    for reason in warnings:
        logger.debug("metrics: %s", reason)
    return {
        "lr_psnr": _finite_or_none(lr["psnr"]),
        "lr_ssim": _finite_or_none(lr["ssim"]),
        "niqe_input": niqe_in,
        "niqe_output": niqe_out,
        "lpips": lpips,
        "identity_similarity": identity,
        "identity_similarity_per_face": per_face,
        "warnings": warnings,
    }


def calculate_image_metrics(original: np.ndarray, enhanced: np.ndarray, original_bytes: int | None = None,
                            enhanced_bytes: int | None = None, quality: bool = True, **quality_kwargs: Any
                            ) -> dict[str, Any]:
    """File metrics and (when ``quality``) quality metrics of one enhancement, in one JSON-safe dict.

    Args:
        original: the input, ``HxW[xC]`` uint8/uint16.
        enhanced: the output, ``H'xW'[xC]`` uint8/uint16.
        original_bytes: encoded size of the input file, if known.
        enhanced_bytes: encoded size of the output file, if known.
        quality: also compute :func:`quality_metrics` (on by default; it costs a few percent of an enhance).
        **quality_kwargs: ``face_pairs``, ``lpips_network``, ``identity_network`` for :func:`quality_metrics`.

    Returns:
        The keys of :func:`file_metrics`, plus those of :func:`quality_metrics` when ``quality`` (else just
        ``"warnings": []``).
    """
    o, e = _check_image(original, "original"), _check_image(enhanced, "enhanced")
    result = file_metrics((o.shape[1], o.shape[0]), (e.shape[1], e.shape[0]), original_bytes, enhanced_bytes)
    if quality:
        result.update(quality_metrics(original, enhanced, **quality_kwargs))
    else:
        result["warnings"] = []
    return result
