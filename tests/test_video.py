"""The video pipeline end to end: real ffmpeg (imageio-ffmpeg's, plus the system's ffprobe when present) and a
real SRVGGNetCompact (the offline animevideov3 ×2 weights when engine.ncnn_convert can import them, else seeded
random weights)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine import ffmpeg as ff
from engine.errors import CancelledError, InputTooLargeError, InvalidSettingsError, VideoError
from engine.video import (DescribedFrameEnhancer, VideoLimits, VideoProgress, VideoRunOptions, VideoSettings,
                          default_work_dir, job_key, probe_video, settings_changes, upscale_video)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tests" / "data" / "video" / "onepiece_demo_24f_160x120.mp4"
LIMITS = VideoLimits(max_bytes=50 * 2**20, max_seconds=60, max_frames=2000, max_pixels=4_000_000)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tools() -> ff.FfmpegTools:
    """imageio-ffmpeg's binary, used as if nothing else existed (no ffprobe: the fallback probe)."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    found = ff.find_tools(imageio_ffmpeg.get_ffmpeg_exe())
    assert found.ffprobe is None
    return found


def _weights(path: Path) -> tuple[Path, bool]:
    """Write SRVGG ×4 weights to ``path``: the offline animevideov3 ones if importable, else seeded random.
    Returns (path, whether a ×0.5 bicubic follows, as in the ×2 export)."""
    import torch

    try:
        from engine.catalog import CATALOG
        from engine.ncnn_convert import import_bundled

        import_bundled(CATALOG["realesr-animevideov3-x2"], path)
        return path, True
    except Exception:  # helper module or package missing: random weights exercise the same pipeline
        net = _build_net()
        torch.manual_seed(0)
        for p in net.parameters():
            p.data.normal_(0, 0.05)
        torch.save({"params_ema": net.state_dict()}, path)
        return path, True


def _build_net():
    from utils.compat import install_torchvision_shim

    install_torchvision_shim()
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4, act_type="prelu")


def make_enhancer(weights: Path, block_after: int | None = None):
    """A real FrameEnhancer: SRVGG ×4 then bicubic ×0.5 (net ×2). ``block_after`` makes it hang for ever once
    that many frames are done (so a test can kill the process at a known point)."""
    import torch
    import torch.nn.functional as F

    net = _build_net()
    net.load_state_dict(torch.load(weights, weights_only=True)["params_ema"])
    net.eval()
    done = [0]

    def enhance(frames: list[np.ndarray]) -> list[np.ndarray]:
        if block_after is not None and done[0] >= block_after:
            while True:
                time.sleep(1)
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():
            y = F.interpolate(net(x), scale_factor=0.5, mode="bicubic", align_corners=False)
        out = (y.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        done[0] += len(frames)
        return list(out)

    return enhance


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    return _weights(tmp_path_factory.mktemp("w") / "w.pth")[0]


@pytest.fixture(scope="session")
def enhancer(weights):
    return make_enhancer(weights)


def _ffmpeg(tools: ff.FfmpegTools, *args: str) -> None:
    subprocess.run([tools.ffmpeg, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="session")
def synthetic(tools, tmp_path_factory) -> Path:
    """64x48, 40 frames at 25 fps, no audio."""
    path = tmp_path_factory.mktemp("syn") / "testsrc.mp4"
    _ffmpeg(tools, "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-frames:v", "40", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", str(path))
    return path


def decode_all(tools: ff.FfmpegTools, path: Path, width: int, height: int) -> np.ndarray:
    """Every frame of ``path`` as NxHxWx3 uint8, decoded by our own decode argv."""
    info = probe_video(path, LIMITS, tools)
    raw = subprocess.run(ff.decode_argv(tools.ffmpeg, path, info.format_name), capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def audio_packets(tools: ff.FfmpegTools, path: Path) -> tuple[float, list[str]]:
    """(duration in seconds, packet checksums) of the first audio stream, without decoding."""
    out = subprocess.run([tools.ffmpeg, "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:a:0",
                          "-c", "copy", "-f", "framecrc", "-"], capture_output=True, text=True, check=True).stdout
    tb = next(ff.parse_fraction(line.split(":", 1)[1]) for line in out.splitlines() if line.startswith("#tb 0:"))
    rows = [[p.strip() for p in line.split(",")] for line in out.splitlines() if line and not line.startswith("#")]
    return float(sum(int(r[3]) for r in rows) * tb), [r[5] for r in rows]


# ---------------------------------------------------------------------------------------------- probe
def test_probe_demo_clip_without_ffprobe(tools):
    info = probe_video(DEMO, LIMITS, tools)
    assert info.probed_with == "ffmpeg"
    assert (info.width, info.height, info.frames) == (160, 120, 24)
    assert info.fps == Fraction(1199, 50)  # exact, from packet timestamps, not the printed "23.98"
    assert info.duration == pytest.approx(1.0, abs=0.01)
    assert [s.codec for s in info.audio_streams] == ["aac"] and info.subtitle_streams == ()
    assert info.rotation == 0 and info.format_name == "mov"


@pytest.mark.skipif(shutil.which("ffprobe") is None or shutil.which("ffmpeg") is None,
                    reason="no system ffprobe (scripts/ensure_ffmpeg.sh installs one)")
def test_probe_with_ffprobe_agrees_with_fallback(tools):
    system = ff.find_tools(shutil.which("ffmpeg"))
    assert system.ffprobe is not None
    a, b = probe_video(DEMO, LIMITS, system), probe_video(DEMO, LIMITS, tools)
    assert a.probed_with == "ffprobe"
    for name in ("width", "height", "frames", "fps", "rotation", "format_name", "codec"):
        assert getattr(a, name) == getattr(b, name), name
    assert len(a.audio_streams) == len(b.audio_streams) == 1


@pytest.mark.parametrize("limits, match", [
    (VideoLimits(1000, 60, 2000, 4_000_000), "MB"),
    (VideoLimits(50 * 2**20, 0.5, 2000, 4_000_000), "lasts"),
    (VideoLimits(50 * 2**20, 60, 10, 4_000_000), "frames"),
    (VideoLimits(50 * 2**20, 60, 2000, 160 * 120 - 1), "pixels"),
])
def test_probe_refuses_over_limits(tools, limits, match):
    with pytest.raises(InputTooLargeError, match=match):
        probe_video(DEMO, limits, tools)


def test_corrupt_and_truncated_files_are_video_errors(tools, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="junk.mp4 is not a readable video"):
        probe_video(junk, LIMITS, tools)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(DEMO.read_bytes()[: DEMO.stat().st_size // 2])
    with pytest.raises(VideoError, match="cut.mp4"):
        probe_video(cut, LIMITS, tools)
    with pytest.raises(VideoError, match="not found"):
        probe_video(tmp_path / "missing.mp4", LIMITS, tools)


@pytest.mark.parametrize("name, text", [
    ("list.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{demo}\n#EXT-X-ENDLIST\n"),
    ("list.txt", "file '{demo}'\nfile '{demo}'\n"),
    ("list.ffconcat", "ffconcat version 1.0\nfile '{demo}'\n"),
    ("video.mp4", "\n  #EXTM3U\n{demo}\n"),
])
def test_playlists_and_concat_lists_are_refused(tools, tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text.format(demo=DEMO))
    with pytest.raises(VideoError, match="playlist"):
        probe_video(path, LIMITS, tools)
    with pytest.raises(VideoError, match="playlist"):
        upscale_video(path, tmp_path / "out.mp4", lambda b: b, VideoSettings(), limits=LIMITS,
                      options=VideoRunOptions(ffmpeg=tools))


def test_formats_off_the_allow_list_are_refused(tools, tmp_path):
    import cv2

    still = tmp_path / "still.mp4"  # a PNG under a video name: ffmpeg would read it as a 1-frame "video"
    ok, data = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    still.write_bytes(data.tobytes())
    with pytest.raises(VideoError, match="png_pipe.*not accepted"):
        probe_video(still, LIMITS, tools)


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs", [dict(codec="av1"), dict(crf=52), dict(codec="vp9", crf=64), dict(crf=1.5),
                                    dict(preset="turbo"), dict(pix_fmt="rgb24"), dict(batch_frames=0),
                                    dict(segment_frames=-1), dict(fps=Fraction(0))])
def test_settings_refuse_bad_values(kwargs):
    with pytest.raises(InvalidSettingsError):
        VideoSettings(**kwargs)


def test_settings_accept_float_fps_as_fraction():
    assert VideoSettings(fps=29.97).fps == Fraction(2997, 100)


def test_container_must_fit_the_codec(tools, tmp_path):
    with pytest.raises(InvalidSettingsError, match="vp9"):
        upscale_video(DEMO, tmp_path / "o.webm", lambda b: b, VideoSettings(codec="h264"), limits=LIMITS,
                      options=VideoRunOptions(ffmpeg=tools))
    with pytest.raises(InvalidSettingsError, match="Output must end"):
        upscale_video(DEMO, tmp_path / "o.gif", lambda b: b, VideoSettings(), limits=LIMITS,
                      options=VideoRunOptions(ffmpeg=tools))


# ---------------------------------------------------------------------------------------------- end to end
def test_demo_clip_x2_keeps_frames_rate_and_audio(tools, enhancer, tmp_path):
    out = tmp_path / "demo_x2.mp4"
    events: list[VideoProgress] = []
    result = upscale_video(DEMO, out, enhancer, VideoSettings(batch_frames=4, segment_frames=10, crf=16),
                           limits=LIMITS, options=VideoRunOptions(ffmpeg=tools), progress=events.append)
    src, dst = probe_video(DEMO, LIMITS, tools), probe_video(out, LIMITS, tools)
    assert result.frames == dst.frames == src.frames == 24
    assert (dst.width, dst.height) == (result.width, result.height) == (320, 240)
    assert dst.fps == src.fps == Fraction(1199, 50)
    assert len(dst.audio_streams) == 1
    src_audio, dst_audio = audio_packets(tools, DEMO), audio_packets(tools, out)
    assert dst_audio[0] == pytest.approx(src_audio[0], abs=0.1)
    assert dst_audio[1] == src_audio[1]  # copied packet for packet, untouched
    # Close to what the enhancer made (lossy encode): compare with enhancing the decoded frames directly.
    expected = np.stack(enhancer(list(decode_all(tools, DEMO, 160, 120))))
    got = decode_all(tools, out, 320, 240).astype(np.int16)
    assert np.abs(got - expected).mean(axis=(1, 2, 3)).max() < 4.0
    # Progress: named steps in order, frames monotone, ends done with all frames.
    stages = [e.stage for e in events]
    assert stages[0] == "probe" and stages[-1] == "done" and "upscale" in stages and "mux" in stages
    done = [e.frames_done for e in events if e.stage == "upscale"]
    assert done == sorted(done) and done[-1] == 24 and all(e.total == 24 for e in events if e.stage == "upscale")
    assert not list(tmp_path.glob(".*"))  # work folder and temporary output are gone


def test_synthetic_clip_without_audio_to_webm_vp9(tools, enhancer, synthetic, tmp_path):
    out = tmp_path / "syn.webm"
    result = upscale_video(synthetic, out, enhancer, VideoSettings(codec="vp9", crf=30, preset="ultrafast",
                                                                   segment_frames=16),
                           limits=LIMITS, options=VideoRunOptions(ffmpeg=tools))
    info = probe_video(out, LIMITS, tools)
    assert result.frames == info.frames == 40 and (info.width, info.height) == (128, 96)
    assert info.codec == "vp9" and info.audio_streams == () and info.fps == Fraction(25)
    # Every frame of testsrc differs (moving gradient, counter): each output frame matches its own source frame
    # better than its neighbours, so nothing was reordered, dropped or duplicated across batches and segments.
    expected = np.stack(enhancer(list(decode_all(tools, synthetic, 64, 48)))).astype(np.int16)
    got = decode_all(tools, out, 128, 96).astype(np.int16)
    error = np.abs(got[:, None] - expected[None, :]).mean(axis=(2, 3, 4))  # output i vs expected j
    assert (error.argmin(axis=1) == np.arange(40)).all()


def test_chosen_frame_rate_keeps_duration(tools, synthetic, tmp_path):
    out = tmp_path / "syn12.mp4"
    half = lambda frames: [f[::2, ::2].copy() for f in frames]  # noqa: E731 - any size change works here
    result = upscale_video(synthetic, out, half, VideoSettings(fps=Fraction(25, 2), preset="ultrafast"),
                           limits=LIMITS, options=VideoRunOptions(ffmpeg=tools))
    info = probe_video(out, LIMITS, tools)
    assert info.fps == Fraction(25, 2) and result.frames == info.frames == 20 and info.width == 32


@pytest.mark.parametrize("system", [False, True], ids=["imageio-ffmpeg", "system-ffmpeg"])
def test_rotation_audio_and_subtitles_are_kept(tools, enhancer, tmp_path, system):
    if system:
        if shutil.which("ffmpeg") is None:
            pytest.skip("no system ffmpeg")
        use = ff.find_tools(shutil.which("ffmpeg"))
    else:
        use = tools
    srt = tmp_path / "s.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:00,400\nhello\n")
    plain, src = tmp_path / "plain.mkv", tmp_path / "rotated.mkv"
    _ffmpeg(tools, "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-f", "lavfi", "-i", "sine=d=1", "-i",
            str(srt), "-t", "0.48", "-map", "0", "-map", "1", "-map", "2", "-c:v", "libx264", "-pix_fmt",
            "yuv420p", "-c:a", "aac", "-c:s", "srt", str(plain))
    _ffmpeg(tools, "-display_rotation", "90", "-i", str(plain), "-map", "0", "-c", "copy", str(src))
    out = tmp_path / "out.mkv"
    result = upscale_video(src, out, enhancer, VideoSettings(preset="ultrafast", segment_frames=5),
                           limits=LIMITS, options=VideoRunOptions(ffmpeg=use))
    info = probe_video(out, LIMITS, tools)
    assert (info.width, info.height) == (128, 96) and info.frames == 12
    if use.has_display_rotation:
        assert info.rotation == 90 and result.warnings == ()
    else:  # ffmpeg < 6.1 has no way to write a rotation into Matroska: it says so
        assert any("rotation" in w for w in result.warnings)
    assert [s.codec for s in info.audio_streams] == ["aac"]
    assert [s.codec for s in info.subtitle_streams] == ["subrip"]
    mp4 = tmp_path / "out.mp4"  # MP4 cannot hold SubRip: dropped, with a warning
    result = upscale_video(src, mp4, enhancer, VideoSettings(preset="ultrafast"), limits=LIMITS,
                           options=VideoRunOptions(ffmpeg=use))
    assert any("subrip" in w for w in result.warnings)
    info = probe_video(mp4, LIMITS, tools)
    assert info.rotation == 90 and info.subtitle_streams == () and len(info.audio_streams) == 1


def test_enhancer_returning_wrong_frames_is_a_video_error(tools, synthetic, tmp_path):
    with pytest.raises(VideoError, match="returned 1 frames for a batch of 4"):
        upscale_video(synthetic, tmp_path / "o.mp4", lambda b: b[:1], VideoSettings(), limits=LIMITS,
                      options=VideoRunOptions(ffmpeg=tools))
    with pytest.raises(VideoError, match="uint8"):
        upscale_video(synthetic, tmp_path / "o.mp4", lambda b: [f.astype(np.float32) for f in b],
                      VideoSettings(), limits=LIMITS, options=VideoRunOptions(ffmpeg=tools))
    assert not (tmp_path / "o.mp4").exists()


def _ffmpeg_children() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name() and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


def test_cancel_kills_ffmpeg_and_removes_partial_output(tools, enhancer, synthetic, tmp_path):
    out = tmp_path / "cancelled.mp4"
    cancel = threading.Event()
    seen: list[int] = []

    def progress(p: VideoProgress) -> None:
        if p.stage == "upscale":
            seen.append(p.frames_done)
            if p.frames_done >= 12:  # after at least one finished segment
                cancel.set()

    with pytest.raises(CancelledError):
        upscale_video(synthetic, out, enhancer, VideoSettings(batch_frames=2, segment_frames=4), limits=LIMITS,
                      options=VideoRunOptions(ffmpeg=tools), progress=progress, cancel=cancel)
    assert seen and seen[-1] < 40
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no .part, no work folder
    assert _ffmpeg_children() == []


CHILD = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.test_video import LIMITS, make_enhancer
from engine import ffmpeg as ff
from engine.video import VideoRunOptions, VideoSettings, upscale_video
upscale_video({src!r}, {out!r}, make_enhancer(Path({weights!r}), block_after=20),
              VideoSettings(batch_frames=2, segment_frames=8, preset="ultrafast"), limits=LIMITS,
              options=VideoRunOptions(ffmpeg=ff.find_tools({ffmpeg!r}), job_id="srvgg-x2"))
"""


def test_resume_after_sigkill_matches_a_clean_run(tools, weights, enhancer, synthetic, tmp_path):
    settings = VideoSettings(batch_frames=2, segment_frames=8, preset="ultrafast")
    out = tmp_path / "resumed.mp4"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), src=str(synthetic), out=str(out),
                                                                 weights=str(weights), ffmpeg=tools.ffmpeg)])
    try:
        deadline = time.monotonic() + 300  # a bound for a hung child only (it imports torch first)
        manifest = None
        while time.monotonic() < deadline and child.poll() is None:
            found = list(tmp_path.glob(".resumed.mp4.work/manifest.json"))
            if found and found[0].read_text().count('"file"') >= 2:  # two segments (16 frames) finished
                manifest = found[0]
                break
            time.sleep(0.1)
        assert child.poll() is None and manifest is not None, "the child should be blocked at frame 20"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert not out.exists()

    events: list[VideoProgress] = []
    result = upscale_video(synthetic, out, enhancer, settings, limits=LIMITS,
                           options=VideoRunOptions(resume=True, ffmpeg=tools, job_id="srvgg-x2"),
                           progress=events.append)
    assert result.resumed_frames == 16 and result.frames == 40
    assert "resume" in [e.stage for e in events]
    assert min(e.frames_done for e in events if e.stage == "upscale") > 16  # the first 16 were not redone

    clean = tmp_path / "clean.mp4"
    upscale_video(synthetic, clean, enhancer, settings, limits=LIMITS, options=VideoRunOptions(ffmpeg=tools))
    a, b = probe_video(out, LIMITS, tools), probe_video(clean, LIMITS, tools)
    assert a.frames == b.frames == 40 and a.fps == b.fps
    frames_a, frames_b = decode_all(tools, out, 128, 96), decode_all(tools, clean, 128, 96)
    assert frames_a.shape == frames_b.shape
    assert np.array_equal(frames_a, frames_b)  # segment boundaries are frame-exact


def test_without_resume_earlier_work_is_discarded(tools, synthetic, tmp_path):
    out = tmp_path / "o.mp4"
    settings = VideoSettings(batch_frames=4, segment_frames=8, preset="ultrafast")
    first = upscale_video(synthetic, out, lambda b: b, settings, limits=LIMITS, options=VideoRunOptions(ffmpeg=tools))
    second = upscale_video(synthetic, out, lambda b: b, settings, limits=LIMITS,
                           options=VideoRunOptions(resume=True, ffmpeg=tools, job_id="identity"))
    assert first.frames == second.frames == 40 and second.resumed_frames == 0  # the work folder was cleaned up


# ---------------------------------------------------------------------------------------------- resume keys
class Interrupted(Exception):
    """Stands in for a crash: raised from the progress callback once a segment is on disk."""


def interrupt_after_first_segment(output: Path):
    """A progress callback that waits until the work folder's manifest lists a finished segment, then raises
    :class:`Interrupted`, leaving the work folder behind as a crash would."""
    manifest = default_work_dir(output) / "manifest.json"

    def progress(p: VideoProgress) -> None:
        if p.stage != "upscale" or p.frames_done < 10:
            return
        deadline = time.monotonic() + 120  # only a bound for a broken pipeline; normally a fraction of a second
        while not (manifest.is_file() and '"file"' in manifest.read_text()):
            assert time.monotonic() < deadline, "no segment was finished"
            time.sleep(0.02)
        raise Interrupted()

    return progress


def painter(value: int, size: tuple[int, int] = (96, 128), **settings) -> DescribedFrameEnhancer:
    """An enhancer that paints every frame one grey ``value`` at ``size`` (H, W), described by ``settings``."""
    return DescribedFrameEnhancer(lambda frames: [np.full((*size, 3), value, np.uint8) for _ in frames],
                                  {"model": "A", "outscale": 2, "face_enhance": False} | settings)


SEGMENTED = VideoSettings(batch_frames=2, segment_frames=8, preset="ultrafast")


def interrupted_run(tools: ff.FfmpegTools, synthetic: Path, out: Path, enhancer, settings=SEGMENTED) -> None:
    with pytest.raises(Interrupted):
        upscale_video(synthetic, out, enhancer, settings, limits=LIMITS, options=VideoRunOptions(ffmpeg=tools),
                      progress=interrupt_after_first_segment(out))
    assert not out.exists() and list(default_work_dir(out).glob("seg_*.mp4"))  # what a crash leaves


def test_resume_with_the_same_settings_keeps_the_earlier_segments(tools, synthetic, tmp_path):
    out = tmp_path / "o.mp4"
    interrupted_run(tools, synthetic, out, painter(200))
    # Same description, other pixels: the frames that come back as 200 can only be the earlier segments.
    result = upscale_video(synthetic, out, painter(100), SEGMENTED, limits=LIMITS,
                           options=VideoRunOptions(resume=True, ffmpeg=tools))
    assert result.resumed_frames >= 8 and result.resumed_frames % 8 == 0 and result.frames == 40
    assert not any("started over" in w for w in result.warnings)
    grey = decode_all(tools, out, 128, 96).mean(axis=(1, 2, 3))
    assert np.abs(grey[:result.resumed_frames] - 200).max() < 3
    assert np.abs(grey[result.resumed_frames:] - 100).max() < 3


@pytest.mark.parametrize("change, enhancer, settings, size, said", [
    ("model", painter(50, model="B"), SEGMENTED, (96, 128), "model A → B"),
    ("scale", painter(50, (144, 192), outscale=3), SEGMENTED, (144, 192), "outscale 2 → 3"),
    ("faces", painter(50, face_enhance=True), SEGMENTED, (96, 128), "face_enhance False → True"),
    ("crf", painter(50), VideoSettings(batch_frames=2, segment_frames=8, preset="ultrafast", crf=23), (96, 128),
     "crf 18 → 23"),
], ids=["model", "scale", "faces", "crf"])
def test_resume_with_other_settings_starts_over_and_says_so(tools, synthetic, tmp_path, change, enhancer, settings,
                                                            size, said):
    out = tmp_path / "o.mp4"
    interrupted_run(tools, synthetic, out, painter(200))
    result = upscale_video(synthetic, out, enhancer, settings, limits=LIMITS,
                           options=VideoRunOptions(resume=True, ffmpeg=tools))
    assert result.resumed_frames == 0 and result.frames == 40
    assert [w for w in result.warnings if "started over" in w] == [
        f"The earlier run used other settings ({said}); started over."]
    grey = decode_all(tools, out, size[1], size[0]).mean(axis=(1, 2, 3))
    assert len(grey) == 40 and np.abs(grey - 50).max() < 3  # not one frame of the earlier run's segments
    assert not default_work_dir(out).exists()


def test_resume_after_the_input_changed_starts_over(tools, synthetic, tmp_path):
    src = tmp_path / "in.mp4"
    shutil.copy(synthetic, src)
    out = tmp_path / "o.mp4"
    interrupted_run(tools, src, out, painter(200))
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))  # edited since
    result = upscale_video(src, out, painter(50), SEGMENTED, limits=LIMITS,
                           options=VideoRunOptions(resume=True, ffmpeg=tools))
    assert result.resumed_frames == 0
    assert "The input file changed since the earlier run; started over." in result.warnings
    assert np.abs(decode_all(tools, out, 128, 96).mean(axis=(1, 2, 3)) - 50).max() < 3


def test_resume_needs_an_enhancer_that_says_how_it_made_its_frames(tools, synthetic, tmp_path):
    with pytest.raises(InvalidSettingsError, match="job_id"):
        upscale_video(synthetic, tmp_path / "o.mp4", lambda b: b, SEGMENTED, limits=LIMITS,
                      options=VideoRunOptions(resume=True, ffmpeg=tools))
    assert list(tmp_path.iterdir()) == []


def test_job_key_treats_equal_numbers_alike_and_any_change_as_another_job():
    base = {"input": {"path": "/v.mp4", "size": 1, "mtime_ns": 2}, "output": ".mp4",
            "video": {"crf": 18, "fps": None}, "enhancer": {"model": "A", "outscale": 2.0, "tile": "auto"},
            "job_id": ""}
    assert job_key(base) == job_key(base | {"enhancer": {"model": "A", "outscale": 2, "tile": "auto"}})
    assert job_key(base) == job_key(base | {"video": {"crf": 18, "fps": None}})
    others = [base | {"enhancer": {"model": "B", "outscale": 2.0, "tile": "auto"}},
              base | {"enhancer": {"model": "A", "outscale": 2.5, "tile": "auto"}},
              base | {"enhancer": {"model": "A", "outscale": 2.0, "tile": 256}},
              base | {"video": {"crf": 18, "fps": Fraction(24000, 1001)}},
              base | {"input": {"path": "/v.mp4", "size": 1, "mtime_ns": 3}}, base | {"job_id": "x"}]
    assert len({job_key(base)} | {job_key(o) for o in others}) == 1 + len(others)
    assert settings_changes(base, others[0]) == "model A → B"
    assert settings_changes(base, others[3]) == f"fps None → {Fraction(24000, 1001)}"
    assert settings_changes(base, others[4]) == "the input file changed"
