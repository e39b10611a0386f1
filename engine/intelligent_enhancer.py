"""The settings advisor: look at an image and this machine, recommend model, scale, tile, denoise and face settings,
with plain-language reasons and a time/memory estimate.

Measurements come from :mod:`engine.image_analysis`; the decision is :func:`decide`, a pure function of those
numbers and of :class:`MachineFacts`, so the rules are tested without images. Time estimates come from real runs
on this machine (:mod:`engine.advisor.estimates`); before the first, from a short calibration run of the real
architecture (cached in the config dir unless the machine was busy), shown as a range.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from engine.advisor.estimates import UNSURE_SPREAD, TimingModel, device_kind, job_key, load_key
from engine.catalog import CATALOG, DEFAULT_FACE_MODEL, active_catalog, user_alternatives
from engine.settings import Advice, EnhanceSettings
from utils.atomic import write_atomic
from utils.errors import CancelledError, InputTooLargeError

logger = logging.getLogger(__name__)

NetworkSource = Callable[[], tuple["torch.nn.Module", "torch.dtype"]]
"""Gives a network to time and the dtype it runs in (see :meth:`ThroughputCalibrator.macs_per_second`)."""

# Thresholds on the calibrated analysis scales (see engine.image_analysis for how each maps to the image).
NOISY_LEVEL = 0.16          # noise level 0.16 ≈ Gaussian sigma 8 on 0-255
JPEG_DAMAGED = 0.35         # blockiness score above which JPEG artefacts are visible
SMALL_SIDE = 320            # long side below which ×4 is the natural choice
LARGE_SIDE = 1600           # long side above which ×2 is usually enough
SLOW_SECONDS = 60.0         # a recommendation slower than this on the CPU offers the fast model
FAST_PHOTO_MODEL = "realesr-general-x4v3"
FAST_FALLBACK_MODEL = "realesr-animevideov3"
#: The catalog's models every advice estimates (tile and time), besides the user's own models for the content.
ADVISED_MODELS = ("RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", FAST_PHOTO_MODEL, FAST_FALLBACK_MODEL,
                  "RealESRGAN_x2plus")
GFPGAN_MACS_PER_FACE = 197_800_000_000
"""GFPGANv1Clean on one 512×512 face, counted by torch's FLOP counter (as a user's face model is measured at import).
Conv-module hooks counted 42.8 G: they miss the StyleGAN decoder's modulated convolutions (``F.conv2d`` calls);
one face takes 3.95 s on a 2-core AVX2 CPU where RealESRGAN_x4plus runs 76 GMAC/s, i.e. 1.3x these MACs' time
(the estimates count 1.5x)."""
_DEFAULT_MACS_PER_SECOND = {"cpu": 100e9, "cuda": 20e12, "mps": 2e12}
SLOWEST_MACS_PER_SECOND = 5e9
"""A floor under any device's throughput (the catalog's networks run at 40-90 GMAC/s on a 2-core x86 laptop): a
job whose network would end within half a time limit even at this rate passes
:meth:`IntelligentEnhancer.check_time_limit` without a calibration (the job's own watch still enforces the limit)."""


@dataclass(frozen=True)
class AnalysisNumbers:
    """What the rules look at (all plain numbers, so rules are testable without images)."""

    content_type: str
    confidence: float
    faces: int
    noise_level: float
    jpeg_artifacts: float
    blur: float
    width: int
    height: int
    bit_depth: int = 8
    has_alpha: bool = False
    content_reason: str = ""  # why content_type (engine.image_analysis.decide_content); "" = say it plainly


@dataclass(frozen=True)
class MachineFacts:
    """This machine and the model catalog's local state, as the rules need them."""

    device: str  # "cpu", "cuda:0", "mps"
    free_memory_bytes: int
    available_models: frozenset[str]
    downloadable_models: frozenset[str]
    macs_per_second: Mapping[str, float] = field(default_factory=dict)  # per model; missing → device default
    max_output_pixels: int = 400_000_000
    face_enhancement_enabled: bool = True
    cpu_bf16_fast: bool = False  # the CPU has native bf16 (AVX512-BF16/AMX): the bf16 fast mode pays off
    timing: Mapping[str, TimingModel] = field(default_factory=dict)  # per model, learned from real runs
    # The models whose MAC/s is a stand-in (the fastest rate measured here with another model, else the device's
    # default): nothing of their rate_class was measured on this device yet, and this advice did not wait for it.
    rough_rates: frozenset[str] = frozenset()

    def throughput(self, model: str) -> float:
        kind = self.device.split(":")[0]
        return float(self.macs_per_second.get(model) or _DEFAULT_MACS_PER_SECOND.get(kind, 100e9))


# ------------------------------------------------------------------------------------------------ pure rules
def choose_scale(width: int, height: int, max_output_pixels: int, requested: float | None = None) -> tuple[float, str]:
    """The output scale and why. Small inputs get ×4, large ones ×2, and the output pixel limit is respected."""
    long_side = max(width, height)
    if requested is not None:
        scale, why = float(requested), f"Scale ×{requested:g} as requested"
    elif long_side < SMALL_SIDE:
        scale, why = 4.0, f"Small image ({width}×{height}): ×4 gives a usable size"
    elif long_side > LARGE_SIDE:
        scale, why = 2.0, f"Already large ({width}×{height}): ×2 is enough and 4× faster to compute"
    else:
        scale, why = 4.0, f"Medium image ({width}×{height}): ×4"
    limit_scale = (max_output_pixels / max(width * height, 1)) ** 0.5
    if scale > limit_scale:
        scale = max(1.0, float(np.floor(limit_scale * 100) / 100))
        why = (f"Output limited to {max_output_pixels / 1e6:.0f} MP: scale lowered to ×{scale:g} "
               "(raise REALESRGAN_MAX_OUTPUT_PIXELS for more)")
    return scale, why


def denoise_from_noise(noise_level: float, jpeg_artifacts: float) -> float:
    """Denoise strength for realesr-general-x4v3 from the measured damage: clean → 0.2, heavy noise → 1.0."""
    damage = max(noise_level / 0.5, jpeg_artifacts)
    return float(np.clip(0.2 + 0.8 * damage, 0.2, 1.0).round(2))


def estimate_seconds(model: str, width: int, height: int, machine: MachineFacts, faces: int = 0,
                     face_enhance: bool = False, tile_overhead: float = 1.1, outscale: float = 4.0) -> float:
    """Seconds for the whole job (see :func:`estimate_range`)."""
    return estimate_range(model, width, height, machine, faces, face_enhance, tile_overhead, outscale)[0]


def estimate_range(model: str, width: int, height: int, machine: MachineFacts, faces: int = 0,
                   face_enhance: bool = False, tile_overhead: float = 1.1,
                   outscale: float = 4.0) -> tuple[float, float, float]:
    """``(seconds, low, high)`` of the whole job — model load (unless loaded), network, decode/metrics/save and
    faces — from ``machine.timing`` (:mod:`engine.advisor.estimates`: what real runs here taught, the calibration
    and priors filling the rest); the range is wide until two real runs agree. A model without a timing (a pure
    call) counts its network and faces at the calibrated MAC/s only."""
    spec = active_catalog()[model]  # the user's models too (their MACs are measured at import)
    macs = spec.macs_per_pixel * width * height * tile_overhead
    timing = machine.timing.get(model)
    if timing is None:  # no record at all (a pure call): the network and faces at the calibrated rate only
        rate = machine.throughput(model)
        timing = TimingModel(rate, 0.0, 0.0, 0.0, 0.0, GFPGAN_MACS_PER_FACE * 1.5 / rate, UNSURE_SPREAD, 0)
    restored = faces if face_enhance else 0
    pixels = width * height * outscale * outscale
    low, high = timing.range(macs, pixels, restored)
    return float(timing.seconds(macs, pixels, restored)), float(low), float(high)


def prior_timing(model: str, macs_per_second: float, runs=(), loads=()) -> TimingModel:
    """The timing of ``model`` from its recorded runs and loads, the calibration's ``macs_per_second`` and the
    priors filling what they do not tell (load from the weights' size, faces from GFPGAN's MACs)."""
    from engine.advisor.estimates import fit_timing, prior_load_seconds

    return fit_timing(list(runs), list(loads), macs_per_second, prior_load_seconds(model),
                      GFPGAN_MACS_PER_FACE * 1.5 / macs_per_second)


def _pick_available(preferred: str, machine: MachineFacts, fallback: str) -> tuple[str, str | None]:
    if preferred in machine.available_models:
        return preferred, None
    if fallback in machine.available_models:
        return fallback, preferred
    return preferred, None


def decide(a: AnalysisNumbers, machine: MachineFacts, requested_scale: float | None = None,
           tile_for: callable = None) -> Advice:
    """The advisor's rules. Pure: same numbers in, same advice out.

    ``tile_for(model) -> TileChoice`` gives the tile the engine will run on this device (0 = whole image), the
    memory it needs and what limited it (:class:`engine.inference.planning.TileChoice`); None means whole image with
    a rough estimate.
    """
    alternatives: list[dict] = []
    on_cpu = machine.device == "cpu"

    model, denoise, reasons = _content_model(a, machine)
    scale, why_scale = choose_scale(a.width, a.height, machine.max_output_pixels, requested_scale)
    reasons.append(why_scale)
    if _native_x2(model, a, machine, scale):
        model = "RealESRGAN_x2plus"
        reasons.append("×2 output: the native ×2 model is used (4× less compute than ×4 then resize)")

    # Faces.
    face_model_ready = DEFAULT_FACE_MODEL in machine.available_models
    face_enhance = False
    if a.faces and a.content_type == "photo" and machine.face_enhancement_enabled:
        face_enhance = True
        plural = "s" if a.faces > 1 else ""
        if face_model_ready:
            reasons.append(f"{a.faces} face{plural} found: face enhancement on ({DEFAULT_FACE_MODEL})")
        else:
            mb = (CATALOG[DEFAULT_FACE_MODEL].size_bytes or 0) / 1e6
            reasons.append(f"{a.faces} face{plural} found: face enhancement on; {DEFAULT_FACE_MODEL} will be "
                           f"downloaded on first use ({mb:.0f} MB), and until then faces are upscaled only")
    elif a.faces and a.content_type == "anime":
        reasons.append(f"{a.faces} drawn face(s): face enhancement off (GFPGAN is made for photos)")
    elif a.faces and not machine.face_enhancement_enabled:
        reasons.append("Faces found, but face enhancement is turned off in the configuration")

    if a.has_alpha:
        reasons.append("Transparent areas: alpha is upscaled by the model too, with edge colours protected")
    if a.bit_depth == 16:
        reasons.append("16-bit image: processed and saved in 16 bits (PNG/TIFF)")

    # Precision and device.
    is_cuda = machine.device.startswith("cuda")
    precision = "fp16" if is_cuda else "fp32"
    reasons.append("GPU: half precision (fp16), about twice as fast" if is_cuda
                   else f"{'CPU' if on_cpu else machine.device}: full precision (fp32)")

    # Tile and estimates.
    from engine.inference.memory_plan import WORKING_SET_BYTES
    from engine.inference.planning import TileChoice

    choice = tile_for(model) if tile_for else TileChoice(0, int(_rough_memory_mb(model, a.width, a.height) * 2**20))
    tile, memory_mb = choice.tile, choice.memory_bytes / 2**20
    reasons.append("The whole image fits in memory: no tiling" if tile == 0 else {
        "cache": f"Tiles of {tile} px: on this CPU small tiles stay in its caches and run faster",
        "working set": f"Tiles of {tile} px keep one row of tiles within {WORKING_SET_BYTES / 2**20:.0f} MB of "
                       f"working memory (larger ones save little compute and cost memory)",
    }.get(choice.limit, f"Tiles of {tile} px fit the free memory ({machine.free_memory_bytes / 2**30:.1f} GB)"))
    seconds, low, high = estimate_range(model, a.width, a.height, machine, a.faces, face_enhance, outscale=scale)
    timing = machine.timing.get(model)
    if timing is not None and timing.observations >= 2 and timing.spread <= 0.25:
        reasons.append(f"Estimated time on {machine.device}: {_human_seconds(seconds)} "
                       f"(learned from {timing.observations} runs here)")
    else:
        basis = (f"from {timing.observations} run here" if timing is not None and timing.observations
                 else "rough: this model's speed is not measured here yet; it improves after each real run"
                 if model in machine.rough_rates else "from a short calibration; it improves after each real run")
        reasons.append(f"Estimated time on {machine.device}: {_human_seconds(low)} to {_human_seconds(high)} "
                       f"({basis})")

    if on_cpu and seconds > SLOW_SECONDS and model not in (FAST_PHOTO_MODEL, FAST_FALLBACK_MODEL):
        fast = FAST_PHOTO_MODEL if (a.content_type == "photo" and FAST_PHOTO_MODEL in machine.available_models) \
            else FAST_FALLBACK_MODEL
        if fast in machine.available_models:
            fast_seconds = estimate_seconds(fast, a.width, a.height, machine, a.faces, face_enhance, outscale=scale)
            alternatives.append({"model": fast, "estimated_seconds": round(fast_seconds, 1),
                                 "why": "fast choice on this CPU"})
            reasons.append(f"{model} takes about {_human_seconds(seconds)} on this CPU; {fast} would take about "
                           f"{_human_seconds(fast_seconds)} (the fast choice, a little less detail)")

    for own in user_alternatives(a.content_type, machine.available_models)[:2]:  # "your 4x-UltraSharp: 40 s"
        own_seconds = estimate_seconds(own.name, a.width, a.height, machine, a.faces, face_enhance,
                                       outscale=scale)
        alternatives.append({"model": own.name, "estimated_seconds": round(own_seconds, 1),
                             "why": f"your {own.tag} model (×{own.scale}): about {_human_seconds(own_seconds)}"})

    if on_cpu and machine.cpu_bf16_fast and seconds > 10:
        alternatives.append({"model": model, "precision": "bf16", "estimated_seconds": round(seconds / 3, 1),
                             "why": "bf16 fast mode on this CPU (≥ 40 dB against fp32)"})
        reasons.append(f"This CPU computes in bf16 natively: precision bf16 would take about "
                       f"{_human_seconds(seconds / 3)} with nearly identical output")

    settings = EnhanceSettings(model=model, outscale=scale, precision=precision, face_enhance=face_enhance,
                               tile="auto", denoise_strength=denoise)
    return Advice(settings=settings, reasons=tuple(reasons), estimated_seconds=round(seconds, 2),
                  estimated_memory_mb=round(memory_mb, 1), alternatives=tuple(alternatives),
                  analysis={"optimal_tile": int(tile), "estimated_range": [round(low, 1), round(high, 1)]})


def _content_model(a: AnalysisNumbers, machine: MachineFacts) -> tuple[str, float, list[str]]:
    """The model for the image's content and damage, its denoise strength and why (:func:`decide`'s first rule)."""
    reasons = []
    damaged = a.noise_level >= NOISY_LEVEL or a.jpeg_artifacts >= JPEG_DAMAGED
    denoise = 0.5
    if a.content_type == "anime":
        model, missing = _pick_available("RealESRGAN_x4plus_anime_6B", machine, FAST_FALLBACK_MODEL)
        why = a.content_reason or f"Flat colours and hard edges ({a.confidence:.0%} sure it is anime/illustration)"
        reasons.append(f"{why}: anime model")
    elif damaged:
        if a.content_reason:
            reasons.append(a.content_reason)
        what = "noise" if a.noise_level >= NOISY_LEVEL else "JPEG artefacts"
        denoise = denoise_from_noise(a.noise_level, a.jpeg_artifacts)
        if FAST_PHOTO_MODEL in machine.available_models:
            model, missing = FAST_PHOTO_MODEL, None
            reasons.append(f"Visible {what} (noise level {a.noise_level:.2f}, JPEG {a.jpeg_artifacts:.2f}): "
                           f"{FAST_PHOTO_MODEL} with denoise strength {denoise:.2f}")
        else:
            model, missing = _pick_available("RealESRGAN_x4plus", machine, FAST_FALLBACK_MODEL)
            if FAST_PHOTO_MODEL in machine.downloadable_models:
                reasons.append(f"Visible {what}: {FAST_PHOTO_MODEL} with denoise {denoise:.2f} would be best, but "
                               "its weights are not downloaded (System Info tab, or: python main.py models download "
                               f"{FAST_PHOTO_MODEL}); RealESRGAN_x4plus also removes noise")
            else:
                reasons.append(f"Visible {what}: RealESRGAN_x4plus removes it along the way")
    else:
        model, missing = _pick_available("RealESRGAN_x4plus", machine, FAST_FALLBACK_MODEL)
        why = a.content_reason or f"Natural photo ({a.confidence:.0%} sure)"
        reasons.append(f"{why}; clean: RealESRGAN_x4plus for the best detail")
    if missing:
        reasons.append(f"{missing} is not available here, so {model} is recommended instead")
    return model, denoise, reasons


def _native_x2(model: str, a: AnalysisNumbers, machine: MachineFacts, scale: float) -> bool:
    """At ×2 or less a photo's x4plus gives way to the native ×2 model when it is here."""
    return (scale <= 2 and "RealESRGAN_x2plus" in machine.available_models and a.content_type != "anime"
            and model == "RealESRGAN_x4plus")


def advisable_models(machine: MachineFacts, width: int, height: int,
                     requested_scale: float | None = None) -> tuple[frozenset[str], float]:
    """The models :func:`decide` may recommend here for a ``width``×``height`` image whatever its content (photo,
    damaged photo, drawing), and the scale they would run at: known from the header alone, so the least an
    automatic job can cost is known before any pixel is decoded."""
    scale = choose_scale(width, height, machine.max_output_pixels, requested_scale)[0]
    models = set()
    for content, noise in (("photo", 0.0), ("photo", 1.0), ("anime", 0.0)):
        a = AnalysisNumbers(content_type=content, confidence=1.0, faces=0, noise_level=noise, jpeg_artifacts=0.0,
                            blur=0.0, width=width, height=height)
        model = _content_model(a, machine)[0]
        models.add("RealESRGAN_x2plus" if _native_x2(model, a, machine, scale) else model)
    return frozenset(models), scale


def _rough_memory_mb(model: str, width: int, height: int) -> float:
    from engine import upscaler

    spec = CATALOG[model]
    return upscaler.estimate_memory_bytes(spec.arch, height, width, scale=spec.network_scale) / 2**20


def _human_seconds(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------------ calibration
#: 1-minute load average per CPU above which the machine counts as busy (a calibration is then not stored).
BUSY_CPU_SHARE = 0.6
"""A CPU calibration is kept only when the process got at least this share of its threads' time during the timed
run (CPU seconds / (wall seconds x threads)); less means other work took the cores and the figure is too slow."""


def starved(cpu_seconds: float, wall_seconds: float, threads: int, share: float = BUSY_CPU_SHARE) -> bool:
    """True when a timed CPU run got less than ``share`` of ``threads`` cores: the machine was busy with other work
    (another job, another program). Measured on the run itself, so the app's own load never counts against it.
    Pure."""
    return wall_seconds > 0 and cpu_seconds < share * wall_seconds * max(1, threads)


def rate_class(model: str) -> tuple:
    """The catalog's models whose networks run at one MAC/s on a device share a class: one architecture of one
    width (RRDBNet with 64 features and a growth of 32; SRVGGNetCompact with 64 features and PReLU), whose layers
    have the same shapes and differ only in how many there are and in the scale. A 2-core CPU measured them within
    10% of each other (x4plus 66-71 GMAC/s, anime_6B 71-76, x2plus 74-77; general-x4v3 83-92, animevideov3
    82-93), well inside the spread of one calibration over a day. A user's model is a class of its own: only its
    own weights build its network."""
    spec = active_catalog()[model]
    if spec.user:
        return ("user", model)
    params = spec.arch_params
    return (spec.arch, params.get("num_feat"), params.get("num_grow_ch"), params.get("act_type"))


def rate_siblings(model: str) -> list[str]:
    """The models of ``model``'s :func:`rate_class` (itself included), quickest to time first (fewest MACs per
    input pixel, then by name)."""
    catalog = active_catalog()
    cls = rate_class(model)
    siblings = [name for name in catalog if rate_class(name) == cls]
    return sorted(siblings, key=lambda name: (catalog[name].macs_per_pixel, name))


class ThroughputCalibrator:
    """Measures MAC/s of a model's architecture on a device with a short run of random weights (speed does not
    depend on the weights) on a ``size`` x ``size`` input, cached in memory and in ``cache_file``. One measurement
    serves every model of its :func:`rate_class`: the quickest of them is timed (RealESRGAN_x2plus for x4plus and
    anime_6B: ~1 s instead of ~4.5 s for x4plus on a 2-core CPU), so a first advice on a fresh install calibrates
    two networks, not five.

    It is only the prior: real runs replace it (:mod:`engine.advisor.estimates`). A CPU measurement during which
    the process did not get its cores (:func:`starved`: another job or program was running) is used for this call
    only and not stored, so a busy moment is not kept forever. ``busy_share`` is :func:`starved`'s threshold (0:
    every measurement is kept, whatever the load).
    """

    def __init__(self, cache_file: Path | None = None, size: int = 128, busy_share: float = BUSY_CPU_SHARE):
        self.cache_file, self.size, self.busy_share = cache_file, size, busy_share
        self._lock = threading.Lock()  # the figures: held for reads and writes only, never while a network runs
        self._measuring = threading.Lock()  # one timed run at a time (two would share the cores and both read slow)
        self._values: dict[str, float] | None = None

    def _load(self) -> dict[str, float]:
        if self._values is None:
            self._values = {}
            if self.cache_file is not None and self.cache_file.is_file():
                try:
                    self._values = {str(k): float(v) for k, v in json.loads(self.cache_file.read_text()).items()}
                except (ValueError, OSError) as exc:
                    logger.warning("ignoring unreadable calibration cache %s: %s", self.cache_file, exc)
        return self._values

    def key(self, model: str, device) -> str:
        """The cache file's key of a measurement (its format's version, device, model, calibration size)."""
        return f"v3|{device}|{model}|{self.size}"

    def macs_per_second(self, model: str, device, network: NetworkSource | None = None,
                        keep: Callable[[], bool] | None = None) -> float:
        """MAC/s of ``model`` on ``device``: from the cache (its own figure or one of its :func:`rate_class`), else
        measured now on the quickest model of its class (and kept, under that model's name, unless the machine was
        busy). ``network`` gives the network to time (a user's model, whose architecture only its own weights
        build: ``(module, dtype)`` as the engine runs it); without it a random-weight network of the catalog's
        architecture is timed. ``keep``, asked after the timed run, False: another job of this process shared the
        device meanwhile (which :func:`starved` cannot see), so the figure is not kept either. Reading the figures
        (:meth:`cached`, :meth:`device_rates`: a server's up-front checks, in its event loop) never waits for a
        measurement."""
        known = self.cached(model, device)
        if known is not None:
            return known
        with self._measuring:
            known = self.cached(model, device)  # measured by another thread meanwhile
            if known is not None:
                return known
            timed = model if network is not None else rate_siblings(model)[0]
            value, busy = self._measure(timed, device, network)
            shared = keep is not None and not keep()
            if busy or shared:
                logger.info("%s: calibration of %s not stored", "a job shared the device" if shared else "machine busy",
                            timed)
                return value
            with self._lock:
                values = self._load()
                values[self.key(timed, device)] = value
                self._save(values)
            return value

    def cached(self, model: str, device) -> float | None:
        """The MAC/s measured earlier for ``model``, or for a model of its :func:`rate_class`, on ``device``
        (memory or cache file), or None; never measures."""
        with self._lock:
            return self._known(self._load(), model, device)

    def _known(self, values: dict[str, float], model: str, device) -> float | None:
        """``model``'s own figure in ``values``, else the first of its class's (quickest to time first)."""
        for name in (model, *rate_siblings(model)):
            value = values.get(self.key(name, device))
            if value is not None:
                return value
        return None

    def device_rates(self, device) -> list[float]:
        """Every MAC/s measured earlier on ``device``, any model (memory or cache file); never measures."""
        head, tail = self.key("\0", device).split("\0")
        with self._lock:
            return [v for k, v in self._load().items() if k.startswith(head) and k.endswith(tail)]

    def _measure(self, model: str, device, network: NetworkSource | None = None) -> tuple[float, bool]:
        """(MAC/s, whether the machine was busy during the run)."""
        import torch

        from engine.models.loader import build_network, layout_network
        from engine.upscaler import prepare_for_inference

        spec = active_catalog()[model]
        torch.manual_seed(0)
        if network is not None:
            net, dtype = network()
        else:
            dtype = torch.float16 if getattr(device, "type", str(device)).startswith("cuda") else torch.float32
            weights = layout_network(spec.arch, spec.arch_params).state_dict()  # random: only the time counts
            net = build_network(spec.arch, weights, spec.arch_params).module
            net = prepare_for_inference(net, device, dtype)  # as the engine runs it
        side = -(-self.size // (2 * spec.size_multiple)) * 2 * spec.size_multiple  # its half a multiple too
        x = torch.rand(1, 3, side, side, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            net(x[:, :, : side // 2, : side // 2])  # warm-up (primitive creation)
            start, cpu_start = time.perf_counter(), time.process_time()
            net(x)
            if getattr(device, "type", str(device)).startswith("cuda"):
                torch.cuda.synchronize()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        on_cpu = getattr(device, "type", str(device)) == "cpu"
        busy = on_cpu and starved(cpu_seconds, seconds, torch.get_num_threads(), self.busy_share)
        value = spec.macs_per_pixel * side * side / max(seconds, 1e-6)
        others = [name for name in rate_siblings(model) if name != model] if network is None else []
        logger.info("calibrated %s on %s: %.1f GMAC/s%s%s", model, device, value / 1e9,
                    f" (for {', '.join(others)} too: the same layers)" if others else "",
                    " (machine busy: not kept)" if busy else "")
        return value, busy

    def _save(self, values: dict[str, float]) -> None:
        if self.cache_file is None:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.cache_file, json.dumps(values, indent=1).encode("utf-8"))
        except OSError as exc:
            logger.warning("could not save the calibration cache: %s", exc)


# ------------------------------------------------------------------------------------------------ the advisor
class IntelligentEnhancer:
    """Analyses images and recommends settings. Holds only read-only facts; safe to share between requests."""

    def __init__(self, model_manager=None, config=None, device: str | None = None, calibrate: bool = True,
                 measure_in_advice: bool = True):
        """``calibrate``: measure models' throughput at all (False: the device's defaults and real runs only).
        ``measure_in_advice``: an advice measures a model whose class nothing measured here yet before it answers
        (the CLI); False: it answers at once with a stand-in rate for a catalog model (:attr:`MachineFacts.rough_rates`;
        a user's model is measured either way), for an app
        whose warm-up calibrates them in the background (:meth:`calibrate_advised_models`), so that the first
        request after an install does not wait for calibrations (~4 s on a 2-core CPU)."""
        from config import Config
        from engine.advisor.estimates import TimingStore, store_for

        self.model_manager = model_manager
        self.config = config if config is not None else Config()
        self.device_name = device or self.config.device
        cache = Path(config.config_dir) / "calibration.json" if config is not None else None
        self.calibrator = ThroughputCalibrator(cache) if calibrate else None
        self.measure_in_advice = measure_in_advice
        self.timings = store_for(config) if config is not None else TimingStore(None)

    def _face_detector(self):
        """The RetinaFace network when its weights are on this machine, on the device the jobs run on: on a GPU
        the analysis detects there, with the very network the face enhancer uses."""
        from engine.face_enhancer import face_detector
        from utils.gpu import resolve_device

        return face_detector(self.model_manager, resolve_device(self.device_name))

    def machine_facts(self, models: tuple[str, ...] = (), check: Callable[[], None] | None = None,
                      measure: bool = True, keep: Callable[[], bool] | None = None) -> MachineFacts:
        """What this machine offers: device, free memory, the models here or downloadable, and the throughput of
        ``models``: calibrated on first use (``check`` runs before each calibration and may raise to stop), or with
        ``measure`` False a stand-in for a catalog model not measured yet (the fastest rate measured on this device,
        :meth:`_device_rate`, else the device's default), named in ``rough_rates``; a user's model, whose speed no
        other network tells, is measured all the same. ``keep``: see
        :meth:`ThroughputCalibrator.macs_per_second`."""
        from utils.gpu import cpu_has_fast_bf16, free_memory_bytes, resolve_device

        device = resolve_device(self.device_name)
        available, downloadable = self._models_here()
        throughput, rough = {}, set()
        if self.calibrator is not None:
            for model in models:
                user = active_catalog()[model].user  # its own class, so no stand-in: measured on first use
                if not measure and not user and self.calibrator.cached(model, device) is None:
                    rough.add(model)  # its stand-in below
                    continue
                if check is not None:
                    check()
                own = self._own_network(model, device) if user else None
                throughput[model] = self.calibrator.macs_per_second(model, device, own, keep)
            stand_in = self._device_rate(device) if rough else None  # read once, whatever the number of models
            if stand_in is not None:
                throughput.update(dict.fromkeys(rough, stand_in))
        return MachineFacts(
            device=str(device), free_memory_bytes=int(free_memory_bytes(device)),
            available_models=frozenset(available), downloadable_models=frozenset(downloadable),
            macs_per_second=throughput,
            max_output_pixels=self.config.max_output_pixels,
            face_enhancement_enabled=self.config.enable_face_enhancement,
            cpu_bf16_fast=device.type == "cpu" and cpu_has_fast_bf16(), rough_rates=frozenset(rough))

    def _models_here(self) -> tuple[set[str], set[str]]:
        """(the models whose weights are here, those that can be downloaded); without a model manager, the
        catalog's bundled models."""
        if self.model_manager is None:
            return {n for n, s in CATALOG.items() if s.bundled is not None}, set()
        statuses = self.model_manager.list_models()
        return {s.name for s in statuses if s.available}, {s.name for s in statuses if s.url}

    def _own_network(self, model: str, device) -> NetworkSource:
        """The network of a user's model as the engine runs it (loaded by the model manager, never downloaded)."""
        def load():
            loaded = self.model_manager.load_model(model, device, "auto", allow_download=False)
            return loaded.net, loaded.dtype
        return load

    def cached_estimate_seconds(self, model: str, width: int, height: int, outscale: float = 4.0, *,
                                calibrate: bool = False) -> float | None:
        """Seconds a job of ``model`` on a ``width``×``height`` input would take here: from the runs learned on
        this machine (model load counted unless it is loaded), else from the model's calibration, else from the
        fastest throughput measured on this device with another model (:meth:`_device_rate`); None when there is
        none of these (or the model is not in the catalog). Cheap: no model runs, unless ``calibrate`` asks to
        measure the model's throughput when nothing on this device is known."""
        from utils.gpu import resolve_device

        if model not in CATALOG:
            return None
        device = resolve_device(self.device_name)
        precision, tiled = self._policy(model, device, width, height)
        runs = self.timings.observations(job_key(device_kind(device), model, precision, tiled))
        throughput = self.calibrator.cached(model, device) if self.calibrator is not None else None
        if runs:
            throughput = throughput or runs[-1].macs / runs[-1].network_seconds
        else:
            throughput = throughput or self._device_rate(device)
            if throughput is None and calibrate and self.calibrator is not None:
                throughput = self.calibrator.macs_per_second(model, device)
        if not throughput:
            return None
        timing = self._learned(model, device, precision, tiled, throughput)
        return float(timing.seconds(CATALOG[model].macs_per_pixel * width * height * 1.1,
                                    width * height * outscale * outscale))

    def check_time_limit(self, model: str, width: int, height: int, limit: float | None, *,
                         outscale: float | None = None, calibrate: bool = False) -> None:
        """Refuse a job of ``model`` whose estimate (:meth:`cached_estimate_seconds`) is over ``limit`` seconds (a
        server's per-job limit; None or 0: no limit). ``outscale`` None: the model's own scale. ``calibrate``:
        measure the model's class when nothing is known here, unless the job is surely within the limit
        (:data:`SLOWEST_MACS_PER_SECOND`).

        Raises:
            InputTooLargeError: over the limit; the message says what to change.
        """
        if not limit or model not in CATALOG:
            return
        outscale = outscale or CATALOG[model].scale
        seconds = self.cached_estimate_seconds(model, width, height, outscale)
        surely_within = CATALOG[model].macs_per_pixel * width * height / SLOWEST_MACS_PER_SECOND <= limit / 2
        if seconds is None and calibrate and not surely_within:  # a first request on a fresh install: no wait
            seconds = self.cached_estimate_seconds(model, width, height, outscale, calibrate=True)
        if seconds is not None and seconds > limit:
            raise self._time_limit_error(f"with {model}", model, (width, height), seconds, limit, outscale)

    def check_auto_time_limit(self, width: int, height: int, limit: float | None,
                              outscale: float | None = None) -> None:
        """Refuse, from the image's size alone, an automatic job that no model the advisor may choose for it
        (:func:`advisable_models`) could finish within ``limit`` seconds. Only from what was measured already (no
        model runs); the advisor's actual choice is checked again once the image is analysed.

        Raises:
            InputTooLargeError: even the quickest of them is over the limit; the message names a model that would
                fit when one is here.
        """
        if not limit:
            return
        models, scale = advisable_models(self.machine_facts(), width, height, outscale)
        estimates = {m: self.cached_estimate_seconds(m, width, height, scale) for m in models if m in CATALOG}
        if not estimates or None in estimates.values():
            return
        least = min(sorted(estimates), key=estimates.get)
        if estimates[least] > limit:
            raise self._time_limit_error(f"with {least}, the quickest model the advisor would choose for it,",
                                         least, (width, height), estimates[least], limit, scale)

    def _time_limit_error(self, how: str, model: str, size: tuple[int, int], seconds: float, limit: float,
                          outscale: float) -> InputTooLargeError:
        """The refusal of a job estimated at ``seconds`` over ``limit`` (``how``: "with MODEL"), naming the
        fastest model here when it would fit."""
        fastest = self.fastest_model()
        quick = None if fastest in (None, model) else self.cached_estimate_seconds(fastest, *size, outscale)
        change = (f"Choose a faster model ({fastest} would take about {quick:.0f} s) or send a smaller image"
                  if quick is not None and quick <= limit else "Send a smaller image or choose a faster model")
        return InputTooLargeError(
            f"This {size[0]}×{size[1]} image {how} would take about {seconds:.0f} s here, over this server's limit "
            f"of {limit:g} s per job. {change}, or ask the operator to raise REALESRGAN_JOB_TIME_LIMIT_SECONDS.",
            actual=round(seconds), limit=limit)

    def fastest_model(self) -> str | None:
        """The available super-resolution model of the catalog with the fewest MACs per input pixel, or None when
        none is here."""
        models = [n for n in self._models_here()[0] if n in CATALOG and CATALOG[n].kind == "sr"]
        return min(sorted(models), key=lambda n: CATALOG[n].macs_per_pixel, default=None)

    def measure_device_rate(self, keep: Callable[[], bool] | None = None) -> float | None:
        """Time the fastest model here once (a 128-pixel calibration, ~0.2 s on a CPU) when nothing was measured on
        this device, so a time limit can be checked from a server's first request (:meth:`_device_rate`). Returns
        the device's rate, None when nothing could be measured (no calibrator or no model here) or kept (``keep``:
        see :meth:`ThroughputCalibrator.macs_per_second`)."""
        from utils.gpu import resolve_device

        device = resolve_device(self.device_name)
        fastest = self.fastest_model()
        if self._device_rate(device) is None and self.calibrator is not None and fastest is not None:
            self.calibrator.macs_per_second(fastest, device, keep=keep)
        return self._device_rate(device)

    def calibrate_advised_models(self, before_each: Callable[[], None] | None = None,
                                 keep: Callable[[], bool] | None = None) -> bool:
        """Calibrate the models every advice estimates that were not measured on this device yet: the first time on
        a machine ~1.5 s on a 2-core CPU (one network of each :func:`rate_class`), later nothing (the figures are
        kept). The app's warm-up calls this in the background, so that no advice waits for it (the app's advisor
        answers with stand-in rates until then, ``measure_in_advice``); ``before_each`` runs before each model (the
        warm-up waits there while a job runs) and ``keep`` after each measurement (False: a job started meanwhile
        and shared the cores, so the figure is not kept). Returns whether every advised model has a kept figure."""
        from utils.gpu import resolve_device

        if self.calibrator is None:
            return False
        self.machine_facts(ADVISED_MODELS, check=before_each, keep=keep)
        device = resolve_device(self.device_name)
        return all(self.calibrator.cached(model, device) is not None for model in ADVISED_MODELS)

    def _device_rate(self, device) -> float | None:
        """The fastest MAC/s measured on ``device`` with any model, by a calibration or a real run. The catalog's
        networks run at much the same MAC/s on one device (the 2-core CPU's calibrations: 79-91 GMAC/s for five
        of them), so it stands in for a model not measured yet; the fastest, so an estimate from it errs short
        and a refusal from it is sure."""
        rates = self.timings.device_rates(device_kind(device))
        if self.calibrator is not None:
            rates += self.calibrator.device_rates(device)
        return max(rates, default=None)

    def advise(self, image, scale: float | None = None, cancel: threading.Event | None = None) -> Advice:
        """Analyse ``image`` (a path, PIL image or ``HxWxC`` array) and recommend settings for it on this machine.

        The tile it shows is the tile the engine will run (:func:`engine.inference.planning.choose_tile`).
        ``cancel`` (a server's time limit, a client gone) is checked between the stages (decode, analysis, each
        model's calibration, each trial model): :class:`~utils.errors.CancelledError` once it is set.
        """
        from engine.face_detect import FaceDetection
        from engine.image_analysis import analyze
        from engine.inference import planning
        from engine.inference.pipeline import Reporter
        from utils.gpu import resolve_device

        stop = Reporter(cancel=cancel)
        start = time.perf_counter()
        stop.check()
        pixels = _pixels(image)
        stop.check()
        analysis = analyze(pixels, detect_faces_too=True, retinaface=self._face_detector())
        stop.check()
        numbers = AnalysisNumbers(
            content_type=analysis.content_type, confidence=float(analysis.confidence), faces=len(analysis.faces),
            noise_level=float(analysis.noise_level), jpeg_artifacts=float(analysis.jpeg_artifacts),
            blur=float(analysis.blur), width=int(analysis.width), height=int(analysis.height),
            bit_depth=int(analysis.bit_depth), has_alpha=bool(analysis.has_alpha),
            content_reason=analysis.content_reason)
        candidates = ADVISED_MODELS
        if self.model_manager is not None:  # the user's own models for this content, calibrated on first use
            candidates += tuple([s.name for s in user_alternatives(numbers.content_type)
                                 if self.model_manager.is_available(s.name)][:2])
        machine = self.machine_facts(tuple(m for m in candidates if self.calibrator is not None), stop.check,
                                     measure=self.measure_in_advice)
        device = resolve_device(self.device_name)

        def tile_for(model: str) -> planning.TileChoice:
            spec = active_catalog()[model]
            precision = planning.effective_precision(spec, device.type, "auto")
            batch_size = planning.batch_size_for(device.type, EnhanceSettings())
            return planning.choose_tile(spec, numbers.height, numbers.width, device=device, precision=precision,
                                        batch_size=batch_size, config=self.config)

        numbers, decided_by, tried = self._settle_content(pixels, analysis, numbers, machine, device, stop.check)
        machine = dataclasses.replace(machine, timing=self._timing(machine, device, tile_for))
        advice = decide(numbers, machine, requested_scale=scale, tile_for=tile_for)
        if tried is not None:
            advice = _with_trial_winner(advice, tried, numbers, machine)
        record = {
            "content_type": numbers.content_type, "confidence": round(numbers.confidence, 3),
            "content_decided_by": decided_by, "content_reason": numbers.content_reason,
            "content_logit": round(float(analysis.content_logit), 2),
            "content_scene_logit": (None if analysis.content_scene_logit is None
                                    else round(float(analysis.content_scene_logit), 2)),
            "faces": numbers.faces,
            "face_boxes": [[round(float(v), 1) for v in (f.x0, f.y0, f.x1, f.y1)] for f in analysis.faces],
            "face_sizes": [round(float(min(f.x1 - f.x0, f.y1 - f.y0)), 1) for f in analysis.faces],
            "face_detector": analysis.face_detector,
            "noise_level": round(numbers.noise_level, 3), "noise_sigma": round(float(analysis.noise_sigma), 2),
            "jpeg_artifacts": round(numbers.jpeg_artifacts, 3), "blur": round(numbers.blur, 3),
            "resolution": f"{numbers.width}x{numbers.height}", "bit_depth": numbers.bit_depth,
            "has_alpha": numbers.has_alpha, "optimal_tile": advice.analysis["optimal_tile"],
            "estimated_seconds": advice.estimated_seconds, "estimated_memory_mb": advice.estimated_memory_mb,
            "estimated_range": advice.analysis.get("estimated_range"),
            "device": machine.device, "alternatives": list(advice.alternatives),
            "trial": None if tried is None else {name: round(db, 2) for name, db in tried.scores.items()},
            "analysis_ms": round((time.perf_counter() - start) * 1000, 1),
        }
        faces = FaceDetection(tuple(analysis.faces), analysis.face_detector) if analysis.face_detector else None
        return dataclasses.replace(advice, analysis=record, faces=faces)

    def _settle_content(self, pixels: np.ndarray, analysis, numbers: AnalysisNumbers, machine: MachineFacts,
                        device, check: Callable[[], None]) -> tuple[AnalysisNumbers, str, object]:
        """An unsure content type is settled by a trial reconstruction when both official models are here and it
        fits the config's ``advisor_trial_seconds`` (the user's ×4 photo/anime models join it when that allows);
        otherwise it stays the photo model, and the reason says why. Returns the numbers, which signal decided the
        content type, and the :class:`~engine.advisor.trial.TrialResult` (None when no trial ran)."""
        from engine.advisor import trial
        from engine.image_analysis import decide_content
        from engine.inference import planning

        unchanged = numbers, analysis.content_decided_by, None
        budget = self.config.advisor_trial_seconds  # the longest a trial may be expected to take; 0: never
        if analysis.content_decided_by != "unsure" or self.model_manager is None or budget <= 0:
            return unchanged
        official = (trial.PHOTO_MODEL, trial.ANIME_MODEL)
        if not all(self.model_manager.is_available(m) for m in official):
            return unchanged
        catalog = active_catalog()
        users = [s.name for s in catalog.values() if s.user and self.model_manager.is_available(s.name)]
        side = min(trial.TRIAL_CROP, numbers.width, numbers.height) // trial.TRIAL_SCALE

        def one(m: str) -> float:  # the model's run on the crop, and its load (learned; 0 once loaded)
            rate = machine.throughput(m)
            precision = planning.effective_precision(catalog[m], device.type, "auto")
            return catalog[m].macs_per_pixel * side * side / rate + self._learned(m, device, precision, False,
                                                                                  rate).load_seconds

        def seconds(models) -> float:
            return sum(one(m) for m in models)

        models = trial.trial_models(catalog.values(), users)
        if seconds(models) > budget:  # the official pair alone, then
            models = trial.trial_models(catalog.values(), ())
        expected = seconds(models)
        if expected > budget:
            note = (f"No time for a trial reconstruction (about {expected:.1f} s here, budget "
                    f"{budget:.1f} s)")
            return dataclasses.replace(numbers, content_reason=f"{numbers.content_reason}. {note}"), "unsure", None
        try:
            rgb = np.ascontiguousarray(_rgb8(pixels))
            result = trial.trial_reconstruction(rgb, self.model_manager, device, check=check, models=models)
        except CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the trial is a tie-breaker; without it the photo model stays
            logger.warning("trial reconstruction failed: %s", exc)
            return unchanged
        decision = decide_content(float(analysis.content_logit), len(analysis.faces) - analysis.drawn_faces,
                                  result.gap_db, scene=analysis.content_scene_logit)
        return dataclasses.replace(numbers, content_type=decision.label, confidence=decision.confidence,
                                   content_reason=decision.reason), decision.decided_by, result

    def _timing(self, machine: MachineFacts, device, tile_for) -> dict[str, TimingModel]:
        """The learned timing per candidate model for this device, precision and tile policy."""
        from engine.inference import planning

        out = {}
        for model in (*machine.macs_per_second, *sorted(machine.rough_rates - set(machine.macs_per_second))):
            precision = planning.effective_precision(active_catalog()[model], device.type, "auto")
            out[model] = self._learned(model, device, precision, tile_for(model).tile > 0, machine.throughput(model))
        return out

    def _policy(self, model: str, device, width: int, height: int) -> tuple[str, bool]:
        """The precision and tile policy (tiled or not) a default job of ``model`` runs with here."""
        from engine.inference import planning

        spec = active_catalog()[model]
        precision = planning.effective_precision(spec, device.type, "auto")
        choice = planning.choose_tile(spec, height, width, device=device, precision=precision,
                                      batch_size=planning.batch_size_for(device.type, EnhanceSettings()),
                                      config=self.config)
        return precision, choice.tile > 0

    def _learned(self, model: str, device, precision: str, tiled: bool, macs_per_second: float) -> TimingModel:
        """What the runs recorded under this key tell, the load counted only when the model is not loaded."""
        kind = device_kind(device)
        timing = prior_timing(model, macs_per_second, self.timings.observations(job_key(kind, model, precision, tiled)),
                              self.timings.loads(load_key(kind, model, precision)))
        if self.model_manager is not None and self.model_manager.is_loaded(model, device, precision):
            timing = dataclasses.replace(timing, load_seconds=0.0)
        return timing

    def get_intelligent_settings(self, image, scale: float | None = None) -> dict:
        """The design's JSON form of :meth:`advise`: ``{"settings": {model, scale, fp32, precision, face_enhance,
        face_strength, tile, auto_tile, denoise_strength}, "reasoning": [...], "analysis": {...}}``."""
        return design_dict(self.advise(image, scale))


def _with_trial_winner(advice: Advice, tried, numbers: AnalysisNumbers, machine: MachineFacts) -> Advice:
    """When one of the user's own models rebuilt the trial crop best on the side the content was settled to, say so
    and offer it first among the alternatives ("Try 4x-Foo, your photo model: on a test crop it was 0.8 dB closer
    than RealESRGAN_x4plus; about 40 s"). The recommendation itself stays an app model."""
    best = tried.best(numbers.content_type)
    if best is None or not active_catalog()[best].user:
        return advice
    runner_up = max((n for n in tried.scores if tried.sides[n] == numbers.content_type and n != best),
                    key=lambda n: tried.scores[n])
    margin = tried.scores[best] - tried.scores[runner_up]
    settings = advice.settings
    own_seconds = estimate_seconds(best, numbers.width, numbers.height, machine, numbers.faces,
                                   settings.face_enhance, outscale=settings.outscale)
    why = (f"your {numbers.content_type} model: on a test crop it was {margin:.1f} dB closer than {runner_up}; "
           f"about {_human_seconds(own_seconds)}")
    others = [alt for alt in advice.alternatives if alt.get("model") != best]
    alternative = {"model": best, "estimated_seconds": round(own_seconds, 1), "why": why}
    return dataclasses.replace(advice, alternatives=(alternative, *others),
                               reasons=(*advice.reasons, f"Try {best}, {why}"))


def design_dict(advice: Advice) -> dict:
    """An :class:`Advice` in the design document's JSON shape (its key names live only here)."""
    s = advice.settings
    return {
        "settings": {"model": s.model, "scale": s.outscale, "fp32": s.precision == "fp32",
                     "precision": s.precision, "face_enhance": s.face_enhance, "face_strength": s.face_strength,
                     "tile": int(advice.analysis.get("optimal_tile", 0)), "auto_tile": s.tile == "auto",
                     "denoise_strength": s.denoise_strength},
        "reasoning": list(advice.reasons),
        "analysis": dict(advice.analysis),
    }


def _rgb8(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB from gray/RGB/RGBA, 8 or 16 bits."""
    from utils.image_io import to_8bit

    pixels = to_8bit(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    colour = pixels[:, :, : 1 if pixels.shape[2] in (1, 2) else 3]
    return np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour


def _pixels(image) -> np.ndarray:
    """Accept a path, PIL image or array; return HxWxC uint8/uint16 pixels."""
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image
    from engine.inference.pipeline import load_input

    return load_input(image).pixels

