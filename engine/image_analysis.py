"""Pure measurements of one image for the settings advisor: content type, noise, JPEG blocking, blur, faces.

Every function takes an HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) array of uint8 or uint16 and returns plain values.
Bit depth comes from the dtype, never from pixel values. Measurements that do not need full resolution run on a
working copy whose long side is at most :data:`WORKING_SIDE`; noise and JPEG blocking need native pixels (a resize
averages noise away and moves the 8x8 grid) and use at most :data:`NATIVE_CROP` x :data:`NATIVE_CROP` pixels from
the image centre, aligned to the JPEG grid.

Content type ("anime" covers cartoons, cel animation, line art, logos and flat-colour illustration) is decided by
:func:`decide_content` from three signals, and the decision says which one decided:

1. **faces**: a human face found by the face detector (the same :func:`engine.face_detect.detect_faces` call the
   face enhancer makes on the same pixels) makes it a photo, unless the face is drawn like the image it is in
   (:func:`drawn_faces`: the image and the face's own pixels read as a drawing);
2. **classifier**: a small network (:class:`ContentClassifier`: three tanh units) on the 15 features of
   :data:`CONTENT_FEATURES`, measured at two fixed scales whatever the input size: a copy whose long side is
   :data:`CONTENT_SIDE` and one of :data:`CONTENT_SMALL_SIDE` (suffix ``_128``; smaller inputs at their own
   size), after a 3x3 median (which removes sensor noise, grain and JPEG mosquito noise but keeps edges);
   transparent pixels are left out. Edge profile (share of hard edges, how sharp an edge is), flat regions,
   colour counts (whole image, per 4x4 block, commonest colours and grey levels, hue clusters), thin dark outlines
   and the texture left after denoising: see :func:`_scale_measures`. To its log-odds (times
   :data:`MEASURES_WEIGHT`) the **scene network** adds its own: a linear head on the features of a MobileNetV2
   trained on many photos and drawings (:mod:`engine.scene_net`), which knows painted and shaded drawings that the
   measures take for photos. The sum decides when sure (beyond +``ANIME_SURE_LOGIT`` or below
   -``PHOTO_SURE_LOGIT``). Images under :data:`SCENE_MIN_SIDE` px get the measures alone;
3. **trial** (run by the advisor, :mod:`engine.advisor.trial`, when the classifier is unsure and there is time):
   which of the photo and anime models rebuilds a 4x-shrunk crop better. Unsure without a trial: photo, the
   safer mistake (the photo model on a drawing softens it a little; the anime model on a photo paints it).

The weights come from ``bench/fit_content_type.py`` (source-balanced fit on 2960 samples: 78 sources at 6 sizes
and 5 variants). Held out by source (``bench/eval_advisor.py``) the classifier alone is right on 91% of samples (87%
at 128 px, 94% at 360 px and native; on the 53 sources of the fit before Debian's photos and anime art joined it
92.5%, against 89% then). With the scene network's head added (fitted by the same script, held out the same way),
both readings are right on 93%, and images no fit has seen go from 55% to 63% right (without a trial); the README
gives the decision's figures and the known limits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from engine.errors import InvalidInputError
from engine.face_detect import FaceBox, detect_faces
from engine.scene_net import SceneHead, scene_features, scene_head

__all__ = [
    "CONTENT_FEATURES",
    "ContentClassifier",
    "ContentDecision",
    "ContentType",
    "decide_content",
    "drawn_faces",
    "ImageAnalysis",
    "analyze",
    "bit_depth",
    "blur_level",
    "content_features",
    "content_logit",
    "content_type",
    "has_alpha",
    "jpeg_blockiness",
    "noise_level",
    "noise_sigma",
    "pixels_logit",
    "scene_logit",
]

ContentType = Literal["anime", "photo"]

#: Long side (pixels) of the working copy used for content type and blur.
WORKING_SIDE = 512
#: Side of the native-resolution centre crop used for noise and JPEG blocking.
NATIVE_CROP = 768
#: Noise sigma (0-255 scale) that maps to noise_level 1.0: level = clip(sigma / NOISE_SIGMA_FULL_SCALE, 0, 1).
NOISE_SIGMA_FULL_SCALE = 50.0
#: The content classifier's inputs (see module docstring and :func:`_scale_measures`), in the order of
#: :attr:`ContentClassifier.hidden`'s rows.
CONTENT_FEATURES = ("hard_edge_share", "edge_sharpness", "colour_count_128", "colour_count", "flat_blocks_128",
                    "texture_residual", "thin_dark_share", "hard_edge_share_128", "hue_concentration",
                    "hue_concentration_128", "palette_share", "luma_peaks", "local_colours", "flat_share_128",
                    "coloured_share")


@dataclass(frozen=True)
class ContentClassifier:
    """The content-type classifier: one hidden layer of tanh units on the raw :data:`CONTENT_FEATURES` values.
    Log-odds of "anime" = output_bias + output . tanh(hidden_bias + features @ hidden)."""

    hidden: np.ndarray  # (features, units): rows in CONTENT_FEATURES order
    hidden_bias: np.ndarray  # (units,)
    output: np.ndarray  # (units,)
    output_bias: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Log-odds of anime of each row of ``features`` (N x len(CONTENT_FEATURES), raw values). Pure."""
        units = np.tanh(np.asarray(features, dtype=np.float64) @ self.hidden + self.hidden_bias)
        return units @ self.output + self.output_bias


#: The shipped classifier, fitted by ``bench/fit_content_type.py`` (source-balanced; its leave-one-source-out
#: figures are there and in the module docstring).
CONTENT_CLASSIFIER = ContentClassifier(
    hidden=np.array([
        [1.53456, 5.13628, 4.04691],  # hard_edge_share
        [15.286, 49.3819, 1.13178],  # edge_sharpness
        [4.82876, 2.12891, 2.58188],  # colour_count_128
        [-0.0158094, -0.848924, 2.14979],  # colour_count
        [2.41165, 1.38084, 2.71618],  # flat_blocks_128
        [0.383367, 1.63826, 0.029861],  # texture_residual
        [0.825452, -0.328124, 0.552505],  # thin_dark_share
        [2.10235, 0.512656, 7.43275],  # hard_edge_share_128
        [-0.0219181, -1.19732, -1.18402],  # hue_concentration
        [0.348581, -0.494163, -0.30425],  # hue_concentration_128
        [-0.389538, -2.0679, -1.23087],  # palette_share
        [2.97651, 5.14794, 2.27183],  # luma_peaks
        [0.646968, 0.163286, -3.79529],  # local_colours
        [-1.31041, -3.15902, -1.55627],  # flat_share_128
        [-0.74919, -0.227369, 0.679403],  # coloured_share
    ]),
    hidden_bias=np.array([-10.4025, -16.7653, -4.10681]),
    output=np.array([1.86158, 2.3391, 1.68867]),
    output_bias=-0.703058,
)

#: The content log-odds of anime is MEASURES_WEIGHT x the measures' classifier (CONTENT_CLASSIFIER) plus the scene
#: network's head (:mod:`engine.scene_net`). Chosen with bench/eval_advisor.py on held-out sources and on images no
#: fit has seen (bench/HISTORY.md#the-settings-advisor).
MEASURES_WEIGHT = 0.75
#: Under this long side the measures' classifier decides alone (its log-odds unweighted): the scene network would
#: see the image blown up 2x or more, and nothing that small was in its head's fit (Real-ESRGAN's 60x90 comic reads
#: +2.8 to the measures and -2.2 to the network).
SCENE_MIN_SIDE = 128
#: The classifier decides "anime" only above this log-odds and "photo" only below minus PHOTO_SURE_LOGIT; between
#: them it is unsure, and a trial reconstruction (when there is time) or the photo model (the safer mistake)
#: decides. Chosen on the leave-one-source-out logits and trial gaps of bench/eval_advisor.py (2960 samples), with
#: the trial / without one: -1 to +1 gives 91.9% / 88.9% with a trial on 10% of samples; a wider photo side gains
#: nothing (-2: 91.8%, a trial on 17%), nor a wider band (-2 to +2: 91.9% / 84.3%, 24%); a narrower anime side
#: (+0.5) 91.9% / 89.7% but calls more photos drawings (92.8% of photos right with a trial instead of 93.1%).
#: Those figures are the measures' alone; with the scene network -1 to +1 gives 94.7% / 94.4%, a trial on 7%.
ANIME_SURE_LOGIT = 1.0
PHOTO_SURE_LOGIT = 1.0
#: The trial reconstruction's rule for an unsure image (:func:`decide_content`): log-odds of anime =
#: TRIAL_GAP_WEIGHT * gap + TRIAL_LOGIT_WEIGHT * logit + TRIAL_BIAS, where gap (dB) is how much closer the compact
#: anime model rebuilt the shrunk test crop than the photo model (:mod:`engine.advisor.trial`). The photo model's
#: invented texture misses a photo's real texture, so on photos the compact model leads by more (median 1.7 dB on
#: the labelled set) than on drawings (0.8 dB). Fitted by ``bench/eval_advisor.py --trial`` on the 466 samples
#: whose held-out log-odds (both signals) is within +-2.5; held out by source it settles 73% of the 206 unsure
#: samples (log-odds -1 to +1) right (the photo model alone: 68%).
TRIAL_GAP_WEIGHT = -0.77
TRIAL_LOGIT_WEIGHT = 0.83
TRIAL_BIAS = 1.00
#: Median gap (dB) of photos and of drawings on the labelled set, quoted in the reason.
TRIAL_TYPICAL_GAP = {"photo": 1.7, "anime": 0.8}
#: Confidence reported for a photo decided by a detected human face.
FACE_EVIDENCE = 0.95
#: A face the detector finds is a drawn one, not evidence of a photo (:func:`drawn_faces`), when the whole image
#: already reads as a drawing (log-odds over ANIME_SURE_LOGIT), the face box is at least DRAWN_FACE_MIN_SIDE pixels
#: a side and the classifier reads the box itself as a drawing (log-odds over DRAWN_FACE_LOGIT). On the labelled
#: set (bench/eval_advisor.py, the classifier refitted without each source) that clears 6 of the 10 anime samples
#: whose characters' faces the detector finds (Ren'Py's Eileen, One Piece); the photos' faces of 64 px and more in
#: images that read as drawings read -2.5 or lower themselves. A photo's face under 64 px reads up to +1.1 (too few
#: pixels to tell skin from a fill), and a whole photo's face up to +2.3 (scikit-image's astronaut, whose image
#: reads -2.1), so neither signal is trusted alone.
DRAWN_FACE_MIN_SIDE = 64
DRAWN_FACE_LOGIT = 1.0
#: Long side (pixels) of the copy the content features are measured on, whatever the input size (smaller inputs
#: are measured at their own size), so a feature means the same on a 12 MP photo and on its thumbnail.
CONTENT_SIDE = 384
#: Long side (pixels) of the second, smaller copy (features with the suffix ``_128``): a 4K image and its 128 px
#: thumbnail measure the same there.
CONTENT_SMALL_SIDE = 128
#: Luminance step (grey levels per pixel, Sobel / 8, after a 3x3 median) above which a pixel is on an edge ...
EDGE_MIN_STEP = 3.0
#: ... and above which that edge is hard (an inked outline or a flat-fill boundary).
HARD_EDGE_STEP = 20.0
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
    content_logit: float = 0.0  # the content log-odds of anime (both readings)
    content_scene_logit: float | None = None  # the scene network's part of it (None under SCENE_MIN_SIDE)
    content_decided_by: str = "classifier"  # which signal decided content_type (see ContentDecision)
    content_reason: str = ""
    drawn_faces: int = 0  # of ``faces``, those that are drawn like the image (:func:`drawn_faces`)


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
    content_rgb: np.ndarray  # the copy at CONTENT_SIDE
    content_alpha: np.ndarray | None
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
    content_rgb, content_alpha, _gray = _split(_working_copy(work, CONTENT_SIDE))
    # Gray stored as RGB (equal channels) is gray.
    is_gray = is_gray or bool(np.array_equal(content_rgb[:, :, 0], content_rgb[:, :, 1])
                              and np.array_equal(content_rgb[:, :, 1], content_rgb[:, :, 2]))
    return _Prepared(work_rgb, work_alpha, content_rgb, content_alpha, crop_rgb, is_gray,
                     work.shape[1] / image.shape[1])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114


def _centre_crop(array: np.ndarray, size: int = NATIVE_CROP) -> np.ndarray:
    """Centre crop of at most size x size whose origin is on the 8-pixel JPEG grid."""
    h, w = array.shape[:2]
    y0 = max(0, (h - size) // 2) // 8 * 8
    x0 = max(0, (w - size) // 2) // 8 * 8
    return array[y0 : y0 + size, x0 : x0 + size]


# --------------------------------------------------------------------------------------------- content type


def content_features(image: np.ndarray) -> dict[str, float]:
    """The content-type features named in :data:`CONTENT_FEATURES` (see the module docstring and
    :func:`_scale_measures`), measured at two fixed scales: the :data:`CONTENT_SIDE` copy and a
    :data:`CONTENT_SMALL_SIDE` copy (suffix ``_128``); an input smaller than a scale is measured at its own size.

    Args:
        image: HxW, HxWx3 or HxWx4 uint8/uint16 (RGB order; alpha masks out transparent pixels).

    Returns:
        ``{name: float}`` for every name in :data:`CONTENT_FEATURES`.

    Raises:
        InvalidInputError: empty or malformed input.
    """
    return _content_features(_prepare(image))


def _content_features(prep: _Prepared) -> dict[str, float]:
    rgb = np.clip(prep.content_rgb + 0.5, 0, 255).astype(np.uint8)
    # Transparent pixels (and a 1 px rim around them, where the cut-out edge is) are left out of every feature.
    if prep.content_alpha is None or (prep.content_alpha > 0.98).sum() < 64:
        opaque = np.ones(rgb.shape[:2], bool)
    else:
        opaque = cv2.erode((prep.content_alpha > 0.98).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        if opaque.sum() < 64:
            opaque = prep.content_alpha > 0.98
    large = _scale_measures(rgb, opaque, prep.is_gray)
    h, w = rgb.shape[:2]
    factor = CONTENT_SMALL_SIDE / max(h, w)
    if factor < 1.0:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small_rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        small_opaque = cv2.resize(opaque.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        if small_opaque.sum() < 64:
            small_opaque = np.ones(small_rgb.shape[:2], bool)
        small = _scale_measures(small_rgb, small_opaque, prep.is_gray)
    else:
        small = large
    measured = {**large, **{f"{name}_128": value for name, value in small.items()}}
    return {name: measured[name] for name in CONTENT_FEATURES}


def _scale_measures(rgb: np.ndarray, opaque: np.ndarray, is_gray: bool) -> dict[str, float]:
    """The content measures of one scale (uint8 RGB; ``opaque`` masks the pixels that count).

    After a 3x3 median (which removes sensor noise, grain and JPEG mosquito noise but keeps edges), with ``step``
    the luminance gradient (Sobel / 8, grey levels per pixel):

    * ``hard_edge_share``: of the pixels on an edge (step >= ``EDGE_MIN_STEP``), the share with step >=
      ``HARD_EDGE_STEP`` (an inked outline or a flat-fill boundary);
    * ``edge_sharpness``: on strong edges (step >= 10), the median of step / (5x5 luminance range + 1): an edge
      drawn in one or two pixels has the whole range in one step, a photo's edge spreads it over several;
    * ``flat_share``: pixels with step < 1; ``flat_blocks``: 8x8 blocks whose luminance deviation is < 1.5;
    * ``colour_count``: log distinct 15-bit colours / log pixels; ``palette_share``: the 4 commonest 15-bit
      colours' share; ``local_colours``: distinct 12-bit colours per 4x4 block, as a share of 16;
      ``luma_peaks``: the share of the 8 commonest grey levels; ``hue_concentration``: of the coloured pixels
      (saturation and value > 0.2), the share in the 3 commonest of 18 hue bins (0 for gray or colourless);
      ``coloured_share``: the coloured pixels' share (0 for gray);
    * ``thin_dark_share``: of the dark pixels (luminance < 70), the share on lines at most 2 px wide (what a 3x3
      opening removes): ink outlines;
    * ``texture_residual``: log(1 + mean |median3 - median5 of it|) away from edges: fine texture a photo keeps.
    """
    smooth = cv2.medianBlur(rgb, 3)
    luma8 = cv2.cvtColor(smooth, cv2.COLOR_RGB2GRAY)
    luma = luma8.astype(np.float32)
    step = np.hypot(cv2.Sobel(luma, cv2.CV_32F, 1, 0), cv2.Sobel(luma, cv2.CV_32F, 0, 1)) / 8.0
    n = max(1, int(opaque.sum()))
    edge_steps = step[(step >= EDGE_MIN_STEP) & opaque]
    hard_edge_share = float((edge_steps >= HARD_EDGE_STEP).mean()) if edge_steps.size else 0.0
    kernel = np.ones((5, 5), np.uint8)
    strong = (step >= 10.0) & opaque
    spread = cv2.dilate(luma, kernel) - cv2.erode(luma, kernel) + 1.0
    edge_sharpness = float(np.median(step[strong] / spread[strong])) if strong.sum() > 10 else 0.0
    # Colours: 15-bit codes for the whole image, 12-bit codes per 4x4 block.
    q = (smooth >> 3).astype(np.int32)
    counts = np.bincount(((q[:, :, 0] << 10) | (q[:, :, 1] << 5) | q[:, :, 2])[opaque], minlength=1 << 15)
    palette_share = float(np.sort(counts)[-4:].sum() / n)
    colour_count = float(np.log(max(2, int((counts > 0).sum()))) / np.log(max(3, n)))
    q4 = (smooth >> 4).astype(np.int32)
    codes = (q4[:, :, 0] << 8) | (q4[:, :, 1] << 4) | q4[:, :, 2]
    local_colours = _per_block(codes, opaque, 4, lambda b: ((np.diff(np.sort(b, 1), axis=1) != 0).sum(1) + 1) / 16.0)
    flat_blocks = _per_block(luma, opaque, 8, lambda b: b.std(1) < 1.5)
    levels = np.bincount(luma8[opaque].ravel(), minlength=256)
    luma_peaks = float(np.sort(levels)[-8:].sum() / n)
    hue_concentration = coloured_share = 0.0
    if not is_gray:
        hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV)[opaque]
        coloured = (hsv[:, 1] > 51) & (hsv[:, 2] > 51)
        coloured_share = float(coloured.mean())
        if coloured.sum() > 20:
            hues = np.bincount(hsv[coloured, 0] // 10, minlength=18)[:18]
            hue_concentration = float(np.sort(hues)[-3:].sum() / coloured.sum())
    dark = ((luma8 < 70) & opaque).astype(np.uint8)
    thin = dark & (1 - cv2.morphologyEx(dark, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)))
    thin_dark_share = float(thin.sum() / max(1, int(dark.sum())))
    calm = (step < 10.0) & opaque
    residual = np.abs(luma - cv2.medianBlur(luma8, 5).astype(np.float32))
    texture_residual = float(np.log1p(residual[calm].mean())) if calm.any() else 0.0
    return {"hard_edge_share": hard_edge_share, "edge_sharpness": edge_sharpness,
            "flat_share": float((step < 1.0)[opaque].mean()), "flat_blocks": flat_blocks,
            "colour_count": colour_count, "palette_share": palette_share, "local_colours": local_colours,
            "luma_peaks": luma_peaks, "hue_concentration": hue_concentration, "coloured_share": coloured_share,
            "thin_dark_share": thin_dark_share,
            "texture_residual": texture_residual}


def _per_block(values: np.ndarray, opaque: np.ndarray, size: int, measure) -> float:
    """Mean of ``measure`` over the size x size blocks that are wholly opaque (all blocks when none is)."""
    bh, bw = values.shape[0] // size * size, values.shape[1] // size * size
    if not bh or not bw:
        return 0.0

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:bh, :bw].reshape(bh // size, size, bw // size, size).transpose(0, 2, 1, 3).reshape(-1, size * size)

    inside = blocks(opaque).all(1)
    chosen = blocks(values)[inside] if inside.any() else blocks(values)
    return float(np.mean(measure(chosen)))


def content_logit(features: dict[str, float], classifier: ContentClassifier | None = None) -> float:
    """Log-odds of "anime" from :func:`content_features` values (pure; ``classifier`` defaults to
    ``CONTENT_CLASSIFIER``, the evaluation passes refitted ones)."""
    classifier = CONTENT_CLASSIFIER if classifier is None else classifier
    return float(classifier.logits(np.array([[features[name] for name in CONTENT_FEATURES]]))[0])


@dataclass(frozen=True)
class ContentDecision:
    """The content type and which signal decided it."""

    label: ContentType
    confidence: float  # in [0.5, 1]: the classifier's probability of ``label``, or the weight of the signal that
    # decided (FACE_EVIDENCE for a face, 0.5 + |dB| / 4 for a trial, 0.5 when unsure)
    decided_by: Literal["classifier", "faces", "trial", "unsure"]
    reason: str


def decide_content(logit: float, faces: int = 0, trial_gap_db: float | None = None, drawn: int = 0,
                   scene: float | None = None) -> ContentDecision:
    """Combine the classifier, the face detector and an optional trial reconstruction (pure).

    Args:
        logit: :func:`content_logit` of the image (log-odds of anime).
        faces: human faces the face detector found (any face is strong evidence of a photo).
        trial_gap_db: PSNR of the compact anime model's rebuild of a test crop minus the photo model's
            (:attr:`engine.advisor.trial.TrialResult.gap_db`), or None when no trial was run.
        drawn: faces the detector found that are drawn (:func:`drawn_faces`; not counted in ``faces``), for the
            reason.
        scene: the scene network's part of ``logit`` (:attr:`ImageAnalysis.content_scene_logit`), for the reason:
            it names the reading that weighed more, and both.

    Returns:
        A :class:`ContentDecision`; ``reason`` is a sentence for the user.
    """
    p_anime = _sigmoid(logit)
    if faces > 0:
        return ContentDecision("photo", max(1.0 - p_anime, FACE_EVIDENCE), "faces",
                               f"{faces} human face{'s' if faces > 1 else ''} found: a photo")
    readings = "" if scene is None else f"; edges and colours {logit - scene:+.1f}, scene network {scene:+.1f}"
    scene_led = scene is not None and abs(scene) > abs(logit - scene)
    if logit > ANIME_SURE_LOGIT:
        faces_too = (f"; the {drawn} face{'s' if drawn > 1 else ''} found look{'' if drawn > 1 else 's'} drawn too"
                     if drawn else "")
        look = "A drawing to the scene network" if scene_led else "Flat colours and hard edges"
        return ContentDecision("anime", p_anime, "classifier",
                               f"{look} ({p_anime:.0%} sure it is anime/illustration{readings}){faces_too}")
    if logit < -PHOTO_SURE_LOGIT:
        look = "A photograph to the scene network" if scene_led else "Natural textures and soft edges"
        return ContentDecision("photo", 1.0 - p_anime, "classifier",
                               f"{look} ({1.0 - p_anime:.0%} sure it is a photo{readings})")
    if trial_gap_db is not None:
        p_trial = _sigmoid(TRIAL_GAP_WEIGHT * trial_gap_db + TRIAL_LOGIT_WEIGHT * logit + TRIAL_BIAS)
        label: ContentType = "anime" if p_trial > 0.5 else "photo"
        kind = "a drawing" if label == "anime" else "a photo"
        return ContentDecision(label, max(p_trial, 1.0 - p_trial), "trial",
                               f"Photo or drawing was unclear ({p_anime:.0%} anime); on a test crop the compact "
                               f"anime model came {trial_gap_db:+.1f} dB closer than the photo model (photos: about "
                               f"{TRIAL_TYPICAL_GAP['photo']:+.1f} dB, drawings {TRIAL_TYPICAL_GAP['anime']:+.1f} dB): "
                               f"{kind}")
    return ContentDecision("photo", 0.5, "unsure",
                           f"Photo or drawing is unclear ({p_anime:.0%} anime): the photo model, the safer mistake")


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, value))))


def content_type(image: np.ndarray) -> tuple[ContentType, float]:
    """Classify as "anime" (cartoon, cel animation, flat-colour illustration) or "photo".

    Args:
        image: HxW, HxWx3 or HxWx4 uint8/uint16 (RGB order; alpha masks out transparent pixels).

    Returns:
        ``(label, confidence)`` from :func:`decide_content` without a trial (unsure reads as photo); a drawing's
        verdict is checked with the face detector (a face makes it a photo). Confidence is the classifier's
        probability of the returned label.

    Raises:
        InvalidInputError: empty or malformed input.
    """
    return _content_type(_prepare(image), image)


def _content_type(prep: _Prepared, image: np.ndarray) -> tuple[ContentType, float]:
    logit = _logit(prep)
    decision = decide_content(logit)
    if decision.label == "anime":  # a human face overrules the pixels (same detector call as analyze)
        faces = detect_faces(image).faces
        decision = decide_content(logit, len(faces) - len(drawn_faces(image, faces, logit)))
    return decision.label, decision.confidence


def pixels_logit(image: np.ndarray, classifier: ContentClassifier | None = None, head: SceneHead | None = None
                 ) -> float:
    """The content log-odds of anime of an image's pixels, both signals (:func:`content_logit` of its measures
    weighted by :data:`MEASURES_WEIGHT`, plus :func:`scene_logit`); ``classifier`` and ``head`` default to the
    shipped ones (the evaluation passes refitted ones)."""
    return _logit(_prepare(image), classifier, head)


def scene_logit(rgb: np.ndarray, alpha: np.ndarray | None = None, head: SceneHead | None = None) -> float:
    """Log-odds of anime from the scene network (:mod:`engine.scene_net`) on HxWx3 RGB (0-255) with optional
    alpha in [0, 1]; ``head`` defaults to the shipped one. Pure."""
    head = scene_head() if head is None else head
    return float(head.logits(scene_features(rgb, alpha)[None])[0])


def _logit(prep: _Prepared, classifier: ContentClassifier | None = None, head: SceneHead | None = None) -> float:
    """The content log-odds of anime (:func:`_reading`)."""
    return _reading(prep, classifier, head)[0]


def _reading(prep: _Prepared, classifier: ContentClassifier | None = None, head: SceneHead | None = None
             ) -> tuple[float, float | None]:
    """(the content log-odds of anime from both readings on the CONTENT_SIDE copy, the scene network's part of
    it); under SCENE_MIN_SIDE the measures alone, and None for the scene network's part."""
    measures = content_logit(_content_features(prep), classifier)
    if max(prep.content_rgb.shape[:2]) < SCENE_MIN_SIDE:
        return measures, None
    scene = scene_logit(prep.content_rgb, prep.content_alpha, head)
    return MEASURES_WEIGHT * measures + scene, scene


def drawn_faces(image: np.ndarray, faces: Sequence[FaceBox], logit: float,
                crop_logit: Callable[[np.ndarray], float] = pixels_logit) -> tuple[FaceBox, ...]:
    """The faces among ``faces`` that are drawn, like the image they are in (see :data:`DRAWN_FACE_LOGIT`): they
    are no evidence of a photo, and GFPGAN is not for them. Pure.

    Args:
        image: the pixels the faces were found on (as :func:`analyze`).
        faces: the detector's faces on ``image``.
        logit: :func:`content_logit` of the whole image.
        crop_logit: the log-odds of anime of a face box's pixels (the evaluation passes a refitted classifier).
    """
    if logit <= ANIME_SURE_LOGIT:
        return ()
    h, w = image.shape[:2]
    drawn = []
    for face in faces:
        x0, y0 = max(0, int(face.x0)), max(0, int(face.y0))
        x1, y1 = min(w, int(math.ceil(face.x1))), min(h, int(math.ceil(face.y1)))
        if min(x1 - x0, y1 - y0) >= DRAWN_FACE_MIN_SIDE and crop_logit(image[y0:y1, x0:x1]) > DRAWN_FACE_LOGIT:
            drawn.append(face)
    return tuple(drawn)


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
    retinaface=None,
) -> ImageAnalysis:
    """Measure everything the advisor uses.

    Args:
        image: HxW, HxWx3 or HxWx4 uint8/uint16, RGB order.
        detect_faces_too: run face detection (the slowest part, ~0.1 s with the cascade).
        retinaface: facexlib's RetinaFace network, loaded (``ModelManager.local_network``); None uses the cascade.

    Returns:
        :class:`ImageAnalysis`.

    Raises:
        InvalidInputError: empty or malformed input.
    """
    image = _check(image)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="analysis-faces") as pool:
        # Face detection (the slowest part; its loops run without the GIL) runs beside the measurements: the very
        # call the face enhancer makes on the same pixels, so the count shown is the count restored.
        detection = pool.submit(detect_faces, image, retinaface=retinaface) if detect_faces_too else None
        prep = _prepare(image)
        logit, scene = _reading(prep)
        sigma = _noise_sigma(prep)
        blocking, blur = _jpeg_blockiness(prep), _blur_level(prep)
        found = detection.result() if detection else None
    faces: tuple[FaceBox, ...] = found.faces if found else ()
    detector = found.detector if found else None
    drawn = drawn_faces(image, faces, logit)
    decision = decide_content(logit, len(faces) - len(drawn), drawn=len(drawn), scene=scene)
    return ImageAnalysis(
        content_type=decision.label,
        confidence=decision.confidence,
        noise_level=float(min(1.0, max(0.0, sigma / NOISE_SIGMA_FULL_SCALE))),
        noise_sigma=sigma,
        jpeg_artifacts=blocking,
        blur=blur,
        width=int(image.shape[1]),
        height=int(image.shape[0]),
        bit_depth=bit_depth(image),
        has_alpha=has_alpha(image),
        faces=faces,
        face_detector=detector,
        content_logit=logit,
        content_scene_logit=scene,
        content_decided_by=decision.decided_by,
        content_reason=decision.reason,
        drawn_faces=len(drawn),
    )
