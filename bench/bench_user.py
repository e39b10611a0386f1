"""What a user waits for, against the official path doing the same work: RealESRGAN_x4plus on the CPU.

Rows (seconds are medians of ``--repeats``, each ratio is official / ours measured in this one run):

* CLI, one image, fresh process: ``main.py enhance`` against a fresh process running the official
  ``inference_realesrgan.py`` semantics (``RealESRGANer``, tile 0, pre_pad 0, fp32 on the CPU, cv2 read/write);
  ours in fp32 and bf16, *cold* (the first call: the bf16 verdict not yet on disk) and *warm* (later calls);
  in-process warm (a second image in one process) for comparison.
* CLI, a folder of ``--folder`` images: one process each side (ours overlapped, and serial for comparison).
* REST: the first and the second ``POST /api/v1/enhance`` after ``main.py ui`` is up (the first sent at once,
  while the background warm-up runs), against a long-lived ``RealESRGANer`` (its first and second ``enhance``);
  then an automatic job (no model named; the advisor picks x4plus for the default photo) on a fresh install, whose
  advice estimates models the warm-up has not calibrated yet.
* The app's idle CPU (psutil, ``--idle-seconds``), after the requests.

Beside each ratio: the machine's conv peaks measured in this run (:func:`bench_upscale.conv_peak`: fp32 NCHW, fp32
NHWC, bf16 NHWC), the ceiling they set (ours NHWC / the official's NCHW; bf16 NHWC / fp32 NCHW) and our GFLOP/s
as a share of our layout's peak (2 * MACs per input pixel * pixels / wall seconds of the whole command).
Numbers swing when other jobs share the cores: the load average is printed with them. Not a test.

    .venv/bin/python bench/bench_user.py                      # 256², folder of 8, 3 repeats (tens of minutes)
    .venv/bin/python bench/bench_user.py --size 128 --folder 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODEL = "RealESRGAN_x4plus"
MACS_PER_PIXEL = 17_926_848  # RealESRGAN_x4plus, per input pixel (as bench_upscale.MACS)
PHOTO = Path("/work/shared/testdata/realesrgan/inputs/ADE_val_00000114.jpg")  # a 256² photo the tests don't use
FALLBACK = ROOT / "tests" / "data" / "upscaler" / "ost_009_crop192.png"

# The official inference_realesrgan.py, reduced to what it does for `-n RealESRGAN_x4plus -i <in> -o <out>`
# on a CPU (tile 0, tile_pad 10, pre_pad 0, fp32): argv = weights, output folder, inputs...
OFFICIAL = """
import sys, time, os, cv2, torch
t0 = time.perf_counter()
from utils.compat import install_torchvision_shim
install_torchvision_shim()
from basicsr.archs.rrdbnet_arch import RRDBNet
from realesrgan import RealESRGANer
model = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
upsampler = RealESRGANer(scale=4, model_path=sys.argv[1], model=model, tile=0, tile_pad=10, pre_pad=0, half=False,
                         device=torch.device("cpu"))
first = None
for path in sys.argv[3:]:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    t = time.perf_counter()
    out, _ = upsampler.enhance(img, outscale=4)
    first = first or time.perf_counter() - t
    name, ext = os.path.splitext(os.path.basename(path))
    cv2.imwrite(os.path.join(sys.argv[2], f"{name}_out{ext}"), out)
print("ENHANCE", first)
"""

# Ours in one process: the second image of the same size, as a warm app or script gets it.
OURS_IN_PROCESS = """
import sys, time
from config import Config
from engine.model_manager import ModelManager
from engine.processor import enhance_image_direct
from engine.settings import EnhanceSettings
from utils.allocator import reuse_freed_memory
reuse_freed_memory()
manager = ModelManager(Config.from_env(env={}, dotenv_path=None, weights_dir=sys.argv[1]))
settings = EnhanceSettings(model="%s", device="cpu", precision=sys.argv[2])
times = []
for _ in range(2):
    t = time.perf_counter()
    enhance_image_direct(sys.argv[3], settings, manager)
    times.append(time.perf_counter() - t)
print("TIMES", *times)
""" % MODEL


def load() -> str:
    return "load %.1f/%.1f/%.1f on %d CPUs" % (*os.getloadavg(), os.cpu_count() or 0)


def timed(argv: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def median(values: list[float]) -> float:
    return statistics.median(values)


class Table:
    def __init__(self, peaks: dict[str, float], pixels: int):
        self.peaks, self.pixels = peaks, pixels
        self.ceiling = {"fp32": peaks["fp32 NHWC"] / peaks["fp32 NCHW"], "bf16": peaks["bf16 NHWC"] / peaks["fp32 NCHW"]}
        self.peak = {"fp32": peaks["fp32 NHWC"], "bf16": peaks["bf16 NHWC"]}
        print(f"{'path':58} {'s':>7} {'ratio':>6} {'ceiling':>7} {'GFLOP/s':>8} {'%peak':>6}")

    def row(self, path: str, seconds: float, official: float | None = None, precision: str | None = None,
            images: int = 1, note: str = "") -> None:
        ratio = f"{official / seconds:5.2f}x" if official else "     -"
        ceiling = f"{self.ceiling[precision]:6.2f}x" if precision and official else "      -"
        gflops = 2 * MACS_PER_PIXEL * self.pixels * images / seconds / 1e9
        share = f"{100 * gflops / self.peak[precision]:5.0f}%" if precision else "     -"
        print(f"{path:58} {seconds:7.2f} {ratio} {ceiling} {gflops:8.1f} {share} {note}", flush=True)


def make_inputs(folder: Path, size: int, count: int, image: Path) -> list[Path]:
    """``count`` different size×size PNGs cut from ``image`` (tiled when smaller)."""
    import cv2
    import numpy as np

    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    reps = (-(-(size + count) // bgr.shape[0]), -(-(size + count) // bgr.shape[1]), 1)
    big = np.tile(bgr, reps)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(big[i:i + size, i:i + size]))
        paths.append(path)
    return paths


def official_weights(weights_dir: Path, dest: Path) -> None:
    """The model's weights as the official loader reads them (``{"params": state_dict}``)."""
    import torch

    from config import Config
    from engine.model_manager import ModelManager
    from engine.models.loader import read_state_dict

    manager = ModelManager(Config.from_env(env={}, dotenv_path=None, weights_dir=weights_dir))
    path, _source = manager.weights_path(MODEL, allow_download=False)
    torch.save({"params": read_state_dict(path)}, dest)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_weights_option(parser) -> None:
    """``--weights-dir`` for a bench that starts the app (:func:`app_env`)."""
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="where the offline weights are (default: the app's weights dir)")


def app_env(tmp: Path, weights: Path | None) -> dict:
    """The environment of an app that keeps everything in ``tmp`` (its own folders), with the weights in
    ``weights`` (None: the app's weights dir) linked in: what the app writes (bf16 verdicts, calibrations) stays in
    ``tmp``."""
    from config import Config

    weights = weights or Config.from_env().weights_dir
    own_weights = tmp / "weights"
    own_weights.mkdir()
    for path in Path(weights).glob("*.pth"):
        (own_weights / path.name).symlink_to(path.resolve())
    return os.environ | {"REALESRGAN_WEIGHTS_DIR": str(own_weights), "REALESRGAN_OUTPUT_DIR": str(tmp / "o"),
                         "REALESRGAN_TEMP_DIR": str(tmp / "t"), "REALESRGAN_CONFIG_DIR": str(tmp / "c"),
                         "REALESRGAN_LOG_DIR": str(tmp / "l"), "REALESRGAN_DEVICE": "cpu",
                         "REALESRGAN_DOWNLOAD_RETRIES": "0", "PYTHONPATH": str(ROOT)}


def wait_for_log(proc: subprocess.Popen, log: Path, *needles: str, timeout: float = 600) -> None:
    """Wait until the app's ``log`` holds one of ``needles``; raise when the app exits first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not any(n in log.read_text(errors="replace") for n in needles):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not log {needles}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


def rest_requests(env: dict, image: Path, precision: str, idle_seconds: float, log: Path,
                  wait_for_warm_up: bool = False, model: str | None = MODEL
                  ) -> tuple[list[float], list[float], float | None]:
    """Launch ``main.py ui``, send two requests (the first at once, or once the warm-up has finished) naming
    ``model`` (None: an automatic job, the advisor chooses), then measure the idle CPU of the app. Returns each
    request's wall seconds, the app's CPU seconds (all its threads) during each request, and the idle CPU share.

    The CPU seconds tell a first request's extra work from a busy machine: other tenants and a hypervisor's steal
    stretch the wall time but not the work the app does (its thread pools' spin-waits still grow a little)."""
    import httpx
    import psutil

    port = free_port()
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "main.py", "ui"], cwd=ROOT, env=env | {"REALESRGAN_PORT": str(port)},
                                stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_log(proc, log, "running at")
        if wait_for_warm_up:
            wait_for_log(proc, log, "warmed up", "warm-up of the default model failed")
        times, cpu = [], []
        process = psutil.Process(proc.pid)
        form = {"device": "cpu", "precision": precision} | ({"model": model} if model else {})
        for _ in range(2):
            start, cpu_start = time.perf_counter(), sum(process.cpu_times()[:2])
            reply = httpx.post(f"http://127.0.0.1:{port}/api/v1/enhance", data=form,
                               files={"file": (image.name, image.read_bytes(), "image/png")}, timeout=3600)
            times.append(time.perf_counter() - start)
            cpu.append(sum(process.cpu_times()[:2]) - cpu_start)
            reply.raise_for_status()
        idle = None
        if idle_seconds > 0:
            time.sleep(2)
            cpu0, t0 = sum(process.cpu_times()[:2]), time.perf_counter()
            time.sleep(idle_seconds)
            idle = 100 * (sum(process.cpu_times()[:2]) - cpu0) / (time.perf_counter() - t0)
        return times, cpu, idle
    finally:
        proc.terminate()
        proc.wait(60)


def first_and_second(first: float, second: float, cpu: list[float]) -> str:
    """The first request against the second, by wall time and by the app's CPU seconds."""
    return (f"first = {first / second:.2f}x the second; app CPU {cpu[0]:.1f} / {cpu[1]:.1f} s = "
            f"{cpu[0] / cpu[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folder", type=int, default=8, help="images in the folder row (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--image", type=Path, default=PHOTO if PHOTO.is_file() else FALLBACK)
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="where the offline weights are (default: the app's weights dir)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cli", "folder", "rest", "idle"])
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()

    import torch
    from bench_upscale import conv_peak

    from config import Config

    weights = args.weights_dir or Config.from_env().weights_dir
    torch.set_num_threads(os.cpu_count() or 1)  # what the CLI and the official script get
    peaks = conv_peak()
    print(f"{MODEL}, {args.size}², CPU, {torch.get_num_threads()} threads, {load()}")
    print("conv peaks GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + "  (ceiling = ours' layout peak / the official's fp32 NCHW peak)")
    table = Table(peaks, args.size * args.size)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = make_inputs(tmp / "in", args.size, max(args.folder, 1), args.image)
        official_pth = tmp / "official.pth"
        official_weights(weights, official_pth)
        own_weights = tmp / "weights"  # ours: a weights dir without a stored bf16 verdict (cold), then with it
        own_weights.mkdir()
        for name in Path(weights).glob(f"{MODEL}*.pth"):
            shutil.copy(name, own_weights)
        env = os.environ | {"REALESRGAN_WEIGHTS_DIR": str(own_weights), "REALESRGAN_OUTPUT_DIR": str(tmp / "o"),
                            "REALESRGAN_TEMP_DIR": str(tmp / "t"), "REALESRGAN_CONFIG_DIR": str(tmp / "c"),
                            "REALESRGAN_LOG_DIR": str(tmp / "l"), "REALESRGAN_DEVICE": "cpu",
                            "PYTHONPATH": str(ROOT)}
        out = tmp / "out"
        out.mkdir()

        def official_run(inputs: list[Path]) -> tuple[float, float]:
            seconds, stdout = timed([sys.executable, "-c", OFFICIAL, str(official_pth), str(out),
                                     *map(str, inputs)], env)
            return seconds, float(stdout.split("ENHANCE")[1])

        def ours(inputs: list[Path], precision: str, *extra: str) -> float:
            target = [str(out / "ours.png")] if len(inputs) == 1 else [str(out / "ours")]
            return timed([sys.executable, "main.py", "enhance", *map(str, inputs), "-o", *target, "--model", MODEL,
                          "--device", "cpu", "--precision", precision, *extra], env)[0]

        if "cli" not in args.skip:
            runs = [official_run(paths[:1]) for _ in range(args.repeats)]
            base = median([r[0] for r in runs])
            table.row("official, one image, fresh process", base, note=load())
            table.row("  official enhance() alone", median([r[1] for r in runs]))
            for precision in args.precisions:
                verdicts = own_weights / "bf16-verdicts.json"
                verdicts.unlink(missing_ok=True)
                cold = ours(paths[:1], precision)
                warm = median([ours(paths[:1], precision) for _ in range(args.repeats)])
                table.row(f"ours CLI {precision}, one image, fresh process, cold", cold, base, precision, note=load())
                table.row(f"ours CLI {precision}, one image, fresh process, warm", warm, base, precision)
                _, stdout = timed([sys.executable, "-c", OURS_IN_PROCESS, str(own_weights), precision,
                                   str(paths[0])], env)
                first, second = map(float, stdout.split("TIMES")[1].split())
                table.row(f"  ours in-process {precision}: first / second image", second, base, precision,
                          note=f"first {first:.2f} s; CLI warm = {warm / second:.2f}x the in-process second")
        if "folder" not in args.skip and args.folder > 1:
            inputs = paths[:args.folder]
            base = median([official_run(inputs)[0] for _ in range(args.repeats)])
            table.row(f"official, folder of {args.folder}, one process", base, images=args.folder, note=load())
            for precision in args.precisions:
                t = median([ours(inputs, precision) for _ in range(args.repeats)])
                table.row(f"ours CLI {precision}, folder of {args.folder}", t, base, precision, images=args.folder)
        if "rest" not in args.skip:
            import numpy as np

            from utils.compat import install_torchvision_shim

            install_torchvision_shim()
            from basicsr.archs.rrdbnet_arch import RRDBNet
            from realesrgan import RealESRGANer
            import cv2

            net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
            upsampler = RealESRGANer(scale=4, model_path=str(official_pth), model=net, tile=0, tile_pad=10,
                                     pre_pad=0, half=False, device=torch.device("cpu"))
            img = cv2.imread(str(paths[0]), cv2.IMREAD_UNCHANGED)
            official_times = []
            for _ in range(2):
                start = time.perf_counter()
                cv2.imencode(".png", upsampler.enhance(np.ascontiguousarray(img), outscale=4)[0])
                official_times.append(time.perf_counter() - start)
            del upsampler, net
            table.row("official long-lived RealESRGANer: first request", official_times[0], note=load())
            table.row("official long-lived RealESRGANer: second request", official_times[1])
            for precision in args.precisions:
                for wait in (False, True):
                    shutil.rmtree(tmp / "c", ignore_errors=True)  # no last-used settings: the app's defaults
                    last = precision == args.precisions[-1] and wait
                    idle_seconds = args.idle_seconds if "idle" not in args.skip and last else 0
                    (first, second), cpu, idle = rest_requests(env, paths[0], precision, idle_seconds,
                                                               tmp / "app.log", wait_for_warm_up=wait)
                    when = "once warmed up" if wait else "at once"
                    table.row(f"ours REST {precision}: first request, sent {when}", first, official_times[0],
                              precision, note=load())
                    table.row(f"ours REST {precision}: second request", second, official_times[1], precision,
                              note=first_and_second(first, second, cpu))
                    if idle is not None:
                        print(f"idle CPU of the app after the requests: {idle:.2f}% of a core over "
                              f"{args.idle_seconds:.0f} s ({load()})")
            # An automatic job (no model named) on a fresh install (as every REST row: no config dir): its advice
            # estimates the advised models, whose calibrations the warm-up makes in the background.
            shutil.rmtree(tmp / "c", ignore_errors=True)
            (first, second), cpu, _ = rest_requests(env, paths[0], "fp32", 0, tmp / "app.log", model=None)
            table.row("ours REST fp32 automatic: first request, sent at once", first,
                      official_times[0], "fp32", note=load())
            table.row("ours REST fp32 automatic: second request", second, official_times[1], "fp32",
                      note=first_and_second(first, second, cpu))

if __name__ == "__main__":
    main()
