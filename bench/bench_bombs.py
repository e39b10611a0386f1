"""Small files that decode to huge images, sent to a fresh server: how fast each is answered and whether it stays up.

``main.py ui`` in a fresh process with the defaults (per-job time limit 600 s, no memory cap; its own temp
folders, the offline weights linked in); once its warm-up is done, ``POST /api/v1/enhance`` of a blank 6300² JPEG
(466 KB) and a 6000² WebP (64 KB) at ×2, each with ``model=RealESRGAN_x4plus`` and without a model (the advisor
chooses), ``--repeats`` times in turn. Printed per request: the status, the seconds to the answer, ``/health``
right after and the start of the message; then the server's peak RSS (a watchdog kills it over ``--cap-gb``) and
the load average. Goal (issue 13): refused in < 1 s or done within the budget; health answers throughout.
Figures, not a test (tests/test_hardening.py asserts the refusals).

    .venv/bin/python bench/bench_bombs.py
    .venv/bin/python bench/bench_bombs.py --repeats 1 --cap-gb 4
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_user import add_weights_option, app_env, free_port, load, wait_for_log  # noqa: E402  (this folder is on sys.path when run as a script)


def bombs() -> dict[str, tuple[bytes, str]]:
    """name -> (the file's bytes, its MIME type): blank images whose files are tiny."""
    from PIL import Image

    found = {}
    for side, fmt, mime in ((6300, "JPEG", "image/jpeg"), (6000, "WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, fmt, quality=1)
        found[f"{side}² {fmt} ({len(buf.getvalue()) // 1000} KB)"] = buf.getvalue(), mime
    return found


def watch_rss(pid: int, cap_bytes: int, stop: threading.Event, peak: list[int]) -> None:
    """Keep the process's peak RSS in ``peak[0]``; kill it over ``cap_bytes`` (the machine stays up)."""
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            rss = process.memory_info().rss
        except psutil.Error:
            return
        peak[0] = max(peak[0], rss)
        if rss > cap_bytes:
            print(f"server RSS {rss / 2**30:.1f} GB over the cap: killed", flush=True)
            process.kill()
            return
        time.sleep(0.05)


def main() -> None:
    import httpx
    import psutil

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="times each request is sent")
    parser.add_argument("--cap-gb", type=float, default=6.0, help="server RSS at which the watchdog kills it")
    add_weights_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port, log = free_port(), tmp / "app.log"
        env = app_env(tmp, args.weights_dir) | {"REALESRGAN_PORT": str(port)}
        with log.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "main.py", "ui"], cwd=ROOT, stdout=sink,
                                    stderr=subprocess.STDOUT, env=env)
        stop, peak = threading.Event(), [0]
        try:
            wait_for_log(proc, log, "running at")
            wait_for_log(proc, log, "warmed up", "warm-up of the default model failed")
            url = f"http://127.0.0.1:{port}/api/v1"
            print(f"fresh server up, RSS {psutil.Process(proc.pid).memory_info().rss / 2**20:.0f} MB ({load()})")
            threading.Thread(target=watch_rss, args=(proc.pid, int(args.cap_gb * 2**30), stop, peak),
                             daemon=True).start()
            print(f"{'input':<24} {'model':<18} {'answer':>6} {'seconds':>8} {'health':>6}  message")
            for _ in range(args.repeats):
                for name, (body, mime) in bombs().items():
                    for model in ("RealESRGAN_x4plus", None):
                        form = {"upscale_factor": "2"} | ({"model": model} if model else {})
                        start = time.perf_counter()
                        reply = httpx.post(f"{url}/enhance", data=form, files={"file": ("in", body, mime)},
                                           timeout=900)
                        seconds = time.perf_counter() - start
                        health = httpx.get(f"{url}/health", timeout=10).status_code
                        message = reply.json().get("error", "") if reply.status_code != 200 else "done"
                        print(f"{name:<24} {model or '(advisor)':<18} {reply.status_code:>6} {seconds:>8.2f} "
                              f"{health:>6}  {message[:150]}", flush=True)
            print(f"server peak RSS {peak[0] / 2**20:.0f} MB ({load()})")
        finally:
            stop.set()
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
