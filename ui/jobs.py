"""What the tabs share at run time: a per-session cancel token, the device slot, and the progress bridge.

Handlers here are plain functions of plain values (paths, dicts) so tests call them without a browser.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

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
