"""Let an idle server wake the CPU less often: the Linux *timer slack* of the calling thread (a no-op elsewhere).

Gradio's queue polls for work with ``asyncio.sleep(0.001)`` (and its progress loop every 10 ms), so an idle app
wakes a thousand times a second: ~6-8% of a core doing nothing (see ``bench/bench_idle.py``). The timer slack
(``prctl(PR_SET_TIMERSLACK)``, the kernel's documented power-saving knob, see prctl(2) and
``Documentation/timers/timers-howto``) lets the kernel fire a timed sleep of that thread up to ``slack`` later, so
that expiries coalesce: with the default 50 ms (``REALESRGAN_IDLE_TIMER_SLACK_MS``) the polling loop runs ~20 times
a second instead of ~900, 0.5-0.7% of a core.

What it changes, and what it does not:

* Only *timed* waits end later (``epoll_wait``/``select`` with a timeout, ``nanosleep``, a condition or futex
  wait with a timeout), by at most ``slack``. A wait that ends because something happened (a socket is readable,
  a lock or condition is signalled) ends at once, so an HTTP request is read, and a REST job is run, without
  delay. A job queued through Gradio's own queue is picked up by its polling loop, so up to ``slack`` later.
* Compute is not slowed: the torch/OpenMP/oneDNN worker threads spin and then block on futexes without a
  timeout, and a running thread is never interrupted by its slack. (Inside CPython, a thread waiting for the GIL
  re-asks for it every 5 ms with a timed wait; with slack it re-asks up to ``slack`` later, which only matters
  when two threads both run Python code at once.)
* A thread created later inherits the slack of the thread that creates it, so setting it around the start of the
  server gives it to the server's event-loop thread and the worker threads that loop starts.

Nothing happens at import.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import sys
from typing import Iterator

logger = logging.getLogger(__name__)

__all__ = ["set_timer_slack", "timer_slack", "timer_slack_for_new_threads"]

# prctl() options, from linux/prctl.h
_PR_SET_TIMERSLACK = 29
_PR_GET_TIMERSLACK = 30


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library with ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "prctl"):
        return None
    libc.prctl.restype = ctypes.c_int
    return libc


def timer_slack() -> float | None:
    """The calling thread's timer slack in seconds, or None where it can't be read (not Linux)."""
    libc = _libc()
    if libc is None:
        return None
    ns = libc.prctl(_PR_GET_TIMERSLACK, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return None if ns < 0 else ns / 1e9


def set_timer_slack(seconds: float) -> bool:
    """Set the calling thread's timer slack (threads it creates afterwards inherit it).

    Args:
        seconds: how much later than asked a timed wait of this thread may end; 0 resets the thread to its default
            (the slack of the thread that created it, 50 µs for a process started normally).

    Returns:
        True when the slack is set; False where it can't be (not Linux, or the kernel refused).

    Raises:
        ValueError: ``seconds`` is negative.
    """
    if seconds < 0:
        raise ValueError(f"the timer slack must be 0 or more seconds, got {seconds}")
    libc = _libc()
    if libc is None:
        return False
    ns = ctypes.c_ulong(round(seconds * 1e9))
    if libc.prctl(_PR_SET_TIMERSLACK, ns, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        logger.warning("could not set the timer slack to %g s: errno %d", seconds, ctypes.get_errno())
        return False
    return True


@contextlib.contextmanager
def timer_slack_for_new_threads(seconds: float) -> Iterator[bool]:
    """Within the block, the calling thread has timer slack ``seconds`` (0: left as it is), so the threads it
    starts there keep that slack; the calling thread's own slack is restored afterwards.

    Yields:
        Whether the slack was set.
    """
    before = timer_slack()
    applied = seconds > 0 and before is not None and set_timer_slack(seconds)
    try:
        yield applied
    finally:
        if applied:
            # the value read before, set exactly (0 would mean "this thread's default", which may differ)
            set_timer_slack(before)
