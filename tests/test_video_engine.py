"""Video through the app's own engine: the frame enhancer and the `video` CLI, with the offline weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.processor import EnhanceSettings, enhance_image_direct, make_frame_enhancer
from engine.video import VideoLimits, probe_video

ROOT = Path(__file__).resolve().parent.parent
CLIP = Path(__file__).resolve().parent / "data" / "video" / "onepiece_demo_24f_160x120.mp4"
LIMITS = VideoLimits(max_bytes=10**9, max_seconds=600, max_frames=10_000, max_pixels=10**8)


def test_batched_frames_match_single_images(model_manager_session):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=2, tile=0, device="cpu", precision="fp32")
    enhancer = make_frame_enhancer(model_manager_session, settings)
    batched = enhancer(frames)
    assert enhancer.warnings == [] and enhancer.settings.model == settings.model
    for frame, out in zip(frames, batched):
        single = enhance_image_direct(frame, settings.replace(quality_metrics=False), model_manager_session).pixels
        assert out.shape == (40, 48, 3)
        assert np.abs(out.astype(int) - single.astype(int)).max() <= 1


def test_cli_video_doubles_size_keeps_frames_fps_and_audio(model_manager_session, tmp_path):
    from tests.test_model_manager import _clean_env

    source = probe_video(CLIP, LIMITS)
    out = tmp_path / "out.mp4"
    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(model_manager_session.weights_dir)}
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "video", str(CLIP), "-o", str(out), "--model",
                           "realesr-animevideov3-x2", "--scale", "2", "--tile", "0", "--batch-frames", "4", "--json"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    result = probe_video(out, LIMITS)
    assert record["frames"] == source.frames == result.frames
    assert (result.width, result.height) == (source.width * 2, source.height * 2)
    assert result.fps == source.fps
    assert len(result.audio_streams) == len(source.audio_streams) == 1
    assert abs(result.duration - source.duration) < 0.1


def test_cli_video_refuses_a_corrupt_file_clearly(tmp_path):
    from tests.test_model_manager import _clean_env

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "video", str(bad), "-o", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, timeout=300, env=_clean_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert "Error:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_output_equal_to_input_is_refused_and_the_original_kept(tmp_path):
    import shutil

    from engine.errors import VideoError
    from engine.video import VideoSettings, upscale_video

    clip = tmp_path / "clip.mp4"
    shutil.copy(CLIP, clip)
    before = clip.read_bytes()
    with pytest.raises(VideoError, match="original is kept"):
        upscale_video(clip, clip, lambda frames: frames, VideoSettings(), limits=LIMITS)
    assert clip.read_bytes() == before
