"""DeviceLimiter with real threads: the bound on running jobs, FIFO order, the bounded line, Retry-After."""

from __future__ import annotations

import threading
import time

import pytest

from engine.concurrency import DeviceLimiter, QueueFullError
from engine.errors import EngineError


def _wait_until(predicate, what: str, limit: float = 10.0) -> None:
    """Poll a condition that other threads make true (a safety net against hangs, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


def test_rejects_bad_construction():
    with pytest.raises(ValueError):
        DeviceLimiter(concurrency=0, max_queue=1)
    with pytest.raises(ValueError):
        DeviceLimiter(concurrency=1, max_queue=-1)


def test_first_ticket_runs_at_once_and_slot_is_returned():
    limiter = DeviceLimiter(concurrency=1, max_queue=2)
    assert limiter.position() == 0
    ticket = limiter.try_acquire()
    assert ticket.granted and ticket.position == 0
    assert (limiter.running, limiter.waiting) == (1, 0)
    assert limiter.position() == 1  # a newcomer would be first in line
    ticket.release()
    ticket.release()  # idempotent
    assert (limiter.running, limiter.waiting) == (0, 0)


def test_granted_counts_the_jobs_given_a_slot():
    """Background work compares it before and after to know whether a job ran meanwhile."""
    limiter = DeviceLimiter(concurrency=1, max_queue=2)
    assert limiter.granted == 0
    first, second = limiter.try_acquire(), limiter.try_acquire()
    assert limiter.granted == 1  # the second waits in line
    first.release()
    assert limiter.granted == 2 and second.granted
    second.release()
    assert limiter.granted == 2


def test_wait_idle_returns_once_no_job_runs_or_waits():
    """Background work (the app's warm-up calibrations) waits for the jobs running and the line behind them."""
    limiter = DeviceLimiter(concurrency=1, max_queue=2)
    assert limiter.wait_idle(timeout=0)  # idle: at once
    first = limiter.try_acquire()
    second = limiter.try_acquire()  # waits in line behind the first
    assert not limiter.wait_idle(timeout=0.01)
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: limiter.wait_idle() and woke.set())
    waiter.start()
    first.release()  # the second job now runs: still not idle
    assert second.granted and not woke.wait(0.05)
    second.release()
    waiter.join(timeout=10)
    assert woke.is_set() and limiter.wait_idle(timeout=0)


def test_wait_idle_with_settle_waits_that_long_after_the_last_job_even_one_that_came_between():
    """The warm-up's background work starts only after a quiet spell, not in the moment between a client's
    back-to-back requests: never before ``settle`` seconds after the last job ended, a job that came between
    starting the spell again."""
    now = [0.0]
    limiter = DeviceLimiter(concurrency=1, max_queue=2, clock=lambda: now[0])
    assert limiter.wait_idle(timeout=0, settle=10)  # no job ever ran: nothing to settle
    limiter.try_acquire().release()  # a job ends at 0
    now[0] = 9.9
    assert not limiter.wait_idle(timeout=0, settle=10)
    now[0] = 10.0
    assert limiter.wait_idle(timeout=0, settle=10)
    limiter.try_acquire().release()  # another request, at 10: the spell starts again
    now[0] = 19.9
    assert not limiter.wait_idle(timeout=0, settle=10)
    now[0] = 20.0
    assert limiter.wait_idle(timeout=0, settle=10)


def test_wait_idle_with_settle_blocks_until_the_spell_is_over():
    """(A lower bound only: a busy machine can make the wait longer, never shorter.)"""
    limiter = DeviceLimiter(concurrency=1, max_queue=2)
    ended = time.monotonic()
    limiter.try_acquire().release()
    assert limiter.wait_idle(settle=0.3)
    assert time.monotonic() - ended >= 0.3


def test_never_more_than_concurrency_jobs_at_once():
    limiter = DeviceLimiter(concurrency=2, max_queue=20)
    lock = threading.Lock()
    active = peak = done = 0

    def job():
        nonlocal active, peak, done
        with limiter.slot():
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.01)
            with lock:
                active -= 1
                done += 1

    threads = [threading.Thread(target=job) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done == 12
    assert peak == 2
    assert (limiter.running, limiter.waiting) == (0, 0)


def test_waiters_are_served_first_come_first_served_and_know_their_position():
    limiter = DeviceLimiter(concurrency=1, max_queue=5)
    holder = limiter.try_acquire()
    tickets = [limiter.try_acquire() for _ in range(4)]
    assert [t.position for t in tickets] == [1, 2, 3, 4]
    assert not any(t.granted for t in tickets)
    order: list[int] = []
    order_lock = threading.Lock()

    def run(i: int) -> None:
        tickets[i].wait()
        with order_lock:
            order.append(i)
        tickets[i].release()

    # Start the waiting threads in reverse order: the grant order must follow the line, not thread start order.
    threads = [threading.Thread(target=run, args=(i,)) for i in reversed(range(4))]
    for t in threads:
        t.start()
    holder.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3]


def test_full_line_raises_queue_full_with_retry_after():
    limiter = DeviceLimiter(concurrency=1, max_queue=2, default_job_seconds=4.0)
    running = limiter.try_acquire()
    waiting = [limiter.try_acquire(), limiter.try_acquire()]
    with pytest.raises(QueueFullError) as info:
        limiter.try_acquire()
    err = info.value
    assert isinstance(err, EngineError)
    assert isinstance(err.retry_after, int) and err.retry_after >= 4  # at least one job's time
    assert "busy" in str(err)
    # Leaving the line frees a place at once.
    waiting[1].release()
    assert limiter.waiting == 1
    extra = limiter.try_acquire()
    assert extra.position == 2
    for t in (running, waiting[0], extra):
        t.release()
    assert (limiter.running, limiter.waiting) == (0, 0)


def test_zero_queue_refuses_when_busy():
    limiter = DeviceLimiter(concurrency=1, max_queue=0)
    ticket = limiter.try_acquire()
    with pytest.raises(QueueFullError):
        limiter.try_acquire()
    ticket.release()
    limiter.try_acquire().release()


class _Clock:
    """A clock the test moves by hand (no real time passes)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_after_follows_the_measured_job_time():
    clock = _Clock()
    limiter = DeviceLimiter(concurrency=1, max_queue=1, default_job_seconds=100.0, clock=clock)
    assert limiter.retry_after() >= 100
    with limiter.slot():
        clock.now += 0.05
    # One finished job replaces the default: the estimate is now about that job's length.
    assert limiter.stats().average_job_seconds < 5
    assert limiter.retry_after() == 1


def test_wait_timeout_leaves_the_line():
    limiter = DeviceLimiter(concurrency=1, max_queue=3)
    holder = limiter.try_acquire()
    ticket = limiter.try_acquire()
    with pytest.raises(TimeoutError):
        ticket.wait(timeout=0.05)
    assert limiter.waiting == 0
    holder.release()
    assert limiter.running == 0  # the slot was not handed to the ticket that gave up


def test_position_callback_reports_progress_through_the_line():
    limiter = DeviceLimiter(concurrency=1, max_queue=5)
    first = limiter.try_acquire()
    second = limiter.try_acquire()
    seen: list[int] = []
    got_slot = threading.Event()

    def waiter():
        with limiter.slot(on_position=seen.append):
            got_slot.set()

    t = threading.Thread(target=waiter)
    t.start()
    _wait_until(lambda: limiter.waiting == 2, "third job queued")
    first.release()
    _wait_until(lambda: second.granted, "second job granted")
    second.release()
    t.join(10)
    assert got_slot.is_set()
    assert seen[0] == 2 and seen == sorted(seen, reverse=True)


def test_release_of_a_waiting_ticket_from_another_thread_does_not_leak_a_slot():
    limiter = DeviceLimiter(concurrency=1, max_queue=2)
    holder = limiter.try_acquire()
    queued = limiter.try_acquire()
    threading.Thread(target=queued.release).start()
    _wait_until(lambda: limiter.waiting == 0, "queued ticket left")
    holder.release()
    assert (limiter.running, limiter.waiting) == (0, 0)
    assert not queued.granted


def test_stats_snapshot_is_json_friendly():
    limiter = DeviceLimiter(concurrency=3, max_queue=7)
    ticket = limiter.try_acquire()
    stats = limiter.stats().as_dict()
    assert stats["running"] == 1 and stats["waiting"] == 0
    assert stats["concurrency"] == 3 and stats["max_queue"] == 7
    ticket.release()
