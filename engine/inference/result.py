"""What enhancing one image gives (:class:`EnhanceResult`) and how it is written to a file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.settings import EnhanceSettings

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})


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
    pending_metrics: object = None  # quality metrics still to measure (engine.inference.pipeline.finish_metrics)

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


def output_format_for(result: EnhanceResult, requested: str | None = None) -> str:
    """The format the result is saved in: the requested one, or for "auto" one that keeps what the input had."""
    from utils.image_io import choose_output_format

    return choose_output_format(requested or result.settings.output_format, result.input_format,
                                result.mode in ("LA", "RGBA"), result.bit_depth, result.size)


def save_result(result: EnhanceResult, path: str | Path, *, original_bytes: int | None = None,
                output_format: str | None = None) -> tuple[Path, dict, list[str]]:
    """Write the result atomically; returns (path, updated metrics with file sizes, warnings from the format).

    The result's pixels are lent to the encoder (``utils.image_io.save_image``'s ``in_place``: a WebP swaps red
    and blue in place and back rather than copying them), so no other thread may read them meanwhile."""
    from utils.image_io import save_image
    from utils.metrics import file_metrics

    path = Path(path)
    fmt = output_format or output_format_for(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = save_image(result.pixels, path, format=fmt, quality=result.settings.quality,
                       icc_profile=result.icc_profile, exif=result.exif, in_place=True)
    notes = [w[:1].upper() + w[1:] + "." for w in saved.warnings]
    metrics = dict(result.metrics)
    metrics.update(file_metrics((result.input_size[0], result.input_size[1]), result.size, original_bytes,
                                saved.bytes_written))
    if result.settings.save_face_crops and result.face_crops:
        from engine.face_enhancer import save_face_crops

        crops = save_face_crops(result.face_crops, path)
        notes.append(f"Saved {len(crops)} face crop(s) next to the output ({crops[0].name}, ...).")
    return saved.path, metrics, notes
