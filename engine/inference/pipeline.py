"""The one-image pipeline: decode → plan → network (colour, then alpha) → faces → exact size → metrics.

Everything one image needs is a frozen :class:`Job`; each step takes it and returns its output with its warnings
(nothing is appended to shared lists), so two threads may enhance at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine.catalog import ModelSpec
from engine.errors import CancelledError, InputTooLargeError, InvalidInputError, InvalidSettingsError, OutOfMemoryError
from engine.inference import planning, streaming
from engine.inference.memory_plan import JobShape
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
    memory: object = None  # its engine.inference.memory_plan.MemoryPlan

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
WriterFor = Callable[[tuple[int, int]], "streaming.BandWriter"]
"""``writer_for(src_size)``: a fresh band writer for network output of ``src_size`` = (width, height)."""


class _Collector:
    """A band writer that assembles whole float outputs at the network's scale (video frames, second pass)."""

    def __init__(self, count: int, size: tuple[int, int]):
        self.images = [np.empty((size[1], size[0], 3), dtype=np.float32) for _ in range(count)]

    def __call__(self, n: int, top: int, rows: np.ndarray) -> None:
        self.images[n][top:top + rows.shape[0]] = rows

    def close(self) -> None:
        pass


class _Health:
    """Watches bands for what makes a half-precision run unusable (see ``upscaler.output_is_bad``)."""

    def __init__(self, images: Sequence[np.ndarray], black: float = 1.0 / 255):
        self.black = black
        from engine.upscaler import unit_peak

        self.non_black = [unit_peak(image) > black for image in images]
        self.finite = [True] * len(images)
        self.peak = [0.0] * len(images)

    def see(self, n: int, rows: np.ndarray) -> None:
        self.finite[n] = self.finite[n] and bool(np.isfinite(rows).all())
        if rows.size:
            self.peak[n] = max(self.peak[n], float(np.max(rows)))

    def bad(self) -> bool:
        return any(not ok or (peak <= self.black and lit)
                   for ok, peak, lit in zip(self.finite, self.peak, self.non_black))


def upscale_rgb(job: Job, images: list[np.ndarray], stage: tuple[float, float],
                writer_for: WriterFor | None = None) -> Run:
    """Run the network on HxWx3 float RGB images of one size (they share forward calls), with OOM → smaller tile →
    CPU, and bad half precision → fp32 retries.

    With ``writer_for`` each band goes to a fresh writer per attempt (a retry rewrites every row) and
    :attr:`Run.images` is empty; without it the whole float outputs at the network's scale are returned."""
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
        net_size = (width * spec.network_scale, height * spec.network_scale)
        writer = writer_for(net_size) if writer_for is not None else _Collector(len(images), net_size)
        health = _Health(images)
        allocator.mark_busy()
        stream = upscaler.BandStream(
            loaded.net, images, upscaler.TileOptions(
                scale=spec.network_scale, tile=int(tile), overlap=planning.tile_overlap(spec, int(tile), settings),
                batch_size=batch_size, device=device, dtype=loaded.dtype, pad_multiple=spec.pad_multiple),
            progress=lambda done, total: tile_progress(done, total, f"Upscaling with {job.model_name}: "
                                                                    f"tile {done}/{total}"))
        network_start = time.perf_counter()
        try:
            for n, top, rows in stream:
                health.see(n, rows)
                writer(n, top, rows)
            writer.close()
        except OutOfMemoryError:
            if device.type != "cpu" and job.config.allow_cpu_fallback:
                warnings.append(f"{device} ran out of memory even at the smallest tile; finished on the CPU.")
                device, precision = resolve("cpu"), "fp32"
                continue
            raise
        if loaded.precision != "fp32" and attempt < 3 and health.bad():
            warnings.append(f"{loaded.precision} produced an invalid image (NaN or black); it was redone in fp32.")
            precision = "fp32"
            continue
        allocator.mark_busy()
        return Run(images=writer.images if isinstance(writer, _Collector) else [], device=str(device),
                   precision=loaded.precision, tile=int(stream.stats.tile_used), warnings=tuple(warnings),
                   network_seconds=time.perf_counter() - network_start)
    raise OutOfMemoryError("The image could not be upscaled after three attempts; try a smaller tile.")


def run_passes(job: Job, rgb: np.ndarray, out_size: tuple[int, int], stage: tuple[float, float],
               writer_for: WriterFor) -> Run:
    """One network pass into ``writer_for``'s writers, or with ``second_pass`` beyond the native scale two, the
    first resized so the second lands exactly on ``out_size``."""
    spec = job.spec
    out_w, out_h = out_size
    if not (job.settings.second_pass and out_w / rgb.shape[1] > spec.scale + 1e-6):
        return upscale_rgb(job, [rgb], stage, writer_for)
    lo, hi = stage
    mid = (lo + hi) / 2
    first = upscale_rgb(job, [rgb], (lo, mid))
    mid_w, mid_h = max(1, round(out_w / spec.scale)), max(1, round(out_h / spec.scale))
    second_in = np.ascontiguousarray(resize_float(first.images[0], mid_w, mid_h))
    del first.images[:]
    second = upscale_rgb(job, [second_in], (mid, hi), writer_for)
    return Run([], second.device, second.precision, second.tile, first.warnings + second.warnings,
               first.network_seconds + second.network_seconds)


def upscale_alpha(job: Job, alpha: np.ndarray, canvas: "streaming.OutputCanvas") -> tuple[str, ...]:
    """Write the alpha channel into ``canvas`` at its size: by the model (as gray RGB), or resized when asked or
    when it is flat. Returns the warnings."""
    if job.settings.alpha_mode == "bicubic" or float(alpha.min()) >= 1.0 or float(alpha.max()) <= 0.0:
        writer = canvas.alpha_writer((alpha.shape[1], alpha.shape[0]))
        writer(0, 0, alpha[:, :, None])
        writer.close()
        return ()
    rgb = np.ascontiguousarray(np.repeat(alpha[:, :, None], 3, axis=2))
    run = run_passes(job, rgb, (canvas.width, canvas.height), (0.6, 0.75), canvas.alpha_writer)
    return run.warnings


# ------------------------------------------------------------------------------------------------ faces, metrics
@dataclass(frozen=True)
class FaceOutcome:
    detected: int = 0
    restored: int = 0
    detector: str | None = None
    crops: tuple[np.ndarray, ...] = ()
    pairs: tuple = ()
    warnings: tuple[str, ...] = ()


def restore_faces(job: Job, pixels: np.ndarray, rgb_in: np.ndarray, canvas: "streaming.OutputCanvas",
                  run: Run, detection=None) -> FaceOutcome:
    """Detect faces on the decoded input ``pixels`` and paste the restored ones into the canvas in place: only the
    faces' regions are touched, no copy of the output is made (8-bit faces, scaled on a 16-bit output, gray on a
    gray one; alpha is kept). ``rgb_in`` is the network's source, for the content guess. ``detection``: the
    ``engine.face_detect.FaceDetection`` of ``pixels`` made already (the advisor's), restored as it is."""
    from engine import face_enhancer

    settings = job.settings
    if not job.config.enable_face_enhancement:
        return FaceOutcome(warnings=(
            "Face enhancement is turned off in the configuration (REALESRGAN_ENABLE_FACE_ENHANCEMENT).",))
    content_type = None
    if not settings.force_face_enhance:
        from engine.image_analysis import content_type as detect_content

        content_type, _confidence = detect_content(rgb_8bit(rgb_in))
    face_settings = face_enhancer.FaceSettings(
        model=settings.face_model, strength=settings.face_strength, only_center_face=settings.only_center_face,
        max_faces=job.config.max_faces, save_crops=settings.save_face_crops,
        force_on_anime=settings.force_face_enhance)
    result = face_enhancer.enhance_faces(
        pixels, canvas.pixels, settings=face_settings, model_manager=job.model_manager, content_type=content_type,
        run=face_enhancer.FaceRun(device=run.device, precision=run.precision,
                                  allow_cpu_fallback=job.config.allow_cpu_fallback, allow_download=True,
                                  in_place=True, detection=detection))
    return FaceOutcome(result.faces_detected, result.faces_restored, result.detector, tuple(result.crops),
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
                                   quality=job.settings.quality_metrics, **extra) | (
                                       {"source": source} if source else {})


# ------------------------------------------------------------------------------------------------ one image
def plan_job(settings: EnhanceSettings, size: tuple[int, int], model_manager, config, *, channels: int = 3,
             bit_depth: int = 8, input_format: str | None = None, streamed: bool = False
             ) -> tuple[Job, tuple[int, int], tuple[str, ...]]:
    """Route the model, plan the output size and the job's memory; refuse an output over the configured limit or
    a job whose memory plan cannot fit this machine (before any pixel buffer of the job is allocated).
    ``size``: the input's (width, height); ``input_format``: its file format (with the settings it decides the
    format the output is encoded in, whose memory is planned); ``streamed``: plan the output written into a file
    in strips (:func:`enhance_streamed`). The job reports to no one: give it the caller's ``Reporter`` with
    ``dataclasses.replace``.

    Raises:
        InputTooLargeError: the output is over ``max_output_pixels``.
        InvalidSettingsError: the output's format cannot hold its size (WebP, JPEG).
        JobTooLargeError: even with small tiles the planned peak passes the memory budget.
    """
    width, height = size
    model_name, note = planning.route_model(settings.model, settings.requested_scale(width, height),
                                            model_manager.is_available)
    settings, precision_note = _native_precision(settings, config)
    spec = model_manager.spec(model_name)
    out_w, out_h, _scale = planning.plan_output_size(width, height, settings, spec.scale)
    if out_w * out_h > config.max_output_pixels:
        raise InputTooLargeError(
            f"The output would be {out_w}×{out_h} = {out_w * out_h / 1e6:.0f} MP, over the limit of "
            f"{config.max_output_pixels / 1e6:.0f} MP; choose a smaller scale or raise REALESRGAN_MAX_OUTPUT_PIXELS.")
    from utils.image_io import auto_format_change, check_encodable, choose_output_format

    alpha = channels in (2, 4)
    kept = choose_output_format(settings.output_format, input_format, alpha, bit_depth)
    encoded_as = choose_output_format(settings.output_format, input_format, alpha, bit_depth, (out_w, out_h))
    change = auto_format_change(kept, (out_w, out_h), alpha) if encoded_as != kept else None
    format_note = f"{change}: it is saved as PNG." if change else None
    notes = tuple(n for n in (note, precision_note, format_note) if n)
    if not streamed:
        check_encodable(out_w, out_h, encoded_as)
    shape = JobShape(width, height, channels, bit_depth, out_w, out_h, encoded_as)
    resident = model_manager.resident_bytes(model_name, faces=settings.face_enhance)
    settings, memory = fit_memory(spec, settings, shape, config, streamed=streamed, resident_bytes=resident)
    logger.debug("memory plan for %dx%d -> %dx%d with %s: %s", width, height, out_w, out_h, model_name,
                 memory.describe())
    return Job(settings, model_name, model_manager, config, Reporter(), memory), (out_w, out_h), notes


NO_NATIVE_BF16 = ("This CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would run emulated, several times "
                  "slower than fp32: fp32 was used.")


def _native_precision(settings: EnhanceSettings, config) -> tuple[EnhanceSettings, str | None]:
    """bf16 asked of a CPU without native bf16 runs in fp32, and says so (the note)."""
    from utils.gpu import cpu_has_fast_bf16

    if settings.precision != "bf16" or job_device(settings, config).type != "cpu" or cpu_has_fast_bf16():
        return settings, None
    return settings.replace(precision="fp32"), NO_NATIVE_BF16


def _log_plan(job: Job, size: tuple[int, int], out_size: tuple[int, int]) -> None:
    """One line per image job (the header check before decoding and video frame batches log theirs at debug)."""
    logger.info("memory plan for %dx%d -> %dx%d with %s: %s", *size, *out_size, job.model_name, job.memory.describe())


def fit_memory(spec: ModelSpec, settings: EnhanceSettings, shape: JobShape, config, *, streamed: bool = False,
               resident_bytes: int = 0):
    """The settings the job runs with (a smaller tile when that makes it fit) and its memory plan
    (``resident_bytes``: see :func:`engine.inference.planning.plan_job_memory`).

    Raises:
        JobTooLargeError: it does not fit even with 64-pixel tiles.
    """
    from engine.errors import JobTooLargeError
    from engine.inference.memory_plan import gigabytes

    device = job_device(settings, config)
    memory = planning.plan_job_memory(spec, settings, shape, device=device, config=config, streamed=streamed,
                                      resident_bytes=resident_bytes)
    if memory.fits:
        return settings, memory
    small = settings.replace(tile=64)
    smaller = planning.plan_job_memory(spec, small, shape, device=device, config=config, streamed=streamed,
                                       resident_bytes=resident_bytes)
    if smaller.fits:
        return small, smaller
    where = (f"{gigabytes(smaller.vram_bytes)} of VRAM, {gigabytes(smaller.vram_budget_bytes)} free"
             if smaller.vram_bytes > smaller.vram_budget_bytes else
             f"{gigabytes(smaller.peak_bytes)} of RAM at its peak, {gigabytes(smaller.budget_bytes)} available")
    raise JobTooLargeError(
        f"This job ({shape.width}×{shape.height} → {shape.out_width}×{shape.out_height}) would need {where} "
        f"({smaller.describe()}). "
        f"Choose a smaller scale or a smaller image, turn off quality metrics, or free memory "
        f"(REALESRGAN_MEMORY_RESERVE_MB, REALESRGAN_MAX_JOB_MEMORY_MB set the budget).",
        actual=smaller.peak_bytes, limit=smaller.budget_bytes)


def network_input(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Split HxWxC pixels into the network's source and the HxW float alpha (None without alpha).

    Without alpha the source is ``pixels`` themselves (HxWx1 gray or HxWx3 RGB, 8 or 16 bits): the engine turns
    each tile into float RGB as it reads it (``engine.upscaler.BandStream``), so the image is never copied whole as
    floats. With alpha it is HxWx3 float32 RGB with the transparent pixels' colours bled."""
    channels = pixels.shape[2]
    if channels not in (2, 4):
        return pixels, None
    floats = as_float(pixels)
    colour, alpha = floats[:, :, : channels - 1], floats[:, :, -1]
    rgb = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
    return np.ascontiguousarray(bleed_transparent_colours(np.ascontiguousarray(rgb), alpha), dtype=np.float32), alpha


def rgb_8bit(source: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB of a network source (see :func:`network_input`)."""
    floats = source if source.dtype == np.float32 else as_float(source)
    return from_float(np.repeat(floats, 3, axis=2) if floats.shape[2] == 1 else floats, np.uint8)


def plan_input(source, settings: EnhanceSettings, model_manager, config, *, streamed: bool = False):
    """The memory plan of enhancing ``source`` (a path or the file's bytes) from its header alone, without decoding
    a pixel: the check to run before decoding a large upload (``streamed``: written into a TIFF file in strips,
    as :func:`enhance_streamed`).

    Returns:
        ``(model name, output size, MemoryPlan)``; the plan may use a smaller tile than ``settings`` asks when
        that makes it fit.

    Raises:
        InvalidInputError, UnsupportedFormatError, InputTooLargeError: the header is unusable or over the limits.
        JobTooLargeError: the job cannot fit this machine's memory budget.
    """
    from utils.validation import probe_image

    header = probe_image(source, max_pixels=config.max_input_pixels)
    mode = header.mode
    channels = {"L": 1, "LA": 2, "RGBA": 4, "PA": 4}.get(mode, 1 if mode.startswith("I;16") else 3)
    bit_depth = 16 if "16" in mode else 8
    job, out_size, _notes = plan_job(settings, (header.width, header.height), model_manager, config,
                                     channels=channels, bit_depth=bit_depth, input_format=header.format,
                                     streamed=streamed)
    return job.model_name, out_size, job.memory


@dataclass(frozen=True)
class PendingMetrics:
    """What measuring a result's quality needs besides its pixels, kept when :func:`enhance_image` defers it."""

    job: Job
    original: np.ndarray
    source_name: str | None
    face_pairs: tuple = ()


def _measured(pending: PendingMetrics, out_pixels: np.ndarray) -> tuple[dict, tuple[str, ...], float]:
    """(metrics, the warnings they raise for the user, seconds)."""
    started = time.perf_counter()
    metrics = measure(pending.job, pending.original, out_pixels, pending.source_name, pending.face_pairs)
    warnings = tuple(w for w in metrics.get("warnings", ()) if w.startswith("identity similarity") and "below" in w)
    return metrics, warnings, time.perf_counter() - started


def finish_metrics(result: EnhanceResult) -> EnhanceResult:
    """``result`` with its quality metrics, when :func:`enhance_image` deferred them (``defer_metrics``: the batch
    runner measures in its writer thread while the device runs the next image); else ``result`` itself."""
    pending = result.pending_metrics
    if pending is None:
        return result
    metrics, warnings, seconds = _measured(pending, result.pixels)
    return replace(result, metrics=metrics, warnings=tuple(dict.fromkeys(result.warnings + warnings)),
                   timings=result.timings | {"metrics": seconds}, pending_metrics=None)


def enhance_image(image, settings: EnhanceSettings | None, model_manager, progress: ProgressFn | None = None, *,
                  config=None, cancel: threading.Event | None = None, defer_metrics: bool = False,
                  detection=None) -> EnhanceResult:
    """Enhance one image (see :func:`engine.processor.enhance_image_direct`, its public name). ``defer_metrics``:
    return before the quality metrics, which :func:`finish_metrics` measures later (the input is kept until then).
    ``detection``: the advisor's ``engine.face_detect.FaceDetection`` of these pixels, restored without
    detecting them again (the count the advice showed is the count restored)."""
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
    job, out_size, warnings = plan_job(settings or EnhanceSettings(), (width, height), model_manager, config,
                                       channels=pixels.shape[2], bit_depth=loaded_image.bit_depth,
                                       input_format=loaded_image.format)
    job = replace(job, report=report)
    _log_plan(job, (width, height), out_size)

    channels = pixels.shape[2]
    rgb, alpha = network_input(pixels)

    t1 = time.perf_counter()
    canvas = streaming.OutputCanvas(out_size, channels, pixels.dtype)
    run = run_passes(job, rgb, out_size, (0.05, 0.75 if alpha is None or job.settings.alpha_mode == "bicubic" else 0.6),
                     canvas.colour_writer)
    timings["inference"] = run.network_seconds
    timings["load"] = time.perf_counter() - t1 - run.network_seconds  # getting the network ready (a cache hit: ~0)
    warnings += run.warnings

    if alpha is not None:
        t2 = time.perf_counter()
        warnings += upscale_alpha(job, alpha, canvas)
        timings["alpha"] = time.perf_counter() - t2

    faces = FaceOutcome()
    if job.settings.face_enhance:
        t3 = time.perf_counter()
        report(0.8, "Restoring faces")
        faces = restore_faces(job, pixels, rgb, canvas, run, detection)
        warnings += faces.warnings
        timings["faces"] = time.perf_counter() - t3
    out_pixels = canvas.pixels

    pending, metrics = PendingMetrics(job, pixels, loaded_image.source_name, tuple(faces.pairs)), {}
    if not defer_metrics:
        report(0.92, "Measuring quality")
        metrics, measured_warnings, timings["metrics"] = _measured(pending, out_pixels)
        warnings += measured_warnings
        pending = None
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
        exif=loaded_image.exif if keep else None, input_format=loaded_image.format, settings=job.settings,
        pending_metrics=pending)


def enhance_streamed(image, settings: EnhanceSettings | None, model_manager, path,
                     progress: ProgressFn | None = None, *, config=None, cancel: threading.Event | None = None):
    """Enhance one image straight into a TIFF or PNG file (by ``path``'s extension), band by band: the output is
    never whole in memory, so the peak does not grow with the output's size (for outputs too large for RAM).

    Gray and RGB inputs, 8 or 16 bits; quality metrics are not computed (they need the output). Images with alpha
    or with face restoration need the output in memory: use :func:`enhance_image`.

    Returns:
        ``(SavedImage, report)``: the file written and a JSON-safe summary (as :meth:`EnhanceResult.report`).

    Raises:
        InvalidSettingsError: alpha or face restoration asked of a streamed output, or a format that cannot be
            streamed (:data:`utils.image_io.STREAMED_FORMATS`).
        JobTooLargeError, InputTooLargeError, ...: as :func:`enhance_image`.
    """
    import queue

    from config import Config
    from utils.image_io import STREAMED_FORMATS, format_of_path, save_rows

    config = config if config is not None else Config()
    fmt = format_of_path(path)
    if fmt not in STREAMED_FORMATS:
        raise InvalidSettingsError(f"A streamed output is written as TIFF or PNG (a .tif, .tiff or .png file), "
                                   f"not {Path(path).suffix or 'a file without extension'}.")
    report = Reporter(progress, cancel)
    t0 = time.perf_counter()
    loaded_image = load_input(image, config)
    pixels = loaded_image.pixels
    height, width, channels = pixels.shape
    if channels in (2, 4) or (settings is not None and settings.face_enhance):
        raise InvalidSettingsError("A streamed output takes gray or RGB images without face restoration; "
                                   "enhance images with alpha or faces in memory.")
    settings = (settings or EnhanceSettings()).replace(quality_metrics=False)
    job, out_size, warnings = plan_job(settings, (width, height), model_manager, config, channels=channels,
                                       bit_depth=loaded_image.bit_depth, streamed=True)
    job = replace(job, report=report)
    _log_plan(job, (width, height), out_size)
    rgb, _alpha = network_input(pixels)
    blocks: queue.Queue = queue.Queue(maxsize=4)  # bounded: the network waits for the encoder
    stop, done = threading.Event(), object()
    outcome: dict = {}

    def put(item) -> None:
        while not stop.is_set():
            try:
                blocks.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise CancelledError("The file writer stopped.")

    class _Rows:
        def __init__(self, src_size):
            from utils.band_resize import BandResizer

            self.writer = streaming.BandWriter(BandResizer(src_size, out_size), self.put)
            self.sent = False

        def put(self, top: int, rows: np.ndarray) -> None:
            self.sent = True
            put(streaming.colour_rows(rows, channels, pixels.dtype))

        def __call__(self, n: int, top: int, rows: np.ndarray) -> None:
            self.writer(n, top, rows)

        def close(self) -> None:
            self.writer.close()

    started: list[_Rows] = []

    def writer_for(src_size):
        if started and started[-1].sent:
            raise OutOfMemoryError("The streamed output cannot be restarted after a retry; enhance it in memory "
                                   "or with a smaller tile.")
        started.append(_Rows(src_size))
        return started[-1]

    def produce() -> None:
        try:
            outcome["run"] = run_passes(job, rgb, out_size, (0.05, 0.95), writer_for)
            put(done)
        except BaseException as exc:  # handed to the writer's thread, which raises it
            outcome["error"] = exc
            with contextlib.suppress(CancelledError):
                put(done)

    def rows():
        while True:
            item = blocks.get()
            if item is done:
                if "error" in outcome:
                    raise outcome["error"]
                return
            yield item

    worker = threading.Thread(target=produce, name="enhance-streamed", daemon=True)
    worker.start()
    try:
        saved = save_rows(rows(), path, fmt, size=out_size, channels=channels, dtype=pixels.dtype,
                          icc_profile=loaded_image.icc_profile if job.settings.keep_metadata else None)
    finally:
        stop.set()
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    run = outcome["run"]
    report(1.0, "Done")
    summary = {"model": job.model_name, "device": run.device, "precision": run.precision, "tile": run.tile,
               "scale": round(out_size[0] / width, 4), "input_size": [width, height], "output_size": list(out_size),
               "seconds": round(time.perf_counter() - t0, 3), "warnings": list(dict.fromkeys(warnings + run.warnings)),
               "memory": job.memory.as_dict(), "output": str(saved.path)}
    return saved, summary


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
        job, out_size, notes = plan_job(self.settings, (width, height), self.model_manager, self.config)
        canvases = [streaming.OutputCanvas(out_size, 3, np.uint8) for _ in frames]
        run = upscale_rgb(job, list(frames), (0.0, 1.0), lambda src_size: streaming.FanOut(
            [canvas.colour_writer(src_size, image=n) for n, canvas in enumerate(canvases)]))
        self._add(notes + run.warnings)
        return [canvas.pixels for canvas in canvases]
