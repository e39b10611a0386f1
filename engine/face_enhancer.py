"""Face enhancement: detect faces on the input, restore them with GFPGAN/RestoreFormer, paste them on the upscale.

The background comes from our own upscaler (an :class:`Upscaler` or an already-upscaled array). Faces are found
on the *input*, aligned to the 512×512 FFHQ template, restored, and warped back onto the background at the output
scale through a feathered mask (the ParseNet face mask when its weights are present). The strength ``s`` blends
the restored face with the background inside that mask: ``out = bg + s·mask·(restored − bg)``, so ``s = 0`` is the
background bit for bit and ``s = 1`` the full restoration.

Everything per request lives in local variables of :func:`enhance_faces`; the networks come from the
:class:`~engine.model_manager.ModelManager` cache and are only read, so concurrent calls are safe.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from engine.catalog import DEFAULT_FACE_MODEL, face_models
from engine.errors import (InvalidInputError, InvalidSettingsError, ModelNotAvailableError,
                           UnsafeEnvironmentError)
from engine.models.loader import FACE_SIZE, face_forward
from utils.gpu import is_out_of_memory

if TYPE_CHECKING:
    from engine.model_manager import LoadedModel, ModelManager

logger = logging.getLogger(__name__)

MIN_EXPORT_SIZE = 512
MIN_EYE_DISTANCE = 5.0  # input pixels; below this the alignment is meaningless (GFPGAN's own threshold)
RETINAFACE_MODEL = "detection_Resnet50_Final"
PARSENET_MODEL = "parsing_parsenet"

# The five landmarks of an FFHQ-aligned 512×512 face (left eye, right eye, nose, left and right mouth corner),
# as in facexlib's FaceRestoreHelper.
FACE_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
_ALIGN_BORDER_VALUE = (135, 133, 132)  # the grey facexlib pads aligned faces with
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
"""The five landmarks of ArcFace's 112×112 aligned face (insightface's reference points)."""
IDENTITY_SIZE = 112


class Upscaler(Protocol):
    """Anything that upscales a picture: ``HxWx3 uint8 RGB`` in, ``H'xW'x3 uint8 RGB`` at the output scale out."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class FaceSettings:
    """What the user asked of face enhancement. Validated on construction.

    Attributes:
        model: a face model of the catalog (GFPGANv1.4, GFPGANv1.3, RestoreFormer) or one the user imported.
        strength: 0.0 (the background upscale, untouched) … 1.0 (the full restoration).
        only_center_face: restore only the face nearest the image centre.
        max_faces: restore at most this many faces (the largest ones).
        save_crops: return each restored face as its own image (see :func:`save_face_crops`).
        crop_size: requested side of the exported crops; they are ``max(512, crop_size)``
            (:attr:`export_crop_size`).
        force_on_anime: run on content classified as anime (skipped otherwise: GFPGAN knows photos only).
    """

    model: str = DEFAULT_FACE_MODEL
    strength: float = 0.8
    only_center_face: bool = False
    max_faces: int = 20
    save_crops: bool = False
    crop_size: int = 512
    force_on_anime: bool = False

    def __post_init__(self) -> None:
        if self.model not in face_models():
            raise InvalidSettingsError(f"Unknown face model {self.model!r}; choose one of {', '.join(face_models())}.")
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)):
            raise InvalidSettingsError(f"Face strength must be a number from 0.0 to 1.0, got {strength!r}.")
        if not 0.0 <= float(strength) <= 1.0:  # also refuses NaN
            raise InvalidSettingsError(
                f"Face strength must be between 0.0 (no restoration) and 1.0 (full restoration), got {strength}."
            )
        object.__setattr__(self, "strength", float(strength))
        if isinstance(self.max_faces, bool) or not isinstance(self.max_faces, (int, np.integer)) \
                or self.max_faces < 1:
            raise InvalidSettingsError(f"max_faces must be a whole number of at least 1, got {self.max_faces!r}.")
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, (int, np.integer)) \
                or not 1 <= self.crop_size <= 4096:
            raise InvalidSettingsError(f"crop_size must be a whole number from 1 to 4096, got {self.crop_size!r}.")

    @property
    def export_crop_size(self) -> int:
        """Side of the exported face crops: the requested size, but never below 512."""
        return max(MIN_EXPORT_SIZE, int(self.crop_size))


@dataclass(frozen=True)
class FaceResult:
    """The outcome of :func:`enhance_faces`.

    Attributes:
        image: the output, same layout, channels and dtype as the background (alpha untouched).
        faces_detected: faces the detector found on the input.
        faces_restored: faces actually restored and pasted back (the rest are the background upscale).
        detector: the detector used ("retinaface" or "lbp-cascade"; "none" when detection was skipped).
        warnings: one sentence per thing the user should know (each face not restored and why, fallbacks).
        crops: the restored faces, ``SxSxC uint8`` with ``S = settings.export_crop_size`` (C = 1 or 3), only when
            ``settings.save_crops``; in the order of ``boxes``.
        boxes: the restored faces' boxes ``(x0, y0, x1, y1)`` in output pixels.
        identity_pairs: for each restored face, ``(input face, output face)``: ``112x112x3 RGB`` cut at the same
            ArcFace-aligned position from the input and from the final output (for the identity metric).
    """

    image: np.ndarray
    faces_detected: int
    faces_restored: int
    detector: str
    warnings: tuple[str, ...] = ()
    crops: tuple[np.ndarray, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    identity_pairs: tuple[tuple[np.ndarray, np.ndarray], ...] = ()

    def as_report(self) -> dict:
        """The JSON-friendly summary for CLI/API reports."""
        return {"faces_detected": self.faces_detected, "faces_restored": self.faces_restored,
                "detector": self.detector, "warnings": list(self.warnings)}


@dataclass(frozen=True)
class DetectedFace:
    """One detected face in input pixels: its box, score and five landmarks (5x2 float32)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))


# ---------------------------------------------------------------------------------------------- pure helpers
def _no_progress(done: int, total: int) -> None:
    """The default progress callback: nothing."""


def download_hint(model: str) -> str:
    """How to get a face model's weights, for warnings."""
    return (f"get the weights with: python main.py models download {model} "
            "(or the Download button in the UI's System Info tab)")


def landmarks_from_box(box: tuple[float, float, float, float]) -> np.ndarray:
    """Estimate the five landmarks (RetinaFace order) of a frontal face from its box. Returns 5x2 float32."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    rel = np.array([[0.32, 0.40], [0.68, 0.40], [0.50, 0.58], [0.35, 0.76], [0.65, 0.76]], dtype=np.float32)
    return (rel * np.array([w, h], dtype=np.float32) + np.array([x0, y0], dtype=np.float32)).astype(np.float32)


def select_faces(faces: list[DetectedFace], width: int, height: int, *, only_center_face: bool,
                 max_faces: int) -> tuple[list[DetectedFace], list[str]]:
    """Choose which detected faces to restore; returns them (left to right) and a warning per group left out."""
    if not faces:
        return [], []
    warnings: list[str] = []
    if only_center_face:
        cx, cy = width / 2.0, height / 2.0
        chosen = [min(faces, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)]
        if len(faces) > 1:
            warnings.append(f"{len(faces) - 1} of {len(faces)} faces were not restored because only the centre "
                            "face was asked for (only-center-face).")
    else:
        chosen = sorted(faces, key=lambda f: (-f.area, -f.score))[:max_faces]
        if len(faces) > max_faces:
            warnings.append(f"{len(faces) - max_faces} of {len(faces)} faces were not restored: the limit is "
                            f"{max_faces} faces per image (the largest are restored; raise REALESRGAN_MAX_FACES "
                            "or the face limit to restore more).")
    return sorted(chosen, key=lambda f: (f.center[0], f.center[1])), warnings


def output_transform(sx: float, sy: float) -> np.ndarray:
    """3x3 map from input pixel coordinates to output pixel coordinates (pixel centres kept aligned)."""
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]], dtype=np.float64)


def _affine3(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])


def _warped_roi(matrix: np.ndarray, size: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Integer box ``(x0, y0, x1, y1)`` of the output that the ``size`` square lands on under ``matrix`` (2x3)."""
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], dtype=np.float64)
    pts = corners @ np.asarray(matrix, dtype=np.float64).T
    x0 = max(0, int(np.floor(pts[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(pts[:, 1].min())) - 1)
    x1 = min(width, int(np.ceil(pts[:, 0].max())) + 2)
    y1 = min(height, int(np.ceil(pts[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


@functools.lru_cache(maxsize=1)
def feathered_face_mask() -> np.ndarray:
    """A soft mask of the face in the 512×512 aligned frame (ellipse over brows to chin, cheek to cheek).

    Used instead of the ParseNet mask when its weights are absent. ``512x512 float32`` in [0, 1], zero on the
    border, read-only (shared between requests).
    """
    import cv2

    mask = np.zeros((FACE_SIZE, FACE_SIZE), dtype=np.float32)
    cv2.ellipse(mask, (256, 290), (118, 160), 0, 0, 360, 1.0, thickness=-1, lineType=cv2.LINE_AA)
    mask = np.clip(cv2.GaussianBlur(mask, (0, 0), sigmaX=14, sigmaY=14), 0.0, 1.0)
    mask[:8, :] = mask[-8:, :] = 0.0
    mask[:, :8] = mask[:, -8:] = 0.0
    mask.setflags(write=False)
    return mask


# ------------------------------------------------------------------------------------------- image plumbing
def _as_hwc(image: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"The {what} must be a uint8 or uint16 numpy array (HxWxC, C = 1, 2, 3 or 4).")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInputError(f"The {what} has shape {image.shape}; expected HxW or HxWxC with C = 1, 2, 3 or 4.")
    return image


def _colour_channels(channels: int) -> int:
    return 1 if channels in (1, 2) else 3


def _to_rgb(image_hwc: np.ndarray) -> np.ndarray:
    """Colour part of an ``HxWxC`` image as ``HxWx3 uint8 RGB`` (grey replicated, alpha dropped, 16 → 8 bits)."""
    from utils.image_io import to_8bit

    colour = to_8bit(image_hwc[:, :, :_colour_channels(image_hwc.shape[2])])
    return np.ascontiguousarray(np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour)


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None]


def _background_from_upscaler(image_hwc: np.ndarray, upscaler: Upscaler) -> np.ndarray:
    """Upscale the colour with ``upscaler`` and any alpha with Lanczos to the same size; keeps the channels."""
    import cv2

    up = np.asarray(upscaler(_to_rgb(image_hwc)))
    if up.dtype != np.uint8 or up.ndim != 3 or up.shape[2] != 3:
        raise InvalidInputError(f"The upscaler returned {up.dtype} {up.shape}; expected HxWx3 uint8 RGB.")
    channels = image_hwc.shape[2]
    colour = _rgb_to_gray(up) if _colour_channels(channels) == 1 else up
    if channels in (2, 4):
        alpha = cv2.resize(image_hwc[:, :, -1], (up.shape[1], up.shape[0]), interpolation=cv2.INTER_LANCZOS4)
        return np.concatenate([colour, alpha[:, :, None]], axis=2)
    return colour


# ------------------------------------------------------------------------------------------------ detection
def _detect(rgb: np.ndarray, model_manager: ModelManager, device: str):
    """The faces of ``rgb`` (an ``engine.face_detect.FaceDetection``): RetinaFace when its weights are here."""
    from engine.face_detect import detect_faces

    return detect_faces(rgb, retinaface=face_detector(model_manager, device))


def face_detector(model_manager: ModelManager | None, device: str | object):
    """The RetinaFace network on ``device`` when its weights are on this machine (built once by the model manager,
    so the advisor and the face enhancer share it); None when they are not or are unusable (then the built-in
    cascade detects, with a warning for damaged weights)."""
    if model_manager is None:
        return None
    try:
        return model_manager.local_network(RETINAFACE_MODEL, device)
    except ModelNotAvailableError as exc:  # weights present but unusable: the cascade still works
        logger.warning("RetinaFace unusable (%s); detecting faces with the built-in cascade", exc)
        return None


def _detected(detection) -> list[DetectedFace]:
    """The faces of a detection with the landmarks alignment needs (estimated from the box when it has none)."""
    faces = []
    for fb in detection.faces:
        box = (float(fb.x0), float(fb.y0), float(fb.x1), float(fb.y1))
        marks = fb.landmarks
        marks = (landmarks_from_box(box) if marks is None
                 else np.asarray(marks, dtype=np.float32).reshape(5, 2))
        faces.append(DetectedFace(box=box, score=float(fb.score), landmarks=marks))
    return faces


# ------------------------------------------------------------------------------------------------- ParseNet
# Face-parsing classes kept in the paste mask (skin, brows, eyes, ears, nose, mouth, lips; not neck, cloth,
# hair, hat), as in facexlib's paste-back.
_PARSE_KEEP = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0], dtype=np.float32)


def parse_mask(parsenet, restored_rgb: np.ndarray) -> np.ndarray:
    """Soft face mask of a restored face from ParseNet (float32, on the device it runs on).

    Args:
        parsenet: facexlib's ParseNet, loaded (``ModelManager.local_network``).
        restored_rgb: ``512x512x3 uint8 RGB``.

    Returns:
        ``512x512 float32`` in [0, 1].
    """
    import cv2
    import torch

    device = next(parsenet.parameters()).device
    x = torch.from_numpy(restored_rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(device)
    with torch.inference_mode():
        labels = parsenet(x)[0].argmax(dim=1).squeeze(0).cpu().numpy()
    mask = _PARSE_KEEP[labels]
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask = cv2.GaussianBlur(mask, (101, 101), 11)
    mask[:10, :] = mask[-10:, :] = 0.0
    mask[:, :10] = mask[:, -10:] = 0.0
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- restoration
def _restore(loaded: LoadedModel, aligned_rgb: np.ndarray) -> np.ndarray:
    """Run the face network on one aligned face (:func:`face_forward`). ``512x512x3 uint8 RGB`` in and out."""
    import torch

    x = torch.from_numpy(aligned_rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = x.to(device=loaded.device, dtype=loaded.dtype)
    with torch.inference_mode():
        out = face_forward(loaded.net, loaded.spec.arch, x)[0].float().clamp_(-1.0, 1.0)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("the network produced NaN/inf values")
        out = ((out + 1.0) * 127.5).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(out)


@dataclass(frozen=True)
class _Outcome:
    """What loading or running the face model gave: a value, or why not (and whether it was out of memory)."""

    value: object = None
    why: str | None = None
    oom: bool = False


def _load(model_manager: ModelManager, name: str, device, precision: str, allow_download: bool) -> _Outcome:
    """Load the face model from the manager's cache; failures become an :class:`_Outcome` with the reason."""
    try:
        return _Outcome(model_manager.load_model(name, device, precision, allow_download=allow_download))
    except UnsafeEnvironmentError:
        raise
    except ModelNotAvailableError as exc:
        logger.warning("face model %s not available: %s", name, exc)
        return _Outcome(why=f"the weights of {name} are not available ({exc})")
    except Exception as exc:  # noqa: BLE001 - a damaged file can make the unpickler raise anything; the image
        # must still be produced, and the warning below says what failed
        logger.warning("face model %s failed to load", name, exc_info=True)
        return _Outcome(why=f"{name} could not be loaded ({_first_line(exc)}); the weights file may be damaged",
                        oom=is_out_of_memory(exc))


def _run(loaded: LoadedModel, aligned: np.ndarray) -> _Outcome:
    try:
        return _Outcome(_restore(loaded, aligned))
    except (RuntimeError, FloatingPointError, MemoryError) as exc:
        oom = is_out_of_memory(exc)
        logger.warning("face restoration failed on %s: %s", loaded.device, exc)
        return _Outcome(why="out of memory" if oom else _first_line(exc), oom=oom)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


class _FaceModel:
    """The face network for one request, moving to the CPU once if the GPU runs out of memory (per call state)."""

    def __init__(self, model_manager: ModelManager, name: str, allow_cpu_fallback: bool, allow_download: bool):
        self.model_manager, self.name = model_manager, name
        self.allow_cpu_fallback, self.allow_download = allow_cpu_fallback, allow_download
        self.loaded: LoadedModel | None = None
        self.moved_to_cpu = False

    def _can_move(self, outcome: _Outcome, device) -> bool:
        return (outcome.oom and self.allow_cpu_fallback and not self.moved_to_cpu
                and getattr(device, "type", str(device)) != "cpu")

    def _to_cpu(self) -> _Outcome:
        from utils.gpu import clear_cache

        clear_cache(self.loaded.device if self.loaded is not None else None)
        self.moved_to_cpu = True
        logger.warning("out of GPU memory during face restoration; continuing on the CPU")
        outcome = _load(self.model_manager, self.name, "cpu", "fp32", self.allow_download)
        if outcome.value is not None:
            self.loaded = outcome.value
        return outcome

    def load(self, device, precision: str) -> _Outcome:
        outcome = _load(self.model_manager, self.name, device, precision, self.allow_download)
        if outcome.value is None and self._can_move(outcome, device):
            outcome = self._to_cpu()
        self.loaded = outcome.value
        return outcome

    def restore(self, aligned: np.ndarray) -> _Outcome:
        outcome = _run(self.loaded, aligned)
        if outcome.value is None and self._can_move(outcome, self.loaded.device):
            moved = self._to_cpu()
            outcome = _run(self.loaded, aligned) if moved.value is not None else moved
        return outcome


# ----------------------------------------------------------------------------------------------------- public
@dataclass(frozen=True)
class FaceRun:
    """Where and how the face model runs, which faces it restores, and where they go.

    Attributes:
        device: "cpu", "cuda", "cuda:N", "mps", "auto" or a ``torch.device``.
        precision: "fp32", "fp16", "bf16" or "auto" (fp16 falls back to fp32 on CPU).
        allow_cpu_fallback: on a GPU out-of-memory error, finish the faces on the CPU.
        allow_download: let the model manager download missing face weights (off: a missing model is reported).
        in_place: paste the faces into the ``background`` given to :func:`enhance_faces` itself, which the result's
            image then is: only the faces' regions are touched and no copy of the output is made (the engine's
            output canvas). Off: the background is copied first.
        detection: the faces found on the image already (an ``engine.face_detect.FaceDetection``: the advisor's,
            made by the same :func:`~engine.face_detect.detect_faces` call on the same pixels), restored without
            detecting them again; None detects them.
    """

    device: object = "cpu"
    precision: str = "fp32"
    allow_cpu_fallback: bool = True
    allow_download: bool = False
    in_place: bool = False
    detection: object = None


def enhance_faces(image: np.ndarray, background: np.ndarray | None = None, upscaler: Upscaler | None = None, *,
                  settings: FaceSettings, model_manager: ModelManager, run: FaceRun = FaceRun(),
                  content_type: str | None = None, progress: Callable[[int, int], None] | None = None) -> FaceResult:
    """Restore the faces of ``image`` onto its upscale.

    Args:
        image: the input, ``HxW`` or ``HxWxC uint8`` (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA); ``uint16`` too
            when ``background`` is given (faces are detected and restored in 8 bits, pasted back in 16).
        background: the input already upscaled by the engine, ``H'xW'xC`` with the same channels and dtype; or
            None when ``upscaler`` is given. The output scale is ``background size / input size``.
        upscaler: makes the background from the input when ``background`` is None (alpha is resized with
            Lanczos to the same size).
        settings: the face settings (model, strength, limits, crop export).
        model_manager: where the face model (and optional RetinaFace/ParseNet weights) come from.
        run: device, precision, CPU fallback, downloads, the faces when they were found already, and whether to
            paste into ``background`` itself (:class:`FaceRun`).
        content_type: the advisor's content class; with "anime" the faces the detector finds are still restored
            (a detected human face is evidence of a photo), with a note saying so.
        progress: called as ``progress(done, total)`` after each face.

    Returns:
        A :class:`FaceResult`. The image is always produced: when faces cannot be restored it is the
        background, and ``warnings`` say why (and how to get missing weights).

    Raises:
        InvalidInputError: arrays of the wrong type/shape, or mismatched channels.
        UnsafeEnvironmentError: torch was told to unpickle arbitrary objects (see the model manager).
    """
    import cv2

    image_hwc = _as_hwc(image, "input image")
    if (background is None) == (upscaler is None):
        raise InvalidInputError("Give enhance_faces exactly one of `background` (the upscaled image) or `upscaler`.")
    if background is None and image_hwc.dtype != np.uint8:
        raise InvalidInputError("A 16-bit image needs its upscaled `background` (an Upscaler works in 8 bits).")
    squeeze = image.ndim == 2 if background is None else background.ndim == 2  # give back an HxW as HxW
    if background is None:
        background = _background_from_upscaler(image_hwc, upscaler)
    bg = _as_hwc(background, "background")
    if bg.shape[2] != image_hwc.shape[2] or bg.dtype != image_hwc.dtype:
        raise InvalidInputError(f"The background ({bg.shape[2]} channels, {bg.dtype}) must have the channels and "
                                f"bit depth of the input ({image_hwc.shape[2]} channels, {image_hwc.dtype}).")
    report = progress or _no_progress
    out = bg if run.in_place else bg.copy()

    def finish(img: np.ndarray, detected: int, restored: int, detector: str, warnings: list[str],
               crops: list[np.ndarray] = (), boxes: list = (), pairs: list = ()) -> FaceResult:
        img = img[:, :, 0] if squeeze else img
        logger.info("faces: %d detected, %d restored (%s)", detected, restored, detector)
        return FaceResult(image=img, faces_detected=detected, faces_restored=restored, detector=detector,
                          warnings=tuple(warnings), crops=tuple(crops), boxes=tuple(boxes),
                          identity_pairs=tuple(pairs))

    import torch

    from utils.gpu import resolve_device

    torch_device = run.device if isinstance(run.device, torch.device) else resolve_device(str(run.device))
    h, w = image_hwc.shape[:2]
    out_h, out_w = bg.shape[:2]
    rgb = _to_rgb(image_hwc)
    detection = run.detection if run.detection is not None else _detect(rgb, model_manager, str(torch_device))
    faces, detector = _detected(detection), detection.detector
    detected = len(faces)
    if not faces:
        why = (" (the image also looks like anime/illustration, which GFPGAN does not know)"
               if content_type == "anime" else "")
        return finish(out, 0, 0, detector, [f"No face was found ({detector} detector){why}; the image is "
                                                  "the plain upscale."])
    notes = []
    if content_type == "anime" and not settings.force_on_anime:
        # A content guess never skips faces the detector found: a detected human face is evidence of a photo
        # (the advisor decides the same way, engine.image_analysis.decide_content). A face drawn like the image
        # it is in is not (engine.image_analysis.drawn_faces).
        from engine.image_analysis import drawn_faces, pixels_logit

        drawn = drawn_faces(rgb, detection.faces, pixels_logit(rgb))
        faces = [face for face, box in zip(faces, detection.faces) if box not in drawn]
        if drawn:
            plural = len(drawn) > 1
            notes.append(f"{len(drawn)} face{'s' if plural else ''} found look{'' if plural else 's'} drawn, like "
                         "the image: left as the upscale (GFPGAN is made for photos; \"Restore faces on drawings\", "
                         "--force-faces, restores them).")
        if faces:
            notes.append(f"The image looked like a drawing, but the {detector} detector found {len(faces)} human "
                         f"face{'s' if len(faces) > 1 else ''}: restored as a photo.")
        else:
            return finish(out, detected, 0, detector, notes)
    chosen, selection_warnings = select_faces(faces, w, h, only_center_face=settings.only_center_face,
                                              max_faces=settings.max_faces)
    warnings = notes + list(selection_warnings)
    usable = []
    for face in chosen:
        if face.eye_distance < MIN_EYE_DISTANCE:
            warnings.append(f"A face at ({face.box[0]:.0f}, {face.box[1]:.0f}) was not restored: it is too small "
                            f"(eyes {face.eye_distance:.1f} px apart, at least {MIN_EYE_DISTANCE:.0f} needed).")
        else:
            usable.append(face)
    if settings.strength == 0.0:
        warnings.append(f"Face strength is 0, so the {len(usable)} face(s) were left as the background upscale.")
        return finish(out, detected, 0, detector, warnings)
    if not usable:
        return finish(out, detected, 0, detector, warnings)

    model = _FaceModel(model_manager, settings.model, run.allow_cpu_fallback, run.allow_download)
    loaded = model.load(torch_device, run.precision)
    if loaded.value is None:
        warnings.append(f"{len(usable)} face(s) were not restored because {loaded.why}; the faces are the plain "
                        f"upscale. To restore faces, {download_hint(settings.model)}.")
        return finish(out, detected, 0, detector, warnings)

    mask_source = _MaskSource(model_manager)
    to_output = output_transform(out_w / w, out_h / h)
    colour = _colour_channels(bg.shape[2])
    crops: list[np.ndarray] = []
    boxes: list[tuple[float, float, float, float]] = []
    pasted: list[np.ndarray] = []  # landmarks (input pixels) of the faces restored
    for index, face in enumerate(usable, start=1):
        affine = alignment_matrix(face.landmarks)
        if affine is None:
            warnings.append(f"Face {index} was not restored: its landmarks could not be aligned.")
            report(index, len(usable))
            continue
        back = (to_output @ _affine3(cv2.invertAffineTransform(affine)))[:2]
        aligned = cv2.warpAffine(rgb, affine, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=_ALIGN_BORDER_VALUE)
        outcome = model.restore(aligned)
        if outcome.value is None:
            warnings.append(f"Face {index} was not restored: the face model failed ({outcome.why}); it is the "
                            "plain upscale there.")
            report(index, len(usable))
            continue
        restored = outcome.value
        mask = mask_source.mask(restored, model.loaded.device)
        if not paste_face(out, restored, mask, back, settings.strength):
            warnings.append(f"Face {index} was not restored: it lies outside the image.")
            report(index, len(usable))
            continue
        boxes.append((face.box[0] * out_w / w, face.box[1] * out_h / h, face.box[2] * out_w / w,
                      face.box[3] * out_h / h))
        pasted.append(face.landmarks)
        if settings.save_crops:
            crops.append(_crop(restored, bg, affine, to_output, settings, colour))
        report(index, len(usable))
    if model.moved_to_cpu:
        warnings.append("The GPU ran out of memory during face restoration; faces were restored on the CPU.")
    return finish(out, detected, len(boxes), detector, warnings, crops, boxes,
                  identity_pairs(rgb, _to_rgb(out), pasted, to_output))


class _MaskSource:
    """Per-call choice of paste mask: ParseNet when its weights are on this machine and load, else the feathered
    ellipse. ParseNet comes from the model manager's cache (built once per device), asked once per call."""

    def __init__(self, model_manager: ModelManager):
        self.model_manager, self.failed = model_manager, False
        self.parsenet, self.device = None, None

    def mask(self, restored: np.ndarray, device) -> np.ndarray:
        if not self.failed:
            try:
                if self.device != str(device):  # the first face, or the face model moved to the CPU
                    self.parsenet, self.device = self.model_manager.local_network(PARSENET_MODEL, device), str(device)
                if self.parsenet is not None:
                    return parse_mask(self.parsenet, restored)
            except (ModelNotAvailableError, RuntimeError, OSError) as exc:
                logger.warning("ParseNet unusable, pasting faces with the feathered mask: %s", exc)
                self.failed = True
        return feathered_face_mask()


def identity_pairs(input_rgb: np.ndarray, output_rgb: np.ndarray, landmarks: Sequence[np.ndarray],
                   to_output: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(input face, output face)`` for each set of landmarks: both cut ArcFace-aligned (112×112, RGB) at the
    same face position, from the input and from the output, for the identity-similarity metric.

    Args:
        input_rgb: the input, ``HxWx3``.
        output_rgb: the output, ``H'xW'x3`` (same dtype).
        landmarks: 5x2 landmarks in input pixels, one array per face.
        to_output: 3x3 map from input to output pixels (:func:`output_transform`).
    """
    import cv2

    pairs = []
    for points in landmarks:
        points = np.asarray(points, dtype=np.float64)
        out_points = (points @ to_output[:2, :2].T + to_output[:2, 2]).astype(np.float32)
        crops = []
        for image, pts in ((input_rgb, points.astype(np.float32)), (output_rgb, out_points)):
            matrix = cv2.estimateAffinePartial2D(pts, ARCFACE_TEMPLATE_112, method=cv2.LMEDS)[0]
            if matrix is None or not np.isfinite(matrix).all():
                break
            shrink = 1.0 / max(1e-6, float(np.sqrt(abs(np.linalg.det(matrix[:, :2])))))
            k = max(1, int(np.ceil(shrink - 1e-3)))  # warp at k x the size, then area-average: no aliasing
            crop = cv2.warpAffine(image, matrix * np.float64(k), (IDENTITY_SIZE * k, IDENTITY_SIZE * k),
                                  flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            if k > 1:
                crop = cv2.resize(crop, (IDENTITY_SIZE, IDENTITY_SIZE), interpolation=cv2.INTER_AREA)
            crops.append(crop)
        if len(crops) == 2:
            pairs.append((crops[0], crops[1]))
    return pairs


def alignment_matrix(landmarks: np.ndarray) -> np.ndarray | None:
    """2x3 similarity transform from input pixels to the 512×512 aligned frame (None if it cannot be fitted).

    Args:
        landmarks: 5x2 float32 (left eye, right eye, nose, left and right mouth corner) in input pixels.
    """
    import cv2

    matrix = cv2.estimateAffinePartial2D(np.asarray(landmarks, dtype=np.float32), FACE_TEMPLATE_512,
                                         method=cv2.LMEDS)[0]
    return None if matrix is None or not np.isfinite(matrix).all() else matrix


def paste_face(out: np.ndarray, face: np.ndarray, mask: np.ndarray, aligned_to_output: np.ndarray,
               strength: float) -> bool:
    """Blend an aligned face into ``out`` in place: ``out += strength·mask·(face − out)`` (colour channels only).

    Args:
        out: ``HxWxC uint8`` or ``uint16`` (C = 1..4); channels beyond the colour (alpha) are not touched, and
            pixels where the warped mask is 0 keep their values.
        face: ``512x512x3 uint8 RGB`` (turned to grey for a grey ``out``).
        mask: ``512x512 float32`` in [0, 1], zero on its border.
        aligned_to_output: 2x3 map from the aligned frame to ``out`` pixels.
        strength: 0..1.

    Returns:
        False when the face lands entirely outside ``out`` (nothing changed).
    """
    import cv2

    height, width = out.shape[:2]
    roi = _warped_roi(aligned_to_output, FACE_SIZE, width, height)
    if roi is None:
        return False
    colour = _colour_channels(out.shape[2])
    x0, y0, x1, y1 = roi
    local = np.asarray(aligned_to_output, dtype=np.float64).copy()
    local[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    face = face if colour == 3 else _rgb_to_gray(face)
    warped = cv2.warpAffine(face, local, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    warped = warped.reshape(size[1], size[0], colour).astype(np.float32)
    top = np.iinfo(out.dtype).max
    if top != 255:
        warped *= np.float32(top / 255.0)
    alpha = cv2.warpAffine(mask, local, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0.0)[:, :, None] * np.float32(strength)
    region = out[y0:y1, x0:x1, :colour].astype(np.float32)
    region += alpha * (warped - region)
    out[y0:y1, x0:x1, :colour] = np.clip(np.rint(region), 0, top).astype(out.dtype)
    return True


def _crop(restored: np.ndarray, bg: np.ndarray, affine: np.ndarray, to_output: np.ndarray, settings: FaceSettings,
          colour: int) -> np.ndarray:
    """The exported face: restored and background face blended by strength, at ``settings.export_crop_size``."""
    import cv2

    face = restored
    if settings.strength < 1.0:
        from_output = _affine3(affine) @ np.linalg.inv(to_output)  # output pixels -> aligned frame
        plain = cv2.warpAffine(_to_rgb(bg), from_output[:2], (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
        s = np.float32(settings.strength)
        face = np.clip(np.rint(s * restored.astype(np.float32) + (1 - s) * plain.astype(np.float32)), 0, 255)
        face = face.astype(np.uint8)
    size = settings.export_crop_size
    if size != FACE_SIZE:
        face = cv2.resize(face, (size, size), interpolation=cv2.INTER_LANCZOS4)
    return face if colour == 3 else _rgb_to_gray(face)


def save_face_crops(result: FaceResult | Sequence[np.ndarray], output_path: str | Path) -> list[Path]:
    """Write the face crops (of a :class:`FaceResult`, or given as arrays) next to ``output_path`` as
    ``<stem>_face01.png``, ``<stem>_face02.png``, …

    Returns:
        The paths written (none when the result has no crops).
    """
    from utils.image_io import save_image

    output_path = Path(output_path)
    written = []
    crops = result.crops if isinstance(result, FaceResult) else result
    for number, crop in enumerate(crops, start=1):
        path = output_path.with_name(f"{output_path.stem}_face{number:02d}.png")
        save_image(crop, path, format="png")
        written.append(path)
    return written
