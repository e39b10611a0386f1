"""Time estimates that learn from real runs, stage by stage.

Every finished enhancement (the batch runner's, saved or kept in memory for the REST API, and the web app's image
job report it through :func:`record_job`) adds one :class:`Observation` to its key (device, model, precision, tile
policy), with the job's stages timed apart by the pipeline (``EnhanceResult.timings``):

* the **network** (``inference``): a fixed part (the kernels' set-up for a new input shape, :data:`NETWORK_FIXED_SHARE`
  of one run until runs of two sizes tell it by Theil-Sen) plus MACs at a rate learned from one run — a
  recency-weighted median of the last runs' rates, so a slow first run or a busy calibration is corrected by the
  next real run and one outlier among several moves it little;
* the **overhead** (decode, analysis, alpha, metrics, save): a robust line in the output pixels, a constant plus
  seconds per pixel (from one size: the prior per-pixel rate, the rest constant; Theil-Sen once two sizes are
  known);
* **faces**: seconds per restored face;
* the **model load** (building the network from its weights), kept per (device, model, precision) apart from the
  rest and counted only when the model is not already loaded in the :class:`engine.model_manager.ModelManager`.

The estimate is ``load + network + overhead + faces`` (:class:`TimingModel`); while it rests on fewer than two
runs it is shown as a range. Before any real run the network rate is the short calibration's
(:class:`engine.intelligent_enhancer.ThroughputCalibrator`), the load a guess from the weights' size.

Observations are kept in ``<config dir>/timings.json`` (format :data:`FORMAT`; a file of another format is ignored
and replaced), written atomically (temporary file, fsync, rename), so a crash leaves the previous file.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from utils.atomic import write_atomic

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "KEEP", "Observation", "TimingModel", "TimingStore", "fit_timing", "job_key", "job_macs",
           "load_key", "prior_load_seconds", "record_job", "store_for"]

#: Version of the timings file; a file of another version is ignored (and replaced on the next save).
FORMAT = 2
#: Observations kept per key (the newest).
KEEP = 12
#: Weight of each older run against the next newer one in the recency-weighted medians.
RECENCY = 0.8
#: Relative half-width of the range shown while the estimate rests on the calibration alone (no real run).
UNSURE_SPREAD = 0.5
#: ... and on one real run: bench/eval_estimates.py measured -9% to -2% (96 -> 160 px) and -7% to -5% (96 ->
#: 400 px) on a quiet CPU, -14% to +14% on one shared with other jobs.
ONE_RUN_SPREAD = 0.25
#: Smallest relative half-width shown once real runs agree.
MIN_SPREAD = 0.1
#: Seconds of a job's overhead that do not grow with the pixels (file handling, set-up), assumed before any run.
OVERHEAD_FIXED = 0.2
#: Seconds per output pixel of decode, metrics and save, assumed until runs of two sizes tell it (PNG save
#: dominates: ~20 MP/s); what one run's overhead has beyond it is fixed (in a fresh process: mostly imports).
PRIOR_OVERHEAD_PER_PIXEL = 5e-8
#: Share of one run's network seconds taken as fixed (first-call set-up of the kernels for a new input shape,
#: thread start) until runs of two sizes tell it. Measured in fresh CLI processes on a 2-core CPU (2026-12-01,
#: 64-400 px, bench/eval_estimates.py's images): the network's time is proportional to its MACs at ~100 GMAC/s
#: from 64 px up, the fitted fixed part 0 s for x4plus and anime_6B and 9 ms for animevideov3. Taking half of a
#: small run as fixed (this was 0.5, from before the first-run costs were removed) made a 400 px estimate from
#: a 96 px run 39-44% short.
NETWORK_FIXED_SHARE = 0.05
#: A load shorter than this was a cache hit (a dict look-up), not a network build, and is not learned from.
CACHE_HIT_SECONDS = 0.02


@dataclass(frozen=True)
class Observation:
    """One finished job, its stages timed apart (seconds)."""

    macs: float  # network multiply-accumulates of the job (faces not included)
    network_seconds: float  # the network alone
    output_pixels: float
    overhead_seconds: float  # decode, analysis, alpha, metrics and save
    faces: int = 0
    face_seconds: float = 0.0


@dataclass(frozen=True)
class TimingModel:
    """``seconds = load + network_fixed + macs / rate + overhead_fixed + overhead_per_pixel * pixels
    + faces * face_seconds``,
    +-``spread`` (relative) when shown as a range. ``load_seconds`` is 0 when the model is already loaded."""

    macs_per_second: float
    network_fixed: float
    load_seconds: float
    overhead_fixed: float
    overhead_per_pixel: float
    face_seconds: float
    spread: float
    observations: int

    def seconds(self, macs: float, output_pixels: float = 0.0, faces: int = 0) -> float:
        return (self.load_seconds + self.network_fixed + macs / self.macs_per_second + self.overhead_fixed
                + self.overhead_per_pixel * output_pixels + faces * self.face_seconds)

    def range(self, macs: float, output_pixels: float = 0.0, faces: int = 0) -> tuple[float, float]:
        s = self.seconds(macs, output_pixels, faces)
        return s * (1.0 - self.spread), s * (1.0 + self.spread)


def _recent_median(values: list[float]) -> float:
    """Weighted median of ``values`` (oldest first), each older value weighing :data:`RECENCY` times the next."""
    weights = [RECENCY ** (len(values) - 1 - i) for i in range(len(values))]
    half, total = sum(weights) / 2, 0.0
    for value, weight in sorted(zip(values, weights)):
        total += weight
        if total >= half:
            return value
    return values[-1]


def _theil_sen(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """``(fixed, slope)`` of ``y = fixed + slope * x`` by Theil-Sen (median of the pairwise slopes of points whose
    ``x`` differ by more than 5%, then the median intercept, clipped to >= 0); None without two such sizes or when
    the slope is not positive."""
    slopes = [(yb - ya) / (xb - xa) for i, (xa, ya) in enumerate(zip(xs, ys)) for xb, yb in zip(xs[i + 1:], ys[i + 1:])
              if abs(xb - xa) > 0.05 * max(xa, xb)]
    if not slopes or median(slopes) <= 0:
        return None
    slope = median(slopes)
    return max(0.0, median(y - slope * x for x, y in zip(xs, ys))), slope


def fit_timing(runs: list[Observation], loads: list[float], prior_rate: float, prior_load: float = 0.0,
               prior_face_seconds: float = 0.0) -> TimingModel:
    """The estimate's parts from this key's runs and this model's load times (pure, deterministic).

    Args:
        runs: this key's jobs, oldest first.
        loads: seconds this model took to load on this device in this precision, oldest first.
        prior_rate: the calibration's MAC/s, used until a run is recorded (> 0).
        prior_load: seconds to assume for a load until one is recorded.
        prior_face_seconds: seconds per face until a run with faces is recorded.

    Returns:
        A :class:`TimingModel` (its spread :data:`UNSURE_SPREAD` without a run, :data:`ONE_RUN_SPREAD` with one).

    Raises:
        ValueError: ``prior_rate`` is not positive.
    """
    if not prior_rate > 0:
        raise ValueError("prior_rate must be > 0")
    runs = [r for r in runs if r.macs > 0 and r.network_seconds > 0 and r.output_pixels > 0
            and r.overhead_seconds >= 0][-KEEP:]
    loads = [s for s in loads if s > 0][-KEEP:]
    network_fixed, rate = 0.0, prior_rate
    if runs:
        line = _theil_sen([r.macs for r in runs], [r.network_seconds for r in runs])
        shortest = min(r.network_seconds for r in runs)
        network_fixed = min(line[0], 0.9 * shortest) if line else NETWORK_FIXED_SHARE * shortest
        rate = _recent_median([r.macs / (r.network_seconds - network_fixed) for r in runs])
    fixed, per_pixel = OVERHEAD_FIXED, PRIOR_OVERHEAD_PER_PIXEL
    if runs:
        line = _theil_sen([r.output_pixels for r in runs], [r.overhead_seconds for r in runs])
        if line is None:  # one size: the pixels' share at the prior rate (saving), the rest is fixed
            per_pixel = min(PRIOR_OVERHEAD_PER_PIXEL, median(r.overhead_seconds / r.output_pixels for r in runs))
            line = median(r.overhead_seconds - per_pixel * r.output_pixels for r in runs), per_pixel
        fixed, per_pixel = line
    with_faces = [r.face_seconds / r.faces for r in runs if r.faces > 0 and r.face_seconds > 0]
    face_seconds = median(with_faces) if with_faces else prior_face_seconds
    load = _recent_median(loads) if loads else prior_load
    model = TimingModel(rate, network_fixed, load, fixed, per_pixel, face_seconds,
                        ONE_RUN_SPREAD if runs else UNSURE_SPREAD, len(runs))
    if len(runs) < 2:
        return model
    # How well the parts explain the runs themselves (the load is not part of a run's record).
    residual = median(abs(model.seconds(r.macs, r.output_pixels, r.faces) - load - total) / total
                      for r in runs for total in [r.network_seconds + r.overhead_seconds + r.face_seconds])
    return TimingModel(rate, network_fixed, load, fixed, per_pixel, face_seconds,
                       min(UNSURE_SPREAD, max(MIN_SPREAD, 1.5 * residual)), len(runs))


def job_key(device: str, model: str, precision: str, tiled: bool) -> str:
    """The key runs are kept under: device kind ("cpu", "cuda:0"), model, precision, tile policy."""
    return f"{device}|{model}|{precision}|{'tiled' if tiled else 'whole'}"


def load_key(device: str, model: str, precision: str) -> str:
    """The key load times are kept under."""
    return f"{device}|{model}|{precision}"


class TimingStore:
    """Runs per :func:`job_key` and load times per :func:`load_key`, in a JSON file (None: in memory only).

    Thread-safe; the file is re-read when another process changed it; atomic writes.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._runs: dict[str, list[list[float]]] = {}
        self._loads: dict[str, list[float]] = {}
        self._stamp: tuple[int, int] | None = None

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            stat = self.path.stat()
        except OSError:
            return
        if self._stamp == (stat.st_mtime_ns, stat.st_size):
            return
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        try:
            raw = json.loads(self.path.read_text())
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                logger.info("timings file %s is of another format: starting afresh", self.path)
                return
            self._runs = {str(k): [[float(x) for x in run][:6] for run in v if len(run) >= 6][-KEEP:]
                          for k, v in raw.get("runs", {}).items()}
            self._loads = {str(k): [float(s) for s in v][-KEEP:] for k, v in raw.get("loads", {}).items()}
        except (ValueError, TypeError, AttributeError, OSError) as exc:
            logger.warning("ignoring unreadable timings file %s: %s", self.path, exc)

    def observations(self, key: str) -> list[Observation]:
        with self._lock:
            self._refresh()
            return [Observation(m, n, p, o, int(f), fs) for m, n, p, o, f, fs in self._runs.get(key, [])]

    def device_rates(self, device: str) -> list[float]:
        """MAC/s of the newest run of every key of ``device`` (a :func:`device_kind`), any model."""
        with self._lock:
            self._refresh()
            return [runs[-1][0] / runs[-1][1] for key, runs in self._runs.items()
                    if key.split("|", 1)[0] == device and runs and runs[-1][1] > 0]

    def loads(self, key: str) -> list[float]:
        with self._lock:
            self._refresh()
            return list(self._loads.get(key, []))

    def add(self, key: str, run: Observation, load: tuple[str, float] | None = None) -> None:
        """Keep ``run`` under ``key`` (and ``load``, ``(load_key, seconds)``, when the model was built for it).
        Runs with a non-finite or non-positive time are refused."""
        values = [run.macs, run.network_seconds, run.output_pixels, run.overhead_seconds, run.faces, run.face_seconds]
        if not (all(math.isfinite(v) for v in values) and run.macs > 0 and run.network_seconds > 0
                and run.output_pixels > 0 and run.overhead_seconds >= 0):
            return
        with self._lock:
            self._refresh()
            self._runs[key] = (self._runs.get(key, []) + [[float(v) for v in values]])[-KEEP:]
            if load is not None and math.isfinite(load[1]) and load[1] > 0:
                self._loads[load[0]] = (self._loads.get(load[0], []) + [float(load[1])])[-KEEP:]
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"format": FORMAT, "runs": self._runs, "loads": self._loads}).encode())
            stat = self.path.stat()
            self._stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            logger.warning("could not save the timings file: %s", exc)


def prior_load_seconds(model: str) -> float:
    """Seconds to build ``model``'s network before one load is recorded: 0.1 s and 1 s per 150 MB of weights
    (measured on 2 CPU cores, page cache warm, in a CLI process: RealESRGAN_x4plus's 67 MB 0.21-0.38 s,
    realesr-animevideov3's 2.5 MB 0.03 s; a cold disk reads at 150 MB/s or faster)."""
    from engine.catalog import CATALOG

    size = CATALOG[model].size_bytes if model in CATALOG else None
    return 0.1 + (size or 0) / 150e6


def store_for(config) -> TimingStore:
    return TimingStore(Path(config.config_dir) / "timings.json")


def job_macs(model: str, width: int, height: int) -> float:
    """Network multiply-accumulates of one job over a ``width``×``height`` input (+10% tile overlap)."""
    from engine.catalog import active_catalog

    return active_catalog()[model].macs_per_pixel * width * height * 1.1


def device_kind(device) -> str:
    """The device part of a key: "cpu" for any CPU, else the device as named ("cuda:0")."""
    return "cpu" if str(device).startswith("cpu") else str(device)


def record_job(config, result, seconds: float) -> None:
    """Add a finished job to the store: ``result`` is its :class:`engine.inference.result.EnhanceResult` (its
    ``timings`` split into decode, load, inference, alpha, faces, metrics), ``seconds`` its whole wall time
    (with reading and saving); the overhead is what the load, network and faces leave.

    Never raises: a failure to record is logged.
    """
    try:
        from engine.catalog import CATALOG

        if result.model not in CATALOG:
            return
        width, height = result.input_size
        timings = dict(result.timings)
        load, network, faces = timings.get("load", 0.0), timings.get("inference", 0.0), timings.get("faces", 0.0)
        out_h, out_w = result.pixels.shape[:2]
        device = device_kind(result.device)
        run = Observation(job_macs(result.model, width, height), float(network), float(out_w * out_h),
                          max(0.0, float(seconds) - load - network - faces), int(result.faces_restored),
                          float(faces) if result.faces_restored else 0.0)
        built = (load_key(device, result.model, str(result.precision)), float(load)) \
            if load > CACHE_HIT_SECONDS else None
        store_for(config).add(job_key(device, result.model, str(result.precision), bool(result.tile)), run, built)
    except Exception:  # noqa: BLE001 - recording a timing must never fail a job
        logger.warning("could not record the job's time", exc_info=True)
