"""Finding ffmpeg/ffprobe, building their command lines, and parsing what they print.

Everything here except :func:`find_tools` and :func:`list_encoders` is a pure function of plain values, so the
command lines and parsers are unit-tested without running ffmpeg. Command lines are argv lists (never a shell);
input files are passed as ``file:<absolute path>`` with ``-protocol_whitelist file,pipe`` so a file name can never
select a network or ``concat:`` protocol, and the vetted demuxer is pinned with ``-f``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

from engine.errors import VideoError

logger = logging.getLogger(__name__)

Codec = Literal["h264", "h265", "vp9"]
StreamKind = Literal["video", "audio", "subtitle", "data", "attachment"]

#: Encoder used for each codec choice.
ENCODERS: dict[str, str] = {"h264": "libx264", "h265": "libx265", "vp9": "libvpx-vp9"}
#: Output container (ffmpeg muxer name) for each supported output suffix.
MUXERS: dict[str, str] = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
#: Demuxers accepted as input (first name of ffmpeg's format list). Playlists (hls, dash, concat), image sequences,
#: text "videos" (tty) and devices are not on it.
ALLOWED_DEMUXERS = frozenset({
    "mov", "matroska", "avi", "flv", "mpegts", "mpeg", "ogg", "asf", "nut", "3gp", "mp4", "webm", "gif", "apng",
    "h264", "hevc", "m4v", "mxf", "yuv4mpegpipe", "ivf", "obu", "rm", "wtv", "dv",
})
_PROTOCOLS = ("-protocol_whitelist", "file,pipe")
_VP9_CPU_USED = {"ultrafast": 5, "superfast": 5, "veryfast": 5, "faster": 4, "fast": 3, "medium": 2, "slow": 1,
                 "slower": 0, "veryslow": 0}
#: Codecs each output container can hold when stream-copied (None: anything ffmpeg can mux there).
_COPYABLE: dict[str, dict[str, frozenset[str] | None]] = {
    "mp4": {"audio": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac", "mp2"}),
            "subtitle": frozenset({"mov_text"})},
    "mov": {"audio": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le", "pcm_f32le",
                                "pcm_s16be", "opus", "flac"}),
            "subtitle": frozenset({"mov_text"})},
    "webm": {"audio": frozenset({"opus", "vorbis"}), "subtitle": frozenset({"webvtt"})},
    "matroska": {"audio": None, "subtitle": None},
}
#: Audio re-encode used when a source audio codec cannot be copied into the output container.
_FALLBACK_AUDIO = {"mp4": ("aac", "aac"), "mov": ("aac", "aac"), "webm": ("libopus", "opus"),
                   "matroska": ("aac", "aac")}


# ---------------------------------------------------------------------------------------------- locating the tools
@dataclass(frozen=True)
class FfmpegTools:
    """The ffmpeg (and, when present, ffprobe) executables a pipeline uses.

    Attributes:
        ffmpeg: path of the ffmpeg executable.
        ffprobe: path of ffprobe, or None (the imageio-ffmpeg wheel ships none; probing then parses ffmpeg's
            own ``-i`` report).
        version: (major, minor) of ffmpeg, or None when the version string is not a release number.
        source: where it was found.
    """

    ffmpeg: str
    ffprobe: str | None
    version: tuple[int, int] | None
    source: Literal["system", "imageio-ffmpeg", "explicit"]

    @property
    def has_fps_mode(self) -> bool:
        """``-fps_mode`` exists from ffmpeg 5.1 (older versions spell it ``-vsync``)."""
        return self.version is None or self.version >= (5, 1)

    @property
    def has_display_rotation(self) -> bool:
        """``-display_rotation`` exists from ffmpeg 6.1 (older versions take a ``rotate`` metadata tag)."""
        return self.version is None or self.version >= (6, 1)


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``ffmpeg -version`` output ("ffmpeg version 5.1.9-0+deb12u1", "n9.0.2-17-g..."),
    or None for a git snapshot without a release number."""
    match = re.search(r"ffmpeg version n?(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_tools(ffmpeg: str | os.PathLike[str] | None = None) -> FfmpegTools:
    """Locate ffmpeg: ``ffmpeg`` if given, else the system's on PATH, else the imageio-ffmpeg wheel's binary.

    ffprobe is taken from beside an explicit ffmpeg, or from PATH, when it exists.

    Raises:
        VideoError: no ffmpeg at all, with how to get one.
    """
    if ffmpeg is not None:
        exe = str(ffmpeg)
        sibling = Path(exe).with_name("ffprobe" + Path(exe).suffix)
        probe = str(sibling) if sibling.is_file() else None
        return _tools(exe, probe, "explicit")
    return _find_default_tools()


@functools.lru_cache(maxsize=1)
def _find_default_tools() -> FfmpegTools:
    system = shutil.which("ffmpeg")
    if system:
        return _tools(system, shutil.which("ffprobe"), "system")
    try:
        import imageio_ffmpeg
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # ImportError, or RuntimeError when the wheel has no binary for this platform
        raise VideoError(
            "ffmpeg was not found: install it (e.g. `apt-get install ffmpeg`, `brew install ffmpeg`) so it is on "
            f"PATH, or `pip install imageio-ffmpeg` ({exc})."
        ) from None
    return _tools(exe, shutil.which("ffprobe"), "imageio-ffmpeg")


@functools.lru_cache(maxsize=8)
def _tools(exe: str, probe: str | None, source: str) -> FfmpegTools:
    try:
        out = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except OSError as exc:
        raise VideoError(f"ffmpeg at {exe} cannot be run ({exc}); reinstall it or point to another one.") from None
    tools = FfmpegTools(exe, probe, parse_version(out), source)  # type: ignore[arg-type]
    logger.debug("Using %s", tools)
    return tools


def parse_encoders(text: str) -> frozenset[str]:
    """Encoder names from ``ffmpeg -encoders`` output (lines like `` V....D libx264   libx264 H.264 ...``)."""
    names = set()
    for line in text.splitlines():
        match = re.match(r"^\s*([VAS][F.][S.][X.][B.][D.])\s+(\S+)\s", line)
        if match and match.group(2) != "=":
            names.add(match.group(2))
    return frozenset(names)


@functools.lru_cache(maxsize=8)
def list_encoders(ffmpeg: str) -> frozenset[str]:
    """The encoders an ffmpeg binary was built with (cached per binary)."""
    out = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return parse_encoders(out)


def require_encoder(encoders: frozenset[str], codec: str, ffmpeg: str = "ffmpeg") -> str:
    """The encoder name for ``codec``.

    Raises:
        VideoError: the ffmpeg build lacks it; the message names the encoders it has for the other codecs.
    """
    encoder = ENCODERS[codec]
    if encoder not in encoders:
        usable = [c for c, e in ENCODERS.items() if e in encoders]
        raise VideoError(
            f"The ffmpeg at {ffmpeg} has no {encoder} encoder, needed for {codec}. Choose "
            f"{' or '.join(usable) if usable else 'another ffmpeg build'}, or install an ffmpeg built with {encoder}."
        )
    return encoder


# ---------------------------------------------------------------------------------------------- probe results
@dataclass(frozen=True)
class StreamInfo:
    """One stream of a media file as ffprobe/ffmpeg report it.

    ``rotation`` is the display matrix's counter-clockwise rotation in degrees (ffmpeg's sign convention).
    ``fps`` is the average frame rate; ``frames`` the stated frame (packet) count, None when not stated.
    """

    index: int
    kind: StreamKind
    codec: str
    width: int = 0
    height: int = 0
    fps: Fraction | None = None
    frames: int | None = None
    rotation: int = 0


@dataclass(frozen=True)
class MediaProbe:
    """What probing a file found: the demuxer (first name of ffmpeg's list), duration in seconds, streams."""

    format_name: str
    duration: float | None
    streams: tuple[StreamInfo, ...]

    @property
    def video(self) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == "video"), None)


def parse_fraction(text: str | None) -> Fraction | None:
    """A rate like ``"24000/1001"``, ``"25"`` or ``"23.98"`` as a Fraction; None for missing or zero (``"0/0"``)."""
    if not text:
        return None
    try:
        num, _, den = text.strip().partition("/")
        value = Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _rotation(value: float) -> int:
    rot = int(round(value)) % 360
    return rot - 360 if rot > 180 else rot


def parse_ffprobe_json(text: str) -> MediaProbe:
    """Parse ``ffprobe -print_format json -show_format -show_streams`` output.

    Raises:
        VideoError: the text is not ffprobe JSON.
    """
    try:
        data = json.loads(text)
        fmt = data.get("format", {})
        streams = []
        for raw in data.get("streams", []):
            kind = raw.get("codec_type", "data")
            rotation = 0.0
            for side in raw.get("side_data_list", []) or []:
                if "rotation" in side:
                    rotation = float(side["rotation"])
            if not rotation and "rotate" in raw.get("tags", {}):  # old ffprobe: clockwise tag
                rotation = -float(raw["tags"]["rotate"])
            frames = raw.get("nb_frames") or raw.get("nb_read_packets")
            streams.append(StreamInfo(
                index=int(raw["index"]), kind=kind if kind in ("video", "audio", "subtitle", "attachment") else "data",
                codec=str(raw.get("codec_name", "unknown")), width=int(raw.get("width", 0) or 0),
                height=int(raw.get("height", 0) or 0),
                fps=parse_fraction(raw.get("avg_frame_rate")) or parse_fraction(raw.get("r_frame_rate")),
                frames=int(frames) if frames not in (None, "", "N/A") else None, rotation=_rotation(rotation)))
        duration = fmt.get("duration")
        return MediaProbe(format_name=str(fmt.get("format_name", "")).split(",")[0],
                          duration=float(duration) if duration not in (None, "N/A") else None,
                          streams=tuple(streams))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VideoError(f"Could not read ffprobe's report ({exc}).") from None


_STREAM_RE = re.compile(
    r"^\s*Stream #0:(\d+)(?:\[0x[0-9a-fA-F]+\])?(?:\([^)]*\))?: (Video|Audio|Subtitle|Data|Attachment): ([\w-]+)")
_SIZE_RE = re.compile(r",\s(\d{1,5})x(\d{1,5})(?=[\s,]|$)")
_FPS_RE = re.compile(r",\s(\d+(?:\.\d+)?)(k?) fps")
_ROT_RE = re.compile(r"display ?matrix: rotation of (-?\d+(?:\.\d+)?) degrees", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


def parse_ffmpeg_banner(text: str) -> MediaProbe:
    """Parse the input report ``ffmpeg -hide_banner -i FILE`` prints on stderr (used when there is no ffprobe).

    The frame rate here is the rounded one ffmpeg prints ("23.98"); :func:`parse_framecrc` gives the exact one.

    Raises:
        VideoError: no ``Input #0`` section (ffmpeg could not open the file); the message quotes ffmpeg.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Input #0, ")), None)
    if start is None:
        useful = [line.strip() for line in lines if line.strip() and "At least one output file" not in line]
        detail = " | ".join(useful[-2:]) or "no output"
        raise VideoError(f"ffmpeg could not read the file as a video: {detail}")
    format_name = lines[start][len("Input #0, "):].split(",")[0].strip()
    duration: float | None = None
    streams: list[StreamInfo] = []
    for line in lines[start + 1:]:
        if line.startswith(("Input #", "Output #", "Stream mapping")):
            break
        if (match := _DURATION_RE.match(line)) is not None:
            h, m, s = match.groups()
            duration = int(h) * 3600 + int(m) * 60 + float(s)
        elif (match := _STREAM_RE.match(line)) is not None:
            kind = match.group(2).lower()
            width = height = 0
            fps = None
            if kind == "video":
                if (size := _SIZE_RE.search(line)) is not None:
                    width, height = int(size.group(1)), int(size.group(2))
                if (rate := _FPS_RE.search(line)) is not None:
                    fps = Fraction(rate.group(1)) * (1000 if rate.group(2) else 1)
            streams.append(StreamInfo(index=int(match.group(1)), kind=kind, codec=match.group(3),  # type: ignore
                                      width=width, height=height, fps=fps))
        elif (match := _ROT_RE.search(line)) is not None and streams:
            last = streams[-1]
            streams[-1] = StreamInfo(last.index, last.kind, last.codec, last.width, last.height, last.fps,
                                     last.frames, _rotation(float(match.group(1))))
    return MediaProbe(format_name=format_name, duration=duration, streams=tuple(streams))


def parse_framecrc(text: str) -> tuple[int, Fraction | None]:
    """Packet count and exact average frame rate from ``ffmpeg ... -c copy -f framecrc -`` of one video stream.

    The rate is ``count / (sum of packet durations × time base)``; when the container gives no packet durations
    it is ``(count - 1) / (pts span × time base)``; None when neither is known (fewer than two packets).
    """
    time_base: Fraction | None = None
    count, total_duration, pts_values = 0, 0, []
    durations_known = True
    for line in text.splitlines():
        if line.startswith("#tb 0:"):
            time_base = parse_fraction(line.split(":", 1)[1])
            continue
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5 or parts[0] != "0":
            continue
        count += 1
        pts, duration = int(parts[2]), int(parts[3])
        pts_values.append(pts)
        if duration <= 0:
            durations_known = False
        total_duration += duration
    if time_base is None or count == 0:
        return count, None
    if durations_known and total_duration > 0:
        return count, Fraction(count) / (total_duration * time_base)
    span = max(pts_values) - min(pts_values)
    if count > 1 and span > 0:
        return count, Fraction(count - 1) / (span * time_base)
    return count, None


# ---------------------------------------------------------------------------------------------- argv builders
def input_url(path: str | os.PathLike[str]) -> str:
    """``file:`` + absolute path, so no file name is ever read as a protocol (``concat:``, ``http:``)."""
    return "file:" + os.path.abspath(os.fspath(path))


def ffprobe_argv(ffprobe: str, path: str | os.PathLike[str], count_packets: bool = False) -> list[str]:
    """ffprobe's JSON report of the format and all streams; ``count_packets`` reads the file to count packets."""
    argv = [ffprobe, "-v", "error", *_PROTOCOLS, "-print_format", "json", "-show_format", "-show_streams"]
    if count_packets:
        argv += ["-count_packets"]
    return argv + ["-i", input_url(path)]


def banner_argv(ffmpeg: str, path: str | os.PathLike[str]) -> list[str]:
    """``ffmpeg -i FILE`` with no output: prints the input report on stderr (exits 1 by design)."""
    return [ffmpeg, "-hide_banner", "-nostdin", *_PROTOCOLS, "-i", input_url(path)]


def count_frames_argv(ffmpeg: str, path: str | os.PathLike[str], demuxer: str) -> list[str]:
    """Fast pass over the first video stream's packets (no decoding), one framecrc line per packet on stdout."""
    return [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *_PROTOCOLS, "-f", demuxer,
            "-i", input_url(path), "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"]


def _fps_mode(tools_has_fps_mode: bool) -> list[str]:
    return ["-fps_mode", "passthrough"] if tools_has_fps_mode else ["-vsync", "passthrough"]


def decode_argv(ffmpeg: str, path: str | os.PathLike[str], demuxer: str, *, fps: Fraction | None = None,
                has_fps_mode: bool = True) -> list[str]:
    """Decode the first video stream to raw ``rgb24`` frames (HxWx3 uint8, row-major) on stdout.

    Frames keep their stored orientation (``-noautorotate``; the rotation is carried as metadata instead) and
    every decoded frame is passed through once (no duplication or dropping), unless ``fps`` asks for a new rate,
    which the ``fps`` filter reaches by dropping/duplicating frames so the duration stays the same.
    """
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *_PROTOCOLS, "-noautorotate",
            "-f", demuxer, "-i", input_url(path), "-map", "0:v:0", "-an", "-sn", "-dn"]
    if fps is not None:
        argv += ["-vf", f"fps={fps.numerator}/{fps.denominator}"]
    return argv + _fps_mode(has_fps_mode) + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]


def encode_argv(ffmpeg: str, output: str | os.PathLike[str], *, width: int, height: int, fps: Fraction,
                codec: str, crf: int, preset: str, pix_fmt: str, muxer: str = "mp4",
                has_fps_mode: bool = True) -> list[str]:
    """Encode raw ``rgb24`` frames of ``width``x``height`` read from stdin at exactly ``fps`` into ``output``.

    Odd sizes are padded by one pixel for chroma-subsampled pixel formats (yuv420p/yuv422p need even sizes).
    """
    rate = f"{fps.numerator}/{fps.denominator}"
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", rate, "-i", "pipe:0"]
    if needs_even_size(pix_fmt) and (width % 2 or height % 2):
        argv += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    argv += ["-c:v", ENCODERS[codec], "-crf", str(crf), "-pix_fmt", pix_fmt]
    if codec == "vp9":
        argv += ["-b:v", "0", "-deadline", "good", "-cpu-used", str(_VP9_CPU_USED.get(preset, 2)), "-row-mt", "1"]
    else:
        argv += ["-preset", preset]
    if codec == "h265":
        argv += ["-x265-params", "log-level=error"]
        if muxer in ("mp4", "mov"):
            argv += ["-tag:v", "hvc1"]  # plays in QuickTime/Safari
    return argv + _fps_mode(has_fps_mode) + ["-f", muxer, os.fspath(output)]


def needs_even_size(pix_fmt: str) -> bool:
    """Whether ``pix_fmt`` subsamples chroma horizontally and vertically (so sizes must be even)."""
    return pix_fmt.startswith(("yuv420", "yuvj420", "nv12", "yuv422", "yuvj422", "nv16", "p010"))


def concat_list_text(segments: Sequence[tuple[str | os.PathLike[str], int]], fps: Fraction) -> str:
    """The concat demuxer's list for our own segment files: (path, frame count) pairs played at ``fps``.

    Each file gets an explicit ``duration`` so the next one starts exactly where it should: the container's own
    duration is rounded to the movie time scale (milliseconds in MP4), which would shift later segments by up to
    a millisecond. Durations are differences of rounded cumulative start times, so the error never builds up
    beyond half a microsecond. Paths are absolute, with single quotes escaped.
    """
    lines = ["ffconcat version 1.0"]
    frames_before = 0
    for path, frames in segments:
        start = round(Fraction(frames_before) / fps * 1_000_000)
        frames_before += frames
        length = round(Fraction(frames_before) / fps * 1_000_000) - start
        escaped = os.path.abspath(os.fspath(path)).replace("'", "'\\''")
        lines += [f"file '{escaped}'", f"duration {length // 1_000_000}.{length % 1_000_000:06d}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class StreamPlan:
    """What the mux step does with one extra (audio/subtitle) source stream: copy, re-encode, or drop."""

    index: int
    kind: StreamKind
    action: Literal["copy", "encode", "drop"]
    encoder: str | None = None
    reason: str = ""


def plan_streams(streams: Sequence[StreamInfo], muxer: str) -> tuple[StreamPlan, ...]:
    """Decide per audio/subtitle stream whether it can be copied untouched into ``muxer``.

    Audio a container cannot hold is re-encoded (AAC, or Opus for WebM); subtitles it cannot hold are dropped.
    Data and attachment streams are not carried.
    """
    allowed = _COPYABLE.get(muxer, {"audio": None, "subtitle": None})
    plans = []
    for stream in streams:
        if stream.kind not in ("audio", "subtitle"):
            continue
        ok = allowed[stream.kind]
        if ok is None or stream.codec in ok:
            plans.append(StreamPlan(stream.index, stream.kind, "copy"))
        elif stream.kind == "audio":
            encoder, name = _FALLBACK_AUDIO.get(muxer, ("aac", "aac"))
            plans.append(StreamPlan(stream.index, "audio", "encode", encoder,
                                    f"{stream.codec} audio cannot be stored in {muxer}; re-encoded to {name}"))
        else:
            plans.append(StreamPlan(stream.index, "subtitle", "drop", None,
                                    f"{stream.codec} subtitles cannot be stored in {muxer}; dropped "
                                    "(use .mkv output to keep them)"))
    return tuple(plans)


def mux_argv(ffmpeg: str, concat_list: str | os.PathLike[str], source: str | os.PathLike[str], source_demuxer: str,
             output: str | os.PathLike[str], *, muxer: str, streams: Sequence[StreamPlan] = (), rotation: int = 0,
             has_display_rotation: bool = True) -> list[str]:
    """Join our encoded segments (stream copy) with the source's audio/subtitle streams into ``output``.

    Video comes from the concat list, untouched; audio/subtitles per ``streams``; the source's global metadata
    and chapters are kept; ``rotation`` (counter-clockwise degrees) is written as display-matrix metadata.
    """
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
    if rotation and has_display_rotation:
        argv += ["-display_rotation:v:0", str(rotation)]
    argv += [*_PROTOCOLS, "-f", "concat", "-safe", "0", "-i", os.fspath(concat_list)]
    kept = [s for s in streams if s.action != "drop"]
    if kept:
        argv += [*_PROTOCOLS, "-f", source_demuxer, "-i", input_url(source)]
    argv += ["-map", "0:v:0"]
    for plan in kept:
        argv += ["-map", f"1:{plan.index}"]
    argv += ["-c", "copy"]
    for out_index, plan in enumerate(kept, start=1):
        if plan.action == "encode":
            argv += [f"-c:{out_index}", plan.encoder or "aac"]
    if kept:
        argv += ["-map_metadata", "1", "-map_chapters", "1"]
    if rotation and not has_display_rotation:
        # ffmpeg < 6.1's MP4 muxer turns a "rotate" tag of X into a display matrix that reads back as X.
        argv += ["-metadata:s:v:0", f"rotate={rotation % 360}"]
    if muxer in ("mp4", "mov"):
        argv += ["-movflags", "+faststart"]
    return argv + ["-f", muxer, os.fspath(output)]
