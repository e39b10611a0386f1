"""Offline face detection: facexlib RetinaFace when the caller has its network, else scikit-image's LBP cascade.

The RetinaFace network comes loaded from the model manager (``ModelManager.local_network``), built once per
process and device. Its weights cannot be fetched here, so the fallback is what normally runs: the frontal-face LBP
cascade that scikit-image ships in its data folder (OpenCV 5 no longer has ``CascadeClassifier``). It runs on a
grayscale copy downscaled to at most :data:`CASCADE_WORKING_SIDE` pixels, its raw windows are clustered by IoU and a
face is kept only when at least :data:`CASCADE_MIN_NEIGHBOURS` windows agree on it. Measured on ``tests/data/advisor``
(see ``tests/test_face_detect.py``): every face photo gets at least one face, no anime frame or landscape gets one;
counts in group photos may miss turned or small faces.

The cascade's scales are shared out over the cores (its loops run without the GIL), each share on a cascade of its
own; the windows are those of one whole scan, in its order, so the faces do not depend on the number of cores.

Thread safety: nothing mutable is shared. A call borrows loaded cascades from a free list and gives them back;
the RetinaFace network is shared and only read: this module runs its ``forward`` and decodes the boxes itself,
because facexlib's ``RetinaFace.detect_faces`` keeps per-image values on the module. It runs on a copy shrunk to
at most :data:`RETINAFACE_MAX_PIXELS`, so its memory and time are bounded whatever the input's size.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from engine.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["FaceBox", "FaceDetection", "detect_faces", "estimate_landmarks", "warm_up"]

Landmarks = tuple[tuple[float, float], ...]

#: Long side (pixels) of the grayscale copy the cascade scans. Faces smaller than ~24/512 of the long side are missed.
CASCADE_WORKING_SIDE = 512
#: RetinaFace runs on a copy shrunk to at most this many pixels (area-averaged), its boxes and landmarks scaled
#: back. At the original size its ResNet-50 held ~210 bytes a pixel: a 2000x1500 image took 15 s and 640 MB more
#: on a 2-core CPU (1000x750: 2.6 s, 250 MB), so a 40 MP upload would have needed ~8 GB. What is lost: faces under
#: ~16 px at the working size (on a 12 MP photo, faces under ~55 px), and landmarks a few pixels less precise on
#: inputs above it (the official GFPGAN path detects at the input's size).
RETINAFACE_MAX_PIXELS = 1_000_000
#: The cascade's own window size (pixels); the smallest face it can see on the working copy.
CASCADE_WINDOW = 24
#: Window scale step and stride multiplier of the multi-scale scan (larger = faster, coarser).
CASCADE_SCALE_FACTOR = 1.2
CASCADE_STEP_RATIO = 1.5
#: The cascade's scan is shared out over at most this many threads (one per core the process may use): skimage runs
#: each scale's loop without the GIL, so on 2 cores a 2 MP image's scan takes ~90 ms instead of ~150 ms.
CASCADE_MAX_THREADS = 4
#: Raw windows whose IoU is at least this are one cluster.
CLUSTER_IOU = 0.3
#: A cluster needs at least this many raw windows to count as a face (cuts single-window false positives).
CASCADE_MIN_NEIGHBOURS = 3
#: Two clusters where this share of the smaller box lies inside the larger are one face (nested windows).
CONTAINMENT_MERGE = 0.5

# Five-point landmarks as fractions of the box (x, y), RetinaFace order: left eye, right eye, nose tip, left and
# right mouth corner ("left" = image left). Standard face proportions: eyes at ~38% of the height and ~31%/69%
# of the width, nose tip at ~58%, mouth corners at ~78% height and 35%/65% width (close to the ArcFace 112x112
# template used for alignment, rescaled to a square detector box).
_LANDMARK_FRACTIONS: Landmarks = ((0.31, 0.38), (0.69, 0.38), (0.50, 0.58), (0.35, 0.78), (0.65, 0.78))

_free_cascades: list = []  # loaded cascades not in use (see _cascade)
_cascades_lock = threading.Lock()


@dataclass(frozen=True)
class FaceBox:
    """One face in input-image pixels: box corners, confidence in [0, 1] and optional 5-point landmarks."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    landmarks: Landmarks | None = None

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


@dataclass(frozen=True)
class FaceDetection:
    """All faces found in one image, best first, and which detector found them."""

    faces: tuple[FaceBox, ...]
    detector: str  # "retinaface" | "lbp-cascade"


def estimate_landmarks(box: FaceBox | tuple[float, float, float, float]) -> Landmarks:
    """Five landmarks (RetinaFace order) from a face box using standard face proportions.

    Args:
        box: a :class:`FaceBox` or ``(x0, y0, x1, y1)`` in pixels.

    Returns:
        ``((x, y), ...)`` five points: left eye, right eye, nose tip, left mouth corner, right mouth corner.
    """
    if isinstance(box, FaceBox):
        x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
    else:
        x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"Face box must have x1 > x0 and y1 > y0, got {(x0, y0, x1, y1)}.")
    w, h = x1 - x0, y1 - y0
    return tuple((x0 + fx * w, y0 + fy * h) for fx, fy in _LANDMARK_FRACTIONS)


def detect_faces(
    image: np.ndarray,
    *,
    retinaface=None,
    max_faces: int | None = None,
    min_size: int = 16,
) -> FaceDetection:
    """Find frontal faces.

    Args:
        image: HxWx3 uint8 RGB (HxW gray, HxWx4 RGBA and uint16 are accepted and converted).
        retinaface: facexlib's RetinaFace network, loaded (``ModelManager.local_network``), in float32 on the
            device it should run on; None runs the LBP cascade.
        max_faces: keep at most this many faces (largest score first); None keeps all.
        min_size: drop faces whose shorter box side is below this many input pixels.

    Returns:
        :class:`FaceDetection` with boxes in input-image pixels, best first.

    Raises:
        InvalidInputError: the image is empty or not 2-D/3-D.
    """
    _check_pixels(image)
    if max_faces is not None and max_faces < 0:
        raise ValueError(f"max_faces must be >= 0 or None, got {max_faces}.")
    faces = _retinaface_or_none(image, retinaface) if retinaface is not None else None
    if faces is not None:
        detector = "retinaface"
    else:
        faces = _detect_cascade(_gray8(image))
        detector = "lbp-cascade"
    faces = [f for f in faces if min(f.width, f.height) >= min_size]
    faces.sort(key=lambda f: -f.score)
    if max_faces is not None:
        faces = faces[:max_faces]
    return FaceDetection(faces=tuple(faces), detector=detector)


def _retinaface_or_none(image: np.ndarray, retinaface) -> list[FaceBox] | None:
    """RetinaFace's faces; None when its device is out of memory (a GPU busy with another job: the cascade then
    detects, with a warning, instead of the job failing)."""
    from utils.gpu import is_out_of_memory

    try:
        return _detect_retinaface_bounded(_as_8bit(image), retinaface)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        logger.warning("RetinaFace ran out of memory on %s; detecting faces with the built-in cascade",
                       next(retinaface.parameters()).device)
        return None


def warm_up() -> None:
    """Pay the cascade's one-time costs now, which the first analysis would otherwise wait for: scikit-image's
    imports and one loaded cascade per scan thread (~0.5 s on 2 cores; a 2 MP analysis then takes ~190 ms the first
    time instead of ~600 ms). The app's warm-up calls this."""
    detect_faces(np.full((64, 64, 3), 128, np.uint8))  # a scan borrows, so loads, one cascade per thread


def _check_pixels(image: np.ndarray) -> None:
    """Raises InvalidInputError unless ``image`` is a non-empty HxW or HxWxC (C 1, 3 or 4) uint8/uint16 array."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        raise InvalidInputError("Expected a non-empty HxW or HxWxC image array.")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"Expected 1, 3 or 4 channels, got {image.shape[2]}.")
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"Expected uint8 or uint16 pixels, got {image.dtype}.")


def _as_8bit(image: np.ndarray) -> np.ndarray:
    """HxWxC uint8 (C 1, 3 or 4) from pixels :func:`_check_pixels` accepted (dtype decides the range, never the
    values: :func:`utils.image_io.to_8bit`, band by band)."""
    from utils.image_io import to_8bit

    return to_8bit(image if image.ndim == 3 else image[:, :, None])


#: Rows converted at a time by :func:`_gray8`.
GRAY_BAND_ROWS = 64


def _gray8(image: np.ndarray) -> np.ndarray:
    """HxW uint8 gray of gray/RGB/RGBA uint8/uint16 pixels: :func:`_as_8bit`'s values, then OpenCV's RGB to gray
    (alpha ignored), made :data:`GRAY_BAND_ROWS` rows at a time, so nothing but the gray image is whole (the same
    values as converting the whole image first: both steps work pixel by pixel). Converting a 36 MP 16-bit RGB
    photo whole held 0.8 GB of float and 8-bit copies for this; a gray image is returned as it is (OpenCV's RGB to
    gray of three equal channels gives them back exactly: its weights sum to 1 in fixed point)."""
    from utils.image_io import to_8bit

    pixels = image if image.ndim == 3 else image[:, :, None]
    if pixels.shape[2] == 1 and pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels[:, :, 0])
    out = np.empty(pixels.shape[:2], np.uint8)
    code = {3: cv2.COLOR_RGB2GRAY, 4: cv2.COLOR_RGBA2GRAY}.get(pixels.shape[2])
    for top in range(0, pixels.shape[0], GRAY_BAND_ROWS):
        band = np.ascontiguousarray(to_8bit(pixels[top:top + GRAY_BAND_ROWS]))
        out[top:top + GRAY_BAND_ROWS] = band[:, :, 0] if code is None else cv2.cvtColor(band, code)
    return out


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 RGB of :func:`_as_8bit` pixels (gray expanded by OpenCV: ``np.repeat`` took 0.4 s at 40 MP)."""
    if pixels.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(pixels[:, :, 0]), cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(pixels[:, :, :3])


@functools.cache
def _cascade_class() -> type:
    """skimage's LBP cascade that scans only some of its scales (imported on first use: skimage's feature module
    takes a while to import)."""
    from skimage.feature import Cascade

    class ScaleSubsetCascade(Cascade):
        """Scans the scales at ``scales`` (indices into the ones ``detect_multi_scale`` derives from its sizes and
        factor; None: all of them). The scales are skimage's own numbers, so the windows found at each scale are
        those of a whole scan."""

        scales: tuple[int, ...] | None = None

        def _get_valid_scale_factors(self, min_size, max_size, scale_step):
            factors = super()._get_valid_scale_factors(min_size, max_size, scale_step)
            return factors if self.scales is None else np.ascontiguousarray(factors[list(self.scales)])

    return ScaleSubsetCascade


@contextlib.contextmanager
def _cascades(count: int):
    """``count`` LBP cascades for this call alone (skimage's Cascade is not documented as re-entrant, so no
    sharing), kept for the next call: loading one takes ~6 ms, and detection may run on a fresh thread beside other
    work."""
    with _cascades_lock:
        borrowed = [_free_cascades.pop() for _ in range(min(count, len(_free_cascades)))]
    if len(borrowed) < count:
        from skimage.data import lbp_frontal_face_cascade_filename

        borrowed += [_cascade_class()(lbp_frontal_face_cascade_filename()) for _ in range(count - len(borrowed))]
    try:
        yield borrowed
    finally:
        with _cascades_lock:
            _free_cascades.extend(borrowed)


def _scan_threads() -> int:
    """Threads for one cascade scan: the cores this process may run on, at most :data:`CASCADE_MAX_THREADS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(CASCADE_MAX_THREADS, cores))


def share_scales(factors: np.ndarray, height: int, width: int, threads: int) -> list[tuple[int, ...]]:
    """The scan's scales shared out over ``threads`` by the windows each tries (their time is about proportional
    to it): the scale with the most windows goes to the thread with the fewest so far.

    Args:
        factors: the scan's window scale factors, smallest first.
        height, width: size of the scanned image.
        threads: at most this many shares.

    Returns:
        Scale indices per share (ascending), only the non-empty shares; together every index once.
    """
    counts = []
    for index, factor in enumerate(factors):
        size, step = int(CASCADE_WINDOW * factor), max(1, round(factor * CASCADE_STEP_RATIO))
        rows, cols = max(0, -(-(height - size) // step)), max(0, -(-(width - size) // step))
        counts.append((rows * cols, index))
    loads, shares = [0] * max(1, threads), [[] for _ in range(max(1, threads))]
    for count, index in sorted(counts, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(index)
        loads[least] += count
    return [tuple(sorted(share)) for share in shares if share]


def _scan(gray: np.ndarray, max_side: int) -> list[dict]:
    """The cascade's raw windows on ``gray`` for window sizes from :data:`CASCADE_WINDOW` to ``max_side``, its
    scales shared out over :func:`_scan_threads` threads: the windows of one whole scan, in its order (scale, then
    row, then column), whatever the number of threads."""
    # intersection_score_threshold=1.0: skimage merges windows only when one covers *more* than all of the other,
    # which never happens, so every raw window comes back for the clustering below.
    scan = {"scale_factor": CASCADE_SCALE_FACTOR, "step_ratio": CASCADE_STEP_RATIO,
            "min_size": (CASCADE_WINDOW, CASCADE_WINDOW), "max_size": (max_side, max_side),
            "min_neighbor_number": 0, "intersection_score_threshold": 1.0}
    with _cascades(_scan_threads()) as cascades:
        for cascade in cascades:
            cascade.scales = None
        try:
            factors = cascades[0]._get_valid_scale_factors(scan["min_size"], scan["max_size"], CASCADE_SCALE_FACTOR)
        except AttributeError:  # a scikit-image that derives its scales some other way: one whole scan
            return cascades[0].detect_multi_scale(gray, **scan)
        shares = share_scales(factors, gray.shape[0], gray.shape[1], len(cascades))
        if len(shares) <= 1:  # one thread, or one scale (none: a window as large as the short side, no scan)
            return cascades[0].detect_multi_scale(gray, **scan) if shares else []
        for cascade, share in zip(cascades, shares):
            cascade.scales = share
        with ThreadPoolExecutor(max_workers=len(shares) - 1, thread_name_prefix="face-scan") as pool:
            others = [pool.submit(c.detect_multi_scale, gray, **scan) for c in cascades[1:len(shares)]]
            raw = cascades[0].detect_multi_scale(gray, **scan)
            for other in others:
                raw += other.result()
    return sorted(raw, key=lambda d: (d["height"], d["r"], d["c"]))


def _box_overlaps(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(IoU, intersection / smaller area) of two x0,y0,x1,y1 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


def cluster_windows(boxes: np.ndarray, *, iou: float = CLUSTER_IOU) -> list[tuple[np.ndarray, int]]:
    """Group raw detector windows (Nx4 x0,y0,x1,y1) whose IoU >= ``iou`` (transitively).

    Returns:
        ``[(mean box, number of windows), ...]`` one per cluster.
    """
    n = len(boxes)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if _box_overlaps(boxes[i], boxes[j])[0] >= iou:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [(boxes[idx].mean(axis=0), len(idx)) for idx in groups.values()]


def _detect_cascade(gray: np.ndarray) -> list[FaceBox]:
    h, w = gray.shape
    scale = min(1.0, CASCADE_WORKING_SIDE / max(h, w))
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    side = min(gray.shape)
    if side < CASCADE_WINDOW:
        return []
    raw = _scan(gray, side)
    if not raw:
        return []
    boxes = np.array([(d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]) for d in raw], np.float64)
    clusters = [c for c in cluster_windows(boxes) if c[1] >= CASCADE_MIN_NEIGHBOURS]
    clusters.sort(key=lambda c: -c[1])
    kept: list[tuple[np.ndarray, int]] = []
    for box, count in clusters:
        if all(_box_overlaps(box, other)[1] < CONTAINMENT_MERGE for other, _ in kept):
            kept.append((box, count))
    faces = []
    for box, count in kept:
        x0, y0, x1, y1 = (float(v) / scale for v in box)
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
        # Score: agreeing windows n -> n / (n + CASCADE_MIN_NEIGHBOURS), so the weakest kept face scores 0.5.
        score = count / (count + CASCADE_MIN_NEIGHBOURS)
        faces.append(FaceBox(x0, y0, x1, y1, score, estimate_landmarks((x0, y0, x1, y1))))
    return faces


#: RetinaFace's input mean (BGR, 0..255), confidence threshold and NMS IoU, as facexlib's ``detect_faces``.
_RETINAFACE_MEAN_BGR = (104.0, 117.0, 123.0)
RETINAFACE_CONFIDENCE = 0.8
RETINAFACE_NMS_IOU = 0.4


def _detect_retinaface_bounded(pixels: np.ndarray, model) -> list[FaceBox]:
    """:func:`_detect_retinaface` on a copy of :func:`_as_8bit` ``pixels`` of at most :data:`RETINAFACE_MAX_PIXELS`
    (shrunk before a gray image is made RGB), in ``pixels``' coordinates."""
    h, w = pixels.shape[:2]
    scale = min(1.0, (RETINAFACE_MAX_PIXELS / (h * w)) ** 0.5)
    if scale == 1.0:
        return _detect_retinaface(_rgb(pixels), model)
    small = cv2.resize(np.ascontiguousarray(pixels), (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    small = _rgb(small if small.ndim == 3 else small[:, :, None])
    sx, sy = w / small.shape[1], h / small.shape[0]
    return [FaceBox(f.x0 * sx, f.y0 * sy, min(float(w), f.x1 * sx), min(float(h), f.y1 * sy), f.score,
                    tuple((x * sx, y * sy) for x, y in f.landmarks) if f.landmarks else None)
            for f in _detect_retinaface(small, model)]


def _detect_retinaface(rgb: np.ndarray, model) -> list[FaceBox]:
    """facexlib's ``RetinaFace.detect_faces`` (at the size it is given), with every per-image value kept local."""
    import torch
    from facexlib.detection.retinaface_utils import PriorBox, decode, decode_landm, py_cpu_nms

    h, w = rgb.shape[:2]
    device = next(model.parameters()).device
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32))
    mean = torch.tensor(_RETINAFACE_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
    with torch.inference_mode():
        loc, conf, marks = model((bgr - mean)[None].to(device))
        priors = PriorBox(model.cfg, image_size=(h, w)).forward().to(device)
        variance = model.cfg["variance"]
        boxes = (decode(loc[0], priors, variance) * torch.tensor([w, h] * 2, device=device)).cpu().numpy()
        marks = (decode_landm(marks[0], priors, variance) * torch.tensor([w, h] * 5, device=device)).cpu().numpy()
        scores = conf[0, :, 1].float().cpu().numpy()
    keep = np.where(scores > RETINAFACE_CONFIDENCE)[0]
    keep = keep[np.argsort(scores[keep])[::-1]]
    dets = np.hstack((boxes[keep], scores[keep, None])).astype(np.float32, copy=False)
    kept = py_cpu_nms(dets, RETINAFACE_NMS_IOU)
    dets = np.concatenate((dets[kept], marks[keep][kept]), axis=1)
    faces = []
    for det in dets.reshape(-1, 15):
        x0, y0, x1, y1 = (float(v) for v in det[:4])
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
        if x1 <= x0 or y1 <= y0:
            continue
        landmarks = tuple((float(det[5 + 2 * i]), float(det[6 + 2 * i])) for i in range(5))
        faces.append(FaceBox(x0, y0, x1, y1, float(det[4]), landmarks))
    return faces
