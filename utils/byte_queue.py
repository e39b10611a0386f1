"""A FIFO between threads bounded by the bytes it holds, not only by how many items: a queue of 4K (or 8K) video
frames must not hold more memory than a queue of small ones.

:class:`ByteBudgetQueue` has the ``put``/``get`` of :class:`queue.Queue` (``timeout``; :class:`queue.Full` and
:class:`queue.Empty`), so a loop written for one works with the other.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Callable


def nbytes(item: Any) -> int:
    """The bytes an item holds: an array's ``nbytes``; 0 for anything else (markers, errors)."""
    return int(getattr(item, "nbytes", 0))


class ByteBudgetQueue:
    """A FIFO that holds at most ``max_bytes`` (and at most ``max_items`` items, when that is above 0).

    An empty queue always takes one item, however large, so an item over the budget passes alone instead of
    blocking for ever. ``peak_bytes`` is the most it ever held (for tests and logs).
    """

    def __init__(self, max_bytes: int, *, max_items: int = 0, size_of: Callable[[Any], int] = nbytes):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_bytes, self.max_items, self._size_of = int(max_bytes), int(max_items), size_of
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self.peak_bytes = 0
        self._changed = threading.Condition()

    def _room_for(self, size: int) -> bool:
        if not self._items:
            return True
        return self._bytes + size <= self.max_bytes and not (self.max_items and len(self._items) >= self.max_items)

    def put(self, item: Any, timeout: float | None = None) -> None:
        """Append ``item``, waiting up to ``timeout`` seconds (None: for ever) for room.

        Raises:
            queue.Full: no room came within ``timeout``.
        """
        size = self._size_of(item)
        with self._changed:
            if not self._changed.wait_for(lambda: self._room_for(size), timeout):
                raise queue.Full
            self._items.append((item, size))
            self._bytes += size
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._changed.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """Remove and return the oldest item, waiting up to ``timeout`` seconds (None: for ever) for one.

        Raises:
            queue.Empty: nothing came within ``timeout``.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._items), timeout):
                raise queue.Empty
            item, size = self._items.popleft()
            self._bytes -= size
            self._changed.notify_all()
            return item

    @property
    def bytes(self) -> int:
        """The bytes held now."""
        with self._changed:
            return self._bytes

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)
