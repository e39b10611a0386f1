"""Time estimates that learn from real runs.

Every finished enhancement (``engine.inference.batch.run_item`` reports it) adds one observation to the key
(device, model, precision, tile policy): the network's multiply-accumulates for that input and the job's whole
wall time (model load, decode, inference, faces, metrics and save). The estimate for a new image is
``fixed + MACs / rate``, fitted to the last :data:`KEEP` observations by :func:`fit_timing`, a robust (Theil-Sen:
medians of pairwise slopes) line, so one run slowed by a busy machine moves it little. Before any real run, the
short calibration run of :class:`engine.intelligent_enhancer.ThroughputCalibrator` gives the rate and the fixed
cost is unknown, so the estimate is shown as a range.

Observations are kept in ``<config dir>/timings.json``, written atomically (temporary file, fsync, rename), so a
crash leaves the previous file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from statistics import median

logger = logging.getLogger(__name__)

__all__ = ["KEEP", "Observation", "TimingModel", "TimingStore", "fit_timing", "job_key", "prior_fixed_seconds",
           "record_job"]

#: Observations kept per key (the newest).
KEEP = 12
#: Relative half-width of the range shown while the model rests on fewer than two real runs.
UNSURE_SPREAD = 0.5
#: Smallest relative half-width shown once real runs agree.
MIN_SPREAD = 0.1


@dataclass(frozen=True)
class Observation:
    macs: float  # network multiply-accumulates of the job
    seconds: float  # measured wall time of the whole job


@dataclass(frozen=True)
class TimingModel:
    """``seconds = fixed_seconds + macs / macs_per_second``, +-``spread`` (relative) when shown as a range."""

    macs_per_second: float
    fixed_seconds: float
    spread: float
    observations: int

    def seconds(self, macs: float) -> float:
        return self.fixed_seconds + macs / self.macs_per_second

    def range(self, macs: float) -> tuple[float, float]:
        s = self.seconds(macs)
        return s * (1.0 - self.spread), s * (1.0 + self.spread)


def fit_timing(observations: list[Observation], prior_rate: float, prior_fixed: float = 0.0) -> TimingModel:
    """Fit the timing line to observations (pure, deterministic).

    * no observation: the prior (the calibration's rate), spread :data:`UNSURE_SPREAD`;
    * observations of one size only: the fixed cost stays ``prior_fixed`` and the rate is the median of
      ``macs / (seconds - fixed)``;
    * two sizes or more: slope = median of the pairwise slopes (Theil-Sen), fixed = median of the residual
      intercepts, clipped to >= 0; the spread is the median relative residual (at least :data:`MIN_SPREAD`).

    Args:
        observations: this key's runs, any order.
        prior_rate: MAC/s to use without observations (> 0).
        prior_fixed: seconds of fixed cost to assume when the data cannot tell it.

    Returns:
        A :class:`TimingModel`.
    """
    if prior_rate <= 0:
        raise ValueError("prior_rate must be > 0")
    obs = [o for o in observations if o.macs > 0 and o.seconds > 0]
    if not obs:
        return TimingModel(prior_rate, prior_fixed, UNSURE_SPREAD, 0)
    slopes = [(b.seconds - a.seconds) / (b.macs - a.macs)
              for i, a in enumerate(obs) for b in obs[i + 1:] if abs(b.macs - a.macs) > 0.05 * max(a.macs, b.macs)]
    if slopes and median(slopes) > 0:
        slope = median(slopes)
        fixed = max(0.0, median(o.seconds - slope * o.macs for o in obs))
    else:
        fixed = min(prior_fixed, 0.5 * min(o.seconds for o in obs))
        slope = median((o.seconds - fixed) / o.macs for o in obs)
    rate = 1.0 / max(slope, 1e-15)
    model = TimingModel(rate, fixed, UNSURE_SPREAD, len(obs))
    if len(obs) < 2:
        return model
    residual = median(abs(o.seconds - model.seconds(o.macs)) / o.seconds for o in obs)
    return TimingModel(rate, fixed, min(UNSURE_SPREAD, max(MIN_SPREAD, 1.5 * residual)), len(obs))


def job_key(device: str, model: str, precision: str, tiled: bool) -> str:
    """The key observations are kept under: device kind ("cpu", "cuda:0"), model, precision, tile policy."""
    return f"{device}|{model}|{precision}|{'tiled' if tiled else 'whole'}"


class TimingStore:
    """Observations per :func:`job_key`, in a JSON file (None: in memory only). Thread-safe; atomic writes."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, list[list[float]]] | None = None

    def _load(self) -> dict[str, list[list[float]]]:
        if self._data is None:
            self._data = {}
            if self.path is not None and self.path.is_file():
                try:
                    raw = json.loads(self.path.read_text())
                    self._data = {str(k): [[float(m), float(s)] for m, s in v][-KEEP:] for k, v in raw.items()}
                except (ValueError, TypeError, OSError) as exc:
                    logger.warning("ignoring unreadable timings file %s: %s", self.path, exc)
        return self._data

    def observations(self, key: str) -> list[Observation]:
        with self._lock:
            return [Observation(m, s) for m, s in self._load().get(key, [])]

    def add(self, key: str, observation: Observation) -> None:
        if not (observation.macs > 0 and observation.seconds > 0 and math.isfinite(observation.seconds)):
            return
        with self._lock:
            data = self._load()
            data[key] = (data.get(key, []) + [[observation.macs, observation.seconds]])[-KEEP:]
            self._save(data)

    def _save(self, data: dict) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not save the timings file: %s", exc)


def prior_fixed_seconds(model: str) -> float:
    """Fixed cost of one job to assume until runs of two sizes tell it: starting up, building the network from its
    weights (~1 s per 20 MB on a CPU), decoding and saving. Measured on the CLI it is 1-10 s."""
    from engine.catalog import CATALOG

    size = CATALOG[model].size_bytes if model in CATALOG else None
    return 1.0 + (size or 0) / 20e6


def store_for(config) -> TimingStore:
    return TimingStore(Path(config.config_dir) / "timings.json")


def job_macs(model: str, width: int, height: int, faces: int = 0) -> float:
    """Multiply-accumulates of one job: the network over the input (+10% tile overlap) and GFPGAN per face."""
    from engine.catalog import CATALOG
    from engine.intelligent_enhancer import GFPGAN_MACS_PER_FACE

    return CATALOG[model].macs_per_pixel * width * height * 1.1 + faces * GFPGAN_MACS_PER_FACE


def record_job(config, result, seconds: float) -> None:
    """Add a finished job (an :class:`engine.inference.result.EnhanceResult` and its wall time) to the store.

    Never raises: a failure to record is logged.
    """
    try:
        from engine.catalog import CATALOG

        if result.model not in CATALOG:
            return
        width, height = result.input_size
        device = str(result.device).split(":")[0] if str(result.device).startswith("cpu") else str(result.device)
        key = job_key(device, result.model, str(result.precision), bool(result.tile))
        store_for(config).add(key, Observation(job_macs(result.model, width, height, result.faces_restored),
                                               float(seconds)))
    except Exception:  # noqa: BLE001 - recording a timing must never fail a job
        logger.warning("could not record the job's time", exc_info=True)
