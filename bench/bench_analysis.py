"""Time of engine.image_analysis.analyze on a 2-megapixel image (budget: 200 ms including face detection).

Run: .venv/bin/python bench/bench_analysis.py [--repeat N]
The image is tests/data/advisor/00.jpg (two faces) resized to 1224x1632 (2.0 MP). Prints the median of N runs per
stage and the ratio to the budget (< 1.0 is within budget).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import image_analysis as ia  # noqa: E402
from engine.face_detect import detect_faces  # noqa: E402

BUDGET_MS = 200.0


def timed(fn, image, repeat: int) -> tuple[float, float]:
    """Median (wall ms, process CPU ms) of ``repeat`` calls after one warm-up (cascade load, caches)."""
    fn(image)
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(image)
        wall.append((time.perf_counter() - w0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    bgr = cv2.imread(str(ROOT / "tests" / "data" / "advisor" / "00.jpg"))
    image = cv2.cvtColor(cv2.resize(bgr, (1224, 1632), interpolation=cv2.INTER_CUBIC), cv2.COLOR_BGR2RGB)
    print(f"image {image.shape[1]}x{image.shape[0]} = {image.shape[0] * image.shape[1] / 1e6:.2f} MP")
    stages = {
        "content_type": ia.content_type,
        "noise_sigma": ia.noise_sigma,
        "jpeg_blockiness": ia.jpeg_blockiness,
        "blur_level": ia.blur_level,
        "detect_faces": detect_faces,
        "analyze (all)": ia.analyze,
    }
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall time inflates under load; "
          "CPU time counts all threads of this process)")
    for name, fn in stages.items():
        wall, cpu = timed(fn, image, args.repeat)
        print(f"{name:16s} wall {wall:7.1f} ms   cpu {cpu:7.1f} ms")
    wall, cpu = timed(ia.analyze, image, args.repeat)
    faces = len(ia.analyze(image).faces)
    print(f"analyze: wall {wall:.1f} ms (ratio {wall / BUDGET_MS:.2f}), cpu {cpu:.1f} ms (ratio {cpu / BUDGET_MS:.2f}) "
          f"of the {BUDGET_MS:.0f} ms budget; {faces} faces found")


if __name__ == "__main__":
    main()
