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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
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
    other users get turns between the images of a long batch). ``time_limit``: the seconds one image may take (a
    server's per-job limit); an image the advisor estimates over it fails before its network runs."""

    model_manager: object
    config: object
    advisor: object | None = None
    slot: Callable[[], AbstractContextManager] = contextlib.nullcontext
    time_limit: float | None = None


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

    System files (Thumbs.db, .DS_Store, hidden files) are left out silently; other files whose extension is not
    an image this app reads (a GIF, a text file) are left out with a warning that names them.
    """
    found: list[BatchInput] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            left_out: list[str] = []
            for item in sorted(walker):
                rel = item.relative_to(path)
                if not item.is_file() or _hidden(rel):
                    continue
                if item.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(BatchInput(item, rel))
                else:
                    left_out.append(str(rel))
            if left_out:
                logger.warning("%d file%s in %s left out, not a format this app reads (PNG, JPEG, WebP, TIFF, BMP): "
                               "%s%s", len(left_out), "s" if len(left_out) > 1 else "", path.name or path,
                               ", ".join(left_out[:5]), ", ..." if len(left_out) > 5 else "")
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


def _target(item: BatchInput, job: BatchJob, settings: EnhanceSettings, loaded,
            out_size: tuple[int, int]) -> tuple[Path | None, str]:
    """Where one output goes and in which format ("auto" keeps what the input needs: alpha, 16 bits, and a format
    that holds the output's size)."""
    from utils.image_io import choose_output_format, format_of_path

    if job.output_file is not None:
        fmt = format_of_path(job.output_file)
        if fmt is None:
            raise InvalidSettingsError(f"Unknown output extension {job.output_file.suffix!r}: use .png, .jpg, .webp "
                                    "or .tiff.")
        return _own_path(item, job.output_file), fmt
    fmt = choose_output_format(settings.output_format, loaded.format, loaded.has_alpha, loaded.bit_depth, out_size)
    if job.output_dir is None:
        return None, fmt
    return _own_path(item, job.output_dir / item.rel.with_suffix("." + fmt)), fmt


def _own_path(item: BatchInput, target: Path) -> Path:
    return output_path_for(item.source, target) if isinstance(item.source, Path) else target


# ------------------------------------------------------------------------------------------------ running
def _measures_behind(measure_behind: bool | None, read: _Read, services: BatchServices) -> bool:
    """Whether an overlapped batch leaves this input's quality metrics to the writer (see :func:`run_batch`)."""
    if read.settings is None or not read.settings.quality_metrics:
        return False
    if measure_behind is not None:
        return measure_behind
    from engine.inference.pipeline import job_device

    try:
        return job_device(read.settings, services.config).type != "cpu"
    except InvalidSettingsError:  # the network's own planning reports it
        return False


def settings_for(pixels, job: BatchJob, advisor) -> tuple[EnhanceSettings, tuple[str, ...], object]:
    """The settings for one image, their reasons and the faces found on ``pixels`` (with ``auto``: the advisor's
    choices under the user's explicit values, and its face detection, which the job restores without detecting
    again; else None); a job with an output file writes the format its extension names (:func:`_target`), which
    the memory plan counts."""
    from utils.image_io import format_of_path

    if not job.auto:
        settings, reasons, faces = merge(None, job.explicit, job.settings), (), None
    else:
        advice = advisor.advise(pixels, scale=job.explicit.get("outscale"))
        settings, reasons, faces = merge(advice, job.explicit, job.settings), advice.reasons, advice.faces
    fmt = format_of_path(job.output_file) if job.output_file is not None else None
    return (settings.replace(output_format=fmt) if fmt else settings), reasons, faces


@dataclass(frozen=True)
class _Read:
    """One input decoded and planned, before the network: what the network and the save of it need, or the item
    it already came to (skipped, or failed to decode)."""

    item: BatchInput
    label: Path | str
    loaded: object = None  # utils.image_io.LoadedImage
    settings: EnhanceSettings | None = None
    reasons: tuple[str, ...] = ()
    target: Path | None = None
    fmt: str = "png"
    outcome: BatchItem | None = None
    seconds: float = 0.0  # decoding and planning it took
    stream: bool = False  # too large for memory: streamed into the TIFF ``target`` undecoded (loaded is None)
    alone: bool = False  # fits memory only without its batch neighbours: the previous result is saved first
    faces: object = None  # the advisor's engine.face_detect.FaceDetection of ``loaded``'s pixels (auto), or None


def _failed(label: Path | str, exc: Exception) -> BatchItem:
    if is_expected(exc):
        logger.warning("batch: %s failed: %s", label, exc)
    else:
        logger.exception("batch: unexpected failure on %s", label)
    return BatchItem(label, None, ok=False, error=user_message(exc), exception=exc)


def _streamed_format(job: BatchJob, settings: EnhanceSettings) -> str | None:
    """The format the job's output file would be streamed in (its output file's extension, or the chosen format),
    or None when that format cannot be written in strips (:data:`utils.image_io.STREAMED_FORMATS`)."""
    from utils.image_io import STREAMED_FORMATS, format_of_path

    if job.output_file is not None:
        fmt = format_of_path(job.output_file)
    else:
        fmt = settings.output_format if job.output_dir is not None else None
    return fmt if fmt in STREAMED_FORMATS else None


def plan_mode(item: BatchInput, job: BatchJob, settings: EnhanceSettings, services: BatchServices, *,
              overlapped: bool = False) -> tuple[str, tuple[int, int] | None, str]:
    """``"memory"`` or ``"stream"`` for one input, from its header alone (no pixel decoded), the output's size
    (None when streamed) and the model the job runs: the output whole in RAM when the memory plan fits, else
    straight into its TIFF or PNG file in strips when that fits (:func:`engine.inference.memory_plan.output_mode`).
    ``overlapped``: the input is one of a batch that saves the previous result while the network runs; ``"alone"``
    when the plan fits only without that (:func:`engine.inference.memory_plan.overlapped`).

    Raises:
        JobTooLargeError: neither fits; the message says what would (the TIFF or PNG format, a smaller scale).
        InvalidInputError, UnsupportedFormatError, InputTooLargeError: the header is unusable or over the limits.
    """
    from engine.errors import JobTooLargeError
    from engine.inference import memory_plan
    from engine.inference.memory_plan import output_mode
    from engine.inference.pipeline import plan_input

    try:
        model, out_size, plan = plan_input(item.source, settings, services.model_manager, services.config)
        return ("alone" if overlapped and not memory_plan.overlapped(plan).fits else "memory"), out_size, model
    except JobTooLargeError as in_memory:
        refusal = in_memory
    to_file, streamable = job.output_file is not None or job.output_dir is not None, not settings.face_enhance
    fits_streamed, model = False, None
    if to_file and streamable:
        with contextlib.suppress(JobTooLargeError):
            model = plan_input(item.source, settings, services.model_manager, services.config, streamed=True)[0]
            fits_streamed = True
    mode = output_mode(False, fits_streamed, to_stream_file=_streamed_format(job, settings) is not None,
                       streamable=streamable)
    if mode != "refuse":
        return mode, None, model
    if fits_streamed:  # a file in another format: as a TIFF or PNG it would fit
        raise JobTooLargeError(
            f"{refusal} Written as TIFF or PNG it would fit: choose one of those output formats (CLI: --format "
            f"tiff or png, or a .tif/.png output file) to stream it to disk, or a smaller scale (--scale).",
            actual=refusal.actual, limit=refusal.limit) from refusal
    raise refusal


def _read(item: BatchInput, job: BatchJob, services: BatchServices, overlapped: bool = False) -> _Read:
    """Plan one input, decode it and choose its settings and output; never raises (a bad input or a job that cannot
    fit gives a failed item). An input too large for memory whose output is a TIFF or PNG file is streamed
    (``stream``: the streamed path decodes it itself; no decode is kept here). With explicit settings the plan
    comes from the header, before any pixel is decoded; the advisor (``auto``) needs the pixels (within the input
    limits) and the plan follows its choice, before the network. ``overlapped``: see :func:`plan_mode`."""
    from engine.inference.pipeline import load_input

    label = item.source if isinstance(item.source, Path) else item.name
    started = time.perf_counter()
    try:
        loaded = load_input(item.source, services.config) if job.auto else None  # the advisor needs the pixels
        settings, reasons, faces = settings_for(None if loaded is None else loaded.pixels, job, services.advisor)
        mode, out_size, model = plan_mode(item, job, settings, services, overlapped=overlapped)
        _check_time(item, loaded, model, settings, services)
        if mode == "stream":
            fmt = _streamed_format(job, settings)
            target = _own_path(item, job.output_file if job.output_file is not None
                               else job.output_dir / item.rel.with_suffix("." + fmt))
            if job.skip_existing and target.exists():
                return _Read(item, label, outcome=BatchItem(label, target, ok=True, skipped=True))
            return _Read(item, label, None, settings, reasons, target, fmt, stream=True,
                         seconds=time.perf_counter() - started)
        loaded = loaded if loaded is not None else load_input(item.source, services.config)
        target, fmt = _target(item, job, settings, loaded, out_size)
        if target is not None and job.skip_existing and target.exists():
            return _Read(item, label, outcome=BatchItem(label, target, ok=True, skipped=True))
        return _Read(item, label, loaded, settings, reasons, target, fmt,
                     seconds=time.perf_counter() - started, alone=mode == "alone", faces=faces)
    except Exception as exc:  # one bad image must not stop the batch; the reason is kept
        return _Read(item, label, outcome=_failed(label, exc))


def _check_time(item: BatchInput, loaded, model: str, settings: EnhanceSettings, services: BatchServices) -> None:
    """Refuse an input the advisor estimates over ``services.time_limit`` with ``model`` (its throughput measured
    now when nothing on this device is known yet), before it is decoded (``loaded``: None) or enhanced.

    Raises:
        InputTooLargeError: over the limit (the message says what to change).
    """
    from utils.validation import probe_image

    if not services.time_limit or services.advisor is None:
        return
    if loaded is not None:
        height, width = loaded.pixels.shape[:2]
    else:
        header = probe_image(item.source, max_pixels=services.config.max_input_pixels)
        width, height = header.width, header.height
    services.advisor.check_time_limit(model, width, height, services.time_limit, calibrate=True,
                                      outscale=settings.requested_scale(width, height))


def _enhance(read: _Read, services: BatchServices, progress, cancel, *,
             defer_metrics: bool = False) -> EnhanceResult | BatchItem:
    """The network part of one input (under the device slot): its result, or the failed item (or, streamed, the
    finished item); cancelling raises. ``defer_metrics``: the quality metrics are left to :func:`_write`."""
    from engine.inference.pipeline import enhance_image

    try:
        with services.slot():
            if read.stream:
                return _stream(read, services, progress, cancel)
            return enhance_image(read.loaded, read.settings, services.model_manager, progress,
                                 config=services.config, cancel=cancel, defer_metrics=defer_metrics,
                                 detection=read.faces)
    except CancelledError:
        raise
    except Exception as exc:  # one bad image must not stop the batch; the reason is kept
        return _failed(read.label, exc)


def _stream(read: _Read, services: BatchServices, progress, cancel) -> BatchItem:
    """Enhance one input straight into its TIFF or PNG target (see
    :func:`engine.inference.pipeline.enhance_streamed`)."""
    from engine.inference.pipeline import enhance_streamed

    read.target.parent.mkdir(parents=True, exist_ok=True)  # as save_result: the output folder may be new
    saved, summary = enhance_streamed(read.item.source, read.settings, services.model_manager, read.target, progress,
                                      config=services.config, cancel=cancel)
    note = (f"streamed to disk: the output did not fit in memory (planned {summary['memory']['peak_mb']:.0f} MB "
            f"streamed); quality metrics are not computed")
    report = summary | {"input": str(read.label), "output": str(saved.path), "metrics": {}, "faces_detected": 0,
                        "faces_restored": 0, "detector": None, "streamed": True,
                        "warnings": summary["warnings"] + [note]}
    return BatchItem(read.label, saved.path, ok=True, report=report, reasons=read.reasons)


def _write(read: _Read, result: EnhanceResult, config) -> BatchItem:
    """Measure one result's quality if that was deferred, and save it where the job says (or keep it in memory);
    never raises (the item records why)."""
    from engine.inference.pipeline import finish_metrics

    try:
        result = finish_metrics(result)
    except Exception as exc:  # as a failure inside enhance_image would: this item only
        return _failed(read.label, exc)
    report = result.report() | {"input": str(read.label)}
    if read.target is None:  # kept in memory: its caller encodes it (the REST API), which is not counted
        _learn(config, read, result, 0.0)
        return BatchItem(read.label, None, ok=True, report=report, reasons=read.reasons, result=result)
    started = time.perf_counter()
    try:
        source = read.item.source
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        saved, metrics, notes = save_result(result, read.target, original_bytes=size, output_format=read.fmt)
    except Exception as exc:  # a full disk or a bad output path fails this item only
        return _failed(read.label, exc)
    _learn(config, read, result, time.perf_counter() - started)
    report |= {"output": str(saved), "metrics": metrics, "warnings": report["warnings"] + notes}
    return BatchItem(read.label, saved, ok=True, report=report, reasons=read.reasons)


def _learn(config, read: _Read, result: EnhanceResult, save_seconds: float) -> None:
    """The advisor's time estimates learn from every real run (:func:`engine.advisor.estimates.record_job` splits
    its stages): reading and planning, the pipeline's stages and the save."""
    if config is not None:
        record_job(config, result, read.seconds + sum(result.timings.values()) + save_seconds)


def run_item(item: BatchInput, job: BatchJob, services: BatchServices, *,
             progress: Callable[[float, str], None] | None = None,
             cancel: threading.Event | None = None) -> BatchItem:
    """Enhance one input of ``job``. A bad image gives a failed item (with the reason), never an exception;
    cancelling raises :class:`CancelledError`."""
    read = _read(item, job, services)
    if read.outcome is not None:
        return read.outcome
    result = _enhance(read, services, progress, cancel)
    return result if isinstance(result, BatchItem) else _write(read, result, services.config)


#: How far the batch runner's helper threads may get from the image in the network: inputs decoded ahead of it,
#: and results waiting to be saved behind it. Bounded, so a slow disk never piles images up in memory.
READ_AHEAD = 1
WRITE_BEHIND = 1


def run_batch(items: Sequence[BatchInput], job: BatchJob, services: BatchServices, *,
              progress: BatchProgress | None = None, cancel: threading.Event | None = None,
              on_item: Callable[[BatchItem], None] | None = None, overlap: bool = True,
              measure_behind: bool | None = None) -> BatchReport:
    """Enhance every input in order, continuing past failures; ``on_item`` sees each item as it finishes, in order,
    on the caller's thread.

    With ``overlap`` (and more than one input) the next input is decoded (and advised) and the previous result is
    saved by two helper threads while the network works on the current one (at most :data:`READ_AHEAD` inputs
    ahead and :data:`WRITE_BEHIND` results behind): the device never waits for the disk. Each helper is one
    thread doing mostly single-threaded decoding and encoding, so on a CPU-only machine it takes little from the
    network's threads. ``measure_behind``: the quality metrics of the previous result are measured by the writer
    too, before its save (None: when the network runs on a GPU, which would otherwise wait for them; on the CPU
    they would take the network's cores, so the network's thread measures them).

    Raises:
        CancelledError: ``cancel`` was set (the items done so far are saved, and reported to ``on_item``).
    """
    if job.auto and services.advisor is None:
        from engine.intelligent_enhancer import IntelligentEnhancer

        advisor = IntelligentEnhancer(model_manager=services.model_manager, config=services.config)
        services = dataclasses.replace(services, advisor=advisor)
    done: list[BatchItem] = []
    total = len(items)

    def finished(index: int, outcome: BatchItem) -> None:
        done.append(outcome)
        if on_item is not None:
            on_item(outcome)
        if progress is not None:
            progress(index + 1, total, items[index].name, 1.0)

    def image_progress(index: int) -> Callable[[float, str], None]:
        def report(fraction: float, _message: str) -> None:
            if progress is not None:
                progress(index, total, items[index].name, fraction)

        return report

    if not overlap or total < 2:
        for index, item in enumerate(items):
            if cancel is not None and cancel.is_set():
                raise CancelledError("Batch cancelled by the user.")
            finished(index, run_item(item, job, services, progress=image_progress(index), cancel=cancel))
        return BatchReport(tuple(done))

    with ThreadPoolExecutor(1, thread_name_prefix="batch-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="batch-write") as writer:
        reads: deque[Future] = deque(reader.submit(_read, item, job, services, True)
                                     for item in items[:max(READ_AHEAD, 1)])
        writes: deque[tuple[int, Future]] = deque()  # in input order; outcomes known without saving are ready

        def report_ready(wait_for: int) -> None:
            """Report the finished head of ``writes``, waiting until at most ``wait_for`` are left."""
            while writes and (len(writes) > wait_for or writes[0][1].done()):
                index, future = writes.popleft()
                finished(index, future.result())

        try:
            for index in range(total):
                if cancel is not None and cancel.is_set():
                    raise CancelledError("Batch cancelled by the user.")
                read = reads.popleft().result()
                following = index + max(READ_AHEAD, 1)
                if following < total:
                    reads.append(reader.submit(_read, items[following], job, services, True))
                outcome: Future = Future()
                if read.outcome is not None:
                    outcome.set_result(read.outcome)
                else:
                    if read.alone:
                        report_ready(0)  # its plan fits only once the previous result is saved and let go
                    result = _enhance(read, services, image_progress(index), cancel,
                                      defer_metrics=_measures_behind(measure_behind, read, services))
                    if isinstance(result, BatchItem):
                        outcome.set_result(result)
                    else:
                        report_ready(WRITE_BEHIND - 1)  # a slow disk holds the network back, not memory
                        outcome = writer.submit(_write, read, result, services.config)
                        result = None  # the writer holds it until saved, and no longer
                writes.append((index, outcome))
                report_ready(WRITE_BEHIND)
            report_ready(0)
        except CancelledError:
            for future in reads:
                future.cancel()
            report_ready(0)  # what was enhanced is saved and reported
            raise
    return BatchReport(tuple(done))
