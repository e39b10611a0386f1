"""Crash-safe file writes: a same-folder temporary file, fsync, ``os.replace``, then fsync of the folder.

A process killed at any moment leaves either the old file or the new one at the path, never a mix; the
temporary file is named ``.<name>.<random>.tmp`` so callers can recognise and clean stale ones.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes) -> int:
    """Replace ``path`` with ``data`` atomically; returns the number of bytes written.

    The new file gets the usual permissions (0666 minus the umask). On any failure the temporary file is removed
    and an existing ``path`` is left as it was.
    """
    path = Path(path)
    temp = path.parent / f".{path.name[:64]}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
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
