"""Pure tests of engine/ffmpeg.py: argv builders and the parsers of ffmpeg/ffprobe output (no ffmpeg run)."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import pytest

from engine import ffmpeg as ff
from engine.errors import VideoError

# Real reports, captured from ffmpeg 9.0 (imageio-ffmpeg) and Debian's ffmpeg 5.1.
BANNER_90 = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:/x/onepiece_demo.mp4':
  Metadata:
    major_brand     : isom
  Duration: 00:00:07.55, start: 0.000000, bitrate: 627 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 640x480 [SAR 1:1 DAR 4:3], \
303 kb/s, 23.98 fps, 23.98 tbr, 19184 tbn (default)
    Metadata:
      handler_name    : VideoHandler
  Stream #0:1[0x2](eng): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 317 kb/s (default)
At least one output file must be specified
"""
BANNER_90_MKV = """\
Input #0, matroska,webm, from 'file:/x/rot.mkv':
  Duration: 00:00:01.02, start: 0.000000, bitrate: 99 kb/s
  Stream #0:0: Video: h264 (High), yuv420p(progressive), 64x48 [SAR 1:1 DAR 4:3], 25 fps, 25 tbr, 1k tbn
    Metadata:
      DURATION        : 00:00:01.000000000
    Side data:
      Display Matrix: rotation of 90.00 degrees
  Stream #0:1: Audio: aac (LC), 44100 Hz, mono, fltp
  Stream #0:2: Subtitle: subrip (srt)
At least one output file must be specified
"""
BANNER_51_ROTATED = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'rot.mp4':
  Duration: 00:00:01.02, start: 0.000000, bitrate: 96 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 64x48 [SAR 1:1 DAR 4:3], \
17 kb/s, 25 fps, 25 tbr, 16k tbn (default)
    Side data:
      displaymatrix: rotation of -90.00 degrees
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, mono, fltp, 70 kb/s (default)
"""
FFPROBE_JSON = json.dumps({
    "streams": [
        {"index": 0, "codec_name": "h264", "codec_type": "video", "width": 64, "height": 48,
         "r_frame_rate": "25/1", "avg_frame_rate": "25/1", "nb_frames": "25",
         "side_data_list": [{"side_data_type": "Display Matrix", "rotation": 90}]},
        {"index": 1, "codec_name": "aac", "codec_type": "audio", "r_frame_rate": "0/0", "avg_frame_rate": "0/0"},
        {"index": 2, "codec_name": "subrip", "codec_type": "subtitle"},
    ],
    "format": {"format_name": "matroska,webm", "duration": "1.023000"},
})
FRAMECRC = """\
#software: Lavf63.1.102
#tb 0: 1/19184
#media_type 0: video
0,      -1600,          0,      800,    35720, 0xdfa2461e
0,       -800,       3200,      800,     1417, 0xee70abc8, F=0x0
0,          0,       1600,      800,      306, 0x13c59708, F=0x0
"""
ENCODERS_TEXT = """\
Encoders:
 V..... = Video
 ------
 V....D libx264              libx264 H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10 (codec h264)
 V....D libvpx-vp9           libvpx VP9 (codec vp9)
 A....D aac                  AAC (Advanced Audio Coding)
"""


def test_parse_version_release_and_git_builds():
    assert ff.parse_version("ffmpeg version 5.1.9-0+deb12u1 Copyright") == (5, 1)
    assert ff.parse_version("ffmpeg version n9.0.2-17-g2a571b6068-20260930 Copyright") == (9, 0)
    assert ff.parse_version("ffmpeg version N-112233-gdeadbeef Copyright") is None


def test_version_gates_options():
    old = ff.FfmpegTools("ffmpeg", None, (5, 1), "system")
    assert old.has_fps_mode and not old.has_display_rotation
    assert not ff.FfmpegTools("ffmpeg", None, (4, 4), "system").has_fps_mode
    assert ff.FfmpegTools("ffmpeg", None, None, "system").has_display_rotation  # unknown: assume a modern build


def test_parse_encoders_and_require():
    names = ff.parse_encoders(ENCODERS_TEXT)
    assert names == {"libx264", "libvpx-vp9", "aac"}
    assert ff.require_encoder(names, "h264") == "libx264"
    with pytest.raises(VideoError, match="libx265.*h264 or vp9"):
        ff.require_encoder(names, "h265")


@pytest.mark.parametrize("text, expected", [("24000/1001", Fraction(24000, 1001)), ("25", Fraction(25)),
                                            ("23.98", Fraction(1199, 50)), ("0/0", None), ("", None),
                                            (None, None), ("abc", None), ("1/0", None)])
def test_parse_fraction(text, expected):
    assert ff.parse_fraction(text) == expected


def test_parse_banner_mp4_with_audio():
    probe = ff.parse_ffmpeg_banner(BANNER_90)
    assert probe.format_name == "mov" and probe.duration == pytest.approx(7.55)
    video = probe.video
    assert (video.width, video.height, video.codec, video.rotation) == (640, 480, "h264", 0)
    assert video.fps == Fraction("23.98")
    assert [s.kind for s in probe.streams] == ["video", "audio"]


@pytest.mark.parametrize("text, rotation, kinds", [
    (BANNER_90_MKV, 90, ["video", "audio", "subtitle"]),
    (BANNER_51_ROTATED, -90, ["video", "audio"]),
])
def test_parse_banner_rotation_and_streams(text, rotation, kinds):
    probe = ff.parse_ffmpeg_banner(text)
    assert probe.video.rotation == rotation
    assert [s.kind for s in probe.streams] == kinds
    assert (probe.video.width, probe.video.height) == (64, 48)


def test_parse_banner_of_unreadable_file_quotes_ffmpeg():
    with pytest.raises(VideoError, match="Invalid data found"):
        ff.parse_ffmpeg_banner("[in#0 @ 0x1] Error opening input: Invalid data found when processing input\n"
                               "Error opening input file file:/x/bad.mp4.\n")


def test_parse_ffprobe_json():
    probe = ff.parse_ffprobe_json(FFPROBE_JSON)
    assert probe.format_name == "matroska" and probe.duration == pytest.approx(1.023)
    assert probe.video.fps == Fraction(25) and probe.video.frames == 25 and probe.video.rotation == 90
    assert [s.kind for s in probe.streams] == ["video", "audio", "subtitle"]
    assert probe.streams[1].fps is None
    with pytest.raises(VideoError):
        ff.parse_ffprobe_json("not json")


def test_parse_ffprobe_old_rotate_tag_is_clockwise():
    text = json.dumps({"streams": [{"index": 0, "codec_type": "video", "codec_name": "h264", "width": 4,
                                    "height": 2, "avg_frame_rate": "30/1", "tags": {"rotate": "90"}}],
                       "format": {"format_name": "mov,mp4"}})
    assert ff.parse_ffprobe_json(text).video.rotation == -90


def test_parse_framecrc_exact_rate():
    assert ff.parse_framecrc(FRAMECRC) == (3, Fraction(1199, 50))


def test_parse_framecrc_without_durations_uses_pts_span():
    text = "#tb 0: 1/1000\n0, 0, 0, 0, 10, 0x1\n0, 40, 40, 0, 10, 0x1\n0, 80, 80, 0, 10, 0x1\n"
    assert ff.parse_framecrc(text) == (3, Fraction(25))
    assert ff.parse_framecrc("#tb 0: 1/1000\n") == (0, None)


def test_input_url_never_selects_a_protocol(tmp_path):
    url = ff.input_url("concat:a.mp4|b.mp4")
    assert url == "file:" + os.path.abspath("concat:a.mp4|b.mp4")


def test_decode_argv_is_frame_exact_and_locked_down():
    argv = ff.decode_argv("ffmpeg", "/v/in.mp4", "mov")
    assert argv[0] == "ffmpeg"
    joined = " ".join(argv)
    assert "-protocol_whitelist file,pipe" in joined and "-f mov -i file:/v/in.mp4" in joined
    assert "-noautorotate" in argv and "-fps_mode passthrough" in joined
    assert joined.endswith("-f rawvideo -pix_fmt rgb24 -")
    assert argv.index("-noautorotate") < argv.index("-i")  # an input option
    assert "-vf" not in argv
    old = ff.decode_argv("ffmpeg", "/v/in.mp4", "mov", fps=Fraction(30000, 1001), has_fps_mode=False)
    assert "fps=30000/1001" in old and "-vsync" in old and "-fps_mode" not in old


@pytest.mark.parametrize("codec, expected, absent", [
    ("h264", ["-c:v", "libx264", "-preset", "slow"], ["-b:v"]),
    ("h265", ["-c:v", "libx265", "-tag:v", "hvc1"], ["-b:v"]),
    ("vp9", ["-c:v", "libvpx-vp9", "-b:v", "0", "-cpu-used", "1"], ["-preset"]),
])
def test_encode_argv_per_codec(codec, expected, absent):
    argv = ff.encode_argv("ffmpeg", "/w/seg.mp4", width=320, height=240, fps=Fraction(1199, 50), codec=codec,
                          crf=20, preset="slow", pix_fmt="yuv420p")
    joined = " ".join(argv)
    assert "-f rawvideo -pix_fmt rgb24 -s 320x240 -framerate 1199/50 -i pipe:0" in joined
    assert " ".join(expected) in joined or all(tok in argv for tok in expected)
    for i in range(0, len(expected), 2):
        assert argv[argv.index(expected[i]) + 1] == expected[i + 1]
    assert not set(absent) & set(argv)
    assert argv[argv.index("-crf") + 1] == "20" and argv[-3:] == ["-f", "mp4", "/w/seg.mp4"]


def test_encode_argv_pads_odd_sizes_only_for_subsampled_formats():
    odd = ff.encode_argv("ffmpeg", "o.mp4", width=321, height=240, fps=Fraction(25), codec="h264", crf=18,
                         preset="medium", pix_fmt="yuv420p")
    assert "pad=ceil(iw/2)*2:ceil(ih/2)*2" in odd
    full = ff.encode_argv("ffmpeg", "o.mp4", width=321, height=240, fps=Fraction(25), codec="h264", crf=18,
                          preset="medium", pix_fmt="yuv444p")
    assert "-vf" not in full


def test_concat_list_durations_add_up_exactly(tmp_path):
    fps = Fraction(30000, 1001)
    segs = [(tmp_path / f"s{i}.mp4", 7) for i in range(100)] + [(tmp_path / "it's.mp4", 3)]
    text = ff.concat_list_text(segs, fps)
    lines = text.splitlines()
    assert lines[0] == "ffconcat version 1.0"
    durations = [Fraction(line.split()[1]) for line in lines if line.startswith("duration ")]
    assert len(durations) == 101
    total_exact = Fraction(703) / fps
    assert abs(sum(durations) - total_exact) <= Fraction(1, 2_000_000)
    assert "file '" + str(tmp_path / "it'\\''s.mp4") + "'" in lines


def test_plan_streams_per_container():
    streams = (ff.StreamInfo(0, "video", "h264"), ff.StreamInfo(1, "audio", "aac"),
               ff.StreamInfo(2, "subtitle", "subrip"), ff.StreamInfo(3, "audio", "pcm_s16le"),
               ff.StreamInfo(4, "data", "bin_data"))
    mkv = ff.plan_streams(streams, "matroska")
    assert [(p.index, p.action) for p in mkv] == [(1, "copy"), (2, "copy"), (3, "copy")]
    mp4 = ff.plan_streams(streams, "mp4")
    assert [(p.index, p.action, p.encoder) for p in mp4] == [(1, "copy", None), (2, "drop", None),
                                                              (3, "encode", "aac")]
    assert "mkv" in mp4[1].reason
    webm = ff.plan_streams(streams, "webm")
    assert webm[0].action == "encode" and webm[0].encoder == "libopus"


def test_mux_argv_copies_streams_and_rotation():
    plans = ff.plan_streams((ff.StreamInfo(1, "audio", "aac"), ff.StreamInfo(2, "subtitle", "subrip"),
                             ff.StreamInfo(3, "audio", "pcm_s16le")), "mp4")
    argv = ff.mux_argv("ffmpeg", "/w/list", "/v/in.mkv", "matroska", "/o/out.mp4", muxer="mp4", streams=plans,
                       rotation=90)
    joined = " ".join(argv)
    assert "-display_rotation:v:0 90" in joined
    assert argv.index("-display_rotation:v:0") < argv.index("concat")  # an input option of the segments
    assert "-f concat -safe 0 -i /w/list" in joined and "-f matroska -i file:/v/in.mkv" in joined
    assert "-map 0:v:0 -map 1:1 -map 1:3 -c copy -c:2 aac" in joined
    assert "1:2" not in argv and "-movflags" in argv and argv[-2:] == ["mp4", "/o/out.mp4"]
    old = ff.mux_argv("ffmpeg", "/w/list", "/v/in.mkv", "matroska", "/o/out.mp4", muxer="mp4", rotation=90,
                      has_display_rotation=False)
    assert "rotate=90" in old and "-display_rotation:v:0" not in old
    assert "file:/v/in.mkv" not in old  # nothing to take from the source


def test_find_tools_explicit_path_without_ffprobe_sibling():
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    tools = ff.find_tools(imageio_ffmpeg.get_ffmpeg_exe())
    assert tools.source == "explicit" and tools.ffprobe is None and tools.version is not None


def test_find_tools_unrunnable_binary_is_a_video_error(tmp_path):
    with pytest.raises(VideoError, match="cannot be run"):
        ff.find_tools(tmp_path / "no-such-ffmpeg")
