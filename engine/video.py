"""Video upscaling as a list of named steps: probe → decode → enhance → encode → mux.

Decoding, inference and encoding overlap: a reader thread pipes raw frames out of one ffmpeg into a queue
bounded by bytes (:data:`FRAME_QUEUE_BYTES`), the calling thread hands batches to the injected
:data:`FrameEnhancer`, and a writer thread pipes the results into a second ffmpeg through another such queue. Output is written in segments of
``segment_frames`` frames, each its own file in a work folder beside the output with a manifest rewritten
atomically after every finished segment, so ``upscale_video(..., options=VideoRunOptions(resume=True))``
continues after a crash or a ``kill -9`` from the last finished segment. Segment boundaries are frame-exact: a
resumed run decodes from the start and drops the frames already done by count (``-ss`` seeking is not
frame-exact). The last step joins the segments (stream copy) and copies the source's audio and subtitle streams
untouched, with its rotation.

A resume continues only the same job: the manifest records the input's identity, every encoding setting and the
enhancer's own settings (a :class:`DescribedFrameEnhancer` carries them: model, scale, denoise, faces, precision,
tiles, ...). When any of them differ, the earlier segments are deleted, the job starts over, and the result says
so in a warning: frames made two ways are never joined.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Literal, Mapping, get_args

import filelock
import numpy as np

from engine import ffmpeg as ff
from engine.errors import CancelledError, InputTooLargeError, InvalidSettingsError, VideoError
from engine.ffmpeg import FfmpegTools, StreamInfo
from utils.atomic import write_atomic
from utils.byte_queue import ByteBudgetQueue

logger = logging.getLogger(__name__)

FrameEnhancer = Callable[[list[np.ndarray]], list[np.ndarray]]
"""Takes a batch of HxWx3 uint8 RGB frames, returns as many upscaled frames, all of one output size."""


@dataclass(frozen=True)
class DescribedFrameEnhancer:
    """A :data:`FrameEnhancer` that carries every setting that decides its pixels.

    :func:`upscale_video` keys resumable work on ``settings``, so a resumed video never joins frames made by
    another model, scale, precision, tiling or face setting. :func:`engine.processor.make_frame_enhancer` returns
    one (``settings`` is its ``EnhanceSettings.as_dict()``).

    Attributes:
        enhance: the frame enhancer itself.
        settings: JSON-able values (str, int, float, bool, None, fractions, nested mappings) naming everything that
            changes the enhancer's output.
    """

    enhance: FrameEnhancer
    settings: Mapping[str, object]

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        return self.enhance(frames)

    @property
    def warnings(self) -> list[str]:
        """The enhancer's own notes about the frames (e.g. a fallback model or precision), once each."""
        return list(getattr(self.enhance, "warnings", ()))

Stage = Literal["probe", "resume", "upscale", "mux", "done"]
Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
PixFmt = Literal["yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv444p10le"]

STEPS: tuple[Stage, ...] = ("probe", "resume", "upscale", "mux", "done")
"""The named steps in order, as reported in :attr:`VideoProgress.stage` (``resume`` only when resuming)."""

_CRF_RANGE = {"h264": (0, 51), "h265": (0, 51), "vp9": (0, 63)}
_CONTAINER_CODECS = {"webm": {"vp9"}}
_MANIFEST_VERSION = 2  # 2: the manifest records the job it belongs to
_PLAYLIST_MARKERS = (b"#EXTM3U", b"ffconcat", b"<?xml", b"<MPD", b"[playlist]")
_QUEUE_POLL_S = 0.1

FRAME_QUEUE_BYTES = 192 * 2**20
"""The most each frame queue (decoded frames waiting for the network, enhanced ones waiting for the encoder) holds:
two 8K RGB frames; smaller frames are also held to ``2 × batch_frames`` at a time. A frame larger than this passes
alone."""


# ---------------------------------------------------------------------------------------------- value types
@dataclass(frozen=True)
class VideoLimits:
    """Upper bounds on an input video; anything over them is refused before decoding starts."""

    max_bytes: int
    max_seconds: float
    max_frames: int
    max_pixels: int  # width * height of one input frame

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_seconds", "max_frames", "max_pixels"):
            if getattr(self, name) <= 0:
                raise InvalidSettingsError(f"VideoLimits.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config) -> "VideoLimits":
        """Limits from a :class:`config.Config` (``max_video_mb``, ``max_video_seconds``, ``max_video_frames``,
        ``max_input_pixels``)."""
        return cls(max_bytes=int(config.max_video_mb * 1024 * 1024), max_seconds=config.max_video_seconds,
                   max_frames=config.max_video_frames, max_pixels=config.max_input_pixels)


@dataclass(frozen=True)
class VideoInfo:
    """A probed input video. ``fps`` is the exact average frame rate; ``rotation`` the display matrix's
    counter-clockwise rotation in degrees (frames are decoded in stored orientation and it is kept as metadata)."""

    path: str
    format_name: str
    codec: str
    width: int
    height: int
    fps: Fraction
    duration: float
    frames: int
    rotation: int
    size_bytes: int
    audio_streams: tuple[StreamInfo, ...] = ()
    subtitle_streams: tuple[StreamInfo, ...] = ()
    streams: tuple[StreamInfo, ...] = ()
    probed_with: Literal["ffprobe", "ffmpeg"] = "ffmpeg"


@dataclass(frozen=True)
class VideoSettings:
    """How the upscaled video is encoded and processed.

    Attributes:
        codec: h264 (libx264), h265 (libx265) or vp9 (libvpx-vp9).
        crf: constant-rate factor (0-51 for h264/h265, 0-63 for vp9; lower is better quality, bigger files).
        preset: x264/x265 speed preset (mapped to ``-cpu-used`` for vp9).
        pix_fmt: output pixel format.
        fps: output frame rate; None keeps the source's exact rate. Another rate drops/duplicates frames and
            keeps the duration (and audio sync).
        batch_frames: frames handed to the enhancer at once.
        segment_frames: frames per resumable segment.
    """

    codec: ff.Codec = "h264"
    crf: int = 18
    preset: Preset = "medium"
    pix_fmt: PixFmt = "yuv420p"
    fps: Fraction | None = None
    batch_frames: int = 4
    segment_frames: int = 240

    def __post_init__(self) -> None:
        if self.codec not in ff.ENCODERS:
            raise InvalidSettingsError(f"codec must be one of {', '.join(ff.ENCODERS)}, got {self.codec!r}")
        low, high = _CRF_RANGE[self.codec]
        if isinstance(self.crf, bool) or not isinstance(self.crf, int) or not low <= self.crf <= high:
            raise InvalidSettingsError(f"crf for {self.codec} must be an integer {low}-{high}, got {self.crf!r}")
        if self.preset not in get_args(Preset):
            raise InvalidSettingsError(f"preset must be one of {', '.join(get_args(Preset))}, got {self.preset!r}")
        if self.pix_fmt not in get_args(PixFmt):
            raise InvalidSettingsError(f"pix_fmt must be one of {', '.join(get_args(PixFmt))}, got {self.pix_fmt!r}")
        if self.fps is not None:
            if not isinstance(self.fps, Fraction):
                object.__setattr__(self, "fps", Fraction(str(self.fps)))
            if not 0 < self.fps <= 240:
                raise InvalidSettingsError(f"fps must be in (0, 240], got {self.fps}")
        for name in ("batch_frames", "segment_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSettingsError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class VideoProgress:
    """Progress of one job: frames enhanced so far (of ``total``), this run's speed, time left, current step."""

    frames_done: int
    total: int
    fps: float
    eta_seconds: float | None
    stage: Stage


@dataclass(frozen=True)
class VideoResult:
    """A finished job. ``fps`` is this run's processing speed (frames per second of wall time upscaling)."""

    output: Path
    frames: int
    seconds: float
    fps: float
    width: int
    height: int
    resumed_frames: int = 0
    warnings: tuple[str, ...] = ()


ProgressCallback = Callable[[VideoProgress], None]


@dataclass(frozen=True)
class VideoRunOptions:
    """How one :func:`upscale_video` call runs, apart from what it encodes (that is :class:`VideoSettings`).

    Attributes:
        resume: continue from the finished segments of an earlier interrupted run of the same job (same input,
            video settings, enhancer settings, output and ``job_id``). Earlier work of another job for this
            output is deleted and a warning says what differed; without ``resume`` earlier work is discarded
            silently.
        work_dir: where segments and the manifest live (a str is turned into a Path); None means a hidden folder
            beside the output (see :func:`default_work_dir`).
        ffmpeg: tools to use, or an ffmpeg path; None finds them (see :func:`engine.ffmpeg.find_tools`).
        job_id: describes an enhancer that is not a :class:`DescribedFrameEnhancer` (its model, weights, ...);
            added to the resume key. ``resume`` needs one or the other.

    Raises:
        InvalidSettingsError: a field of the wrong type.
    """

    resume: bool = False
    work_dir: Path | None = None
    ffmpeg: FfmpegTools | str | os.PathLike[str] | None = None
    job_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.resume, bool):
            raise InvalidSettingsError(f"resume must be True or False, got {self.resume!r}")
        if self.work_dir is not None:
            if not isinstance(self.work_dir, (str, os.PathLike)):
                raise InvalidSettingsError(f"work_dir must be a path or None, got {self.work_dir!r}")
            object.__setattr__(self, "work_dir", Path(self.work_dir))
        if self.ffmpeg is not None and not isinstance(self.ffmpeg, (FfmpegTools, str, os.PathLike)):
            raise InvalidSettingsError("ffmpeg must be FfmpegTools (engine.ffmpeg.find_tools), an ffmpeg path "
                                       f"or None, got {self.ffmpeg!r}")
        if not isinstance(self.job_id, str):
            raise InvalidSettingsError(f"job_id must be a string, got {self.job_id!r}")


# ---------------------------------------------------------------------------------------------- probe
def probe_video(path: str | os.PathLike[str], limits: VideoLimits,
                ffmpeg: FfmpegTools | str | os.PathLike[str] | None = None) -> VideoInfo:
    """Probe a video and check it against ``limits``.

    Uses ffprobe's JSON when ffprobe exists, else parses ``ffmpeg -i``'s report; frame count and exact frame
    rate come from a stream-copy pass over the packets when the container does not state them.

    Args:
        path: the video file.
        limits: bounds the video must be within.
        ffmpeg: tools to use (see :func:`engine.ffmpeg.find_tools`), or an ffmpeg path; None finds them.

    Raises:
        VideoError: missing file, a playlist/concat list, a format not on the allow-list, no video stream,
            or a file ffmpeg cannot read (the message quotes ffmpeg).
        InputTooLargeError: over a limit; the message names the limit.
    """
    tools = ffmpeg if isinstance(ffmpeg, FfmpegTools) else ff.find_tools(ffmpeg)
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"Video file not found: {path}")
    if "\n" in str(path) or "\r" in str(path):
        raise VideoError("Video file names may not contain line breaks; rename the file.")
    size = path.stat().st_size
    if size == 0:
        raise VideoError(f"{path.name} is empty.")
    if size > limits.max_bytes:
        raise InputTooLargeError(f"{path.name} is {size / 2**20:.1f} MB; the limit is "
                                 f"{limits.max_bytes / 2**20:.1f} MB. Trim or compress the video first.")
    _refuse_playlists(path)

    probed_with: Literal["ffprobe", "ffmpeg"] = "ffprobe" if tools.ffprobe else "ffmpeg"
    if tools.ffprobe:
        proc = _run(ff.ffprobe_argv(tools.ffprobe, path), timeout=120)
        if proc.returncode != 0:
            raise VideoError(f"{path.name} is not a readable video: {_tail(proc.stderr) or 'ffprobe failed'}")
        media = ff.parse_ffprobe_json(proc.stdout)
    else:
        proc = _run(ff.banner_argv(tools.ffmpeg, path), timeout=120)
        try:
            media = ff.parse_ffmpeg_banner(proc.stderr)
        except VideoError as exc:
            raise VideoError(f"{path.name} is not a readable video. {exc}") from None

    _check_format(path, media.format_name)
    video = media.video
    if video is None or video.width <= 0 or video.height <= 0:
        raise VideoError(f"{path.name} has no video stream ffmpeg can read.")
    if video.width * video.height > limits.max_pixels:
        raise InputTooLargeError(f"{path.name} is {video.width}x{video.height}; the limit is "
                                 f"{limits.max_pixels:,} pixels per frame. Downscale it first.")
    duration = media.duration
    if duration is not None and duration > limits.max_seconds:
        raise InputTooLargeError(f"{path.name} lasts {duration:.1f} s; the limit is {limits.max_seconds:.0f} s. "
                                 "Cut it into shorter parts.")
    if duration is not None and video.fps is not None and duration * video.fps > limits.max_frames * 1.02 + 2:
        raise InputTooLargeError(f"{path.name} has about {int(duration * video.fps):,} frames; the limit is "
                                 f"{limits.max_frames:,}. Cut it into shorter parts.")

    frames, fps = video.frames, video.fps
    if frames is None or fps is None or probed_with == "ffmpeg":
        counted, exact_fps = _count_frames(tools, path, media.format_name)
        frames, fps = counted, exact_fps or fps
    if not frames or fps is None:
        raise VideoError(f"{path.name} has no decodable video frames (or no frame rate).")
    if frames > limits.max_frames:
        raise InputTooLargeError(f"{path.name} has {frames:,} frames; the limit is {limits.max_frames:,}. "
                                 "Cut it into shorter parts.")
    if duration is None:
        duration = float(frames / fps)
    return VideoInfo(
        path=str(path), format_name=media.format_name, codec=video.codec, width=video.width, height=video.height,
        fps=fps, duration=duration, frames=frames, rotation=video.rotation, size_bytes=size,
        audio_streams=tuple(s for s in media.streams if s.kind == "audio"),
        subtitle_streams=tuple(s for s in media.streams if s.kind == "subtitle"),
        streams=media.streams, probed_with=probed_with)


def _refuse_playlists(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(_PLAYLIST_MARKERS) or head.startswith(b"file ") or head.startswith(b"file\t"):
        raise VideoError(f"{path.name} is a playlist or concat list, not a video file; upload the video itself.")


def _check_format(path: Path, format_name: str) -> None:
    if format_name not in ff.ALLOWED_DEMUXERS:
        if format_name in ("hls", "dash", "concat", "ffconcat"):
            raise VideoError(f"{path.name} is a playlist or concat list ({format_name}), not a video file; "
                             "upload the video itself.")
        raise VideoError(f"{path.name} is in the {format_name!r} format, which is not accepted as video input; "
                         "convert it to MP4, MKV or WebM.")


def _count_frames(tools: FfmpegTools, path: Path, demuxer: str) -> tuple[int, Fraction | None]:
    proc = _run(ff.count_frames_argv(tools.ffmpeg, path, demuxer), timeout=600)
    if proc.returncode != 0:
        raise VideoError(f"{path.name} could not be read to the end: {_tail(proc.stderr) or 'ffmpeg failed'}")
    return ff.parse_framecrc(proc.stdout)


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise VideoError(f"{Path(argv[0]).name} took over {timeout:.0f} s to read the file; it may be damaged.") \
            from None
    except OSError as exc:
        raise VideoError(f"Could not run {argv[0]} ({exc}).") from None


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- plan
def output_muxer(output: Path, codec: str) -> str:
    """The ffmpeg muxer for an output path, checked against the codec.

    Raises:
        InvalidSettingsError: unsupported suffix, or a codec the container cannot hold (h264 in .webm).
    """
    muxer = ff.MUXERS.get(output.suffix.lower())
    if muxer is None:
        raise InvalidSettingsError(f"Output must end in one of {', '.join(ff.MUXERS)}, got {output.name!r}.")
    allowed = _CONTAINER_CODECS.get(muxer)
    if allowed is not None and codec not in allowed:
        raise InvalidSettingsError(f"{output.suffix} output needs codec {' or '.join(sorted(allowed))}; "
                                   f"got {codec}. Choose vp9 or an .mp4/.mkv output.")
    return muxer


def job_description(info: VideoInfo, settings: VideoSettings, output: Path,
                    enhancer_settings: Mapping[str, object] | None = None, job_id: str = "") -> dict:
    """Everything that decides a job's frames, as canonical JSON values: the input's identity (path, size,
    mtime), every :class:`VideoSettings` field, the output's suffix, the enhancer's settings (see
    :class:`DescribedFrameEnhancer`) and the caller's ``job_id``. Pure apart from one ``stat`` of the input."""
    stat = os.stat(info.path)
    return {"input": {"path": os.path.abspath(info.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "output": output.suffix.lower(), "video": _canonical(asdict(settings)),
            "enhancer": _canonical(dict(enhancer_settings or {})), "job_id": job_id}


def job_key(description: Mapping[str, object]) -> str:
    """SHA-256 of a :func:`job_description` (and the manifest version): equal only for the same job."""
    payload = {"v": _MANIFEST_VERSION, "job": _canonical(description)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _canonical(value: object) -> object:
    """A JSON value that is equal for equal settings: 2 and 2.0 are one number, a Fraction its exact text."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Fraction):
        return int(value) if value.denominator == 1 else str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    return str(value)


def settings_changes(earlier: Mapping[str, object], now: Mapping[str, object], limit: int = 4) -> str:
    """What differs between two :func:`job_description` values, for the user ("model a → b, crf 18 → 23")."""
    changes: list[str] = []
    if earlier.get("input") != now.get("input"):
        changes.append("the input file changed")
    if earlier.get("output") != now.get("output"):
        changes.append(f"output type {earlier.get('output')} → {now.get('output')}")
    for section in ("enhancer", "video"):
        old, new = earlier.get(section), now.get(section)
        old, new = (old if isinstance(old, Mapping) else {}), (new if isinstance(new, Mapping) else {})
        for name in [*new, *(k for k in old if k not in new)]:
            if old.get(name, "unset") != new.get(name, "unset"):
                changes.append(f"{name} {old.get(name, 'unset')} → {new.get(name, 'unset')}")
    if earlier.get("job_id") != now.get("job_id"):
        changes.append(f"job id {earlier.get('job_id')!r} → {now.get('job_id')!r}")
    shown = ", ".join(changes[:limit]) + (f" and {len(changes) - limit} more" if len(changes) > limit else "")
    return shown or "unrecorded"


def default_work_dir(output: Path) -> Path:
    """The work folder beside ``output`` (hidden, named from the output): one per output file, so a job for the
    same output with other settings finds the earlier run's segments, says so, and replaces them."""
    return output.parent / f".{output.name}.work"


@dataclass
class _Manifest:
    key: str
    job: dict  # the job_description the key hashes, kept to say what changed when a resume does not match
    segments: list[dict] = field(default_factory=list)  # {"file": name, "frames": n, "bytes": size}
    width: int = 0
    height: int = 0

    @property
    def frames_done(self) -> int:
        return sum(s["frames"] for s in self.segments)

    def save(self, work_dir: Path) -> None:
        data = json.dumps({"version": _MANIFEST_VERSION, "key": self.key, "job": self.job, "width": self.width,
                           "height": self.height, "segments": self.segments}, indent=1)
        write_atomic(work_dir / "manifest.json", data.encode("utf-8"))

    @classmethod
    def for_resume(cls, work_dir: Path, key: str, job: dict) -> tuple["_Manifest | None", str | None]:
        """The earlier run's manifest in ``work_dir`` when it belongs to this job and its segments are intact.

        Returns:
            (manifest or None, None or a sentence for the user saying why earlier work was not used).
        """
        try:
            data = json.loads((work_dir / "manifest.json").read_text())
        except FileNotFoundError:
            if any(work_dir.glob("seg_*.mp4")):
                return None, "The earlier run's segments had no record of how they were made; started over."
            return None, None
        except (OSError, ValueError):
            return None, "The earlier run's record could not be read; started over."
        if not isinstance(data, dict) or data.get("version") != _MANIFEST_VERSION:
            return None, "The earlier run was made by another version of this app; started over."
        if data.get("key") != key:
            earlier = data.get("job") if isinstance(data.get("job"), dict) else {}
            if earlier.get("input") != job.get("input"):
                return None, "The input file changed since the earlier run; started over."
            return None, f"The earlier run used other settings ({settings_changes(earlier, job)}); started over."
        segments = list(data.get("segments", []))
        for seg in segments:
            file = work_dir / str(seg.get("file", ""))
            if not file.is_file() or file.stat().st_size != seg.get("bytes"):
                return None, "Some of the earlier run's segments are missing or damaged; started over."
        return cls(key, job, segments, int(data.get("width", 0)), int(data.get("height", 0))), None


# ---------------------------------------------------------------------------------------------- pipeline
_END = object()


@dataclass
class _Failure:
    error: BaseException


class _Job:
    """The live parts of one ``upscale_video`` call (threads, child processes); never shared between calls."""

    def __init__(self, cancel: threading.Event | None):
        self.cancel = cancel or threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def spawn(self, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with self.lock:
            if self.stop.is_set():
                raise _Stopped()
            with open(log, "wb") as err:
                proc = subprocess.Popen(argv, stderr=err, **kwargs)
            self.procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)

    def kill_all(self) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(Exception):
                        pipe.close()


class _Stopped(Exception):
    """Internal: a thread noticed the job is stopping."""


def _put(q: ByteBudgetQueue, item: object, stop: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=_QUEUE_POLL_S)
            return
        except queue.Full:
            if stop.is_set():
                raise _Stopped() from None


def _read_exactly(stream, size: int) -> bytearray | None:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    if got == 0:
        return None
    if got < size:
        raise VideoError(f"The decoder stopped in the middle of a frame ({got} of {size} bytes).")
    return buf


def _reader(job: _Job, proc: subprocess.Popen, shape: tuple[int, int, int], skip: int,
            out: ByteBudgetQueue) -> None:
    """Reader thread: raw frames from the decoder's stdout → ``out``; the first ``skip`` frames are dropped."""
    try:
        frame_bytes, index = shape[0] * shape[1] * shape[2], 0
        while not job.stop.is_set():
            buf = _read_exactly(proc.stdout, frame_bytes)
            if buf is None:
                break
            if index >= skip:
                _put(out, np.frombuffer(buf, dtype=np.uint8).reshape(shape), job.stop)
            index += 1
        _put(out, _END, job.stop)
    except _Stopped:
        pass
    except BaseException as exc:  # handed to the calling thread, which re-raises it
        with contextlib.suppress(_Stopped):
            _put(out, _Failure(exc), job.stop)


@dataclass(frozen=True)
class _EncodePlan:
    tools: FfmpegTools
    work_dir: Path
    fps: Fraction
    settings: VideoSettings


def _writer(job: _Job, plan: _EncodePlan, manifest: _Manifest, frames_in: ByteBudgetQueue,
            failure: list[BaseException]) -> None:
    """Writer thread: frames from ``frames_in`` → one encoder process per segment; the manifest is saved after
    every finished segment."""
    proc: subprocess.Popen | None = None
    count = 0
    index = len(manifest.segments)
    try:
        while True:
            try:
                item = frames_in.get(timeout=_QUEUE_POLL_S)
            except queue.Empty:
                if job.stop.is_set():
                    raise _Stopped() from None
                continue
            if item is _END:
                break
            frame: np.ndarray = item  # type: ignore[assignment]
            if proc is None:
                proc = _start_segment(job, plan, index, frame.shape[1], frame.shape[0])
            try:
                proc.stdin.write(np.ascontiguousarray(frame).data)
            except (BrokenPipeError, ValueError, OSError):
                if job.stop.is_set():
                    raise _Stopped() from None
                raise VideoError(f"The video encoder quit: {_log_tail(plan.work_dir, index)}") from None
            count += 1
            if count == plan.settings.segment_frames:
                _finish_segment(job, plan, manifest, proc, index, count)
                proc, count, index = None, 0, index + 1
        if proc is not None:
            _finish_segment(job, plan, manifest, proc, index, count)
    except _Stopped:
        pass
    except BaseException as exc:
        failure.append(exc)
        job.stop.set()


def _segment_name(index: int) -> str:
    return f"seg_{index:05d}.mp4"


def _log_tail(work_dir: Path, index: int) -> str:
    try:
        return _tail((work_dir / f"seg_{index:05d}.log").read_text(errors="replace")) or "no message"
    except OSError:
        return "no message"


def _start_segment(job: _Job, plan: _EncodePlan, index: int, width: int, height: int) -> subprocess.Popen:
    s = plan.settings
    argv = ff.encode_argv(plan.tools.ffmpeg, plan.work_dir / (_segment_name(index) + ".part"), width=width,
                          height=height, fps=plan.fps, codec=s.codec, crf=s.crf, preset=s.preset, pix_fmt=s.pix_fmt,
                          muxer="mp4", has_fps_mode=plan.tools.has_fps_mode)
    return job.spawn(argv, plan.work_dir / f"seg_{index:05d}.log", stdin=subprocess.PIPE,
                     stdout=subprocess.DEVNULL)


def _finish_segment(job: _Job, plan: _EncodePlan, manifest: _Manifest, proc: subprocess.Popen, index: int,
                    frames: int) -> None:
    proc.stdin.close()
    rc = proc.wait()
    job.forget(proc)
    if job.stop.is_set():
        raise _Stopped()
    if rc != 0:
        raise VideoError(f"The video encoder failed on segment {index}: {_log_tail(plan.work_dir, index)}")
    name = _segment_name(index)
    os.replace(plan.work_dir / (name + ".part"), plan.work_dir / name)
    (plan.work_dir / f"seg_{index:05d}.log").unlink(missing_ok=True)
    manifest.segments.append({"file": name, "frames": frames, "bytes": (plan.work_dir / name).stat().st_size})
    manifest.save(plan.work_dir)
    logger.debug("Segment %d finished (%d frames)", index, frames)


def _check_outputs(batch: list[np.ndarray], result: list[np.ndarray], size: tuple[int, int] | None
                   ) -> tuple[int, int]:
    if not isinstance(result, (list, tuple)) or len(result) != len(batch):
        got = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
        raise VideoError(f"The frame enhancer returned {got} frames for a batch of {len(batch)}.")
    for frame in result:
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoError("The frame enhancer must return HxWx3 uint8 RGB frames, got "
                             f"{getattr(frame, 'shape', '?')} {getattr(frame, 'dtype', type(frame).__name__)}.")
        if size is None:
            size = (frame.shape[0], frame.shape[1])
        elif frame.shape[:2] != size:
            raise VideoError(f"The frame enhancer changed output size mid-video ({size} then {frame.shape[:2]}).")
    return size  # type: ignore[return-value]


def _wait(job: _Job, proc: subprocess.Popen, what: str, log: Path) -> None:
    while True:
        try:
            rc = proc.wait(timeout=_QUEUE_POLL_S)
            break
        except subprocess.TimeoutExpired:
            if job.cancelled():
                raise CancelledError("Video upscaling was cancelled; partial output was removed.") from None
    job.forget(proc)
    if rc != 0:
        raise VideoError(f"{what} failed: {_tail(log.read_text(errors='replace')) if log.is_file() else rc}")


# ---------------------------------------------------------------------------------------------- public entry
def upscale_video(input: str | os.PathLike[str], output: str | os.PathLike[str], enhancer: FrameEnhancer,
                  settings: VideoSettings, *, limits: VideoLimits, options: VideoRunOptions = VideoRunOptions(),
                  progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> VideoResult:
    """Upscale every frame of a video with ``enhancer`` and write ``output`` with the source's audio/subtitles.

    Steps (reported as :attr:`VideoProgress.stage`): ``probe`` → ``resume`` (skipping finished segments) →
    ``upscale`` (decode → enhance → encode, overlapped, in segments) → ``mux`` → ``done``.

    Args:
        input: the source video.
        output: the file to write (.mp4, .m4v, .mov, .mkv or .webm); written under a temporary name and moved
            into place at the end, so it never exists half-written.
        enhancer: batch of HxWx3 uint8 RGB frames → as many upscaled HxWx3 uint8 RGB frames of one size; a
            :class:`DescribedFrameEnhancer` (what :func:`engine.processor.make_frame_enhancer` returns) also
            names its settings, which key the resume.
        settings: encoding and batching settings.
        limits: bounds the input must be within.
        options: resume, work folder, ffmpeg tools and job id (see :class:`VideoRunOptions`).
        progress: called from the calling thread with a :class:`VideoProgress` after each batch.
        cancel: set it to stop; ffmpeg children are killed, partial output and the work folder are removed and
            :class:`CancelledError` is raised.

    Returns:
        A :class:`VideoResult`; the work folder is removed.

    Raises:
        InvalidSettingsError: output suffix/codec mismatch, or ``options.resume`` with an enhancer that does not
            describe itself and no ``options.job_id``.
        VideoError: probing, decoding, the enhancer's output shape, encoding or muxing failed, the ffmpeg build
            lacks the encoder, or another process is working on the same job.
        InputTooLargeError: the input is over ``limits``.
        CancelledError: ``cancel`` was set.
    """
    started = time.monotonic()
    input_path, output_path = Path(input), Path(output)
    enhancer_settings = enhancer.settings if isinstance(enhancer, DescribedFrameEnhancer) else None
    if options.resume and enhancer_settings is None and not options.job_id:
        raise InvalidSettingsError("Resuming needs to know how the earlier frames were made: pass the enhancer from "
                                   "engine.processor.make_frame_enhancer (a DescribedFrameEnhancer), or a job_id "
                                   "that names your enhancer's model and settings.")
    if output_path.exists() and input_path.exists() and output_path.resolve() == input_path.resolve():
        raise VideoError(f"The output {output_path.name} is the input file itself; choose another output name "
                         "so the original is kept.")
    muxer = output_muxer(output_path, settings.codec)
    tools = options.ffmpeg if isinstance(options.ffmpeg, FfmpegTools) else ff.find_tools(options.ffmpeg)
    ff.require_encoder(ff.list_encoders(tools.ffmpeg), settings.codec, tools.ffmpeg)
    if input_path.resolve() == output_path.resolve():
        raise InvalidSettingsError("The output path must differ from the input path.")

    def report(done: int, total: int, rate: float, stage: Stage) -> None:
        if progress is not None:
            eta = (total - done) / rate if rate > 0 and total >= done else None
            progress(VideoProgress(done, total, rate, eta, stage))

    report(0, 0, 0.0, "probe")
    info = probe_video(input_path, limits, tools)
    out_fps = settings.fps or info.fps
    total = info.frames if settings.fps is None else max(1, round(info.duration * out_fps))
    if total > limits.max_frames:
        raise InputTooLargeError(f"At {out_fps} fps the output would have {total:,} frames; the limit is "
                                 f"{limits.max_frames:,}. Choose a lower frame rate or a shorter video.")
    warnings: list[str] = []
    stream_plans = ff.plan_streams(info.streams, muxer)
    warnings += [p.reason for p in stream_plans if p.reason]
    if info.rotation and not tools.has_display_rotation and muxer not in ("mp4", "mov"):
        warnings.append(f"This ffmpeg ({tools.version}) cannot store the {info.rotation}° rotation in {muxer}; "
                        "the output plays unrotated. Use .mp4 output or ffmpeg 6.1 or newer.")

    description = job_description(info, settings, output_path, enhancer_settings, options.job_id)
    key = job_key(description)
    work = options.work_dir if options.work_dir is not None else default_work_dir(output_path)
    work.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(work / "lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise VideoError(f"Another job is already writing {output_path.name}; wait for it or pick another "
                         "output name.") from None
    job = _Job(cancel)
    partial = output_path.parent / f".{output_path.name}.part"
    try:
        manifest, note = _Manifest.for_resume(work, key, description) if options.resume else (None, None)
        if note:
            warnings.append(note)
        if manifest is None:
            manifest = _Manifest(key, description)
        _clear_unlisted(work, manifest)  # an earlier job's segments are deleted here, never joined
        skip = manifest.frames_done
        if skip:
            logger.info("Resuming %s from frame %d (%d segments done)", input_path.name, skip,
                        len(manifest.segments))
            report(skip, total, 0.0, "resume")

        run = _SegmentRun(job, _EncodePlan(tools, work, out_fps, settings), info, manifest, enhancer)
        frames_this_run, upscale_seconds = _run_segments(run, skip, total, report)
        frames = manifest.frames_done
        if settings.fps is None and frames != info.frames:
            warnings.append(f"Decoded {frames} frames where the container states {info.frames}.")
        warnings += getattr(enhancer, "warnings", ())  # what the engine said about the frames (once each)

        report(frames, frames, frames_this_run / upscale_seconds if upscale_seconds else 0.0, "mux")
        list_file = work / "segments.ffconcat"
        list_file.write_text(ff.concat_list_text([(work / s["file"], s["frames"]) for s in manifest.segments], out_fps))
        log = work / "mux.log"
        argv = ff.mux_argv(tools.ffmpeg, list_file, input_path, info.format_name, partial, muxer=muxer,
                           streams=stream_plans, rotation=info.rotation,
                           has_display_rotation=tools.has_display_rotation)
        _wait(job, job.spawn(argv, log, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL), "Muxing", log)
        os.replace(partial, output_path)
    except CancelledError:
        job.kill_all()
        partial.unlink(missing_ok=True)
        lock.release()
        shutil.rmtree(work, ignore_errors=True)
        logger.info("Cancelled %s", input_path.name)
        raise
    except BaseException:
        job.kill_all()
        partial.unlink(missing_ok=True)
        raise
    finally:
        if lock.is_locked:
            lock.release()
    shutil.rmtree(work, ignore_errors=True)
    rate = frames_this_run / upscale_seconds if upscale_seconds else 0.0
    report(frames, frames, rate, "done")
    for message in warnings:
        logger.warning("%s: %s", input_path.name, message)
    return VideoResult(output=output_path, frames=frames, seconds=time.monotonic() - started, fps=rate,
                       width=manifest.width, height=manifest.height, resumed_frames=skip, warnings=tuple(warnings))


def _clear_unlisted(work: Path, manifest: _Manifest) -> None:
    listed = {s["file"] for s in manifest.segments}
    for path in work.iterdir():
        if path.name in ("lock", "manifest.json") or path.name in listed:
            continue
        if path.is_file():
            path.unlink()
    if not manifest.segments:
        (work / "manifest.json").unlink(missing_ok=True)


@dataclass(frozen=True)
class _SegmentRun:
    """What the segment loop of one :func:`upscale_video` call works with. The job and the manifest are live
    (threads, child processes, finished segments); this object only bundles them, it is never shared between
    calls."""

    job: _Job
    plan: _EncodePlan  # ffmpeg tools, work folder, output frame rate, video settings
    info: VideoInfo
    manifest: _Manifest
    enhancer: FrameEnhancer


def _run_segments(run: _SegmentRun, skip: int, total: int,
                  report: Callable[[int, int, float, Stage], None]) -> tuple[int, float]:
    """Decode → enhance → encode from frame ``skip`` on. Returns (frames enhanced, seconds spent)."""
    job, plan, info, manifest, enhancer = run.job, run.plan, run.info, run.manifest, run.enhancer
    tools, work, settings = plan.tools, plan.work_dir, plan.settings
    depth = 2 * settings.batch_frames
    decoded = ByteBudgetQueue(FRAME_QUEUE_BYTES, max_items=depth)
    enhanced = ByteBudgetQueue(FRAME_QUEUE_BYTES, max_items=depth)
    decode_log = work / "decode.log"
    decoder = job.spawn(ff.decode_argv(tools.ffmpeg, info.path, info.format_name, fps=settings.fps,
                                       has_fps_mode=tools.has_fps_mode),
                        decode_log, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    writer_failure: list[BaseException] = []
    reader = threading.Thread(target=_reader, args=(job, decoder, (info.height, info.width, 3), skip, decoded),
                              name="video-decode", daemon=True)
    writer = threading.Thread(target=_writer, args=(job, plan, manifest, enhanced, writer_failure),
                              name="video-encode", daemon=True)
    reader.start()
    writer.start()
    t0 = time.monotonic()
    done = 0
    size = (manifest.height, manifest.width) if manifest.segments else None
    try:
        ended = False
        while not ended:
            batch: list[np.ndarray] = []
            while len(batch) < settings.batch_frames:
                if job.cancelled():
                    raise CancelledError("Video upscaling was cancelled; partial output was removed.")
                if writer_failure:
                    raise writer_failure[0]
                try:
                    item = decoded.get(timeout=_QUEUE_POLL_S)
                except queue.Empty:
                    continue
                if isinstance(item, _Failure):
                    raise item.error
                if item is _END:
                    ended = True
                    break
                batch.append(item)
            if batch:
                result = enhancer(batch)
                size = _check_outputs(batch, result, size)
                if not manifest.width:
                    manifest.height, manifest.width = size
                for frame in result:
                    while True:
                        if job.cancelled():
                            raise CancelledError("Video upscaling was cancelled; partial output was removed.")
                        if writer_failure:
                            raise writer_failure[0]
                        try:
                            enhanced.put(frame, timeout=_QUEUE_POLL_S)
                            break
                        except queue.Full:
                            continue
                done += len(batch)
                elapsed = time.monotonic() - t0
                report(skip + done, max(total, skip + done), done / elapsed if elapsed > 0 else 0.0, "upscale")
        _put(enhanced, _END, job.stop)
        while writer.is_alive():
            writer.join(timeout=_QUEUE_POLL_S)
            if job.cancelled():
                raise CancelledError("Video upscaling was cancelled; partial output was removed.")
        if writer_failure:
            raise writer_failure[0]
        _wait(job, decoder, "Decoding", decode_log)
    finally:
        if reader.is_alive() or writer.is_alive():
            job.kill_all()
        reader.join(timeout=10)
        writer.join(timeout=10)
    if manifest.frames_done == 0:
        raise VideoError(f"{Path(info.path).name}: no frames could be decoded.")
    return done, time.monotonic() - t0
