"""Estimate vs measured time for real CLI runs, after the advisor has learned from one run.

For each model (RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B, realesr-animevideov3) in a fresh config dir:

1. a bad calibration is planted (a quarter of the calibrated MAC/s, as if taken on a busy machine) and the
   advisor's estimate for image B is printed (the "before" figure);
2. ``main.py enhance`` runs on image A (one fresh process, as a user runs it); the batch runner records the job,
   its stages timed apart (model load, network, decode/metrics/save);
3. the advisor's estimate for image B (another size; a fresh CLI process, so the model load is counted) is
   printed, then ``main.py enhance`` runs on B and the recorded job time (load, decode, network, metrics, save)
   and the whole CLI wall time (with Python's and torch's start-up) are printed beside it.

The machine's 1-minute load average is printed before and after each model: on a shared machine the figures
move with it.

Run: .venv/bin/python bench/eval_estimates.py [--sides 96,160]   (CPU; a few minutes on 2 cores for small images)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3")
SOURCE = ROOT / "tests" / "data" / "advisor" / "00003.png"


def make_image(path: Path, long_side: int) -> tuple[int, int]:
    image = Image.open(SOURCE).convert("RGB")
    w, h = image.size
    f = long_side / max(w, h)
    image = image.resize((round(w * f), round(h * f)), Image.LANCZOS)
    image.save(path)
    return image.size


def estimate(config, model: str, width: int, height: int) -> tuple[float, str]:
    """The advisor's estimate for a fresh CLI process (nothing loaded) of ``model`` at ×4, and its parts."""
    from engine.advisor.estimates import job_macs
    from engine.intelligent_enhancer import IntelligentEnhancer
    from utils.gpu import resolve_device

    advisor = IntelligentEnhancer(None, config, device="cpu")
    seconds = advisor.cached_estimate_seconds(model, width, height, 4.0)
    rate = advisor.calibrator.cached(model, resolve_device("cpu"))
    t = advisor._learned(model, resolve_device("cpu"), "fp32", False, rate)
    network = t.network_fixed + job_macs(model, width, height) / t.macs_per_second
    overhead = seconds - t.load_seconds - network
    return seconds, f"{t.load_seconds:.1f}/{network:.1f}/{overhead:.1f}"


def recorded(config, model: str) -> tuple[float, str]:
    """The whole time of the last job recorded for ``model`` (load + network + overhead + faces), and its parts."""
    from engine.advisor.estimates import job_key, load_key, store_for

    store = store_for(config)
    last = store.observations(job_key("cpu", model, "fp32", tiled=False))[-1]
    loads = store.loads(load_key("cpu", model, "fp32"))
    load = loads[-1] if loads else 0.0
    return (load + last.network_seconds + last.overhead_seconds + last.face_seconds,
            f"{load:.1f}/{last.network_seconds:.1f}/{last.overhead_seconds + last.face_seconds:.1f}")


def cli(env: dict, image: Path, out: Path, model: str) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "enhance", str(image), "-o", str(out), "--model",
                           model, "--scale", "4", "--json"], capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="96,160", help="long sides of images A and B")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    side_a, side_b = (int(v) for v in args.sides.split(","))
    from config import Config

    weights = Config.from_env(dotenv_path=None).weights_dir
    print(f"CPU: {os.cpu_count()} cores; images {side_a} px then {side_b} px (long side), x4")
    print("(parts: model load / network / decode, metrics and save; 'CLI wall' adds the process start-up)")
    print(f"{'model':28s} {'before':>8s} {'after 1 run':>12s} {'parts':>14s} {'measured':>9s} {'parts':>14s} "
          f"{'error':>7s} {'CLI wall':>9s} {'load avg':>13s}")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            env = {k: v for k, v in os.environ.items() if not k.startswith("REALESRGAN_")}
            env |= {"REALESRGAN_WEIGHTS_DIR": str(weights), "REALESRGAN_CONFIG_DIR": str(tmp / "cfg"),
                    "REALESRGAN_TEMP_DIR": str(tmp / "tmp"), "REALESRGAN_LOG_DIR": str(tmp / "logs"),
                    "REALESRGAN_DEVICE": "cpu"}
            config = Config.from_env(env, dotenv_path=None)
            a, b = tmp / "a.png", tmp / "b.png"
            make_image(a, side_a)
            wb, hb = make_image(b, side_b)
            load_before = os.getloadavg()[0]
            # A calibration taken on a busy machine: a quarter of the real speed, stored as the cache would be.
            from engine.intelligent_enhancer import ThroughputCalibrator

            calibrator = ThroughputCalibrator(Path(config.config_dir) / "calibration.json")
            real, _busy = calibrator._measure(model, "cpu")
            calibrator._save({calibrator.key(model, "cpu"): real / 4})
            before, _ = estimate(config, model, wb, hb)
            cli(env, a, tmp / "out", model)
            after, parts = estimate(config, model, wb, hb)
            wall, _record = cli(env, b, tmp / "out", model)
            measured, measured_parts = recorded(config, model)
            print(f"{model:28s} {before:6.1f} s {after:10.1f} s {parts:>14s} {measured:7.1f} s {measured_parts:>14s} "
                  f"{100 * (after - measured) / measured:+6.0f}% {wall:7.1f} s "
                  f"{load_before:5.1f} -> {os.getloadavg()[0]:4.1f}", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
