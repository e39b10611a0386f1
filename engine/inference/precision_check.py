"""Is bf16 faithful enough for a model on the CPU? Measured once per (model, denoise strength) against fp32."""

from __future__ import annotations

import logging
import threading

import numpy as np

logger = logging.getLogger(__name__)

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
            out, _ = upscaler.upscale_image_ex(loaded.net, probe, upscaler.TileOptions(
                scale=loaded.spec.network_scale, tile=0, batch_size=1, dtype=loaded.dtype,
                pad_multiple=loaded.spec.pad_multiple))
            outputs.append(out)
        mse = float(np.mean((outputs[0] - outputs[1]) ** 2))
        psnr = 100.0 if mse == 0 else float(10 * np.log10(1.0 / mse))
        _bf16_verdicts[key] = psnr
        logger.info("bf16 check for %s: %.1f dB against fp32", model_name, psnr)
        return psnr
