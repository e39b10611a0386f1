"""The one-image pipeline: decode → plan → network (colour, then alpha) → faces → exact size → metrics.

Everything one image needs is a frozen :class:`Job`; each step takes it and returns its output with its warnings
(nothing is appended to shared lists), so two threads may enhance at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from engine.catalog import ModelSpec
from engine.errors import CancelledError, InputTooLargeError, InvalidInputError, InvalidSettingsError, OutOfMemoryError
from engine.inference import planning
from engine.inference.precision_check import BF16_MIN_PSNR, bf16_psnr
from engine.inference.result import EnhanceResult
from engine.settings import EnhanceSettings

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class Reporter:
    """The user's progress callback and cancel flag: raises CancelledError at the next step once cancelled."""

    progress: ProgressFn | None = None
    cancel: threading.Event | None = None

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("Cancelled by the user.")

    def __call__(self, fraction: float, message: str) -> None:
        self.check()
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), message)

    def span(self, lo: float, hi: float) -> Callable[[int, int, str], None]:
        """A ``(done, total, what)`` reporter mapped onto ``lo..hi`` of the whole job."""
        return lambda done, total, what: self(lo + (hi - lo) * done / max(total, 1), what)


@dataclass(frozen=True)
class Job:
    """One image's frozen context: its settings, the network chosen for it, and the app's services."""

    settings: EnhanceSettings
    model_name: str
    model_manager: object
    config: object
    report: Reporter

    @property
    def spec(self) -> ModelSpec:
        return self.model_manager.spec(self.model_name)


@dataclass(frozen=True)
class Run:
    """What one network run made and used (returned, never stored on shared objects)."""

    images: list[np.ndarray]
    device: str
    precision: str
    tile: int
    warnings: tuple[str, ...] = ()
    network_seconds: float = 0.0  # the forward passes alone (not the imports, the network build or retries)


def as_float(pixels: np.ndarray) -> np.ndarray:
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    return pixels.astype(np.float32) / scale


def from_float(image: np.ndarray, dtype) -> np.ndarray:
    top = 65535.0 if dtype == np.uint16 else 255.0
    return np.clip(np.round(image * top), 0, top).astype(dtype)


def resize_float(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """High-quality resize of an HxWxC float image: Lanczos up, area down (no aliasing)."""
    import cv2

    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width < image.shape[1] and height < image.shape[0]
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4)
    if out.ndim == 2:
        out = out[:, :, None]
    return np.clip(out, 0.0, 1.0)


def bleed_transparent_colours(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Give fully transparent pixels the colour of the nearest visible pixel.

    Transparent pixels often hold black; an upscaler blends their colour into the visible edge, leaving a dark
    fringe once alpha is upscaled too. Filling them from the nearest opaque neighbour removes the fringe without
    touching any visible pixel. ``rgb`` HxWx3 float32, ``alpha`` HxW float32 in [0, 1].
    """
    import cv2

    transparent = alpha <= 0
    if not transparent.any() or transparent.all():
        return rgb
    src = np.where(transparent, 255, 0).astype(np.uint8)  # distance to the nearest zero = nearest visible pixel
    _, labels = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    visible_rows, visible_cols = np.nonzero(~transparent)
    lookup_r = np.zeros(labels.max() + 1, dtype=np.intp)
    lookup_c = np.zeros(labels.max() + 1, dtype=np.intp)
    visible_labels = labels[visible_rows, visible_cols]
    lookup_r[visible_labels], lookup_c[visible_labels] = visible_rows, visible_cols
    out = rgb.copy()
    t_rows, t_cols = np.nonzero(transparent)
    nearest = labels[t_rows, t_cols]
    out[t_rows, t_cols] = rgb[lookup_r[nearest], lookup_c[nearest]]
    return out


def load_input(image, config=None):
    """Decode a path / bytes / PIL image / array into a LoadedImage (one already decoded passes through).

    Raises:
        InvalidInputError, UnsupportedFormatError, InputTooLargeError: the input can't be used (utils raise them).
    """
    from utils.image_io import LoadedImage, load_image

    if isinstance(image, LoadedImage):
        return image
    try:
        return load_image(image, max_pixels=config.max_input_pixels if config is not None else None)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"File not found: {getattr(exc, 'filename', None) or image}.") from exc


def job_device(settings: EnhanceSettings, config):
    """The torch device the settings ask for (``auto``: the configured one)."""
    from utils.gpu import resolve_device

    try:
        return resolve_device(settings.device if settings.device != "auto" else config.device)
    except ValueError as exc:
        raise InvalidSettingsError(str(exc)) from None


# ------------------------------------------------------------------------------------------------ the network
def upscale_rgb(job: Job, images: list[np.ndarray], stage: tuple[float, float]) -> Run:
    """Run the network on HxWx3 float RGB images of one size (they share forward calls), with OOM → smaller tile →
    CPU, and bad half precision → fp32 retries."""
    from engine import upscaler
    from utils import allocator
    from utils.gpu import resolve_device as resolve

    settings, warnings = job.settings, []
    if job.config.cpu_memory_reuse:
        allocator.reuse_freed_memory()  # no mmap + page faults per layer (see utils.allocator)
    device = job_device(settings, job.config)
    precision = settings.precision
    if precision == "bf16" and device.type == "cpu":
        psnr = bf16_psnr(job.model_manager, job.model_name, settings.denoise_strength)
        if not psnr >= BF16_MIN_PSNR:  # NaN counts as a failure
            warnings.append(f"bf16 is not faithful enough for {job.model_name} ({psnr:.0f} dB against fp32, under "
                            f"{BF16_MIN_PSNR:.0f} dB): fp32 was used.")
            precision = "fp32"
    height, width = images[0].shape[:2]
    for attempt in range(1, 4):
        batch_size = planning.batch_size_for(device.type, settings)
        loaded = job.model_manager.load_model(job.model_name, device, precision,
                                              denoise_strength=settings.denoise_strength)
        spec = loaded.spec
        tile = settings.tile if settings.tile != "auto" else planning.choose_tile(
            spec, height, width, device=device, precision=loaded.precision, batch_size=batch_size,
            config=job.config).tile
        tile_progress = job.report.span(*stage)
        allocator.mark_busy()
        network_start = time.perf_counter()
        try:
            outs, stats = upscaler.upscale_images_ex(
                loaded.net, images, upscaler.TileOptions(
                    scale=spec.network_scale, tile=int(tile), overlap=planning.tile_overlap(spec, int(tile), settings),
                    batch_size=batch_size, device=device, dtype=loaded.dtype, pad_multiple=spec.pad_multiple),
                progress=lambda done, total: tile_progress(done, total, f"Upscaling with {job.model_name}: "
                                                                        f"tile {done}/{total}"))
        except OutOfMemoryError:
            if device.type != "cpu" and job.config.allow_cpu_fallback:
                warnings.append(f"{device} ran out of memory even at the smallest tile; finished on the CPU.")
                device, precision = resolve("cpu"), "fp32"
                continue
            raise
        if loaded.precision != "fp32" and attempt < 3 and any(
                upscaler.output_is_bad(out, src) for out, src in zip(outs, images)):
            warnings.append(f"{loaded.precision} produced an invalid image (NaN or black); it was redone in fp32.")
            precision = "fp32"
            continue
        allocator.mark_busy()
        return Run(images=outs, device=str(device), precision=loaded.precision, tile=int(stats.tile_used),
                   warnings=tuple(warnings), network_seconds=time.perf_counter() - network_start)
    raise OutOfMemoryError("The image could not be upscaled after three attempts; try a smaller tile.")


def run_passes(job: Job, rgb: np.ndarray, out_size: tuple[int, int], stage: tuple[float, float]) -> Run:
    """One network pass, or with ``second_pass`` beyond the native scale two, the first resized so the second
    lands exactly on ``out_size``."""
    spec = job.spec
    out_w, out_h = out_size
    if not (job.settings.second_pass and out_w / rgb.shape[1] > spec.scale + 1e-6):
        return upscale_rgb(job, [rgb], stage)
    lo, hi = stage
    mid = (lo + hi) / 2
    first = upscale_rgb(job, [rgb], (lo, mid))
    mid_w, mid_h = max(1, round(out_w / spec.scale)), max(1, round(out_h / spec.scale))
    second_in = np.ascontiguousarray(resize_float(first.images[0], mid_w, mid_h))
    second = upscale_rgb(job, [second_in], (mid, hi))
    return Run(second.images, second.device, second.precision, second.tile, first.warnings + second.warnings,
               first.network_seconds + second.network_seconds)


def upscale_alpha(job: Job, alpha: np.ndarray, out_size: tuple[int, int]) -> tuple[np.ndarray, tuple[str, ...]]:
    """The alpha channel at ``out_size``: by the model (as gray RGB), or resized when asked or when it is flat."""
    out_w, out_h = out_size
    if job.settings.alpha_mode == "bicubic" or float(alpha.min()) >= 1.0 or float(alpha.max()) <= 0.0:
        return resize_float(alpha[:, :, None], out_w, out_h)[:, :, 0], ()
    rgb = np.ascontiguousarray(np.repeat(alpha[:, :, None], 3, axis=2))
    run = run_passes(job, rgb, out_size, (0.6, 0.75))
    return resize_float(run.images[0], out_w, out_h).mean(axis=2), run.warnings


# ------------------------------------------------------------------------------------------------ faces, metrics
@dataclass(frozen=True)
class FaceOutcome:
    image: np.ndarray
    detected: int = 0
    restored: int = 0
    detector: str | None = None
    crops: tuple[np.ndarray, ...] = ()
    pairs: tuple = ()
    warnings: tuple[str, ...] = ()


def restore_faces(job: Job, rgb_in: np.ndarray, upscaled_rgb: np.ndarray, run: Run) -> FaceOutcome:
    """Detect faces on the input and paste restored ones onto the upscaled colour (8-bit colour images)."""
    from engine import face_enhancer

    settings = job.settings
    if not job.config.enable_face_enhancement:
        return FaceOutcome(upscaled_rgb, warnings=(
            "Face enhancement is turned off in the configuration (REALESRGAN_ENABLE_FACE_ENHANCEMENT).",))
    content_type = None
    if not settings.force_face_enhance:
        from engine.image_analysis import content_type as detect_content

        content_type, _confidence = detect_content(from_float(rgb_in, np.uint8))
    face_settings = face_enhancer.FaceSettings(
        model=settings.face_model, strength=settings.face_strength, only_center_face=settings.only_center_face,
        max_faces=job.config.max_faces, save_crops=settings.save_face_crops,
        force_on_anime=settings.force_face_enhance)
    result = face_enhancer.enhance_faces(
        from_float(rgb_in, np.uint8), from_float(upscaled_rgb, np.uint8), settings=face_settings,
        model_manager=job.model_manager, content_type=content_type,
        run=face_enhancer.FaceRun(device=run.device, precision=run.precision,
                                  allow_cpu_fallback=job.config.allow_cpu_fallback, allow_download=True))
    # Keep full precision when nothing was pasted.
    image = upscaled_rgb if result.faces_restored == 0 else as_float(np.ascontiguousarray(result.image[:, :, :3]))
    return FaceOutcome(image, result.faces_detected, result.faces_restored, result.detector, tuple(result.crops),
                       tuple(result.identity_pairs), tuple(result.warnings))


def measure(job: Job, original: np.ndarray, enhanced: np.ndarray, source: str | None, face_pairs: Sequence = ()
            ) -> dict:
    """File and quality metrics; LPIPS and identity only with weights already on this machine (never fetched
    here: ``models download lpips-alexnet arcface-ir-se50`` gets them), their networks from the model manager."""
    from engine.catalog import IDENTITY_MODEL, LPIPS_MODELS
    from engine.errors import ModelNotAvailableError
    from utils.metrics import calculate_image_metrics

    def network(name: str):
        try:
            return job.model_manager.local_network(name)
        except ModelNotAvailableError as exc:  # damaged weights: the metric is reported as not computed
            logger.warning("metric network %s unusable: %s", name, exc)
            return None

    extra = {}
    if job.settings.quality_metrics:
        extra = dict(lpips_network=network(LPIPS_MODELS[1]),  # the linear layers, on their AlexNet trunk
                     identity_network=network(IDENTITY_MODEL) if face_pairs else None,
                     face_pairs=list(face_pairs))
    return calculate_image_metrics(original, enhanced, original_bytes=None, enhanced_bytes=None,
                                   quality=job.settings.quality_metrics, **extra) | ({"source": source} if source else {})


# ------------------------------------------------------------------------------------------------ one image
def plan_job(settings: EnhanceSettings, width: int, height: int, model_manager, config, report: Reporter
             ) -> tuple[Job, tuple[int, int], tuple[str, ...]]:
    """Route the model and plan the output size; refuse an output over the configured limit."""
    model_name, note = planning.route_model(settings.model, settings.requested_scale(width, height),
                                            model_manager.is_available)
    spec = model_manager.spec(model_name)
    out_w, out_h, _scale = planning.plan_output_size(width, height, settings, spec.scale)
    if out_w * out_h > config.max_output_pixels:
        raise InputTooLargeError(
            f"The output would be {out_w}×{out_h} = {out_w * out_h / 1e6:.0f} MP, over the limit of "
            f"{config.max_output_pixels / 1e6:.0f} MP; choose a smaller scale or raise REALESRGAN_MAX_OUTPUT_PIXELS.")
    return Job(settings, model_name, model_manager, config, report), (out_w, out_h), ((note,) if note else ())


def enhance_image(image, settings: EnhanceSettings | None, model_manager, progress: ProgressFn | None = None, *,
                  config=None, cancel: threading.Event | None = None) -> EnhanceResult:
    """Enhance one image (see :func:`engine.processor.enhance_image_direct`, its public name)."""
    from config import Config

    config = config if config is not None else Config()
    report = Reporter(progress, cancel)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded_image = load_input(image, config)
    pixels = loaded_image.pixels
    height, width = pixels.shape[:2]
    timings["decode"] = time.perf_counter() - t0
    report(0.02, "Image decoded")
    job, out_size, warnings = plan_job(settings or EnhanceSettings(), width, height, model_manager, config, report)

    # Split colour and alpha; gray runs through the RGB network as three equal channels.
    channels = pixels.shape[2]
    floats = as_float(pixels)
    has_alpha = channels in (2, 4)
    colour = floats[:, :, : channels - 1] if has_alpha else floats
    alpha = floats[:, :, -1] if has_alpha else None
    rgb = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
    if alpha is not None:
        rgb = bleed_transparent_colours(np.ascontiguousarray(rgb), alpha)
    rgb = np.ascontiguousarray(rgb, dtype=np.float32)

    t1 = time.perf_counter()
    run = run_passes(job, rgb, out_size, (0.05, 0.75 if alpha is None or job.settings.alpha_mode == "bicubic" else 0.6))
    timings["inference"] = run.network_seconds
    timings["load"] = time.perf_counter() - t1 - run.network_seconds  # getting the network ready (a cache hit: ~0)
    warnings += run.warnings
    upscaled_rgb = resize_float(run.images[0], *out_size)

    out_alpha = None
    if alpha is not None:
        t2 = time.perf_counter()
        out_alpha, alpha_warnings = upscale_alpha(job, alpha, out_size)
        warnings += alpha_warnings
        timings["alpha"] = time.perf_counter() - t2

    faces = FaceOutcome(upscaled_rgb)
    if job.settings.face_enhance:
        t3 = time.perf_counter()
        report(0.8, "Restoring faces")
        faces = restore_faces(job, rgb, upscaled_rgb, run)
        warnings += faces.warnings
        timings["faces"] = time.perf_counter() - t3

    out_colour = faces.image
    if colour.shape[2] == 1:
        import cv2

        out_colour = cv2.cvtColor(faces.image, cv2.COLOR_RGB2GRAY)[:, :, None]
    parts = [out_colour] + ([out_alpha[:, :, None]] if out_alpha is not None else [])
    out_pixels = from_float(np.concatenate(parts, axis=2) if len(parts) > 1 else out_colour, pixels.dtype)

    report(0.92, "Measuring quality")
    t4 = time.perf_counter()
    metrics = measure(job, pixels, out_pixels, loaded_image.source_name, faces.pairs)
    warnings += tuple(w for w in metrics.get("warnings", ()) if w.startswith("identity similarity") and "below" in w)
    timings["metrics"] = time.perf_counter() - t4
    from utils.gpu import clear_cache

    clear_cache()
    report(1.0, "Done")
    keep = job.settings.keep_metadata
    return EnhanceResult(
        pixels=out_pixels, mode=loaded_image.mode, bit_depth=loaded_image.bit_depth, model=job.model_name,
        device=run.device, precision=run.precision, tile=run.tile, outscale=out_size[0] / width, timings=timings,
        warnings=tuple(dict.fromkeys(warnings)), metrics=metrics, input_size=(width, height),
        faces_detected=faces.detected, faces_restored=faces.restored, face_detector=faces.detector,
        face_crops=faces.crops, icc_profile=loaded_image.icc_profile if keep else None,
        exif=loaded_image.exif if keep else None, input_format=loaded_image.format, settings=job.settings)


# ------------------------------------------------------------------------------------------------ video frames
class FrameEnhancer:
    """A callable for :func:`engine.video.upscale_video`: a batch of HxWx3 uint8 RGB frames in, upscaled frames out.

    Frames go through the same engine as images (models, tiling, precision, OOM handling); the frames of one batch
    share forward calls. With face enhancement each frame also goes through the face path. Warnings are collected
    once each in :attr:`warnings`. ``settings`` is what changes the pixels (a video resume keys on it).
    """

    def __init__(self, model_manager, settings: EnhanceSettings, config=None):
        from config import Config

        self.settings = settings.replace(quality_metrics=False, keep_metadata=False, output_format="png")
        self.model_manager, self.config = model_manager, config if config is not None else Config()
        self.warnings: list[str] = []
        self._lock = threading.Lock()

    def _add(self, new: Sequence[str]) -> None:
        with self._lock:
            self.warnings.extend(note for note in new if note not in self.warnings)

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        if not frames:
            return []
        if self.settings.face_enhance or frames[0].ndim != 3 or frames[0].shape[2] != 3:
            results = [enhance_image(f, self.settings, self.model_manager, config=self.config) for f in frames]
            for r in results:
                self._add(r.warnings)
            return [r.pixels for r in results]
        height, width = frames[0].shape[:2]
        job, out_size, notes = plan_job(self.settings, width, height, self.model_manager, self.config, Reporter())
        run = upscale_rgb(job, [as_float(f) for f in frames], (0.0, 1.0))
        self._add(notes + run.warnings)
        return [from_float(resize_float(out, *out_size), np.uint8) for out in run.images]
