"""The engine's public entry, as the design names it: enhance one image (:func:`enhance_image_direct`) or many
(:func:`process_batch`).

The work lives in :mod:`engine.inference`: ``planning`` (pure: output size, routing, precision, tile and overlap),
``pipeline`` (one image on a frozen job), ``batch`` (the one batch runner) and ``result`` (the result and saving).
The one settings model is :mod:`engine.settings`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from engine.inference.batch import (BatchInput, BatchItem, BatchJob, BatchProgress, BatchReport, BatchServices,
                                    collect_inputs, output_path_for, run_batch)
from engine.inference.pipeline import FrameEnhancer, ProgressFn, bleed_transparent_colours, enhance_image, load_input
from engine.inference.planning import cpu_cache_tile, overlap_for, plan_output_size, route_model
from engine.inference.result import IMAGE_EXTENSIONS, EnhanceResult, output_format_for, save_result
from engine.settings import EnhanceSettings

__all__ = [
    "IMAGE_EXTENSIONS", "BatchInput", "BatchItem", "BatchJob", "BatchReport", "BatchServices", "EnhanceResult",
    "EnhanceSettings", "FrameEnhancer", "bleed_transparent_colours", "collect_inputs", "cpu_cache_tile",
    "enhance_image_direct", "load_input", "make_frame_enhancer", "output_format_for", "output_path_for",
    "overlap_for", "plan_output_size", "process_batch", "route_model", "run_batch", "save_result", "warm_up",
]


def enhance_image_direct(image, settings: EnhanceSettings | None, model_manager, progress: ProgressFn | None = None,
                         *, config=None, cancel: threading.Event | None = None) -> EnhanceResult:
    """Enhance one image.

    Args:
        image: a path, bytes, PIL image or ``HxW[xC]`` uint8/uint16 array (RGB order).
        settings: an :class:`EnhanceSettings` (None for defaults).
        model_manager: the app's :class:`~engine.model_manager.ModelManager`.
        progress: ``progress(fraction in [0, 1], message)``.
        config: the app :class:`~config.Config` (limits, device, fallbacks); None for ``Config()``'s defaults.
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
    return enhance_image(image, settings, model_manager, progress, config=config, cancel=cancel)


def process_batch(inputs: Sequence[str | Path], job: BatchJob, progress: BatchProgress | None = None, *,
                  model_manager, config=None, recursive: bool = False, cancel: threading.Event | None = None,
                  advisor=None) -> BatchReport:
    """Enhance the images in ``inputs`` (files or folders) as ``job`` says, continuing past failures.

    With ``job.auto`` the advisor chooses per image, so a mixed batch of anime and photos gets the right model for
    each, while what the user set in ``job.explicit`` stays. ``progress(index, total, name, fraction)``.
    """
    from config import Config

    services = BatchServices(model_manager, config if config is not None else Config(), advisor)
    return run_batch(collect_inputs(inputs, recursive), job, services, progress=progress, cancel=cancel)


def make_frame_enhancer(model_manager, settings: EnhanceSettings, config=None) -> "DescribedFrameEnhancer":
    """A callable for :func:`engine.video.upscale_video` running frames through the same engine as images. It
    carries the settings that decide its pixels, so a resumed video never joins frames of other settings."""
    from engine.video import DescribedFrameEnhancer

    frames = FrameEnhancer(model_manager, settings, config)
    return DescribedFrameEnhancer(frames, frames.settings.as_dict())


def warm_up(model_manager, settings: EnhanceSettings, side: int = 64, *, config=None) -> None:
    """Pay the one-time costs of ``settings``' model before the first request needs them: the weights load, the
    bf16 verdict (bf16 on a CPU), the kernels' first-call set-up (oneDNN primitives, the allocator) and the
    pipeline's own first calls. A side×side gray image runs through the one-image pipeline with these settings
    (the output size fields cleared); the app starts this in the background at launch.

    Raises:
        whatever a request with these settings would raise (the caller logs it; the request reports it).
    """
    import numpy as np

    small = settings.replace(target_width=None, target_height=None, max_side=None)
    enhance_image(np.full((side, side, 3), 128, dtype=np.uint8), small, model_manager,
                  config=config if config is not None else model_manager.config)
