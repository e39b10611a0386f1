"""The one batch runner: the CLI, the Batch tab and the REST API all enhance through :func:`run_batch`.

A :class:`BatchJob` is the serializable description of the work (settings, what the user set explicitly, whether
the advisor chooses per image, where outputs go). :func:`run_item` does one input and never raises for a bad
image (the item records why), so another backend (a cluster) can map it over the inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from engine.advisor.estimates import record_job
from engine.errors import CancelledError, InvalidSettingsError
from engine.inference.result import IMAGE_EXTENSIONS, EnhanceResult, save_result
from engine.settings import EnhanceSettings, merge
from utils.errors import is_expected, user_message

logger = logging.getLogger(__name__)

#: ``progress(index, total, name, fraction_of_this_image)``
BatchProgress = Callable[[int, int, str, float], None]


@dataclass(frozen=True)
class BatchJob:
    """What to do with every input of a batch. Plain values only, so it can be stored or sent to a worker.

    Attributes:
        settings: the settings underneath (defaults for what nobody chose).
        explicit: the settings the user set; they win over the advisor's.
        auto: ask the advisor for each image (its choices go under ``explicit``).
        output_dir: where files go (the input folders' structure is mirrored); None keeps results in memory.
        output_file: the one output file of a one-image job (its extension picks the format).
        skip_existing: leave inputs whose output file exists.
    """

    settings: EnhanceSettings = field(default_factory=EnhanceSettings)
    explicit: Mapping[str, object] = field(default_factory=dict)
    auto: bool = False
    output_dir: Path | None = None
    output_file: Path | None = None
    skip_existing: bool = False


@dataclass(frozen=True)
class BatchServices:
    """The long-lived objects a batch runs on. ``slot`` is held around each image (the app's device limiter, so
    other users get turns between the images of a long batch)."""

    model_manager: object
    config: object
    advisor: object | None = None
    slot: Callable[[], AbstractContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class BatchInput:
    """One input: a path (``rel`` is where its output goes below the output folder) or in-memory bytes."""

    source: Path | bytes
    rel: Path

    @property
    def name(self) -> str:
        return self.rel.name


@dataclass(frozen=True)
class BatchItem:
    """What became of one input. ``result`` is kept only for in-memory jobs; ``exception`` for the caller to map."""

    input: Path | str
    output: Path | None
    ok: bool
    skipped: bool = False
    error: str | None = None
    report: dict | None = None
    reasons: tuple[str, ...] = ()
    result: EnhanceResult | None = field(default=None, repr=False, compare=False)
    exception: BaseException | None = field(default=None, repr=False, compare=False)


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


# ------------------------------------------------------------------------------------------------ inputs
def collect_inputs(inputs: Iterable[str | Path], recursive: bool = False) -> list[BatchInput]:
    """Expand files and folders into inputs (each with its path relative to its root), skipping non-images.

    System files (Thumbs.db, .DS_Store, hidden files) and files whose extension is not an image are left out.
    """
    found: list[BatchInput] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            for item in sorted(walker):
                rel = item.relative_to(path)
                if item.is_file() and item.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(rel):
                    found.append(BatchInput(item, rel))
        else:
            found.append(BatchInput(path, Path(path.name)))
    return found


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part.lower() in ("thumbs.db", "desktop.ini") for part in rel.parts)


def output_path_for(source: Path, target: Path) -> Path:
    """``target``, unless it is the source file itself: then ``<stem>_enhanced<ext>`` beside it (an output
    folder that is also the input folder must never overwrite the originals)."""
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        return target.with_name(f"{target.stem}_enhanced{target.suffix}")
    return target


_FORMAT_BY_SUFFIX = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff"}


def _target(item: BatchInput, job: BatchJob, settings: EnhanceSettings, loaded) -> tuple[Path | None, str]:
    """Where one output goes and in which format ("auto" keeps what the input needs: alpha, 16 bits)."""
    from utils.image_io import choose_output_format

    if job.output_file is not None:
        fmt = _FORMAT_BY_SUFFIX.get(job.output_file.suffix.lower())
        if fmt is None:
            raise InvalidSettingsError(f"Unknown output extension {job.output_file.suffix!r}: use .png, .jpg, .webp "
                                    "or .tiff.")
        return _own_path(item, job.output_file), fmt
    fmt = choose_output_format(settings.output_format, loaded.format, loaded.has_alpha, loaded.bit_depth)
    if job.output_dir is None:
        return None, fmt
    return _own_path(item, job.output_dir / item.rel.with_suffix("." + fmt)), fmt


def _own_path(item: BatchInput, target: Path) -> Path:
    return output_path_for(item.source, target) if isinstance(item.source, Path) else target


# ------------------------------------------------------------------------------------------------ running
def settings_for(pixels, job: BatchJob, advisor) -> tuple[EnhanceSettings, tuple[str, ...]]:
    """The settings for one image: with ``auto`` the advisor's choices under the user's explicit values."""
    if not job.auto:
        return merge(None, job.explicit, job.settings), ()
    advice = advisor.advise(pixels, scale=job.explicit.get("outscale"))
    return merge(advice, job.explicit, job.settings), advice.reasons


def run_item(item: BatchInput, job: BatchJob, services: BatchServices, *,
             progress: Callable[[float, str], None] | None = None,
             cancel: threading.Event | None = None) -> BatchItem:
    """Enhance one input of ``job``. A bad image gives a failed item (with the reason), never an exception;
    cancelling raises :class:`CancelledError`."""
    from engine.inference.pipeline import enhance_image, load_input

    label = item.source if isinstance(item.source, Path) else item.name
    name = str(label)
    config = services.config
    started = time.perf_counter()
    try:
        loaded = load_input(item.source, config)
        settings, reasons = settings_for(loaded.pixels, job, services.advisor)
        target, fmt = _target(item, job, settings, loaded)
        if target is not None and job.skip_existing and target.exists():
            return BatchItem(label, target, ok=True, skipped=True)
        with services.slot():
            result = enhance_image(loaded, settings, services.model_manager, progress, config=config, cancel=cancel)
        report = result.report() | {"input": name}
        if target is None:
            return BatchItem(label, None, ok=True, report=report, reasons=reasons, result=result)
        size = item.source.stat().st_size if isinstance(item.source, Path) else len(item.source)
        saved, metrics, notes = save_result(result, target, original_bytes=size, output_format=fmt)
        record_job(config, result, time.perf_counter() - started)  # the advisor's estimates learn from real runs
        report |= {"output": str(saved), "metrics": metrics, "warnings": report["warnings"] + notes}
        return BatchItem(label, saved, ok=True, report=report, reasons=reasons)
    except CancelledError:
        raise
    except Exception as exc:  # one bad image must not stop the batch; the reason is kept
        if is_expected(exc):
            logger.warning("batch: %s failed: %s", name, exc)
        else:
            logger.exception("batch: unexpected failure on %s", name)
        return BatchItem(label, None, ok=False, error=user_message(exc), exception=exc)


def run_batch(items: Sequence[BatchInput], job: BatchJob, services: BatchServices, *,
              progress: BatchProgress | None = None, cancel: threading.Event | None = None,
              on_item: Callable[[BatchItem], None] | None = None) -> BatchReport:
    """Enhance every input in order, continuing past failures; ``on_item`` sees each item as it finishes.

    Raises:
        CancelledError: ``cancel`` was set (the items done so far are already saved).
    """
    if job.auto and services.advisor is None:
        from engine.intelligent_enhancer import IntelligentEnhancer

        advisor = IntelligentEnhancer(model_manager=services.model_manager, config=services.config)
        services = dataclasses.replace(services, advisor=advisor)
    done: list[BatchItem] = []
    for index, item in enumerate(items):
        if cancel is not None and cancel.is_set():
            raise CancelledError("Batch cancelled by the user.")

        def image_progress(fraction: float, _message: str, index=index, item=item) -> None:
            if progress is not None:
                progress(index, len(items), item.name, fraction)

        outcome = run_item(item, job, services, progress=image_progress, cancel=cancel)
        done.append(outcome)
        if on_item is not None:
            on_item(outcome)
        if progress is not None:
            progress(index + 1, len(items), item.name, 1.0)
    return BatchReport(tuple(done))
