"""The advisor end to end: `analyze` and `enhance --auto` on real sample images, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ADVISOR = Path(__file__).resolve().parent / "data" / "advisor"


def _run(tmp_path: Path, weights_dir: Path, *args: str) -> subprocess.CompletedProcess:
    from tests.test_model_manager import _clean_env

    env = _clean_env(tmp_path) | {"REALESRGAN_WEIGHTS_DIR": str(weights_dir)}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path)


def test_analyze_json_has_the_designs_shape_and_plain_reasons(tmp_path, model_manager_session):
    done = _run(tmp_path, model_manager_session.weights_dir, "analyze", str(ADVISOR / "10045.png"), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    advice = json.loads(done.stdout)
    settings, analysis = advice["settings"], advice["analysis"]
    assert {"model", "scale", "fp32", "face_enhance", "tile", "auto_tile", "denoise_strength", "face_strength",
            "precision"} <= set(settings)
    assert {"content_type", "faces", "noise_level", "resolution", "optimal_tile", "confidence", "jpeg_artifacts",
            "blur", "estimated_seconds", "estimated_memory_mb", "device"} <= set(analysis)
    assert analysis["content_type"] == "photo" and analysis["faces"] >= 1
    assert isinstance(analysis["content_scene_logit"], float)  # the scene network's part of content_logit
    assert settings["face_enhance"] is True and settings["model"] == "RealESRGAN_x4plus"
    assert len(analysis["face_boxes"]) == analysis["faces"]
    assert analysis["estimated_seconds"] > 0 and analysis["device"] == "cpu"
    assert any("face" in r for r in advice["reasoning"])
    text = _run(tmp_path, model_manager_session.weights_dir, "analyze", str(ADVISOR / "0014.jpg"))
    assert text.returncode == 0 and "anime model" in text.stdout


def test_enhance_auto_picks_the_right_model_per_image(tmp_path, model_manager_session):
    src = tmp_path / "mixed"
    src.mkdir()
    # Small images keep the CPU time low; each keeps its kind (an anime frame, a natural photo). The frame is
    # downscaled whole: a 4x close-up of a character's skin reads as a photo to the scene network (README, limits).
    Image.open(ADVISOR / "onepiece_105.jpg").convert("RGB").resize((128, 96), Image.LANCZOS).save(src / "anime.png")
    photo = np.asarray(Image.open(ADVISOR / "00003.png").convert("RGB"))[:96, :128]
    Image.fromarray(photo).save(src / "photo.png")
    done = _run(tmp_path, model_manager_session.weights_dir, "enhance", str(src), "-o", str(tmp_path / "out"),
                "--auto", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    records = {Path(r["input"]).name: r for r in map(json.loads, done.stdout.strip().splitlines())}
    assert records["anime.png"]["model"] == "RealESRGAN_x4plus_anime_6B"
    assert records["photo.png"]["model"] == "RealESRGAN_x4plus"
    assert all(r["ok"] and r["advisor"] for r in records.values())
