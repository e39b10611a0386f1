"""Estimate vs measured time for real CLI runs, after the advisor has learned from one run.

For each model (RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B, realesr-animevideov3) in a fresh config dir:

1. a bad calibration is planted (a quarter of the calibrated MAC/s, as if taken on a busy machine) and the
   advisor's estimate for image B is printed (the "before" figure, shown as a range);
2. ``main.py enhance`` runs on image A (one fresh process, as a user runs it); the batch runner records the job;
3. the advisor's estimate for image B (another size) is printed, then ``main.py enhance`` runs on B and the
   recorded job time (load, decode, inference, metrics, save) and the whole CLI wall time are printed beside it.

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


def estimate(config, model: str, width: int, height: int) -> tuple[float, float, float, int]:
    from engine.advisor.estimates import fit_timing, job_key, job_macs, prior_fixed_seconds, store_for
    from engine.intelligent_enhancer import ThroughputCalibrator

    calibrated = ThroughputCalibrator(Path(config.config_dir) / "calibration.json").macs_per_second(model, "cpu")
    key = job_key("cpu", model, "fp32", tiled=False)
    timing = fit_timing(store_for(config).observations(key), calibrated, prior_fixed_seconds(model))
    macs = job_macs(model, width, height)
    low, high = timing.range(macs)
    return timing.seconds(macs), low, high, timing.observations


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
    print(f"CPU: {os.cpu_count()} cores, load average now {os.getloadavg()[0]:.1f} (estimates are only as good as "
          "the machine is steady)")
    print(f"{'model':28s} {'before (bad calibration)':>26s} {'estimate after 1 run':>22s} {'measured job':>13s} "
          f"{'error':>7s} {'CLI wall':>9s}")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            env = {k: v for k, v in os.environ.items() if not k.startswith("REALESRGAN_")}
            env |= {"REALESRGAN_WEIGHTS_DIR": str(weights), "REALESRGAN_CONFIG_DIR": str(tmp / "cfg"),
                    "REALESRGAN_TEMP_DIR": str(tmp / "tmp"), "REALESRGAN_LOG_DIR": str(tmp / "logs")}
            config = Config.from_env(env, dotenv_path=None)
            a, b = tmp / "a.png", tmp / "b.png"
            make_image(a, side_a)
            wb, hb = make_image(b, side_b)
            # A calibration taken on a busy machine: a quarter of the real speed, stored as the cache would be.
            from engine.intelligent_enhancer import ThroughputCalibrator

            calibrator = ThroughputCalibrator(Path(config.config_dir) / "calibration.json")
            real = calibrator._measure(model, "cpu")
            calibrator._save({f"v3|cpu|{model}|{calibrator.size}": real / 4})
            before, lo0, hi0, _ = estimate(config, model, wb, hb)
            cli(env, a, tmp / "out", model)
            after, lo, hi, n = estimate(config, model, wb, hb)
            wall, _record = cli(env, b, tmp / "out", model)
            stored = json.loads((Path(config.config_dir) / "timings.json").read_text())
            measured = list(stored.values())[0][-1][1]
            print(f"{model:28s} {before:8.1f} s ({lo0:5.1f}-{hi0:5.1f}) {after:8.1f} s ({lo:5.1f}-{hi:5.1f}) "
                  f"{measured:11.1f} s {100 * (after - measured) / measured:+6.0f}% {wall:7.1f} s", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
