"""Pure planning of a job: output size, which network runs, precision, tile and overlap.

Nothing here touches pixels or loads a model. :func:`choose_tile` is the one tile choice: the engine runs the tile
it returns and the advisor shows the same number.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, replace
from typing import Callable

from engine.catalog import ModelSpec
from engine.errors import InvalidSettingsError
from engine.settings import MAX_SCALE, MIN_SCALE, EnhanceSettings

logger = logging.getLogger(__name__)

X2_MODEL, X4_MODEL = "RealESRGAN_x2plus", "RealESRGAN_x4plus"


def plan_output_size(width: int, height: int, settings: EnhanceSettings, native_scale: int) -> tuple[int, int, float]:
    """Output (width, height, effective scale) for an input size. Pure.

    Raises:
        InvalidSettingsError: the target implies a scale outside 1..8.
    """
    requested = settings.requested_scale(width, height)
    scale = float(native_scale) if requested is None else float(requested)
    if not MIN_SCALE - 1e-9 <= scale <= MAX_SCALE + 1e-9:
        raise InvalidSettingsError(f"The requested size means a scale of {scale:.2f}×; it must be between 1× and 8×.")
    out_w = settings.target_width or max(1, int(round(width * scale)))
    out_h = settings.target_height or max(1, int(round(height * scale)))
    return out_w, out_h, scale


def route_model(requested: str, outscale: float | None, available: Callable[[str], bool]) -> tuple[str, str | None]:
    """Pick the network for ``requested`` ("auto" routes by scale). Returns (name, note for the user or None). Pure."""
    if requested != "auto":
        return requested, None
    if outscale is not None and outscale <= 2.0:
        if available(X2_MODEL):
            return X2_MODEL, None
        return X4_MODEL, ("The ×2 model is not downloaded, so the ×4 model ran and was resized to ×2 "
                          f"(python main.py models download {X2_MODEL} for the native ×2 model).")
    return X4_MODEL, None


def effective_precision(spec: ModelSpec, device_type: str, requested: str) -> str:
    """The precision a model really runs in: auto → fp16 on CUDA, else fp32; fp16 only where it works. Pure."""
    from utils.gpu import default_precision

    precision = default_precision(device_type) if requested == "auto" else requested
    if precision == "fp16" and (device_type == "cpu" or not spec.supports_half):
        precision = "fp32"
    if precision == "bf16" and not spec.supports_bfloat16:
        precision = "fp32"
    return precision


def batch_size_for(device_type: str, settings: EnhanceSettings) -> int:
    """Tiles per forward call: one on a CPU (it stays in cache and runs faster), the setting on a GPU. Pure."""
    return 1 if device_type == "cpu" else settings.batch_size


def activation_arch(spec: ModelSpec) -> str:
    """The name under which :mod:`engine.upscaler` keeps the memory figures of ``spec``'s network: a user's RRDBNet
    may be built by spandrel, which runs its upsampling stage whole (``"ESRGAN"``). Pure."""
    return "ESRGAN" if spec.arch == "RRDBNet" and spec.user else spec.arch


def overlap_for(spec: ModelSpec, tile: int) -> int:
    """The tile overlap ("auto") for a model and tile: context enough to hide seams at ≤ ~30% extra compute.

    RRDBNet's receptive field is wide (a tile edge still shows 10-20 px in), so it gets a quarter of the tile,
    16..64 px; the compact SRVGG models settle within about 16 px; a model with a measured receptive radius
    (``spec.overlap``, the user's models) gets it, up to half the tile. Pure.
    """
    if spec.overlap is not None:
        return int(min(spec.overlap, max(8, tile // 2)))
    if spec.arch == "RRDBNet":
        return int(min(64, max(16, tile // 4)))
    return int(min(32, max(8, tile // 8)))


def tile_overlap(spec: ModelSpec, tile: int, settings: EnhanceSettings) -> int:
    return overlap_for(spec, tile) if settings.tile_overlap == "auto" else int(settings.tile_overlap)


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


@dataclass(frozen=True)
class TileChoice:
    """The tile (stride; 0 = whole image) a job runs with, the activation memory it plans for, and what limited it:
    ``"memory"`` (what fits the free memory, or the whole image), ``"cache"`` (a CPU's faster small tiles) or
    ``"working set"`` (one tile row's activations and blend buffers within
    :data:`~engine.inference.memory_plan.WORKING_SET_BYTES`)."""

    tile: int
    memory_bytes: int
    limit: str = "memory"


def plan_tile(spec: ModelSpec, height: int, width: int, *, device_type: str, precision: str, batch_size: int,
              free_bytes: int, memory_reused: bool) -> TileChoice:
    """The tile for ``tile=auto`` from plain facts: what fits ``free_bytes``, on a CPU what stays in cache, and a
    tile row's activations plus its blend buffers (which grow with the image's width) within
    :data:`engine.inference.memory_plan.WORKING_SET_BYTES`. Pure."""
    from engine import upscaler
    from utils.gpu import torch_dtype

    dtype = torch_dtype(precision)
    scale = spec.network_scale
    side = upscaler.auto_tile(spec.arch, height, width, dtype=dtype, free_bytes=free_bytes, scale=scale,
                              batch_size=batch_size)
    tile = max(side - overlap_for(spec, side), 16) if side else 0  # a tile reads its stride + the overlap
    limit = "memory"
    if device_type == "cpu":
        cached = cpu_cache_tile(spec, height, width, tile, memory_reused=memory_reused)
        if cached != tile:
            limit, tile = "cache", cached
    bounded = _within_working_set(spec, height, width, tile, dtype, batch_size)
    if bounded != tile:
        limit, tile = "working set", bounded
    if tile and side == 0 and _whole_is_worth_it(spec, height, width, tile, dtype, batch_size):
        limit, tile = "memory", 0
    return TileChoice(int(tile), int(_activation_bytes(spec, height, width, tile, dtype, batch_size)), limit)


def _whole_is_worth_it(spec: ModelSpec, height: int, width: int, tile: int, dtype, batch_size: int) -> bool:
    """Whether a small image runs faster whole than in ``tile`` tiles by enough to spend the memory: its
    activations fit :data:`~engine.inference.memory_plan.WHOLE_IMAGE_BYTES` and the tiles' overlap would add at
    least :data:`~engine.inference.memory_plan.WHOLE_IMAGE_GAIN` compute. Pure."""
    from engine.inference.memory_plan import WHOLE_IMAGE_BYTES, WHOLE_IMAGE_GAIN

    if _activation_bytes(spec, height, width, 0, dtype, batch_size) > WHOLE_IMAGE_BYTES:
        return False
    return read_shape(spec, height, width, tile)[2] >= WHOLE_IMAGE_GAIN


def read_shape(spec: ModelSpec, height: int, width: int, tile: int,
               overlap: int | None = None) -> tuple[int, int, float]:
    """``(tile_h, tile_w, compute_ratio)`` of running ``spec`` over a ``height`` x ``width`` image in ``tile`` tiles
    with ``overlap`` (None: :func:`overlap_for`), exactly as the engine will tile it (padded to the model's
    multiple; tile 0: the whole image, ratio 1). Pure."""
    from engine import upscaler

    multiple = spec.pad_multiple
    padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    if not tile or tile >= max(padded_h, padded_w):
        return padded_h, padded_w, 1.0
    overlap = overlap_for(spec, tile) if overlap is None else overlap
    return upscaler.tile_shape(padded_h, padded_w, tile, min(overlap, tile), multiple)


def _activation_bytes(spec: ModelSpec, height: int, width: int, tile: int, dtype, batch_size: int) -> int:
    from engine import upscaler

    read_h, read_w, _ratio = read_shape(spec, height, width, tile)
    return upscaler.estimate_memory_bytes(spec.arch, read_h, read_w, dtype, scale=spec.network_scale,
                                          batch_size=batch_size)


def working_set_bytes(spec: ModelSpec, height: int, width: int, tile: int, dtype, batch_size: int) -> int:
    """What a tile size costs the working set: one forward pass's activations and the blend buffers of a tile row
    (see :data:`~engine.inference.memory_plan.WORKING_SET_BYTES`). Pure."""
    from engine.inference.memory_plan import band_bytes

    rows = read_shape(spec, height, width, tile)[0] if tile else 0
    return _activation_bytes(spec, height, width, tile, dtype, batch_size) + band_bytes(
        rows, height, width, spec.network_scale)


def _within_working_set(spec: ModelSpec, height: int, width: int, tile: int, dtype, batch_size: int) -> int:
    """``tile`` when its activations and band buffers fit the working set; else, of the tiles (>= 32, multiples of
    8) that fit, the one that computes the fewest pixels (the overlap's share depends on how the tiles fall, not
    only on their size), the larger on a tie. Pure."""
    from engine.inference.memory_plan import WORKING_SET_BYTES

    def fits(t: int) -> bool:
        return working_set_bytes(spec, height, width, t, dtype, batch_size) <= WORKING_SET_BYTES

    if fits(tile):
        return tile
    largest = min(tile, max(height, width)) if tile else max(height, width)
    candidates = range(32, largest + 1, 8)
    # A larger tile reads at least as much (its overlap grows with it), so the tiles that fit come first.
    fitting = candidates[:bisect.bisect_left(candidates, True, key=lambda t: not fits(t))]
    if not fitting:
        return 32
    return min(fitting, key=lambda t: (read_shape(spec, height, width, t)[2], -t))


def choose_tile(spec: ModelSpec, height: int, width: int, *, device, precision: str, batch_size: int,
                config) -> TileChoice:
    """The one ``tile=auto`` choice for this machine now (free memory less the configured reserve). The engine runs
    this tile, and the advisor shows it."""
    from utils import allocator
    from utils.gpu import free_memory_bytes

    if device.type == "cpu" and config.cpu_memory_reuse:
        allocator.reuse_freed_memory()  # as the engine runs (idempotent; see utils.allocator)
    free = int(free_memory_bytes(device) * (1 - config.gpu_memory_reserve))
    memory_reused = device.type == "cpu" and allocator.reusing_freed_memory()
    return plan_tile(spec, height, width, device_type=device.type, precision=precision, batch_size=batch_size,
                     free_bytes=free, memory_reused=memory_reused)


def memory_budget(config, device=None) -> tuple[int, int]:
    """(host bytes, VRAM bytes) a job's process may reach now: what it holds already plus the available RAM less
    ``memory_reserve_mb``, capped by ``max_job_memory_mb`` when set; free VRAM less the configured share on a GPU
    (else 0). Compared with :attr:`MemoryPlan.peak_bytes`, which counts the process's own runtime."""
    import psutil

    from utils.gpu import free_memory_bytes

    held = int(psutil.Process().memory_info().rss)
    host = held + int(psutil.virtual_memory().available) - int(config.memory_reserve_mb * 2 ** 20)
    if config.max_job_memory_mb:
        host = min(host, int(config.max_job_memory_mb * 2 ** 20))
    vram = 0
    if device is not None and device.type == "cuda":
        vram = int(free_memory_bytes(device) * (1 - config.gpu_memory_reserve))
    return max(host, 0), vram


def plan_job_memory(spec: ModelSpec, settings: EnhanceSettings, shape, *, device, config, streamed: bool = False,
                    resident_bytes: int = 0):
    """The :class:`~engine.inference.memory_plan.MemoryPlan` of one image job of ``shape`` (a
    :class:`~engine.inference.memory_plan.JobShape`) on ``device`` now: the tile the engine will run
    (``choose_tile`` for ``tile=auto``) and this machine's budget; ``streamed``: the output goes straight into a
    file in strips (:func:`~engine.inference.memory_plan.streamed`); ``resident_bytes``: what the process holds that
    the job does not use (``ModelManager.resident_bytes``: other loaded networks, the web server)."""
    from engine import upscaler
    from engine.inference import memory_plan
    from engine.inference.memory_plan import NetworkRun, plan_memory
    from engine.models import networks
    from utils.gpu import release_unusable_cuda_libraries, torch_dtype

    height, width = shape.height, shape.width
    precision = effective_precision(spec, device.type, settings.precision)
    batch_size = batch_size_for(device.type, settings)
    if settings.tile == "auto":
        tile = choose_tile(spec, height, width, device=device, precision=precision, batch_size=batch_size,
                           config=config).tile
    else:
        tile = int(settings.tile)
    overlap = tile_overlap(spec, tile, settings) if tile else 0
    read_h, read_w, _ratio = read_shape(spec, height, width, tile, overlap)
    activations = upscaler.pass_memory_bytes(activation_arch(spec), read_h, read_w, torch_dtype(precision),
                                             scale=spec.network_scale, batch_size=batch_size)
    run = NetworkRun(scale=spec.network_scale, tile=tile, overlap=overlap, activation_bytes=activations,
                     weights_bytes=spec.size_bytes or 20 * 2 ** 20, device_type=device.type, read=(read_h, read_w))
    plan = plan_memory(shape, run, memory_budget(config, device), quality_metrics=settings.quality_metrics,
                       face_enhance=settings.face_enhance,
                       model_alpha=shape.channels in (2, 4) and settings.alpha_mode == "model",
                       spandrel=settings.face_enhance or spec.arch not in networks.ARCHITECTURES,
                       cuda_libraries_released=release_unusable_cuda_libraries() > 0)
    plan = replace(plan, resident_bytes=int(resident_bytes))
    return memory_plan.streamed(plan, shape, spec.network_scale) if streamed else plan
