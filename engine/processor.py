"""Enhance one image (``enhance_image_direct``) or many (``process_batch``) with the tiled engine.

The flow of one image: decode (upright, 8/16-bit, gray/alpha kept) → plan the output size and pick the model →
run the network on the colour channels (and on alpha, or resize it) → faces → resize to the exact target →
metrics. Everything a request needs lives in local variables, so two threads may enhance at once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from engine.catalog import CATALOG, DEFAULT_FACE_MODEL, SR_MODELS, ModelSpec
from engine.errors import (CancelledError, EngineError, InputTooLargeError, InvalidInputError, InvalidSettingsError,
                           OutOfMemoryError, UnsupportedFormatError)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
PrecisionChoice = Literal["auto", "fp32", "fp16", "bf16"]
FormatChoice = Literal["auto", "png", "jpg", "webp", "tiff"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})
_MIN_SCALE, _MAX_SCALE = 1.0, 8.0


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class EnhanceSettings:
    """Everything that decides how an image is enhanced. Validated on construction.

    ``outscale`` None means the model's native scale. At most one of ``target_width``, ``target_height`` and
    ``max_side`` may be set; it overrides ``outscale``. ``tile`` 0 runs the whole image at once, ``"auto"`` picks
    the largest tile that fits the device's free memory.
    """

    model: str = "auto"
    outscale: float | None = None
    target_width: int | None = None
    target_height: int | None = None
    max_side: int | None = None
    tile: int | Literal["auto"] = "auto"
    tile_overlap: int | Literal["auto"] = "auto"
    denoise_strength: float = 0.5
    face_enhance: bool = False
    face_strength: float = 0.8
    face_model: str = DEFAULT_FACE_MODEL
    only_center_face: bool = False
    save_face_crops: bool = False
    force_face_enhance: bool = False
    precision: PrecisionChoice = "auto"
    device: str = "auto"
    output_format: FormatChoice = "auto"
    quality: int = 95
    alpha_mode: Literal["model", "bicubic"] = "model"
    keep_metadata: bool = True
    second_pass: bool = False
    batch_size: int = 4
    quality_metrics: bool = True

    def __post_init__(self) -> None:
        if self.model != "auto" and self.model not in SR_MODELS:
            raise InvalidSettingsError(f"Unknown model {self.model!r}; choose auto or one of: {', '.join(SR_MODELS)}.")
        if self.outscale is not None and not (_MIN_SCALE <= float(self.outscale) <= _MAX_SCALE):
            raise InvalidSettingsError(f"Scale must be between 1 and 8, got {self.outscale}.")
        targets = [v for v in (self.target_width, self.target_height, self.max_side) if v is not None]
        if len(targets) > 1:
            raise InvalidSettingsError("Give only one of target width, target height and max side.")
        if any(int(v) < 1 for v in targets):
            raise InvalidSettingsError("Target width, height and max side must be positive pixel counts.")
        if self.tile != "auto" and (not isinstance(self.tile, int) or (self.tile != 0 and not 16 <= self.tile <= 8192)):
            raise InvalidSettingsError(f"Tile must be auto, 0 (no tiling) or 16..8192 pixels, got {self.tile!r}.")
        overlap = self.tile_overlap
        if overlap != "auto" and (not isinstance(overlap, int) or not 0 <= overlap <= 256):
            raise InvalidSettingsError(f"Tile overlap must be auto or 0..256 pixels, got {self.tile_overlap!r}.")
        for name in ("denoise_strength", "face_strength"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise InvalidSettingsError(f"{name.replace('_', ' ').capitalize()} must be between 0 and 1, "
                                           f"got {value}.")
        if self.face_model not in CATALOG or CATALOG[self.face_model].kind != "face":
            raise InvalidSettingsError(f"Unknown face model {self.face_model!r}.")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise InvalidSettingsError(f"Precision must be auto, fp32, fp16 or bf16, got {self.precision!r}.")
        if self.output_format not in ("auto", "png", "jpg", "webp", "tiff"):
            raise InvalidSettingsError(f"Output format must be auto, png, jpg, webp or tiff, got "
                                       f"{self.output_format!r}.")
        if not 1 <= int(self.quality) <= 100:
            raise InvalidSettingsError(f"Quality must be 1..100, got {self.quality}.")
        if self.alpha_mode not in ("model", "bicubic"):
            raise InvalidSettingsError(f"Alpha mode must be model or bicubic, got {self.alpha_mode!r}.")
        if not 1 <= self.batch_size <= 64:
            raise InvalidSettingsError(f"Batch size must be 1..64, got {self.batch_size}.")
        from config import _check_device  # one device-name rule for config and settings

        try:
            _check_device(self.device)
        except ValueError as exc:
            raise InvalidSettingsError(str(exc)) from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "EnhanceSettings":
        """Build from a dict (presets, widgets, JSON); unknown keys are ignored, ``scale`` means ``outscale``."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in values.items() if k in names}
        if "outscale" not in data and values.get("scale") is not None:
            data["outscale"] = values["scale"]
        if isinstance(data.get("tile"), str) and data["tile"] != "auto":
            data["tile"] = int(data["tile"])
        if isinstance(data.get("tile"), float):
            data["tile"] = int(data["tile"])
        if isinstance(data.get("tile_overlap"), (str, float)) and data["tile_overlap"] != "auto":
            data["tile_overlap"] = int(data["tile_overlap"])
        return cls(**data)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "EnhanceSettings":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EnhanceResult:
    """The enhanced image and an honest account of how it was made.

    ``pixels`` has the input's channel layout (Gray/GrayA/RGB/RGBA) and bit depth (uint8 or uint16).
    """

    pixels: np.ndarray
    mode: str
    bit_depth: int
    model: str
    device: str
    precision: str
    tile: int
    outscale: float
    timings: dict[str, float]
    warnings: tuple[str, ...]
    metrics: dict
    input_size: tuple[int, int]
    faces_detected: int = 0
    faces_restored: int = 0
    face_detector: str | None = None
    face_crops: tuple[np.ndarray, ...] = ()
    icc_profile: bytes | None = None
    exif: bytes | None = None
    input_format: str | None = None
    settings: EnhanceSettings = field(default_factory=EnhanceSettings)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def report(self) -> dict:
        """JSON-safe summary (no pixels)."""
        return {
            "model": self.model, "device": self.device, "precision": self.precision, "tile": self.tile,
            "scale": round(self.outscale, 4), "input_size": list(self.input_size), "output_size": list(self.size),
            "seconds": round(sum(self.timings.values()), 3), "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "warnings": list(self.warnings), "metrics": self.metrics, "faces_detected": self.faces_detected,
            "faces_restored": self.faces_restored, "detector": self.face_detector,
        }


# ------------------------------------------------------------------------------------------------ pure planning
def plan_output_size(width: int, height: int, settings: EnhanceSettings, native_scale: int) -> tuple[int, int, float]:
    """Output (width, height, effective scale) for an input size. Pure.

    Raises:
        InvalidSettingsError: the target implies a scale outside 1..8.
    """
    if settings.target_width is not None:
        scale = settings.target_width / width
    elif settings.target_height is not None:
        scale = settings.target_height / height
    elif settings.max_side is not None:
        scale = settings.max_side / max(width, height)
    else:
        scale = float(settings.outscale) if settings.outscale is not None else float(native_scale)
    if not _MIN_SCALE - 1e-9 <= scale <= _MAX_SCALE + 1e-9:
        raise InvalidSettingsError(f"The requested size means a scale of {scale:.2f}×; it must be between 1× and 8×.")
    out_w = settings.target_width or max(1, int(round(width * scale)))
    out_h = settings.target_height or max(1, int(round(height * scale)))
    if settings.target_width is not None:
        out_h = max(1, int(round(height * scale)))
    if settings.target_height is not None:
        out_w = max(1, int(round(width * scale)))
    return out_w, out_h, scale


def route_model(requested: str, outscale: float | None, available: Callable[[str], bool]) -> tuple[str, str | None]:
    """Pick the network for ``requested`` ("auto" routes by scale). Returns (name, note for the user or None). Pure."""
    if requested != "auto":
        return requested, None
    if outscale is not None and outscale <= 2.0:
        if available("RealESRGAN_x2plus"):
            return "RealESRGAN_x2plus", None
        return "RealESRGAN_x4plus", ("The ×2 model is not downloaded, so the ×4 model ran and was resized to ×2 "
                                     "(python main.py models download RealESRGAN_x2plus for the native ×2 model).")
    return "RealESRGAN_x4plus", None


def pad_multiple_for(spec: ModelSpec) -> int:
    """RRDBNet below ×4 pixel-unshuffles its input: ×2 needs even sizes, ×1 multiples of 4."""
    if spec.arch == "RRDBNet":
        return {1: 4, 2: 2}.get(int(spec.arch_params["scale"]), 1)
    return 1


def overlap_for(spec: ModelSpec, tile: int) -> int:
    """The tile overlap ("auto") for a model and tile: context enough to hide seams at ≤ ~30% extra compute.

    RRDBNet's receptive field is wide (a tile edge still shows 10-20 px in), so it gets a quarter of the tile,
    16..64 px; the compact SRVGG models settle within about 16 px. Pure.
    """
    if spec.arch == "RRDBNet":
        return int(min(64, max(16, tile // 4)))
    return int(min(32, max(8, tile // 8)))


# Measured on a 2-core AVX-512 CPU with glibc's default allocator: the compact model runs at ~3.1 µs per input
# pixel on inputs up to ~256 px but ~6.8 µs on 640×480 whole, because each layer's activations (> 32 MB) are
# mmapped and page-faulted anew; 256-px tiles keep them small (3.8 µs). With utils.allocator's reuse of freed
# memory the whole image runs at ~3.2 µs and tiles only add overlap, so this applies only without it.
# RRDBNet's sweet spot (~130 px) is too small for the overlap it needs, so it runs whole either way.
_CPU_SMALL_TILES = {"SRVGGNetCompact": 256}


def cpu_cache_tile(spec: ModelSpec, height: int, width: int, memory_tile: int, memory_reused: bool = False) -> int:
    """On a CPU, the tile that keeps a model's activations small (when that is faster: only where freed memory is
    not reused, see above), capped by the tile that fits memory (``memory_tile``, 0 = anything fits). Pure."""
    cache_tile = None if memory_reused else _CPU_SMALL_TILES.get(spec.arch)
    if cache_tile is None or max(height, width) <= cache_tile * 3 // 2:
        return memory_tile
    return min(cache_tile, memory_tile) if memory_tile else cache_tile


def network_scale(spec: ModelSpec) -> int:
    params = spec.arch_params
    return int(params.get("scale", params.get("upscale", spec.scale)))


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


# ------------------------------------------------------------------------------------------------ the engine run
@dataclass(frozen=True)
class _Run:
    """What one network run used (returned by the inner loop, never stored on shared objects)."""

    image: np.ndarray | list[np.ndarray]
    model: str
    device: str
    precision: str
    tile: int


BF16_MIN_PSNR = 40.0
_bf16_verdicts: dict[tuple[str, float | None], float] = {}
_bf16_lock = threading.Lock()


def bf16_psnr(model_manager, model_name: str, denoise_strength: float | None = None) -> float:
    """PSNR (dB) of the model's bf16 output against fp32 on a fixed probe image, measured once per model.

    bf16 on the CPU is an opt-in fast mode that is kept only where it stays faithful (see BF16_MIN_PSNR).
    """
    from engine import upscaler

    key = (model_name, denoise_strength)
    with _bf16_lock:
        if key in _bf16_verdicts:
            return _bf16_verdicts[key]
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:40, 0:40] / 40.0
        probe = np.stack([yy, xx, (yy + xx) / 2], axis=2) * 0.8 + rng.random((40, 40, 3)) * 0.2
        probe = np.ascontiguousarray(probe, dtype=np.float32)
        outputs = []
        for precision in ("fp32", "bf16"):
            loaded = model_manager.load_model(model_name, "cpu", precision, denoise_strength=denoise_strength)
            out, _ = upscaler.upscale_image_ex(loaded.net, probe, scale=network_scale(loaded.spec), tile=0,
                                               batch_size=1, dtype=loaded.dtype,
                                               pad_multiple=pad_multiple_for(loaded.spec))
            outputs.append(out)
        mse = float(np.mean((outputs[0] - outputs[1]) ** 2))
        psnr = 100.0 if mse == 0 else float(10 * np.log10(1.0 / mse))
        _bf16_verdicts[key] = psnr
        logger.info("bf16 check for %s: %.1f dB against fp32", model_name, psnr)
        return psnr


def _as_float(pixels: np.ndarray) -> np.ndarray:
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    return pixels.astype(np.float32) / scale


def _from_float(image: np.ndarray, dtype) -> np.ndarray:
    top = 65535.0 if dtype == np.uint16 else 255.0
    return np.clip(np.round(image * top), 0, top).astype(dtype)


def _convert_validation_error(exc: ValueError) -> EngineError:
    from utils import validation

    if isinstance(exc, validation.InvalidSetting):
        return InvalidSettingsError(str(exc))
    if isinstance(exc, validation.TooLarge):
        return InputTooLargeError(str(exc))
    if isinstance(exc, validation.UnsupportedFormat):
        return UnsupportedFormatError(str(exc))
    return InvalidInputError(str(exc))


def load_input(image, config=None):
    """Decode a path / bytes / PIL image / array into a LoadedImage, with engine errors for bad input."""
    from utils import validation
    from utils.image_io import load_image

    max_pixels = config.max_input_pixels if config is not None else None
    try:
        return load_image(image, max_pixels=max_pixels)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"File not found: {getattr(exc, 'filename', None) or image}.") from exc
    except validation.ValidationError as exc:
        raise _convert_validation_error(exc) from exc


class _Cancellable:
    """Wraps the user's progress callback; raises CancelledError at the next step once ``cancel`` is set."""

    def __init__(self, progress: ProgressFn | None, cancel: threading.Event | None):
        self.progress, self.cancel = progress, cancel

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("Cancelled by the user.")

    def __call__(self, fraction: float, message: str) -> None:
        self.check()
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), message)


def _auto_tile(spec: ModelSpec, height: int, width: int, device, dtype, batch_size: int, config) -> int:
    """The tile (stride) for ``tile=auto``: what fits the device's free memory, and on a CPU what stays in cache."""
    from engine import upscaler
    from utils.gpu import free_memory_bytes

    reserve = config.gpu_memory_reserve if config is not None else 0.1
    side = upscaler.auto_tile(spec.arch, height, width, device=device, dtype=dtype,
                              free_bytes=int(free_memory_bytes(device) * (1 - reserve)), scale=network_scale(spec),
                              batch_size=batch_size)
    tile = max(side - overlap_for(spec, side), 16) if side else 0  # a tile reads its stride + the overlap
    if device.type != "cpu":
        return tile
    from utils.allocator import reusing_freed_memory

    return cpu_cache_tile(spec, height, width, tile, memory_reused=reusing_freed_memory())


def _upscale_rgb(rgb: np.ndarray | list[np.ndarray], *, model_name: str, settings: EnhanceSettings, model_manager,
                 config, report: _Cancellable, warnings: list[str], stage: tuple[float, float]) -> _Run:
    """Run the network on HxWx3 float RGB image(s) of one size, with OOM → smaller tile → CPU, and bad half
    precision → fp32 retries. A list (video frames) shares forward calls; ``_Run.image`` is then a list too."""
    from engine import upscaler
    from utils import allocator
    from utils.gpu import resolve_device

    images = rgb if isinstance(rgb, list) else [rgb]
    if config is None or config.cpu_memory_reuse:
        allocator.reuse_freed_memory()  # no mmap + page faults per layer (see utils.allocator)
    try:
        device = resolve_device(settings.device if settings.device != "auto" else (config.device if config else "auto"))
    except ValueError as exc:
        raise InvalidSettingsError(str(exc)) from None
    precision = settings.precision
    if precision == "bf16" and device.type == "cpu":
        psnr = bf16_psnr(model_manager, model_name, settings.denoise_strength)
        if not psnr >= BF16_MIN_PSNR:  # NaN counts as a failure
            warnings.append(f"bf16 is not faithful enough for {model_name} ({psnr:.0f} dB against fp32, under "
                            f"{BF16_MIN_PSNR:.0f} dB): fp32 was used.")
            precision = "fp32"
    attempts = 0
    while True:
        attempts += 1
        # On a CPU one tile at a time stays in cache and runs faster than a batch; GPUs want batches.
        batch_size = 1 if device.type == "cpu" else settings.batch_size
        loaded = model_manager.load_model(model_name, device, precision,
                                          denoise_strength=settings.denoise_strength)
        spec = loaded.spec
        height, width = images[0].shape[:2]
        tile = settings.tile if settings.tile != "auto" else _auto_tile(spec, height, width, device, loaded.dtype,
                                                                        batch_size, config)
        lo, hi = stage

        def tile_progress(done: int, total: int) -> None:
            report(lo + (hi - lo) * done / max(total, 1), f"Upscaling with {model_name}: tile {done}/{total}")

        allocator.mark_busy()
        try:
            outs, stats = upscaler.upscale_images_ex(
                loaded.net, images, scale=network_scale(spec), tile=int(tile),
                overlap=overlap_for(spec, int(tile)) if settings.tile_overlap == "auto" else settings.tile_overlap,
                batch_size=batch_size, device=device, dtype=loaded.dtype,
                pad_multiple=pad_multiple_for(spec), progress=tile_progress)
        except OutOfMemoryError:
            if device.type != "cpu" and (config is None or config.allow_cpu_fallback):
                warnings.append(f"{device} ran out of memory even at the smallest tile; finished on the CPU.")
                device, precision = resolve_device("cpu"), "fp32"
                continue
            raise
        if loaded.precision != "fp32" and attempts < 3 and any(
                upscaler.output_is_bad(out, src) for out, src in zip(outs, images)):
            warnings.append(f"{loaded.precision} produced an invalid image (NaN or black); it was redone in fp32.")
            precision = "fp32"
            continue
        allocator.mark_busy()
        return _Run(image=outs if isinstance(rgb, list) else outs[0], model=model_name, device=str(device),
                    precision=loaded.precision, tile=int(stats.tile_used))


def enhance_image_direct(image, settings: EnhanceSettings | None, model_manager, progress: ProgressFn | None = None,
                         *, config=None, cancel: threading.Event | None = None) -> EnhanceResult:
    """Enhance one image.

    Args:
        image: a path, bytes, PIL image or ``HxW[xC]`` uint8/uint16 array (RGB order).
        settings: an :class:`EnhanceSettings` (None for defaults).
        model_manager: the app's :class:`~engine.model_manager.ModelManager`.
        progress: ``progress(fraction in [0, 1], message)``.
        config: the app :class:`~config.Config` (limits, device, fallbacks); None for defaults.
        cancel: set it from another thread to stop at the next tile (raises CancelledError).

    Returns:
        An :class:`EnhanceResult` whose pixels keep the input's channels and bit depth.

    Raises:
        InvalidInputError, UnsupportedFormatError, InputTooLargeError: bad input.
        InvalidSettingsError: settings that cannot apply to this image.
        ModelNotAvailableError: the model's weights can't be had (the message says how to get them).
        OutOfMemoryError: even the smallest tile does not fit and CPU fallback is off.
        CancelledError: ``cancel`` was set.
    """
    settings = settings or EnhanceSettings()
    report = _Cancellable(progress, cancel)
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t0 = time.perf_counter()
    loaded_image = load_input(image, config)
    pixels = loaded_image.pixels
    height, width = pixels.shape[:2]
    timings["decode"] = time.perf_counter() - t0
    report(0.02, "Image decoded")

    available = model_manager.is_available
    model_name, note = route_model(settings.model, _requested_scale(settings, width, height), available)
    if note:
        warnings.append(note)
    spec = model_manager.spec(model_name)
    out_w, out_h, outscale = plan_output_size(width, height, settings, spec.scale)
    max_out = config.max_output_pixels if config is not None else None
    if max_out is not None and out_w * out_h > max_out:
        raise InputTooLargeError(
            f"The output would be {out_w}×{out_h} = {out_w * out_h / 1e6:.0f} MP, over the limit of "
            f"{max_out / 1e6:.0f} MP; choose a smaller scale or raise REALESRGAN_MAX_OUTPUT_PIXELS.")

    # Split colour and alpha; gray runs through the RGB network as three equal channels.
    channels = pixels.shape[2]
    as_float = _as_float(pixels)
    has_alpha = channels in (2, 4)
    colour = as_float[:, :, : channels - 1] if has_alpha else as_float
    alpha = as_float[:, :, -1] if has_alpha else None
    rgb = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
    if alpha is not None:
        rgb = bleed_transparent_colours(np.ascontiguousarray(rgb), alpha)
    rgb = np.ascontiguousarray(rgb, dtype=np.float32)

    passes = 2 if settings.second_pass and outscale > spec.scale + 1e-6 else 1
    t1 = time.perf_counter()
    run = _run_passes(rgb, passes, out_w, out_h, spec, model_name, settings, model_manager, config, report, warnings,
                      stage=(0.05, 0.75 if alpha is None or settings.alpha_mode == "bicubic" else 0.6))
    timings["inference"] = time.perf_counter() - t1
    upscaled_rgb = resize_float(run.image, out_w, out_h)

    out_alpha = None
    if alpha is not None:
        t2 = time.perf_counter()
        out_alpha = _upscale_alpha(alpha, out_w, out_h, spec, model_name, passes, settings, model_manager, config,
                                   report, warnings)
        timings["alpha"] = time.perf_counter() - t2

    # Faces (8-bit colour images), pasted onto the upscaled colour at the output scale.
    faces_detected = faces_restored = 0
    face_detector = None
    crops: tuple[np.ndarray, ...] = ()
    face_pairs: tuple = ()
    if settings.face_enhance:
        t3 = time.perf_counter()
        report(0.8, "Restoring faces")
        upscaled_rgb, face_info = _enhance_faces(rgb, upscaled_rgb, settings, model_manager, config, run, warnings,
                                                 is_gray=colour.shape[2] == 1)
        faces_detected, faces_restored, face_detector, crops, face_pairs = face_info
        timings["faces"] = time.perf_counter() - t3

    out_colour = upscaled_rgb
    if colour.shape[2] == 1:
        import cv2

        out_colour = cv2.cvtColor(upscaled_rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    parts = [out_colour] + ([out_alpha[:, :, None]] if out_alpha is not None else [])
    out_pixels = _from_float(np.concatenate(parts, axis=2) if len(parts) > 1 else out_colour, pixels.dtype)

    report(0.92, "Measuring quality")
    t4 = time.perf_counter()
    metrics = _metrics(pixels, out_pixels, loaded_image, settings, model_manager, face_pairs)
    warnings.extend(w for w in metrics.get("warnings", ()) if w.startswith("identity similarity") and "below" in w)
    timings["metrics"] = time.perf_counter() - t4
    from utils.gpu import clear_cache

    clear_cache()
    report(1.0, "Done")
    return EnhanceResult(
        pixels=out_pixels, mode=loaded_image.mode, bit_depth=loaded_image.bit_depth, model=run.model,
        device=run.device, precision=run.precision, tile=run.tile, outscale=out_w / width, timings=timings,
        warnings=tuple(dict.fromkeys(warnings)), metrics=metrics, input_size=(width, height),
        faces_detected=faces_detected, faces_restored=faces_restored, face_detector=face_detector, face_crops=crops,
        icc_profile=loaded_image.icc_profile if settings.keep_metadata else None,
        exif=loaded_image.exif if settings.keep_metadata else None, input_format=loaded_image.format,
        settings=settings)


def _requested_scale(settings: EnhanceSettings, width: int, height: int) -> float | None:
    if settings.target_width is not None:
        return settings.target_width / width
    if settings.target_height is not None:
        return settings.target_height / height
    if settings.max_side is not None:
        return settings.max_side / max(width, height)
    return settings.outscale


def _run_passes(rgb, passes, out_w, out_h, spec, model_name, settings, model_manager, config, report, warnings,
                stage) -> _Run:
    lo, hi = stage
    if passes == 1:
        return _upscale_rgb(rgb, model_name=model_name, settings=settings, model_manager=model_manager, config=config,
                            report=report, warnings=warnings, stage=stage)
    # Beyond the native scale: a first pass, resized so the second pass lands exactly on the target.
    mid = (lo + hi) / 2
    first = _upscale_rgb(rgb, model_name=model_name, settings=settings, model_manager=model_manager, config=config,
                         report=report, warnings=warnings, stage=(lo, mid))
    mid_w, mid_h = max(1, round(out_w / spec.scale)), max(1, round(out_h / spec.scale))
    second_in = np.ascontiguousarray(resize_float(first.image, mid_w, mid_h))
    return _upscale_rgb(second_in, model_name=model_name, settings=settings, model_manager=model_manager,
                        config=config, report=report, warnings=warnings, stage=(mid, hi))


def _upscale_alpha(alpha, out_w, out_h, spec, model_name, passes, settings, model_manager, config, report,
                   warnings) -> np.ndarray:
    if settings.alpha_mode == "bicubic" or float(alpha.min()) >= 1.0 or float(alpha.max()) <= 0.0:
        return resize_float(alpha[:, :, None], out_w, out_h)[:, :, 0]
    rgb = np.ascontiguousarray(np.repeat(alpha[:, :, None], 3, axis=2))
    run = _run_passes(rgb, passes, out_w, out_h, spec, model_name, settings, model_manager, config, report, warnings,
                      stage=(0.6, 0.75))
    return resize_float(run.image, out_w, out_h).mean(axis=2)


def _enhance_faces(rgb_in, upscaled_rgb, settings, model_manager, config, run: _Run, warnings, is_gray: bool):
    from engine import face_enhancer

    if config is not None and not config.enable_face_enhancement:
        warnings.append("Face enhancement is turned off in the configuration (REALESRGAN_ENABLE_FACE_ENHANCEMENT).")
        return upscaled_rgb, (0, 0, None, (), ())
    content_type = None
    if not settings.force_face_enhance:
        from engine.image_analysis import content_type as detect_content

        content_type, _confidence = detect_content(_from_float(rgb_in, np.uint8))
    face_settings = face_enhancer.FaceSettings(
        model=settings.face_model, strength=settings.face_strength, only_center_face=settings.only_center_face,
        max_faces=config.max_faces if config is not None else 20, save_crops=settings.save_face_crops,
        force_on_anime=settings.force_face_enhance)
    result = face_enhancer.enhance_faces(
        _from_float(rgb_in, np.uint8), _from_float(upscaled_rgb, np.uint8), settings=face_settings,
        model_manager=model_manager, device=run.device, precision=run.precision, content_type=content_type,
        allow_cpu_fallback=config.allow_cpu_fallback if config is not None else True, allow_download=True)
    warnings.extend(result.warnings)
    if result.faces_restored == 0:
        out = upscaled_rgb  # keep full precision when nothing was pasted
    else:
        out = _as_float(np.ascontiguousarray(result.image[:, :, :3]))
    return out, (result.faces_detected, result.faces_restored, result.detector, tuple(result.crops),
                 result.identity_pairs)


def _metrics(original: np.ndarray, enhanced: np.ndarray, loaded_image, settings: EnhanceSettings,
             model_manager, face_pairs: Sequence = ()) -> dict:
    """File and quality metrics; LPIPS and identity only with weights already on this machine (never fetched
    here: ``models download lpips-alexnet arcface-ir-se50`` gets them), their networks from the model manager."""
    from engine.catalog import IDENTITY_MODEL, LPIPS_MODELS
    from engine.errors import ModelNotAvailableError
    from utils.metrics import calculate_image_metrics

    def network(name: str):
        try:
            return model_manager.local_network(name)
        except ModelNotAvailableError as exc:  # damaged weights: the metric is reported as not computed
            logger.warning("metric network %s unusable: %s", name, exc)
            return None

    source = loaded_image.source_name
    extra: dict = {}
    if settings.quality_metrics:
        extra = dict(lpips_network=network(LPIPS_MODELS[1]),  # the linear layers, on their AlexNet trunk
                     identity_network=network(IDENTITY_MODEL) if face_pairs else None,
                     face_pairs=list(face_pairs))
    return calculate_image_metrics(original, enhanced, original_bytes=None, enhanced_bytes=None,
                                   quality=settings.quality_metrics, **extra) | ({"source": source} if source else {})


# ------------------------------------------------------------------------------------------------ saving
def output_format_for(result: EnhanceResult, requested: str | None = None) -> str:
    from utils.image_io import choose_output_format

    return choose_output_format(requested or result.settings.output_format, result.input_format,
                                result.mode in ("LA", "RGBA"), result.bit_depth)


def save_result(result: EnhanceResult, path: str | Path, *, original_bytes: int | None = None,
                output_format: str | None = None) -> tuple[Path, dict, list[str]]:
    """Write the result atomically; returns (path, updated metrics with file sizes, warnings from the format)."""
    from utils.image_io import save_image
    from utils.metrics import file_metrics

    path = Path(path)
    fmt = output_format or (output_format_for(result) if result.settings.output_format == "auto"
                            else result.settings.output_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = save_image(result.pixels, path, format=fmt, quality=result.settings.quality,
                       icc_profile=result.icc_profile, exif=result.exif)
    notes = [w[:1].upper() + w[1:] + "." for w in saved.warnings]
    metrics = dict(result.metrics)
    metrics.update(file_metrics((result.input_size[0], result.input_size[1]), result.size, original_bytes,
                                saved.bytes_written))
    if result.settings.save_face_crops and result.face_crops:
        from engine.face_enhancer import save_face_crops

        crops = save_face_crops(result.face_crops, path)
        notes.append(f"Saved {len(crops)} face crop(s) next to the output ({crops[0].name}, ...).")
    return saved.path, metrics, notes


# ------------------------------------------------------------------------------------------------ batches
@dataclass(frozen=True)
class BatchItem:
    input: Path
    output: Path | None
    ok: bool
    skipped: bool = False
    error: str | None = None
    report: dict | None = None


@dataclass(frozen=True)
class BatchReport:
    items: tuple[BatchItem, ...]

    @property
    def successes(self) -> int:
        return sum(1 for i in self.items if i.ok and not i.skipped)

    @property
    def failures(self) -> tuple[BatchItem, ...]:
        return tuple(i for i in self.items if not i.ok)

    @property
    def skipped(self) -> int:
        return sum(1 for i in self.items if i.skipped)

    def summary(self) -> str:
        text = f"{self.successes} successful, {len(self.failures)} failed"
        if self.skipped:
            text += f", {self.skipped} skipped (output exists)"
        return text


def collect_inputs(inputs: Iterable[str | Path], recursive: bool = False) -> list[tuple[Path, Path]]:
    """Expand files and folders into (image path, path relative to its root) pairs, skipping non-images.

    System files (Thumbs.db, .DS_Store, hidden files) and files whose extension is not an image are left out.
    """
    found: list[tuple[Path, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            for item in sorted(walker):
                if item.is_file() and _is_image_name(item) and not _hidden(item.relative_to(path)):
                    found.append((item, item.relative_to(path)))
        else:
            found.append((path, Path(path.name)))
    return found


def output_path_for(source: Path, target: Path) -> Path:
    """``target``, unless it is the source file itself: then ``<stem>_enhanced<ext>`` beside it (an output
    folder that is also the input folder must never overwrite the originals)."""
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        return target.with_name(f"{target.stem}_enhanced{target.suffix}")
    return target


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part.lower() in ("thumbs.db", "desktop.ini") for part in rel.parts)


BatchProgress = Callable[[int, int, str, float], None]


def process_batch(inputs: Sequence[str | Path], settings_or_auto: EnhanceSettings | Literal["auto"],
                  progress: BatchProgress | None = None, *, model_manager, output_dir: str | Path, config=None,
                  recursive: bool = False, skip_existing: bool = False, cancel: threading.Event | None = None,
                  advisor=None) -> BatchReport:
    """Enhance many images into ``output_dir`` (mirroring folder structure), continuing past failures.

    ``settings_or_auto`` "auto" asks the advisor for settings per image, so a mixed batch of anime and photos gets
    the right model for each. ``progress(index, total, name, fraction_of_this_image)``.
    """
    output_dir = Path(output_dir)
    pairs = collect_inputs(inputs, recursive)
    items: list[BatchItem] = []
    for index, (path, rel) in enumerate(pairs):
        if cancel is not None and cancel.is_set():
            raise CancelledError("Batch cancelled by the user.")

        def image_progress(fraction: float, _message: str, index=index, path=path) -> None:
            if progress is not None:
                progress(index, len(pairs), path.name, fraction)

        try:
            settings = _settings_for(path, settings_or_auto, advisor, model_manager, config)
            fmt_ext = _extension_for(path, settings)
            target = output_path_for(path, output_dir / rel.with_suffix(fmt_ext))
            if skip_existing and target.exists():
                items.append(BatchItem(path, target, ok=True, skipped=True))
                continue
            result = enhance_image_direct(path, settings, model_manager, image_progress, config=config, cancel=cancel)
            saved, metrics, notes = save_result(result, target, original_bytes=path.stat().st_size,
                                                output_format=fmt_ext.lstrip("."))
            report = result.report() | {"input": str(path), "output": str(saved), "metrics": metrics}
            report["warnings"] = report["warnings"] + notes
            items.append(BatchItem(path, saved, ok=True, report=report))
        except CancelledError:
            raise
        except (EngineError, OSError, ValueError) as exc:
            logger.warning("batch: %s failed: %s", path, exc)
            items.append(BatchItem(path, None, ok=False, error=str(exc)))
        except Exception as exc:  # one bad image must not stop the batch; the reason is kept
            logger.exception("batch: unexpected failure on %s", path)
            items.append(BatchItem(path, None, ok=False, error=f"unexpected error ({type(exc).__name__}: {exc})"))
        if progress is not None:
            progress(index + 1, len(pairs), path.name, 1.0)
    return BatchReport(tuple(items))


def _settings_for(path: Path, settings_or_auto, advisor, model_manager, config) -> EnhanceSettings:
    if isinstance(settings_or_auto, EnhanceSettings):
        return settings_or_auto
    if settings_or_auto != "auto":
        raise InvalidSettingsError("Batch settings must be EnhanceSettings or 'auto'.")
    from engine.intelligent_enhancer import IntelligentEnhancer

    advisor = advisor or IntelligentEnhancer(model_manager=model_manager, config=config)
    advice = advisor.get_intelligent_settings(load_input(path, config).pixels)
    return settings_from_advice(advice["settings"])


def settings_from_advice(advised: Mapping[str, object], base: EnhanceSettings | None = None) -> EnhanceSettings:
    """Turn the advisor's settings dict into EnhanceSettings (on top of ``base``)."""
    base = base or EnhanceSettings()
    values = base.as_dict()
    values.update({
        "model": advised.get("model", base.model),
        "outscale": float(advised.get("scale", base.outscale or 4)),
        "face_enhance": bool(advised.get("face_enhance", base.face_enhance)),
        "face_strength": float(advised.get("face_strength", base.face_strength)),
        "denoise_strength": float(advised.get("denoise_strength", base.denoise_strength)),
        "precision": advised.get("precision", "fp32" if advised.get("fp32") else base.precision),
        "tile": "auto" if advised.get("auto_tile", True) else int(advised.get("tile", 0)),
    })
    return EnhanceSettings.from_mapping(values)


def _extension_for(path: Path, settings: EnhanceSettings) -> str:
    if settings.output_format != "auto":
        return "." + settings.output_format
    ext = path.suffix.lower()
    return {".jpeg": ".jpg", ".tif": ".tiff", ".bmp": ".png"}.get(ext, ext if ext in IMAGE_EXTENSIONS else ".png")


# ------------------------------------------------------------------------------------------------ video frames
def make_frame_enhancer(model_manager, settings: EnhanceSettings, config=None,
                        warnings: list[str] | None = None) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A callable for :func:`engine.video.upscale_video`: a batch of HxWx3 uint8 RGB frames in, upscaled frames out.

    Frames go through the same engine as images (models, tiling, precision, OOM handling); the frames of one batch
    share forward calls. With face enhancement each frame also goes through the face path (skipped on anime with
    a warning). Warnings are appended to ``warnings`` once each. The callable keeps no per-call state.
    """
    frame_settings = settings.replace(quality_metrics=False, keep_metadata=False, output_format="png")
    notes: list[str] = warnings if warnings is not None else []

    def add(new: Iterable[str]) -> None:
        for note in new:
            if note not in notes:
                notes.append(note)

    def enhance(frames: list[np.ndarray]) -> list[np.ndarray]:
        if not frames:
            return []
        if frame_settings.face_enhance or frames[0].ndim != 3 or frames[0].shape[2] != 3:
            results = [enhance_image_direct(f, frame_settings, model_manager, config=config) for f in frames]
            for r in results:
                add(r.warnings)
            return [r.pixels for r in results]
        height, width = frames[0].shape[:2]
        model_name, note = route_model(frame_settings.model, _requested_scale(frame_settings, width, height),
                                       model_manager.is_available)
        spec = model_manager.spec(model_name)
        out_w, out_h, _ = plan_output_size(width, height, frame_settings, spec.scale)
        run_warnings: list[str] = [note] if note else []
        run = _upscale_rgb([_as_float(f) for f in frames], model_name=model_name, settings=frame_settings,
                           model_manager=model_manager, config=config, report=_Cancellable(None, None),
                           warnings=run_warnings, stage=(0.0, 1.0))
        add(run_warnings)
        return [_from_float(resize_float(out, out_w, out_h), np.uint8) for out in run.image]

    return enhance
