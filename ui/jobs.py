"""What the tabs and the REST API share at run time: a per-session cancel token, the device slot, the job watch
(time limit and client-gone cancellation), and the progress bridge.

Handlers here are plain functions of plain values (paths, dicts) so tests call them without a browser.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

from utils.errors import JobTimeLimitError

logger = logging.getLogger(__name__)


class CancelToken:
    """A cancel flag kept in a session's ``gr.State``.

    Gradio deep-copies a State's initial value for every new session, so each browser tab gets its own token
    (``__deepcopy__`` makes a fresh one). A job calls :meth:`start` and passes :attr:`event` to the engine; the
    Cancel button calls :meth:`cancel`.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    def start(self) -> threading.Event:
        self.event = threading.Event()
        return self.event

    def cancel(self) -> None:
        self.event.set()

    def __deepcopy__(self, memo) -> "CancelToken":
        return CancelToken()


def time_limit_message(limit: float) -> str:
    return (f"The job took longer than this server's limit of {limit:g} s and was stopped. Try a smaller image, "
            "scale or tile, or ask the operator to raise REALESRGAN_JOB_TIME_LIMIT_SECONDS.")


_sessions_lock = threading.Lock()
_session_jobs: dict[str, set[threading.Event]] = {}


def cancel_session_jobs(session: str | None) -> int:
    """Set the cancel event of every job the session ``session`` is running (its client went away).

    Returns:
        How many jobs were told to stop.
    """
    with _sessions_lock:
        events = list(_session_jobs.get(session or "", ()))
    for event in events:
        event.set()
    if events:
        logger.info("client went away; cancelling its %d job(s)", len(events))
    return len(events)


class JobWatch:
    """Owns a job's cancel event: sets it when ``time_limit`` seconds pass or the job's session is closed.

    Used as a context manager around the job: a timer arms on entry and is disarmed on exit, so the engine (which
    checks the event at every tile) stops an overlong or abandoned job within a tile. An exception leaving the block
    after the time limit fired becomes :class:`JobTimeLimitError`. Gradio handlers pass their session hash
    (``gr.Request.session_hash``) so that :func:`cancel_session_jobs`, run by ``demo.unload``, finds the job.
    """

    def __init__(self, time_limit: float | None, cancel: threading.Event | None = None,
                 session: str | None = None):
        self.cancel = cancel if cancel is not None else threading.Event()
        self.time_limit = time_limit
        self.session = session
        self.timed_out = threading.Event()
        self._timer: threading.Timer | None = None

    def _expire(self) -> None:
        self.timed_out.set()
        self.cancel.set()

    def time_limit_error(self) -> JobTimeLimitError:
        return JobTimeLimitError(time_limit_message(float(self.time_limit or 0)))

    def __enter__(self) -> "JobWatch":
        if self.time_limit is not None and self.time_limit > 0:
            self._timer = threading.Timer(self.time_limit, self._expire)
            self._timer.daemon = True
            self._timer.start()
        if self.session:
            with _sessions_lock:
                _session_jobs.setdefault(self.session, set()).add(self.cancel)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.session:
            with _sessions_lock:
                jobs = _session_jobs.get(self.session)
                if jobs is not None:
                    jobs.discard(self.cancel)
                    if not jobs:
                        del _session_jobs[self.session]
        if exc is not None and isinstance(exc, Exception) and self.timed_out.is_set():
            raise self.time_limit_error() from None


def watch_job(services, cancel: threading.Event | None = None, request=None) -> JobWatch:
    """A :class:`JobWatch` with the server's per-job time limit, tied to the Gradio ``request``'s session."""
    limit = getattr(getattr(services, "config", None), "job_time_limit_seconds", None)
    return JobWatch(limit, cancel, session=getattr(request, "session_hash", None))


@contextlib.contextmanager
def device_slot(services, notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold one of the device's inference slots (shared with the REST API) for the block.

    Raises:
        QueueFullError: the shared wait line is full (the message says when to retry).
    """
    limiter = getattr(services, "limiter", None)
    if limiter is None:
        yield
        return

    def on_position(position: int) -> None:
        if notify is not None:
            notify(f"Waiting for the processor: number {position} in line")

    with limiter.slot(on_position=on_position):
        yield


def gradio_progress(progress, offset: float = 0.0, span: float = 1.0) -> Callable[[float, str], None]:
    """An engine progress callback ``(fraction, message)`` feeding a ``gr.Progress`` (or nothing when None)."""

    def report(fraction: float, message: str) -> None:
        if progress is None:
            return
        try:
            progress(min(1.0, max(0.0, offset + span * float(fraction))), desc=message)
        except Exception:  # progress display must never break a job
            logger.debug("progress update failed", exc_info=True)

    return report
