"""Video through the app's own engine: the frame enhancer and the `video` CLI, with the offline weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.processor import EnhanceSettings, enhance_image_direct, make_frame_enhancer
from engine.video import (VideoLimits, VideoRunOptions, VideoSettings, default_work_dir, probe_video,
                          upscale_video)

ROOT = Path(__file__).resolve().parent.parent
CLIP = Path(__file__).resolve().parent / "data" / "video" / "onepiece_demo_24f_160x120.mp4"
LIMITS = VideoLimits(max_bytes=10**9, max_seconds=600, max_frames=10_000, max_pixels=10**8)


def test_batched_frames_match_single_images(model_manager_session):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    settings = EnhanceSettings(model="realesr-animevideov3", outscale=2, tile=0, device="cpu", precision="fp32")
    enhancer = make_frame_enhancer(model_manager_session, settings)
    batched = enhancer(frames)
    assert enhancer.enhance.warnings == [] and enhancer.settings["model"] == settings.model
    for frame, out in zip(frames, batched):
        single = enhance_image_direct(frame, settings.replace(quality_metrics=False), model_manager_session).pixels
        assert out.shape == (40, 48, 3)
        assert np.abs(out.astype(int) - single.astype(int)).max() <= 1


def test_cli_video_doubles_size_keeps_frames_fps_and_audio(model_manager_session, tmp_path):
    from tests.test_model_manager import _clean_env

    source = probe_video(CLIP, LIMITS)
    out = tmp_path / "results" / f"{CLIP.stem}_out.mp4"  # no -o: as the official video script
    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(model_manager_session.weights_dir)}
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "video", str(CLIP), "--model",
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


# ---------------------------------------------------------------------------------------------- resume
class Interrupted(Exception):
    """Stands in for a crash: raised from the progress callback once a segment is on disk."""


def _interrupt_after_first_segment(output: Path):
    manifest = default_work_dir(output) / "manifest.json"

    def progress(p) -> None:
        if p.stage != "upscale" or p.frames_done < 10:
            return
        deadline = time.monotonic() + 120  # only a bound for a broken pipeline
        while not (manifest.is_file() and '"file"' in manifest.read_text()):
            assert time.monotonic() < deadline, "no segment was finished"
            time.sleep(0.02)
        raise Interrupted()

    return progress


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory) -> Path:
    """64x48, 24 frames at 24 fps: every frame differs (testsrc), cheap for the real networks."""
    import imageio_ffmpeg

    path = tmp_path_factory.mktemp("clip") / "testsrc.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=64x48:rate=24", "-frames:v", "24", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(path)], check=True)
    return path


def _frames(path: Path) -> np.ndarray:
    import imageio_ffmpeg

    from engine import ffmpeg as ff

    info = probe_video(path, LIMITS)
    raw = subprocess.run(ff.decode_argv(imageio_ffmpeg.get_ffmpeg_exe(), path, info.format_name),
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


SEGMENTED = VideoSettings(batch_frames=4, segment_frames=8, preset="ultrafast")


def _settings(model: str, scale: float) -> EnhanceSettings:
    return EnhanceSettings(model=model, outscale=scale, tile=0, device="cpu", precision="fp32")


@pytest.mark.parametrize("model, scale, resumes, said", [
    ("realesr-animevideov3", 2, True, None),
    ("realesr-animevideov3-x2", 2, False, "model realesr-animevideov3 → realesr-animevideov3-x2"),
    ("realesr-animevideov3", 3, False, "outscale 2 → 3"),
], ids=["same", "other-model", "other-scale"])
def test_resume_joins_only_segments_made_with_the_same_settings(model_manager_session, small_clip, tmp_path, model,
                                                                  scale, resumes, said):
    out = tmp_path / "out.mp4"
    first = make_frame_enhancer(model_manager_session, _settings("realesr-animevideov3", 2))
    with pytest.raises(Interrupted):
        upscale_video(small_clip, out, first, SEGMENTED, limits=LIMITS, progress=_interrupt_after_first_segment(out))
    assert list(default_work_dir(out).glob("seg_*.mp4"))

    enhancer = make_frame_enhancer(model_manager_session, _settings(model, scale))
    events = []
    result = upscale_video(small_clip, out, enhancer, SEGMENTED, limits=LIMITS, options=VideoRunOptions(resume=True),
                           progress=events.append)
    clean = tmp_path / "clean.mp4"
    upscale_video(small_clip, clean, make_frame_enhancer(model_manager_session, _settings(model, scale)), SEGMENTED,
                  limits=LIMITS)
    started_over = [w for w in result.warnings if "started over" in w]
    first_batch = min(e.frames_done for e in events if e.stage == "upscale")
    if resumes:
        assert result.resumed_frames >= 8 and started_over == [] and first_batch > 8
    else:  # every frame enhanced again by this run (the offline x2 model is the x4 network: same pixels here)
        assert result.resumed_frames == 0 and first_batch == 4
        assert started_over == [f"The earlier run used other settings ({said}); started over."]
    # Frame for frame what a clean run with the second settings makes (encoding is deterministic).
    assert result.frames == 24
    assert np.array_equal(_frames(out), _frames(clean))


def test_frame_enhancer_carries_its_settings(model_manager_session):
    settings = _settings("realesr-animevideov3", 2).replace(face_enhance=True, face_strength=0.3,
                                                             tile_overlap=24, denoise_strength=0.2)
    enhancer = make_frame_enhancer(model_manager_session, settings)
    for name in ("model", "outscale", "tile", "tile_overlap", "denoise_strength", "face_enhance", "face_model",
                 "face_strength", "only_center_face", "precision", "alpha_mode", "device"):
        assert enhancer.settings[name] == getattr(settings, name), name


def test_cli_video_resume_with_another_model_starts_over(model_manager_session, small_clip, tmp_path):
    import main
    from tests.test_model_manager import _clean_env

    out = tmp_path / "out.mp4"
    argv = ["video", str(small_clip), "-o", str(out), "--scale", "2", "--tile", "0", "--precision", "fp32",
            "--device", "cpu", "--batch-frames", "4", "--segment-frames", "8", "--preset", "ultrafast", "--json",
            "--resume"]
    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(model_manager_session.weights_dir)}

    def interrupted(model: str) -> None:  # the state a killed `main.py video` leaves, with that model
        args = main.build_parser().parse_args(argv + ["--model", model])
        settings, video_settings = main.video_settings_from_args(args)
        with pytest.raises(Interrupted):
            upscale_video(small_clip, out, make_frame_enhancer(model_manager_session, settings), video_settings,
                          limits=LIMITS, progress=_interrupt_after_first_segment(out))

    def cli(model: str) -> dict:
        done = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv, "--model", model], capture_output=True,
                              text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    interrupted("realesr-animevideov3")
    record = cli("realesr-animevideov3-x2")
    assert record["resumed_frames"] == 0 and record["frames"] == 24
    assert any("other settings (model realesr-animevideov3 → realesr-animevideov3-x2" in w
               for w in record["warnings"]), record["warnings"]

    interrupted("realesr-animevideov3")
    record = cli("realesr-animevideov3")  # the same command line: the same key in another process
    assert record["resumed_frames"] >= 8 and record["frames"] == 24
    assert not any("started over" in w for w in record["warnings"])


def test_the_frame_enhancer_keeps_its_notes_once_for_the_video(model_manager_session, native_bf16):
    """What the engine says about the frames (here: bf16 refused as unfaithful) is kept once for the video."""
    from engine.inference import precision_check

    settings = EnhanceSettings(model="realesr-animevideov3", outscale=2, tile=0, device="cpu", precision="bf16")
    enhancer = make_frame_enhancer(model_manager_session, settings)
    frames = [np.zeros((12, 16, 3), dtype=np.uint8)] * 2
    precision_check._bf16_verdicts[("realesr-animevideov3", 0.5)] = 31.0
    try:
        enhancer(frames)
        enhancer(frames)
    finally:
        precision_check._bf16_verdicts.pop(("realesr-animevideov3", 0.5))
    notes = [w for w in enhancer.warnings if "not faithful enough" in w]
    assert len(notes) == 1
