"""Peak memory of one enhance job in a fresh process, against the goal 1.0 GB + 2 × the output's bytes.

Each case runs ``main.py enhance`` (the user's path) in its own subprocess, watched: the child is killed once its
RSS passes ``--cap-gb`` (default 4 GB), so a regression cannot take the machine down. The peak RSS comes from the
kernel (``wait4`` → ``ru_maxrss``, with this process's own peak reset before each spawn: see
:func:`reset_peak_rss`); beside it, the file-backed share of the highest sampled RSS (the mapped code of
torch, its CUDA libraries and the rest, and the memory-mapped weights: clean pages that the kernel can drop and
that processes share). Beside those: the memory plan's estimate (``engine.inference.pipeline.plan_input``, from
the file's header) and the wall time; with ``--compare REF`` the same cases run in a checkout ``REF`` (e.g. the
old engine) and the speed ratio is printed. Not a test; timings are noisy when other jobs share the CPU.

    .venv/bin/python bench/bench_memory.py                       # the default cases
    .venv/bin/python bench/bench_memory.py --case 1500x1000x4 --compare /work/main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1024 ** 3


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    scale: float
    model: str = "realesr-animevideov3"
    output: str = "png"  # output file extension
    extra: tuple[str, ...] = ()
    stream: bool = False  # through pipeline.enhance_streamed (the output never whole in memory), not the CLI
    alpha: bool = False  # an RGBA PNG input (a soft-edged transparent shape) instead of an RGB JPEG

    @property
    def output_bytes(self) -> int:
        return int(round(self.width * self.scale)) * int(round(self.height * self.scale)) * (4 if self.alpha else 3)


CASES = {c.name: c for c in (
    Case("1500x1000x4", 1500, 1000, 4),
    Case("2000x1500x4", 2000, 1500, 4),
    Case("2000x1500x2", 2000, 1500, 2),
    Case("2000x1500x4-jpg", 2000, 1500, 4, output="jpg"),
    Case("2000x1500x4-webp", 2000, 1500, 4, output="webp"),
    Case("1000x1000x4-rgba-webp", 1000, 1000, 4, output="webp", alpha=True),  # 4000²: alpha compressed
    Case("1500x1000x4-rgba-webp", 1500, 1000, 4, output="webp", alpha=True),  # over 4096²: alpha uncompressed
    Case("1500x1000x4-rgba-png", 1500, 1000, 4, output="png", alpha=True),
    Case("4000x4000x4-rgba-webp", 4000, 4000, 4, output="webp", alpha=True),  # 16000², near WebP's largest
    Case("256x256x4-x4plus", 256, 256, 4, model="RealESRGAN_x4plus"),
    Case("640x480x4-x4plus", 640, 480, 4, model="RealESRGAN_x4plus"),
    Case("1500x1000x4-stream", 1500, 1000, 4, output="tiff", stream=True),
    Case("2500x2500x4-stream", 2500, 2500, 4, output="tiff", stream=True),
    Case("5000x5000x4-stream", 5000, 5000, 4, output="tiff", stream=True),
    Case("2500x2500x4-stream-png", 2500, 2500, 4, output="png", stream=True),
    Case("5000x5000x4-stream-png", 5000, 5000, 4, output="png", stream=True),
)}


def make_input(case: Case, folder: Path) -> Path:
    """A JPEG of smooth gradients and edges (content does not change memory; decoding cost is realistic); with
    ``alpha``, a PNG whose alpha is an ellipse with a soft edge."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:case.height, 0:case.width]
    rgb = np.stack([(x * 255 // max(case.width - 1, 1)), (y * 255 // max(case.height - 1, 1)),
                    ((x // 37 + y // 23) % 2) * 200 + 20], axis=2).astype(np.uint8)
    if case.alpha:
        radius = np.hypot((x - case.width / 2) / case.width, (y - case.height / 2) / case.height)
        alpha = np.clip((0.45 - radius) * 2000, 0, 255).astype(np.uint8)
        path = folder / f"{case.name}.png"
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
        return path
    path = folder / f"{case.name}.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    return path


def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (Linux ``/proc/self/clear_refs``).

    A child's ``ru_maxrss`` starts from its parent's high-water mark: Linux carries the old memory's peak across
    ``exec``, and Python spawns with ``vfork``, whose old memory is this process's. Making a 5000² input here
    (int64 grids, ~1.2 GB) made a streamed job read 1.55 GB that peaked at 1.14 GB itself."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise SystemExit(f"Cannot reset the RSS peak ({exc}); the children's peaks would include this process's. "
                         "Run on Linux 4.0 or later.") from exc


def run_capped(argv: list[str], cap_bytes: int, cwd: Path, env: dict | None = None) -> dict:
    """Run ``argv``; kill it when its RSS passes ``cap_bytes``. Returns peak RSS (bytes), seconds, exit code."""
    import psutil

    reset_peak_rss()
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = threading.Event()
    highest = {"rss": 0, "file": 0}  # the highest sampled RSS and the file-backed pages in it

    def watch() -> None:
        try:
            proc = psutil.Process(child.pid)
            while child.returncode is None and not killed.is_set():
                info = proc.memory_info()
                if info.rss > highest["rss"]:
                    highest.update(rss=info.rss, file=info.shared)  # Linux: RssFile + RssShmem
                if info.rss > cap_bytes:
                    killed.set()
                    child.kill()
                    return
                time.sleep(0.05)
        except psutil.Error:
            return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = child.stdout.read()
    err = child.stderr.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    killed_flag = killed.is_set()
    killed.set()
    return {"peak": usage.ru_maxrss * 1024, "file_pages": highest["file"], "seconds": time.perf_counter() - start,
            "rc": child.returncode, "killed": killed_flag, "stdout": out.decode(errors="replace"),
            "stderr": err.decode(errors="replace")}


def plan_estimate(case: Case, image: Path, checkout: Path) -> int | None:
    """The memory plan's peak for the case, in bytes, as the checkout computes it (None when it has no plan)."""
    code = ("import json; from config import Config; from engine.model_manager import ModelManager;"
            "from engine.settings import EnhanceSettings; from engine.inference.pipeline import plan_input;"
            "c=Config(); s=EnhanceSettings(model=%r, outscale=%r, device='cpu', quality_metrics=%r,"
            " output_format=%r); print(plan_input(%r, s, ModelManager(c), c%s)[2].peak_bytes)" % (
                case.model, case.scale, not case.stream, case.output, str(image),
                ", streamed=True" if case.stream else ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(checkout)))
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else None


def run_case(case: Case, checkout: Path, folder: Path, cap: int) -> dict:
    image = make_input(case, folder)
    out = folder / f"{case.name}-{checkout.name}.{case.output}"
    argv = [sys.executable, "main.py", "enhance", str(image), "-o", str(out), "--model", case.model,
            "--scale", str(case.scale), "--device", "cpu", *case.extra]
    if case.stream:
        argv = [sys.executable, "-c", (
            "from config import Config; from engine.model_manager import ModelManager;"
            "from engine.settings import EnhanceSettings; from engine.inference.pipeline import enhance_streamed;"
            "c=Config(); s=EnhanceSettings(model=%r, outscale=%r, device='cpu');"
            "print(enhance_streamed(%r, s, ModelManager(c), %r, config=c)[1], flush=True);"
            # Ended as main.py ends a command (main.exit_now): the interpreter's teardown of torch's modules took
            # RSS 0.14-0.35 GB above the job's own peak (VmHWM 0.81 GB, ru_maxrss 0.94-1.18 GB for 2500² x4).
            "import os; os._exit(0)" % (case.model, case.scale, str(image), str(out)))]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    result = run_capped(argv, cap, checkout, env)
    result["estimate"] = plan_estimate(case, image, checkout)
    if out.exists():
        out.unlink()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="cases to run (default: all)")
    parser.add_argument("--cap-gb", type=float, default=4.0, help="kill a run whose RSS passes this")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout (the old engine) to time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases = [CASES[name] for name in (args.case or CASES)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            row = {"case": case.name, "goal": GB + 2 * case.output_bytes}
            row["new"] = run_case(case, ROOT, Path(tmp), int(args.cap_gb * GB))
            if args.compare is not None:
                row["old"] = run_case(case, args.compare.resolve(), Path(tmp), int(args.cap_gb * GB))
            rows.append(row)
            _print_row(row)
    if args.json:
        print(json.dumps([{k: ({kk: vv for kk, vv in v.items() if kk not in ("stdout", "stderr")}
                               if isinstance(v, dict) else v) for k, v in r.items()} for r in rows], indent=1))
    return 0


def _print_row(row: dict) -> None:
    def cell(r: dict) -> str:
        state = "killed at cap" if r["killed"] else ("ok" if r["rc"] == 0 else f"rc={r['rc']}")
        est = f"{r['estimate'] / GB:.2f}" if r.get("estimate") else "-"
        ratio = f" ({r['estimate'] / r['peak']:.2f}× measured)" if r.get("estimate") else ""
        return (f"peak {r['peak'] / GB:.2f} GB ({r['file_pages'] / GB:.2f} GB of it file-backed), "
                f"plan {est} GB{ratio}, {r['seconds']:.1f} s, {state}")

    line = f"{row['case']:<20} goal <= {row['goal'] / GB:.2f} GB | new: {cell(row['new'])}"
    if "old" in row:
        line += f" | old: {cell(row['old'])} | speed new/old {row['old']['seconds'] / row['new']['seconds']:.2f}×"
    print(line, flush=True)
    if row["new"]["rc"] not in (0, None) and not row["new"]["killed"]:
        print(row["new"]["stderr"][-1500:], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
