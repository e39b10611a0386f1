"""utils.allocator's own behaviour: set-up, state, idle-release bookkeeping and the config switch. Each case that
changes the allocator runs in a fresh interpreter, since the settings are process-wide.

What the reuse does to page faults and memory depends on the kernel (transparent huge pages), glibc and the load
on the machine, so it is measured by ``bench/bench_allocator.py``, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from utils.allocator import _glibc, _release_due

GLIBC = sys.platform.startswith("linux") and _glibc() is not None


def _python(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_nothing_happens_at_import():
    code = ("import utils.allocator as a, sys; "
            "sys.exit(1 if a._state['active'] or 'torch' in sys.modules or a._glibc.cache_info().currsize else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


SET_UP = r"""
import json, threading
from utils import allocator

def releasers():
    return sum(t.name == "release-freed-memory" for t in threading.enumerate())

before = {"reusing": allocator.reusing_freed_memory(), "release": allocator.release_freed_memory(),
          "threads": releasers()}
first, second = allocator.reuse_freed_memory(idle_release_s=3600), allocator.reuse_freed_memory(idle_release_s=1)
print(json.dumps({"before": before, "first": first, "second": second, "reusing": allocator.reusing_freed_memory(),
                  "threads": releasers()}))
"""


def test_reuse_is_idempotent_and_reports_its_state():
    r = _python(SET_UP)
    assert r["before"] == {"reusing": False, "release": False, "threads": 0}  # off until asked; nothing to trim
    if GLIBC:
        assert r["first"] is r["second"] is r["reusing"] is True
        assert r["threads"] == 1  # the second call changed nothing: one idle-release thread
    else:
        assert r["first"] is r["second"] is r["reusing"] is False and r["threads"] == 0


def test_release_is_due_only_after_use_and_a_full_idle_spell():
    assert not _release_due(dirty=False, last_use=0.0, now=100.0, idle_s=5.0)  # nothing ran since the last one
    assert not _release_due(dirty=True, last_use=10.0, now=14.9, idle_s=5.0)  # still busy
    assert _release_due(dirty=True, last_use=10.0, now=15.0, idle_s=5.0)
    assert _release_due(dirty=True, last_use=10.0, now=1000.0, idle_s=5.0)


IDLE = r"""
import json, time
from utils import allocator

allocator.reuse_freed_memory(idle_release_s=0.05)
allocator.mark_busy()
marked = dict(allocator._state)
deadline = time.monotonic() + 120  # a bound for a stuck thread only; it takes about 0.1 s
while allocator._state["dirty"] and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"marked_dirty": marked["dirty"], "marked_at": marked["last_use"],
                  "released": not allocator._state["dirty"]}))
"""


@pytest.mark.skipif(not GLIBC, reason="the idle release runs only where the reuse is set up (glibc)")
def test_mark_busy_is_followed_by_one_idle_release():
    r = _python(IDLE)
    assert r["marked_dirty"] is True and r["marked_at"] > 0
    assert r["released"] is True  # the daemon thread saw the idle spell and cleared the flag


SWITCH = r"""
import json, sys
import numpy as np
from config import Config
from engine.model_manager import ModelManager
from engine.processor import EnhanceSettings, enhance_image_direct
from utils import allocator

config = Config.from_env(dotenv_path=None, weights_dir=sys.argv[1], download_retries=0)
enhance_image_direct(np.zeros((16, 16, 3), np.uint8), EnhanceSettings(model="realesr-animevideov3", tile=0,
                     device="cpu", precision="fp32", quality_metrics=False), ModelManager(config), config=config)
print(json.dumps({"config": config.cpu_memory_reuse, "reusing": allocator.reusing_freed_memory()}))
"""


@pytest.mark.parametrize("value, expected", [(None, True), ("false", False), ("0", False), ("true", True)])
def test_config_switch_decides_whether_inference_sets_the_reuse_up(model_manager_session, value, expected):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("REALESRGAN_")}
    if value is not None:
        env["REALESRGAN_CPU_MEMORY_REUSE"] = value
    r = _python(SWITCH.replace("sys.argv[1]", repr(str(model_manager_session.weights_dir))), env=env)
    assert r["config"] is expected
    assert r["reusing"] is (expected and GLIBC)


@pytest.mark.parametrize("value, expected", [(None, True), ("false", False)])
def test_config_switch_decides_whether_the_cli_sets_the_reuse_up(tmp_path, value, expected):
    from tests.test_model_manager import _clean_env

    env = _clean_env(tmp_path)
    if value is not None:
        env["REALESRGAN_CPU_MEMORY_REUSE"] = value
    code = ("import contextlib, io, json, main\nfrom utils import allocator\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    rc = main.main(['models', 'list', '--json'])\n"
            "print(json.dumps({'rc': rc, 'reusing': allocator.reusing_freed_memory()}))")
    assert _python(code, env=env) == {"rc": 0, "reusing": expected and GLIBC}


DROP = """
import json, mmap, re, sys
from utils import allocator

def resident(pattern):
    total, counting = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            counting = len(head) == 6 and bool(pattern.search(head[5].strip()))
        elif counting and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total

library, data = sys.argv[1], sys.argv[2]
with open(library, "rb") as f:  # as the loader maps a library's code: private, read-only
    code = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
with open(data, "rb") as f:  # as it maps a library's data: private, written (relocated) in places
    table = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
checksum = sum(code[i] for i in range(0, len(code), 4096))  # touch every page
table[4096] = 7  # a private copy of one page, which only this process holds
before = resident(re.compile(re.escape(library) + "$"))
released = allocator.drop_mapped_file_pages(re.compile("(" + re.escape(library) + "|" + re.escape(data) + ")$"))
after = resident(re.compile(re.escape(library) + "$"))
other = allocator.drop_mapped_file_pages(re.compile("no such file at all$"))
print(json.dumps({"resident": before, "released": released, "after": after, "other": other,
                  "same": sum(code[i] for i in range(0, len(code), 4096)) == checksum, "kept": table[4096]}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's madvise on Linux")
def test_dropping_a_mapped_file_s_pages_keeps_its_contents_and_leaves_written_mappings_alone(tmp_path):
    """What ``utils.gpu.release_unusable_cuda_libraries`` does to torch's CUDA libraries, on files of our own."""
    library, data = tmp_path / "library.bin", tmp_path / "data.bin"
    library.write_bytes(bytes(range(256)) * (32 * 4096))  # 32 MB
    data.write_bytes(bytes(3 * 4096))
    r = _python(DROP.replace("sys.argv[1], sys.argv[2]", f"{str(library)!r}, {str(data)!r}"))
    assert r["resident"] >= 30 << 20  # every page touched
    assert r["after"] <= 1 << 20  # the read-only mapping's pages are let go...
    assert r["released"] >= r["resident"] - r["after"] - (1 << 20)  # ...which is what the process's RSS dropped by
    assert r["same"]  # and mapped again from the file when touched
    assert r["kept"] == 7  # a written mapping keeps its private copy
    assert r["other"] == 0


def test_only_the_cuda_libraries_are_released():
    from utils.gpu import _CUDA_LIBRARY

    site = "/app/.venv/lib/python3.11/site-packages/"
    for path in ("nvidia/cu13/lib/libcublasLt.so.13", "nvidia/cudnn/lib/libcudnn.so.9", "torch/lib/libtorch_cuda.so",
                 "torch/lib/libc10_cuda.so", "cuda/bindings/driver.cpython-311-x86_64-linux-gnu.so"):
        assert _CUDA_LIBRARY.search(site + path), path
    for path in ("torch/lib/libtorch_cpu.so", "torch/lib/libc10.so", "torch/lib/libtorch_python.so",
                 "numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so", "cv2/cv2.abi3.so"):
        assert not _CUDA_LIBRARY.search(site + path), path
