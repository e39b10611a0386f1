"""Trial reconstruction: how the photo model and the compact anime model rebuild a shrunk crop of the image.

A crop of the image's most detailed area is shrunk 4x (area averaging, as a camera or a thumbnailer would) and
upscaled back with both models, each scored by PSNR on luminance (borders left out). The measure is not "the closer
one knows this kind of picture": measured on the labelled set, the photo model's invented texture misses a photo's
real texture, so the compact model comes closer on photos (a median 1.7 dB) than on drawings (0.8 dB), and
:func:`engine.image_analysis.decide_content` weighs that gap with the classifier's logit. It is the tie-breaker the
advisor uses when its content classifier is unsure.

The user's own ×4 models tagged photo or anime can join either side (:func:`trial_models`): they do not move the
content decision, but the advisor can say "on a test crop your 4x-Foo was 0.8 dB closer than RealESRGAN_x4plus"
when one of them rebuilt it best on the side the content was settled to.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Collection, Mapping

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["PHOTO_MODEL", "ANIME_MODEL", "TRIAL_CROP", "TRIAL_SCALE", "TrialResult", "pick_crop",
           "trial_models", "trial_reconstruction"]

PHOTO_MODEL = "RealESRGAN_x4plus"
#: The trial's anime model: the compact one, whose smooth rebuilds show how much the photo model's invented
#: texture costs (more on a photo than on a drawing; see ``engine.image_analysis.TRIAL_GAP_WEIGHT``).
#: RealESRGAN_x4plus_anime_6B rebuilds both kinds more alike (a median -0.8 dB against the photo model on photos,
#: -1.3 dB on drawings): its gap alone, held out by source, settled 57% of the unsure samples right, the compact
#: model's 82%.
ANIME_MODEL = "realesr-animevideov3"
#: Side (pixels) of the crop that is shrunk to a quarter and rebuilt; 128 -> 32x32 network inputs (~0.3 s on 2 CPU
#: cores for both models).
TRIAL_CROP = 128
#: Long side (pixels) of the copy the crop is searched on (:func:`pick_crop`).
SEARCH_SIDE = 1024
TRIAL_SCALE = 4  # the crop is shrunk by this; only models of this scale rebuild it (scores of other scales differ)
MAX_USER_MODELS = 2  # the user's models that may join a trial (each costs a model run, and a load)
_BORDER = 4  # output pixels left out of the PSNR (padding effects at the crop's edge)


@dataclass(frozen=True)
class TrialResult:
    """PSNR (dB, luminance) of each side's best rebuild of the crop, and what it took.

    ``scores`` holds every model tried (name -> PSNR) and ``sides`` its side ("photo" or "anime"); empty when the
    result was made from the two side scores alone.
    """

    photo_psnr: float
    anime_psnr: float
    crop: tuple[int, int, int, int]  # x, y, width, height in input pixels
    seconds: float
    scores: Mapping[str, float] = field(default_factory=dict)
    sides: Mapping[str, str] = field(default_factory=dict)

    def best(self, side: str) -> str | None:
        """The model of ``side`` whose rebuild was closest (None when no per-model scores were kept)."""
        tried = [name for name in self.scores if self.sides.get(name) == side]
        return max(tried, key=lambda name: self.scores[name]) if tried else None

    @property
    def gap_db(self) -> float:
        """How much closer the official anime model's rebuild was than the official photo model's (dB; the side
        scores when the per-model ones were not kept): the evidence :func:`engine.image_analysis.decide_content`
        weighs, fitted on these two models alone (the user's models only rank within a side)."""
        if PHOTO_MODEL in self.scores and ANIME_MODEL in self.scores:
            return self.scores[ANIME_MODEL] - self.scores[PHOTO_MODEL]
        return self.anime_psnr - self.photo_psnr


def pick_crop(rgb: np.ndarray, size: int = TRIAL_CROP) -> tuple[int, int, int, int]:
    """The size x size window (smaller for small images; sides multiples of 4) with the most gradient energy.

    The window is searched on a copy at most :data:`SEARCH_SIDE` pixels long (area averaging), so a 24 MP photo
    costs what a 1 MP one does; the crop itself is taken from ``rgb``.

    Args:
        rgb: HxWx3 uint8.
    """
    h, w = rgb.shape[:2]
    side = min(size, h, w) // 4 * 4
    if side < 16:
        raise ValueError("image too small for a trial reconstruction")
    f = min(1.0, SEARCH_SIDE / max(h, w))
    small = rgb if f == 1.0 else cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))),
                                            interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    window = min(sh, sw, max(4, round(side * f)))
    luma = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    energy = np.abs(cv2.Laplacian(luma, cv2.CV_32F))
    integral = cv2.integral(energy)
    stride = max(8 if f == 1.0 else 2, window // 4)
    best, best_xy = -1.0, (0, 0)
    for y in range(0, sh - window + 1, stride):
        for x in range(0, sw - window + 1, stride):
            e = integral[y + window, x + window] - integral[y, x + window] - integral[y + window, x] + integral[y, x]
            if e > best:
                best, best_xy = e, (x, y)
    return (min(round(best_xy[0] / f), w - side), min(round(best_xy[1] / f), h - side), side, side)


def _psnr_luma(a: np.ndarray, b: np.ndarray) -> float:
    ya = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64)[_BORDER:-_BORDER, _BORDER:-_BORDER]
    yb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64)[_BORDER:-_BORDER, _BORDER:-_BORDER]
    mse = float(((ya - yb) ** 2).mean())
    return 99.0 if mse < 1e-10 else 10.0 * math.log10(255.0**2 / mse)


def _rebuild(net, small: np.ndarray, device, dtype) -> np.ndarray:
    import torch

    x = torch.from_numpy(small.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device=device, dtype=dtype)
    with torch.inference_mode():
        y = net(x.contiguous(memory_format=torch.channels_last)).float().clamp_(0, 1)
    return (y[0].permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def trial_models(specs, available: Collection[str], limit: int = MAX_USER_MODELS) -> dict[str, str]:
    """The models a trial runs, name -> side: the official photo and anime models, then up to ``limit`` of the
    user's ×4 super-resolution models tagged photo or anime whose weights are ``available``.

    Args:
        specs: the catalog entries to choose from (:func:`engine.catalog.active_catalog`'s values).
        available: names whose weights are on this machine.
    """
    chosen = {PHOTO_MODEL: "photo", ANIME_MODEL: "anime"}
    users = [s for s in specs if s.user and s.kind == "sr" and s.tag in ("photo", "anime")
             and s.scale == TRIAL_SCALE and s.name in available]
    chosen.update({s.name: s.tag for s in users[:limit]})
    return chosen


def trial_reconstruction(rgb: np.ndarray, model_manager, device="cpu",
                         check: Callable[[], None] | None = None,
                         models: Mapping[str, str] = MappingProxyType({PHOTO_MODEL: "photo", ANIME_MODEL: "anime"}),
                         ) -> TrialResult:
    """Rebuild a 4x-shrunk crop of ``rgb`` with the photo and the anime models and compare.

    Args:
        rgb: HxWx3 uint8 RGB (at least 16 px each side).
        model_manager: gives the networks (``load_model``; never downloads: weights must be on this machine).
        device: where they run.
        check: run before each model; raises to stop (a cancelled job).
        models: name -> side ("photo" or "anime") of the ×4 models to try, at least one per side
            (:func:`trial_models`).

    Returns:
        A :class:`TrialResult`.

    Raises:
        ModelNotAvailableError: one of the two models' weights is not on this machine.
        ValueError: the image is too small.
    """
    start = time.perf_counter()
    x, y, cw, ch = pick_crop(rgb)
    crop = np.ascontiguousarray(rgb[y : y + ch, x : x + cw])
    small = cv2.resize(crop, (cw // TRIAL_SCALE, ch // TRIAL_SCALE), interpolation=cv2.INTER_AREA)
    psnr = {}
    for name in models:
        if (ch // TRIAL_SCALE) % model_manager.spec(name).pad_multiple:
            continue  # a window-attention model cannot take this small crop
        if check is not None:
            check()
        loaded = model_manager.load_model(name, device, "auto", allow_download=False)
        psnr[name] = _psnr_luma(_rebuild(loaded.net, small, loaded.device, loaded.dtype), crop)
    side_best = {side: max(p for n, p in psnr.items() if models[n] == side) for side in ("photo", "anime")}
    result = TrialResult(side_best["photo"], side_best["anime"], (x, y, cw, ch), time.perf_counter() - start,
                         scores=MappingProxyType(psnr), sides=MappingProxyType(dict(models)))
    logger.info("trial reconstruction (%.2f s): %s", result.seconds,
                ", ".join(f"{name} {value:.2f} dB" for name, value in psnr.items()))
    return result
