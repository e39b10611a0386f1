"""Real-ESRGAN Ultimate engine: models, tiled inference, faces, video, the settings advisor.

No gradio here. The public names below are imported lazily (PEP 562), so ``import engine`` stays cheap and has
no side effects; ``from engine import enhance_image_direct`` loads what it needs on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # models
    "CATALOG": "engine.catalog", "ModelSpec": "engine.catalog", "SR_MODELS": "engine.catalog",
    "FACE_MODELS": "engine.catalog", "ModelManager": "engine.model_manager", "ModelStatus": "engine.model_manager",
    "LoadedModel": "engine.model_manager",
    # images
    "EnhanceSettings": "engine.processor", "EnhanceResult": "engine.processor",
    "enhance_image_direct": "engine.processor", "process_batch": "engine.processor", "save_result": "engine.processor",
    "BatchReport": "engine.processor", "make_frame_enhancer": "engine.processor",
    "upscale_image": "engine.upscaler", "TileOptions": "engine.upscaler",
    # faces, advice, video, settings
    "FaceSettings": "engine.face_enhancer", "enhance_faces": "engine.face_enhancer",
    "IntelligentEnhancer": "engine.intelligent_enhancer",
    "VideoSettings": "engine.video", "VideoLimits": "engine.video", "VideoRunOptions": "engine.video",
    "upscale_video": "engine.video",
    "DescribedFrameEnhancer": "engine.video",
    "probe_video": "engine.video",
    "SettingsManager": "engine.settings_manager", "DeviceLimiter": "engine.concurrency",
    # errors
    "EngineError": "engine.errors", "InvalidSettingsError": "engine.errors", "InvalidInputError": "engine.errors",
    "UnsupportedFormatError": "engine.errors", "InputTooLargeError": "engine.errors",
    "ModelNotAvailableError": "engine.errors", "DownloadError": "engine.errors",
    "ChecksumMismatchError": "engine.errors", "OutOfMemoryError": "engine.errors", "CancelledError": "engine.errors",
    "VideoError": "engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
