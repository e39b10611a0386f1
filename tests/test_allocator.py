"""utils.allocator on the real glibc allocator: a network's forward passes in a worker thread page-fault their
activations anew every time by default, not once freed memory is reused; the idle release hands the memory back.
Each case runs in a fresh interpreter, since the settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = r"""
import json, resource, sys, threading, time
import torch
from utils import allocator
from utils.compat import install_torchvision_shim

install_torchvision_shim()
from realesrgan.archs.srvgg_arch import SRVGGNetCompact

active = allocator.reuse_freed_memory(idle_release_s=0.3) if sys.argv[1] == "reuse" else False
torch.set_num_threads(2)
net = SRVGGNetCompact(3, 3, 64, 8, 4, "prelu").eval().to(memory_format=torch.channels_last)
image = torch.rand(1, 3, 384, 384).contiguous(memory_format=torch.channels_last)  # 38 MB activations
faults = []

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def work():
    with torch.inference_mode():
        for _ in range(6):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            net(image)
            allocator.mark_busy()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=work)  # inference runs in worker threads in the app
thread.start()
thread.join()
held = rss_mb()
time.sleep(1.5)  # idle: the release thread gives the freed memory back
print(json.dumps({"active": active, "faults": faults, "held_mb": held, "after_idle_mb": rss_mb()}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    from utils.allocator import _glibc

    return _glibc() is not None


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc only")


def test_reused_memory_stops_the_page_faults_of_every_forward_pass_and_goes_back_when_idle():
    default, reuse = _probe("default"), _probe("reuse")
    assert default["active"] is False and reuse["active"] is True
    steady_default = sum(default["faults"][3:]) / 3  # after warm-up: every pass maps its activations anew
    steady_reuse = sum(reuse["faults"][3:]) / 3
    assert steady_default > 20_000, default  # > 80 MB of fresh pages per forward pass
    assert steady_reuse < 0.1 * steady_default, (default, reuse)
    assert reuse["held_mb"] - reuse["after_idle_mb"] > 30, reuse  # the freed activations went back when idle


def test_nothing_happens_at_import():
    code = ("import utils.allocator as a, sys; "
            "sys.exit(1 if a._state['active'] or 'torch' in sys.modules or a._glibc.cache_info().currsize else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
