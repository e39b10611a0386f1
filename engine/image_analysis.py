"""Pure measurements of one image for the settings advisor: content type, noise, JPEG blocking, blur, faces.

Every function takes an HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) array of uint8 or uint16 and returns plain values.
Bit depth comes from the dtype, never from pixel values. Measurements that do not need full resolution run on a
working copy whose long side is at most :data:`WORKING_SIDE`; noise and JPEG blocking need native pixels (a resize
averages noise away and moves the 8x8 grid) and use at most :data:`NATIVE_CROP` x :data:`NATIVE_CROP` pixels from
the image centre, aligned to the JPEG grid.

Content type ("anime" covers cartoons, cel animation and flat-colour illustration) is a logistic on two features,
both computed on the working copy, both with a physical reading:

* ``clean_fraction`` - share of 8x8 luminance blocks (not clipped to black/white, inside the alpha mask) that a
  quadratic surface fits to within 0.5 grey levels: noise-free flats and noise-free smooth shading. Cel animation
  and digital illustration have many; camera photos have sensor noise and texture almost everywhere.
* ``chroma_ratio`` - total chroma gradient (CIELAB a*, b*) over total luminance gradient. Inked outlines make
  cartoon edges luminance edges, flat fills carry no chroma texture; photos have chroma texture and object edges
  that change colour as much as brightness. Undefined for gray images (also gray content stored as RGB), which
  get the neutral value 0.25.

``logit = CONTENT_WEIGHT * (clean_fraction - chroma_ratio)``; anime when the logit is > 0, confidence is the
sigmoid of ``|logit|``. The weight is hand-set (a logistic fit on the development set gave +5.96 / -6.03 with
bias 0.18, i.e. "anime when clean_fraction exceeds chroma_ratio"), not tuned per file. ``bench/eval_advisor.py``
validates it on the labelled set and on held-out frames, crops, downscales and re-compressions.
Known limit: painted, photo-realistic illustrations with scan noise (the Set14 "comic") read as photos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from engine.errors import InvalidInputError
from engine.face_detect import FaceBox, detect_faces

__all__ = [
    "ContentType",
    "ImageAnalysis",
    "analyze",
    "bit_depth",
    "blur_level",
    "content_features",
    "content_type",
    "has_alpha",
    "jpeg_blockiness",
    "noise_level",
    "noise_sigma",
]

ContentType = Literal["anime", "photo"]

#: Long side (pixels) of the working copy used for content type and blur.
WORKING_SIDE = 512
#: Side of the native-resolution centre crop used for noise and JPEG blocking.
NATIVE_CROP = 768
#: Noise sigma (0-255 scale) that maps to noise_level 1.0: level = clip(sigma / NOISE_SIGMA_FULL_SCALE, 0, 1).
NOISE_SIGMA_FULL_SCALE = 50.0
#: Steepness of the content-type logistic (see module docstring).
CONTENT_WEIGHT = 8.0
#: chroma_ratio used for images without colour.
NEUTRAL_CHROMA_RATIO = 0.25
#: 99th-percentile CIELAB chroma (0-255 Lab scale) under which an RGB image counts as gray (stored as RGB).
COLOURLESS_CHROMA = 3.0
#: Residual (grey levels) under which an 8x8 block counts as clean.
CLEAN_BLOCK_RESIDUAL = 0.5
#: Laplacian variance (0-255 scale, working copy) of a sharp and of a very blurry image: blur 0 and 1.
BLUR_SHARP_LAPVAR = 1000.0
BLUR_BLURRY_LAPVAR = 10.0
#: Boundary/interior difference ratio of 8x8 blocking that maps to jpeg_artifacts 1.0 (ratio 1.0 maps to 0).
BLOCKINESS_FULL_RATIO = 2.0


@dataclass(frozen=True)
class ImageAnalysis:
    """Everything the advisor needs to know about one image. Levels are in [0, 1], 1 = strongest."""

    content_type: ContentType
    confidence: float
    noise_level: float
    noise_sigma: float  # estimated Gaussian sigma on the 0-255 scale
    jpeg_artifacts: float
    blur: float
    width: int
    height: int
    bit_depth: int
    has_alpha: bool
    faces: tuple[FaceBox, ...]
    face_detector: str | None  # None when face detection was not run


# --------------------------------------------------------------------------------------------- input handling


def _check(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"Expected a numpy image array, got {type(image).__name__}.")
    if image.ndim not in (2, 3) or image.size == 0 or min(image.shape[:2]) == 0:
        raise InvalidInputError(f"Expected a non-empty HxW or HxWxC image, got shape {image.shape}.")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"Expected 1, 3 or 4 channels, got {image.shape[2]}.")
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"Expected uint8 or uint16 pixels, got {image.dtype}; convert the image first.")
    return image


def bit_depth(image: np.ndarray) -> int:
    """8 for uint8, 16 for uint16 (from the dtype, never from the values)."""
    return 16 if _check(image).dtype == np.uint16 else 8


def has_alpha(image: np.ndarray) -> bool:
    """True for HxWx4 arrays (RGBA), whatever the alpha values."""
    image = _check(image)
    return image.ndim == 3 and image.shape[2] == 4


def _split(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(HxWx3 float32 RGB on the 0-255 scale, HxW alpha in [0, 1] or None, is_gray)."""
    image = _check(image)
    scale = 1.0 / 257.0 if image.dtype == np.uint16 else 1.0
    alpha = None
    if image.ndim == 2 or image.shape[2] == 1:
        gray = image.reshape(image.shape[:2]).astype(np.float32) * scale
        return np.repeat(gray[:, :, None], 3, axis=2), None, True
    rgb = image[:, :, :3].astype(np.float32) * scale
    if image.shape[2] == 4:
        alpha = image[:, :, 3].astype(np.float32) * (scale / 255.0)
    return rgb, alpha, False


def _working_copy(array: np.ndarray, side: int = WORKING_SIDE) -> np.ndarray:
    h, w = array.shape[:2]
    factor = min(1.0, side / max(h, w))
    if factor >= 1.0:
        return array
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class _Prepared:
    """Reduced views of one image, made once: the working copy and the native centre crop (float32, 0-255)."""

    work_rgb: np.ndarray
    work_alpha: np.ndarray | None
    crop_rgb: np.ndarray
    is_gray: bool
    work_scale: float  # working-copy pixels per input pixel


def _prepare(image: np.ndarray) -> _Prepared:
    image = _check(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    # Resize and crop in the native dtype (cheap), convert the small results to float.
    work = _working_copy(image)
    work_rgb, work_alpha, is_gray = _split(work)
    crop_rgb, _alpha, _gray = _split(_centre_crop(image))
    return _Prepared(work_rgb, work_alpha, crop_rgb, is_gray, work.shape[1] / image.shape[1])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114


def _centre_crop(array: np.ndarray, size: int = NATIVE_CROP) -> np.ndarray:
    """Centre crop of at most size x size whose origin is on the 8-pixel JPEG grid."""
    h, w = array.shape[:2]
    y0 = max(0, (h - size) // 2) // 8 * 8
    x0 = max(0, (w - size) // 2) // 8 * 8
    return array[y0 : y0 + size, x0 : x0 + size]


# --------------------------------------------------------------------------------------------- content type


def _blocks(array: np.ndarray, size: int = 8) -> np.ndarray:
    h, w = array.shape[:2]
    h, w = h - h % size, w - w % size
    a = array[:h, :w]
    return a.reshape(h // size, size, w // size, size).swapaxes(1, 2).reshape(-1, size * size)


def _quadratic_projector(size: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    basis = np.stack([np.ones(size * size), yy.ravel(), xx.ravel(), yy.ravel() ** 2, xx.ravel() ** 2,
                      (xx * yy).ravel()], axis=1)
    return (basis @ np.linalg.pinv(basis)).astype(np.float32)


_PROJECTOR = _quadratic_projector()


def content_features(image: np.ndarray) -> dict[str, float]:
    """The two content-type features (see module docstring): ``clean_fraction`` and ``chroma_ratio``."""
    return _content_features(_prepare(image))


def _content_features(prep: _Prepared) -> dict[str, float]:
    rgb, alpha, is_gray = prep.work_rgb, prep.work_alpha, prep.is_gray
    luma = _luma(rgb)
    opaque = np.ones(luma.shape, bool) if alpha is None else alpha > 0.98

    blocks = _blocks(luma)
    inside = _blocks(opaque.astype(np.float32)).min(axis=1) > 0
    unclipped = (blocks.max(axis=1) < 250) & (blocks.min(axis=1) > 5)
    usable = inside & unclipped
    if usable.sum() < 8:
        usable = inside if inside.sum() >= 1 else np.ones(len(blocks), bool)
    chosen = blocks[usable]
    residual = chosen - chosen @ _PROJECTOR.T
    rms = np.sqrt((residual**2).mean(axis=1) * 64.0 / 58.0) if len(chosen) else np.zeros(1)
    clean_fraction = float((rms < CLEAN_BLOCK_RESIDUAL).mean())

    lab = None
    if not is_gray:
        lab = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8), cv2.COLOR_RGB2LAB).astype(np.float32)
        chroma = np.hypot(lab[:, :, 1] - 128.0, lab[:, :, 2] - 128.0)
        is_gray = float(np.percentile(chroma[opaque] if opaque.any() else chroma, 99)) < COLOURLESS_CHROMA
    if is_gray or lab is None:
        chroma_ratio = NEUTRAL_CHROMA_RATIO
    else:
        inner = cv2.erode(opaque.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        if not inner.any():
            inner = np.ones(luma.shape, bool)

        def grad(channel: np.ndarray) -> np.ndarray:
            return np.hypot(cv2.Sobel(channel, cv2.CV_32F, 1, 0), cv2.Sobel(channel, cv2.CV_32F, 0, 1))

        luma_grad = grad(lab[:, :, 0])[inner].sum()
        chroma_grad = np.hypot(grad(lab[:, :, 1]), grad(lab[:, :, 2]))[inner].sum()
        chroma_ratio = float(chroma_grad / luma_grad) if luma_grad > 0 else NEUTRAL_CHROMA_RATIO
    return {"clean_fraction": clean_fraction, "chroma_ratio": chroma_ratio}


def content_type(image: np.ndarray) -> tuple[ContentType, float]:
    """Classify as "anime" (cartoon, cel animation, flat-colour illustration) or "photo".

    Args:
        image: HxW, HxWx3 or HxWx4 uint8/uint16 (RGB order; alpha masks out transparent pixels).

    Returns:
        ``(label, confidence)`` with confidence in [0.5, 1].

    Raises:
        InvalidInputError: empty or malformed input.
    """
    return _content_type(_prepare(image))


def _content_type(prep: _Prepared) -> tuple[ContentType, float]:
    f = _content_features(prep)
    logit = CONTENT_WEIGHT * (f["clean_fraction"] - f["chroma_ratio"])
    confidence = 1.0 / (1.0 + math.exp(-abs(logit)))
    return ("anime" if logit > 0 else "photo"), confidence


# --------------------------------------------------------------------------------------------- noise, blocking, blur

_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(image: np.ndarray) -> float:
    """Estimated Gaussian noise sigma per channel on the 0-255 scale (Immerkaer's fast estimator, edges excluded).

    Immerkaer (1996): sigma = sqrt(pi/2) / 6 * mean |I * N| with N the 3x3 difference-of-Laplacians mask, which
    cancels planes and quadratic ramps. Following Tai & Yang (2008) the 10% of pixels with the strongest gradient
    (Sobel of a Gaussian-smoothed luminance, so noise itself does not pick the pixels) are left out, so edges and
    texture inflate it less. Computed per colour channel and averaged, on native pixels (a centre crop of at most
    ``NATIVE_CROP`` squared). Texture still adds to it: a clean but highly textured photo reads sigma ~10.
    """
    return _noise_sigma(_prepare(image))


def _noise_sigma(prep: _Prepared) -> float:
    crop, is_gray = prep.crop_rgb, prep.is_gray
    if min(crop.shape[:2]) < 3:
        return 0.0
    smooth = cv2.GaussianBlur(_luma(crop), (0, 0), 1.0)
    gradient = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))[1:-1, 1:-1]
    keep = gradient <= np.percentile(gradient, 90)
    if not keep.any():
        keep = np.ones_like(gradient, bool)
    channels = (0,) if is_gray else (0, 1, 2)
    means = []
    for c in channels:
        response = np.abs(cv2.filter2D(np.ascontiguousarray(crop[:, :, c]), cv2.CV_32F, _IMMERKAER,
                                       borderType=cv2.BORDER_REFLECT))[1:-1, 1:-1]
        means.append(float(response[keep].mean()))
    return float(math.sqrt(math.pi / 2.0) / 6.0 * np.mean(means))


def noise_level(image: np.ndarray) -> float:
    """Noise in [0, 1]: ``clip(noise_sigma(image) / 50, 0, 1)``, i.e. 0.1 per 5 sigma on the 0-255 scale."""
    return float(min(1.0, max(0.0, noise_sigma(image) / NOISE_SIGMA_FULL_SCALE)))


def jpeg_blockiness(image: np.ndarray) -> float:
    """JPEG 8x8 blocking in [0, 1].

    The mean absolute luminance step across 8x8 grid boundaries divided by the mean step inside blocks; an
    unblocked image gives ~1. ``clip((ratio - 1) / (BLOCKINESS_FULL_RATIO - 1), 0, 1)``. Native pixels, grid from
    the image origin (a resized or cropped JPEG has no aligned grid and reads ~0).
    """
    return _jpeg_blockiness(_prepare(image))


def _jpeg_blockiness(prep: _Prepared) -> float:
    luma = _luma(prep.crop_rgb)
    ratios = []
    for diffs in (np.abs(np.diff(luma, axis=1)), np.abs(np.diff(luma, axis=0)).T):
        if diffs.shape[1] < 16:
            continue
        index = np.arange(diffs.shape[1])
        boundary = diffs[:, index % 8 == 7].mean()
        interior = diffs[:, index % 8 != 7].mean()
        if interior > 1e-6:
            ratios.append(boundary / interior)
        elif boundary > 1e-6:
            ratios.append(BLOCKINESS_FULL_RATIO)
    if not ratios:
        return 0.0
    return float(min(1.0, max(0.0, (float(np.mean(ratios)) - 1.0) / (BLOCKINESS_FULL_RATIO - 1.0))))


def blur_level(image: np.ndarray) -> float:
    """Blur in [0, 1] from the variance of the Laplacian of the luminance on the working copy.

    Log-linear between ``BLUR_SHARP_LAPVAR`` (1000 -> 0) and ``BLUR_BLURRY_LAPVAR`` (10 -> 1) on the 0-255 scale.
    Noise raises the Laplacian variance, so a noisy blurry image reads sharper than it is.
    """
    return _blur_level(_prepare(image))


def _blur_level(prep: _Prepared) -> float:
    luma = _luma(prep.work_rgb)
    if min(luma.shape) < 3:
        return 0.0
    variance = float(cv2.Laplacian(luma, cv2.CV_32F).var())
    top, bottom = math.log10(BLUR_SHARP_LAPVAR), math.log10(BLUR_BLURRY_LAPVAR)
    return float(min(1.0, max(0.0, (top - math.log10(variance + 1.0)) / (top - bottom))))


# --------------------------------------------------------------------------------------------- all together


def analyze(
    image: np.ndarray,
    *,
    detect_faces_too: bool = True,
    retinaface_weights: Path | None = None,
) -> ImageAnalysis:
    """Measure everything the advisor uses.

    Args:
        image: HxW, HxWx3 or HxWx4 uint8/uint16, RGB order.
        detect_faces_too: run face detection (the slowest part, ~0.1 s with the cascade).
        retinaface_weights: facexlib RetinaFace weights, used when the file exists.

    Returns:
        :class:`ImageAnalysis`.

    Raises:
        InvalidInputError: empty or malformed input.
    """
    image = _check(image)
    prep = _prepare(image)
    label, confidence = _content_type(prep)
    sigma = _noise_sigma(prep)
    faces: tuple[FaceBox, ...] = ()
    detector = None
    if detect_faces_too:
        faces, detector = _faces(image, prep, retinaface_weights)
    return ImageAnalysis(
        content_type=label,
        confidence=confidence,
        noise_level=float(min(1.0, max(0.0, sigma / NOISE_SIGMA_FULL_SCALE))),
        noise_sigma=sigma,
        jpeg_artifacts=_jpeg_blockiness(prep),
        blur=_blur_level(prep),
        width=int(image.shape[1]),
        height=int(image.shape[0]),
        bit_depth=bit_depth(image),
        has_alpha=has_alpha(image),
        faces=faces,
        face_detector=detector,
    )


def _faces(
    image: np.ndarray, prep: _Prepared, retinaface_weights: Path | None
) -> tuple[tuple[FaceBox, ...], str]:
    """Faces in input pixels. The cascade scans the working copy (it would downscale to it anyway)."""
    if retinaface_weights is not None and Path(retinaface_weights).is_file():
        detection = detect_faces(image, retinaface_weights=retinaface_weights)
        return detection.faces, detection.detector
    work = np.clip(prep.work_rgb + 0.5, 0, 255).astype(np.uint8)
    detection = detect_faces(work)
    k = 1.0 / prep.work_scale
    faces = tuple(
        FaceBox(f.x0 * k, f.y0 * k, f.x1 * k, f.y1 * k, f.score,
                None if f.landmarks is None else tuple((x * k, y * k) for x, y in f.landmarks))
        for f in detection.faces
    )
    return faces, detection.detector
