"""Is bf16 faithful enough for a model on the CPU? Measured once per (model, denoise strength) against fp32.

The verdict (a PSNR in dB) depends on the weights, on torch's kernels and on the CPU's instructions, not on the
process, so it is kept on disk in the weights dir (``bf16-verdicts.json``) under a key naming the model, the
denoise strength, the torch version and the CPU (see :func:`verdict_key`): the probe (two model loads and two
runs) runs once per machine and torch install, not in every CLI call. A damaged or unwritable file only means the
probe runs again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import threading
from pathlib import Path

import numpy as np

from utils.atomic import write_atomic

logger = logging.getLogger(__name__)

BF16_MIN_PSNR = 40.0
VERDICTS_FILE = "bf16-verdicts.json"
_PROBE_VERSION = 1  # raise when the probe image or its measure changes: older verdicts are then ignored

_bf16_verdicts: dict[tuple[str, float | None], float] = {}  # this process's verdicts (its torch and CPU are fixed)
_bf16_lock = threading.Lock()
probe_runs = 0  # how many probes this process ran (a measured verdict, not one read back)


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str:
    """What of the CPU decides torch's kernels: architecture, torch's vector capability and the CPU flags (hashed).

    Example: ``"x86_64-AVX2-1f3a9c0b2d4e"``.
    """
    import torch

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = next((line.split(":", 1)[1] for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:  # not Linux: the processor's name stands in for its flags
        flags = platform.processor()
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}-{digest}"


def verdict_key(model_name: str, denoise_strength: float | None, torch_version: str | None = None,
                cpu: str | None = None) -> str:
    """The on-disk key of a verdict: model, denoise strength, torch version and CPU (this machine's by default)."""
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    cpu = cpu_signature() if cpu is None else cpu
    return f"{model_name}|denoise={denoise_strength}|torch={torch_version}|cpu={cpu}|probe={_PROBE_VERSION}"


def verdicts_path(model_manager) -> Path:
    return Path(model_manager.config.weights_dir) / VERDICTS_FILE


def read_verdicts(path: Path) -> dict[str, float]:
    """The verdicts stored at ``path``; empty when the file is missing or damaged."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict):
        return {}
    return {str(k): float(v) for k, v in stored.items() if isinstance(v, (int, float))}


def _store_verdict(path: Path, key: str, psnr: float) -> None:
    """Add one verdict to the file atomically (:func:`utils.atomic.write_atomic`): a crash leaves
    the old file or the new one, never half of one. Concurrent writers may drop each other's entry (it is then
    measured again), never corrupt the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        verdicts = read_verdicts(path) | {key: psnr}
        write_atomic(path, json.dumps(verdicts, indent=1, sort_keys=True).encode("utf-8"))
    except OSError as exc:  # a read-only weights dir: the verdict stays in this process only
        logger.debug("could not store the bf16 verdict in %s: %s", path, exc)


def bf16_psnr(model_manager, model_name: str, denoise_strength: float | None = None) -> float:
    """PSNR (dB) of the model's bf16 output against fp32 on a fixed probe image, measured once per model, torch
    version and CPU (kept in memory and on disk, see the module docstring).

    bf16 on the CPU is an opt-in fast mode that is kept only where it stays faithful (see BF16_MIN_PSNR).
    """
    global probe_runs

    key = (model_name, denoise_strength)
    with _bf16_lock:
        if key in _bf16_verdicts:
            return _bf16_verdicts[key]
        path, disk_key = verdicts_path(model_manager), verdict_key(model_name, denoise_strength)
        stored = read_verdicts(path).get(disk_key)
        if stored is not None:
            _bf16_verdicts[key] = stored
            logger.debug("bf16 check for %s: %.1f dB against fp32 (stored)", model_name, stored)
            return stored
        psnr = _probe(model_manager, model_name, denoise_strength)
        probe_runs += 1
        _bf16_verdicts[key] = psnr
        _store_verdict(path, disk_key, psnr)
        logger.info("bf16 check for %s: %.1f dB against fp32", model_name, psnr)
        return psnr


def check_loaded_models(model_manager, denoise_strength: float | None, before_each=lambda: None) -> list[str]:
    """On a CPU that computes bf16 natively (where the advice offers bf16 as the fast mode), the verdict of each
    model loaded for the CPU in fp32, so that the first bf16 request after an install does not pay the probe (~3 s
    of CPU for RealESRGAN_x4plus on 2 cores); the app's warm-up calls this in the background, ``before_each`` before
    each model. The bf16 copy a probe loads is dropped again unless it was loaded before. Returns the models
    checked; a failure is logged (a bf16 request probes again and reports it)."""
    from utils import gpu

    if not gpu.cpu_has_fast_bf16():
        return []
    checked = []
    for name in model_manager.loaded_names("cpu", "fp32"):
        had_bf16 = name in model_manager.loaded_names("cpu", "bf16")
        before_each()
        try:
            bf16_psnr(model_manager, name, denoise_strength)
            checked.append(name)
        except Exception as exc:  # a bf16 request probes again and reports what is wrong
            logger.warning("bf16 check of %s in the background failed: %s", name, exc)
        if not had_bf16:
            model_manager.unload_model(name, "cpu", "bf16")
    return checked


def _probe(model_manager, model_name: str, denoise_strength: float | None) -> float:
    from engine import upscaler

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 40.0
    probe = np.stack([yy, xx, (yy + xx) / 2], axis=2) * 0.8 + rng.random((40, 40, 3)) * 0.2
    probe = np.ascontiguousarray(probe, dtype=np.float32)
    outputs = []
    for precision in ("fp32", "bf16"):
        loaded = model_manager.load_model(model_name, "cpu", precision, denoise_strength=denoise_strength)
        out, _ = upscaler.upscale_image_ex(loaded.net, probe, upscaler.TileOptions(
            scale=loaded.spec.network_scale, tile=0, batch_size=1, dtype=loaded.dtype,
            pad_multiple=loaded.spec.pad_multiple))
        outputs.append(out)
    mse = float(np.mean((outputs[0] - outputs[1]) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(1.0 / mse))
