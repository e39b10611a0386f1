"""Crash-safe file writes: a same-folder temporary file, fsync, ``os.replace``, then fsync of the folder.

A process killed at any moment leaves either the old file or the new one at the path, never a mix; the
temporary file is named ``.<name>.<random>.tmp`` so callers can recognise and clean stale ones.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def replaced_when_complete(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A new file opened for writing beside ``path`` (``.<name>.<random>.tmp``, the usual permissions: 0666 minus
    the umask), flushed, fsynced and moved over ``path`` when the block completes; removed instead when the block
    fails, so a failure or a killed process leaves ``path`` as it was, never a partial file."""
    path = Path(path)
    temp = path.parent / f".{path.name[:64]}.{secrets.token_hex(6)}.tmp"
    handle = open(temp, "wb", opener=_new_file)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _new_file(path: str, flags: int) -> int:
    """``open``'s opener for a file that must not exist yet (0666 minus the umask, as usual for new files)."""
    return os.open(path, flags | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def write_atomic(path: str | os.PathLike, data: bytes) -> int:
    """Replace ``path`` with ``data`` atomically (see :func:`replaced_when_complete`); returns the number of bytes
    written."""
    with replaced_when_complete(path) as handle:
        handle.write(data)
    return len(data)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
