"""Keep freed tensor memory inside the process during CPU inference (glibc only; a no-op elsewhere).

glibc serves every allocation above 32 MB with a fresh ``mmap`` and gives it back with ``munmap`` when freed, and
threads other than the main one allocate from their own arenas, which do the same for anything that does not fit
a 64 MB heap. A super-resolution network allocates tensors of that size at every layer (64 channels × a 512² tile
× 4 bytes = 67 MB; RRDBNet's upsampling stages are 16× larger), so each layer pays one page fault per 4 KB page,
the kernel zeroing each page, before any arithmetic: 30% to 90% of a forward pass, measured on realesr-animevideov3
at 512² and RRDBNet at 160² (see ``bench/HISTORY.md``, bench_upscale.py).

:func:`reuse_freed_memory` tells glibc to serve large blocks from its heap, never to return freed memory to the
system by itself, and to keep all threads on one arena, so the second layer and every later tile reuse pages
already mapped. It is the glibc equivalent of the jemalloc settings Intel recommends for PyTorch CPU inference.
:func:`release_freed_memory` hands what is free back to the system (``malloc_trim``); after
:func:`reuse_freed_memory`, a daemon thread does it once the process has been idle for a few seconds (each
inference calls :func:`mark_busy`), so an idle app does not hold its peak.

:func:`drop_mapped_file_pages` lets go of the pages of mapped files the process never runs (torch's CUDA libraries
on a machine without CUDA: ``utils.gpu.release_unusable_cuda_libraries``).

Call :func:`reuse_freed_memory` early (before worker threads start): a thread that already has its own arena
keeps it. Nothing happens at import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import re
import sys
import threading
import time

logger = logging.getLogger(__name__)

__all__ = ["drop_mapped_file_pages", "mark_busy", "release_freed_memory", "reuse_freed_memory",
           "reusing_freed_memory"]

# mallopt() parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1  # mallopt takes an int: the largest trim threshold it can express (2 GiB)
_MADV_DONTNEED = 4  # madvise(2)

_lock = threading.Lock()
_state = {"active": False, "last_use": 0.0, "dirty": False}


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None  # musl and other C libraries: leave their allocator alone
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def reuse_freed_memory(idle_release_s: float = 5.0) -> bool:
    """Make glibc keep large freed blocks for reuse instead of unmapping them (idempotent, thread-safe).

    Args:
        idle_release_s: once no :func:`mark_busy` came for this long, the memory freed since is given back to
            the system by a daemon thread (the first call's value counts).

    Returns:
        True when the allocator is (now or already) set up this way; False where it can't be (not glibc).
    """
    with _lock:
        if _state["active"]:
            return True
        libc = _glibc()
        if libc is None:
            return False
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_MAX, 0),                  # large blocks from the heap, not a fresh mmap each time
            (_M_TRIM_THRESHOLD, _INT_MAX),     # free() does not shrink the heap by itself
            (_M_ARENA_MAX, 1),                 # new threads share the main heap (their own arenas would mmap)
        ))
        _state["active"] = ok
        if ok:
            logger.debug("glibc allocator: large blocks are reused (no mmap, no trim, one arena)")
            threading.Thread(target=_release_when_idle, args=(float(idle_release_s),), name="release-freed-memory",
                             daemon=True).start()
        else:
            logger.warning("glibc refused the allocator settings; CPU inference keeps the default allocator")
        return ok


def reusing_freed_memory() -> bool:
    """True once :func:`reuse_freed_memory` has set the allocator up in this process."""
    return bool(_state["active"])


def release_freed_memory() -> bool:
    """Give the memory freed since the last job back to the system (``malloc_trim``); cheap, safe at any time.

    Returns:
        True when memory was released, False when there was nothing to release or this is not glibc.
    """
    libc = _glibc()
    if libc is None or not _state["active"]:
        return False
    return bool(libc.malloc_trim(0))


def drop_mapped_file_pages(path: re.Pattern) -> int | None:
    """Unmap the resident pages of this process's read-only mappings of files whose path matches ``path``
    (``madvise(MADV_DONTNEED)``). Returns how much the process's RSS dropped meanwhile (bytes), or None when this
    is not Linux with glibc or the kernel refuses.

    It costs correctness nothing: only mappings that cannot be written and hold no private copy (``Anonymous: 0``
    in ``/proc/self/smaps``: no page relocated at load) are touched, so every page dropped is the file's own and
    is mapped again from the page cache if touched; the page cache keeps them, so the next process that loads the
    file reads no more from disk. Meant for libraries that are mapped but never run (~70 ms for torch's CUDA
    libraries); on code that runs, every page would fault back in."""
    libc = _glibc()
    if libc is None:
        return None
    try:
        ranges = _clean_read_only_mappings(path)
    except OSError:
        return None
    before = _resident_bytes()
    for start, end in ranges:
        if libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
            logger.debug("madvise(MADV_DONTNEED) refused (errno %d)", ctypes.get_errno())
            return None
    return max(before - _resident_bytes(), 0)


def _clean_read_only_mappings(path: re.Pattern) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files matching ``path`` that are not writable and hold no
    anonymous (copied-on-write) page."""
    found, current = [], None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
                current = None
                if len(head) == 6 and "w" not in head[1] and path.search(head[5].strip()):
                    current = tuple(int(part, 16) for part in head[0].split("-"))
            elif current is not None and head[0] == "Anonymous:":
                if int(head[1]) == 0:
                    found.append(current)
                current = None
    return found


def _resident_bytes() -> int:
    """This process's RSS (``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mark_busy() -> None:
    """Note that inference just ran: the idle release waits until none has run for a while."""
    _state["last_use"] = time.monotonic()
    _state["dirty"] = True


def _release_due(dirty: bool, last_use: float, now: float, idle_s: float) -> bool:
    """Whether the idle thread gives memory back now: inference ran since the last release (``dirty``) and none
    has run for ``idle_s`` seconds. Pure."""
    return dirty and now - last_use >= idle_s


def _release_when_idle(idle_s: float) -> None:
    while True:
        time.sleep(max(0.05, idle_s / 2))
        if _release_due(bool(_state["dirty"]), float(_state["last_use"]), time.monotonic(), idle_s):
            _state["dirty"] = False
            release_freed_memory()
