"""The idle app's CPU and a small REST request's latency for several timer slacks (``REALESRGAN_IDLE_TIMER_SLACK_MS``).

For each slack: ``main.py ui`` in a fresh process (its own temp folders, the offline weights linked in), wait until
the background warm-up has logged that it is done, send ``--requests`` ``POST /api/v1/enhance`` of a 32×32 PNG
(realesr-animevideov3; the first loads the model) and ``--requests`` of a ``--size``² PNG (compute-bound: the
slack must not slow inference), wait 3 s, then measure the process's CPU time over ``--seconds`` (psutil, as
``top`` shows it, and exactly: the threads' ``schedstat``) and read the timer slack of every thread
(``/proc/<tid>/timerslack_ns``). Prints % of one core, the request latencies (first, median of the rest), the
median time a request spends outside its job (latency less the job's ``processing_time_ms``: HTTP, upload parsing,
the event loop, which is what the slack could delay), the threads that woke most while idle and the load average.
Figures, not a test.

    .venv/bin/python bench/bench_idle.py                          # slacks 0, 20, 50 ms; 20 s each
    .venv/bin/python bench/bench_idle.py --slacks 0 20 --seconds 10
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_user import add_weights_option, app_env, free_port, load, wait_for_log  # noqa: E402  (this folder is on sys.path when run as a script)

MODEL = "realesr-animevideov3"


def png(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def threads(pid: int) -> dict[int, dict]:
    """Every thread of ``pid``: name, timer slack (µs, from ``/proc/<tid>/timerslack_ns``: the per-task folders
    have no such file), CPU seconds as ``top`` counts them (clock ticks) and exactly (``schedstat``, ns), and context
    switches (the wake-ups of a thread that sleeps) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
            found[tid] = {"name": "main" if tid == pid else (task / "comm").read_text().strip(),
                          "slack_us": int(Path(f"/proc/{tid}/timerslack_ns").read_text()) // 1000,
                          "cpu": (int(stat[11]) + int(stat[12])) / tick,
                          "cpu_ns": int((task / "schedstat").read_text().split()[0]),
                          "switches": int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])}
        except (OSError, KeyError, IndexError):  # the thread ended meanwhile
            pass
    return found


def run_one(slack_ms: float, env: dict, log: Path, seconds: float, requests: int, size: int) -> dict:
    import httpx
    import psutil

    port = free_port()
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "main.py", "ui"], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env=env | {"REALESRGAN_PORT": str(port),
                                           "REALESRGAN_IDLE_TIMER_SLACK_MS": f"{slack_ms:g}"})
    try:
        wait_for_log(proc, log, "running at")
        wait_for_log(proc, log, "warmed up", "warm-up of the default model failed")
        latencies, overheads = {}, []
        for side in (32, size):
            body, times = png(side), []
            for _ in range(requests):
                start = time.perf_counter()
                reply = httpx.post(f"http://127.0.0.1:{port}/api/v1/enhance", data={"model": MODEL, "device": "cpu"},
                                   files={"file": ("in.png", body, "image/png")}, timeout=600)
                times.append(time.perf_counter() - start)
                reply.raise_for_status()
                overheads.append(times[-1] - reply.json()["data"]["processing_time_ms"] / 1000)
            latencies[side] = times
        process = psutil.Process(proc.pid)
        time.sleep(3)
        before = threads(proc.pid)
        cpu0, t0 = sum(process.cpu_times()[:2]), time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - t0
        idle = 100 * (sum(process.cpu_times()[:2]) - cpu0) / elapsed
        after = threads(proc.pid)
        busiest = sorted(((after[t]["switches"] - before[t]["switches"]) / elapsed, t) for t in after if t in before)
        busiest = [f"{after[t]['name']} {rate:.0f}/s {100 * (after[t]['cpu'] - before[t]['cpu']) / elapsed:.1f}%"
                   for rate, t in reversed(busiest[-3:]) if rate >= 1]
        exact = 100 * sum(after[t]["cpu_ns"] - before[t]["cpu_ns"] for t in after if t in before) / 1e9 / elapsed
        slacks = collections.Counter(t["slack_us"] for t in after.values())
        return {"idle": idle, "exact": exact, "overhead": statistics.median(overheads[1:]), "latencies": latencies, "slacks": slacks, "busiest": busiest, "load": load()}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slacks", type=float, nargs="*", default=[0, 20, 50], help="timer slacks in ms")
    parser.add_argument("--seconds", type=float, default=20.0, help="idle measurement per slack")
    parser.add_argument("--requests", type=int, default=4, help="requests of each size per slack")
    parser.add_argument("--size", type=int, default=128, help="side of the compute-bound request's image")
    add_weights_option(parser)
    args = parser.parse_args()
    print(f"{MODEL} over REST, {args.requests} requests of 32² and {args.size}², idle over {args.seconds:g} s "
          f"({load()})")
    print(f"{'slack ms':>8} {'idle %core':>10} {'exact':>6} {'32² first':>9} {'32² rest':>8} {f'{args.size}² first':>10} "
          f"{f'{args.size}² rest':>9} {'outside job':>11}  threads by slack (µs: count)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = app_env(tmp, args.weights_dir)
        for slack in args.slacks:
            r = run_one(slack, env, tmp / "app.log", args.seconds, args.requests, args.size)
            small, large = r["latencies"][32], r["latencies"][args.size]
            slacks = ", ".join(f"{us}: {n}" for us, n in sorted(r["slacks"].items()))
            print(f"{slack:8g} {r['idle']:10.2f} {r['exact']:6.2f} {small[0]:9.3f} {statistics.median(small[1:] or small):8.3f} "
                  f"{large[0]:10.3f} {statistics.median(large[1:] or large):9.3f} {r['overhead']:11.3f}  {slacks}  ({r['load']})",
                  flush=True)
            print(f"{'':8} threads waking most (wake-ups/s, % of a core): {'; '.join(r['busiest'])}", flush=True)


if __name__ == "__main__":
    main()
