"""Bound how many inferences run at once on a device, with a bounded first-come-first-served wait line.

A :class:`DeviceLimiter` hands out :class:`Ticket` objects. Joining the line never blocks: it either gives a
ticket (running at once, or waiting at a known position) or raises :class:`QueueFullError` with an estimate of
when to retry. Waiting for the ticket's turn blocks the calling thread, so async code joins in the event loop
(an immediate yes/no it can turn into ``429``) and waits in a worker thread::

    ticket = limiter.try_acquire()          # QueueFullError → 429 with Retry-After
    try:
        await anyio.to_thread.run_sync(lambda: run_when_ready(ticket))   # ticket.wait() inside
    finally:
        ticket.release()

Sync callers use ``with limiter.slot(): ...``. A released slot is handed straight to the head of the line, so
the order is strictly FIFO and no waiter is woken for nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from engine.errors import CancelledError, QueueFullError

logger = logging.getLogger(__name__)

#: Seconds one job is assumed to take before any has finished (used only for Retry-After estimates).
DEFAULT_JOB_SECONDS = 10.0
_EWMA_WEIGHT = 0.3  # weight of the newest job in the running average of job durations
_DRAIN_WINDOW = 20  # completions the drain rate is measured over

PositionCallback = Callable[[int], None]


@dataclass(frozen=True)
class LimiterStats:
    """A snapshot of the limiter, for health checks and the UI."""

    running: int
    waiting: int
    concurrency: int
    max_queue: int
    average_job_seconds: float
    seconds_per_completion: float

    def as_dict(self) -> dict:
        return {"running": self.running, "waiting": self.waiting, "concurrency": self.concurrency,
                "max_queue": self.max_queue, "average_job_seconds": round(self.average_job_seconds, 3),
                "seconds_per_completion": round(self.seconds_per_completion, 3)}


class Ticket:
    """One job's place: waiting in line, then holding a slot until :meth:`release`.

    Safe to release from any thread, and more than once (later calls do nothing). Not reusable.
    """

    def __init__(self, limiter: "DeviceLimiter", number: int):
        self._limiter = limiter
        self.number = number
        self._ready = threading.Event()
        self._released = False
        self._started_at: float | None = None

    @property
    def granted(self) -> bool:
        """True once the ticket holds a slot (the job may run)."""
        return self._ready.is_set()

    @property
    def position(self) -> int:
        """0 while holding a slot (or released), else 1 for the head of the line, 2 for the next..."""
        return self._limiter.position(self)

    def wait(self, timeout: float | None = None, on_position: PositionCallback | None = None,
             poll_seconds: float = 0.5, cancel: threading.Event | None = None) -> None:
        """Block until the ticket holds a slot.

        Args:
            timeout: seconds to wait at most; None waits as long as it takes.
            on_position: called with the line position (1 = next) whenever it changes while waiting, for
                "you are number 3 in the queue" messages.
            poll_seconds: how often the position is re-read for ``on_position``.
            cancel: an event that, once set, makes the ticket leave the line (a client that went away).

        Raises:
            TimeoutError: the slot did not come within ``timeout``; the ticket has left the line.
            CancelledError: ``cancel`` was set while waiting; the ticket has left the line.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while not self._ready.is_set():
            if cancel is not None and cancel.is_set() and self._limiter._leave_if_waiting(self):
                raise CancelledError("The request was cancelled while it waited for a free slot.")
            if on_position is not None:
                pos = self.position
                if pos != last and pos > 0:
                    on_position(pos)
                    last = pos
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                if self._limiter._leave_if_waiting(self):
                    raise TimeoutError(f"waited {timeout:g} s for a free slot")
                return  # the slot came at the last moment: keep it
            step = poll_seconds if on_position is not None or cancel is not None else remaining
            if remaining is not None and step is not None:
                step = min(step, remaining)
            self._ready.wait(step)

    def release(self) -> None:
        """Give the slot back (or leave the line). Idempotent."""
        self._limiter._release(self)

    def __enter__(self) -> "Ticket":
        self.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DeviceLimiter:
    """At most ``concurrency`` jobs run at once; up to ``max_queue`` more wait in FIFO order; beyond, refusal.

    Thread-safe. Retry-After comes from the measured drain rate: for each of the last few completions, the busy
    time since the previous completion (or since the job started, if the device was idle in between), so idle
    hours don't slow the estimate and parallel slots speed it up. ``clock`` is injectable for tests.
    """

    def __init__(self, concurrency: int = 1, max_queue: int = 16, default_job_seconds: float = DEFAULT_JOB_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        if isinstance(concurrency, bool) or int(concurrency) < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        if isinstance(max_queue, bool) or int(max_queue) < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue!r}")
        self.concurrency = int(concurrency)
        self.max_queue = int(max_queue)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when the last job leaves
        self._queue: deque[Ticket] = deque()
        self._running = 0
        self._granted = 0  # jobs given a slot since start
        self._average = float(default_job_seconds)
        self._finished = 0
        self._numbers = itertools.count(1)
        self._clock = clock
        self._default_job_seconds = float(default_job_seconds)
        self._drain: deque[float] = deque(maxlen=_DRAIN_WINDOW)  # busy seconds per completion, newest last
        self._last_finish = float("-inf")

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def granted(self) -> int:
        """How many jobs were given a slot since start (background work compares it before and after, to know
        whether a job ran meanwhile)."""
        return self._granted

    def stats(self) -> LimiterStats:
        with self._lock:
            return LimiterStats(running=self._running, waiting=len(self._queue), concurrency=self.concurrency,
                                max_queue=self.max_queue, average_job_seconds=self._average,
                                seconds_per_completion=self._seconds_per_completion())

    def wait_idle(self, timeout: float | None = None, settle: float = 0.0) -> bool:
        """Block until no job runs or waits, and none has finished for ``settle`` seconds (background work that
        should not take a job's cores: the app's warm-up calibrations; ``settle`` keeps it from starting in the
        moment between a client's back-to-back requests). Returns False when ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._idle.wait_for(lambda: self._running == 0 and not self._queue, left):
                    return False
                quiet_for = settle - (self._clock() - self._last_finish)
                if quiet_for <= 0:
                    return True
                if deadline is not None and deadline - time.monotonic() <= 0:
                    return False
                self._idle.wait(quiet_for if deadline is None else min(quiet_for, deadline - time.monotonic()))

    def position(self, ticket: Ticket | None = None) -> int:
        """Line position of ``ticket`` (0 = running or gone, 1 = next); with no ticket, where a newcomer would
        stand (0 = it would run at once)."""
        with self._lock:
            if ticket is None:
                if self._running < self.concurrency and not self._queue:
                    return 0
                return len(self._queue) + 1
            try:
                return self._queue.index(ticket) + 1
            except ValueError:
                return 0

    def retry_after(self) -> int:
        """Seconds after which a refused client may reasonably try again (at least 1)."""
        with self._lock:
            return self._retry_after_locked()

    def _seconds_per_completion(self) -> float:
        if self._drain:
            return sum(self._drain) / len(self._drain)
        return self._default_job_seconds / self.concurrency

    def _retry_after_locked(self) -> int:
        # The line ahead (running + waiting) drains at the measured rate; by then a newcomer gets a place.
        ahead = self._running + len(self._queue)
        return max(1, math.ceil(self._seconds_per_completion() * max(ahead, 1)))

    # ------------------------------------------------------------------ joining and leaving
    def try_acquire(self) -> Ticket:
        """Join without blocking: a ticket that runs now or waits its turn (see :meth:`Ticket.wait`).

        Raises:
            QueueFullError: all slots busy and ``max_queue`` already waiting.
        """
        with self._lock:
            ticket = Ticket(self, next(self._numbers))
            if self._running < self.concurrency and not self._queue:
                self._grant(ticket)
            elif len(self._queue) < self.max_queue:
                self._queue.append(ticket)
            else:
                retry = self._retry_after_locked()
                raise QueueFullError(
                    f"The server is busy ({self._running} job(s) running, {len(self._queue)} waiting, the most it "
                    f"queues); try again in about {retry} s.", retry_after=retry)
            return ticket

    def acquire(self, timeout: float | None = None, on_position: PositionCallback | None = None) -> Ticket:
        """Join and block until a slot is held. Raises QueueFullError (line full) or TimeoutError."""
        ticket = self.try_acquire()
        ticket.wait(timeout, on_position)
        return ticket

    @contextlib.contextmanager
    def slot(self, timeout: float | None = None, on_position: PositionCallback | None = None) -> Iterator[Ticket]:
        """``with limiter.slot(): run()`` — hold a slot for the block (QueueFullError when the line is full)."""
        ticket = self.acquire(timeout, on_position)
        try:
            yield ticket
        finally:
            ticket.release()

    # ------------------------------------------------------------------ internals (lock held)
    def _grant(self, ticket: Ticket) -> None:
        self._running += 1
        self._granted += 1
        ticket._started_at = self._clock()
        ticket._ready.set()

    def _leave_if_waiting(self, ticket: Ticket) -> bool:
        """Take a still-waiting ticket out of the line (True); False when it already holds a slot."""
        with self._lock:
            if ticket._ready.is_set():
                return False
            ticket._released = True
            with contextlib.suppress(ValueError):
                self._queue.remove(ticket)
            return True

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            if ticket._ready.is_set():
                self._running -= 1
                if ticket._started_at is not None:
                    self._record(ticket._started_at, self._clock())
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(ticket)
            while self._running < self.concurrency and self._queue:
                self._grant(self._queue.popleft())
            if self._running == 0 and not self._queue:
                self._idle.notify_all()

    def _record(self, started: float, finished: float) -> None:
        self._drain.append(max(0.0, finished - max(started, self._last_finish)))
        self._last_finish = finished
        seconds = finished - started
        self._finished += 1
        if self._finished == 1:
            self._average = seconds
        else:
            self._average = (1 - _EWMA_WEIGHT) * self._average + _EWMA_WEIGHT * seconds
