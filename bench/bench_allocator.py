"""Page faults and memory of a network's forward passes with glibc's default allocator vs ``utils.allocator``.

Each mode runs in a fresh interpreter (the allocator settings are process-wide): SRVGGNetCompact (64 features,
8 convs, ×4) on a 384² channels_last image, ``--passes`` forward passes in a worker thread (as in the app), with
the minor page faults of each pass, then the resident memory before and after an idle spell (the idle release
gives freed memory back with ``malloc_trim``). What the figures say depends on the kernel (transparent huge pages),
the glibc version and other jobs on the machine, which is why they are printed here and not asserted by a test.

    .venv/bin/python bench/bench_allocator.py [--passes 6] [--size 384] [--idle 1.5]

On glibc the default mode page-faults every pass's activations anew (> 80 MB of fresh pages per pass) and the
reuse mode mostly while warming up. The steady-state ratio (reuse / default) measured 15-21% on the 2-core
machines of 2026-11 (see bench/README.md); a former test wanted < 10%: it is a figure to watch, not a pass mark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, resource, sys, threading, time
import torch
from utils import allocator
from utils.compat import install_torchvision_shim

install_torchvision_shim()
from realesrgan.archs.srvgg_arch import SRVGGNetCompact

mode, passes, size, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
active = allocator.reuse_freed_memory(idle_release_s=idle / 5) if mode == "reuse" else False
torch.set_num_threads(2)
net = SRVGGNetCompact(3, 3, 64, 8, 4, "prelu").eval().to(memory_format=torch.channels_last)
image = torch.rand(1, 3, size, size).contiguous(memory_format=torch.channels_last)
faults, seconds = [], []

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def work():
    with torch.inference_mode():
        for _ in range(passes):
            before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            net(image)
            allocator.mark_busy()
            seconds.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=work)  # inference runs in worker threads in the app
thread.start()
thread.join()
held = rss_mb()
time.sleep(idle)  # idle: the release thread gives the freed memory back
print(json.dumps({"active": active, "faults": faults, "seconds": seconds, "held_mb": held,
                  "after_idle_mb": rss_mb()}))
"""


def probe(mode: str, passes: int, size: int, idle: float) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(passes), str(size), str(idle)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=6, help="forward passes per mode (half are warm-up)")
    parser.add_argument("--size", type=int, default=384, help="input side in pixels")
    parser.add_argument("--idle", type=float, default=1.5, help="seconds idle before the last memory reading")
    args = parser.parse_args()
    warm = max(1, args.passes // 2)
    results = {mode: probe(mode, args.passes, args.size, args.idle) for mode in ("default", "reuse")}
    if not results["reuse"]["active"]:
        print("utils.allocator is not available here (not glibc): both runs used the default allocator.")
    steady = {}
    for mode, r in results.items():
        steady[mode] = sum(r["faults"][warm:]) / len(r["faults"][warm:])
        ms = sum(r["seconds"][warm:]) / len(r["seconds"][warm:]) * 1000
        print(f"{mode:8} page faults per pass {r['faults']}; steady {steady[mode]:,.0f} "
              f"({steady[mode] * 4 / 1024:,.0f} MB of fresh pages), {ms:,.0f} ms per pass; "
              f"RSS {r['held_mb']:,.0f} MB after the passes, {r['after_idle_mb']:,.0f} MB after {args.idle:g} s idle")
    ratio = steady["reuse"] / steady["default"] if steady["default"] else float("nan")
    print(f"steady page faults reuse/default: {ratio:.1%}")
    released = results["reuse"]["held_mb"] - results["reuse"]["after_idle_mb"]
    print(f"memory given back after {args.idle:g} s idle with reuse: {released:,.0f} MB")


if __name__ == "__main__":
    main()
