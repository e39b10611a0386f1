"""Retention of served results: per-job folders expire by age and by a total size cap, oldest first.

What it manages are the *job folders* the server creates for other people: ``output_dir/web/<job>`` (results of
the web UI and its API) and Gradio's cache under ``temp_dir/gradio`` (uploads and the copies of results Gradio
serves). The CLI's own outputs, presets and weights are never touched. A folder is one unit: it goes whole.

* :func:`sweep` deletes folders older than ``retention_hours``, then the least recently used ones while the
  total is over ``retention_max_mb``. Folders touched in the last :data:`IN_USE_SECONDS` are left alone (a job
  may still be writing them).
* :func:`maybe_sweep` runs :func:`sweep` at most once a minute per output folder (called when a job starts).
* :func:`check_free_space` refuses new work (:class:`~utils.errors.DiskFullError`) while the output disk has less
  than ``min_free_disk_mb`` free even after a sweep.
* :func:`usage` reports the space held, for the System tab.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from utils.errors import DiskFullError

logger = logging.getLogger(__name__)

WEB_JOBS = "web"  # sub-folder of output_dir holding the web UI's per-job result folders
GRADIO_CACHE = "gradio"  # sub-folder of temp_dir that GRADIO_TEMP_DIR points to
IN_USE_SECONDS = 120.0  # a folder modified this recently may belong to a running job
SWEEP_INTERVAL_SECONDS = 60.0

_last_sweep: dict[str, float] = {}
_sweep_lock = threading.Lock()


@dataclass(frozen=True)
class JobFolder:
    path: Path
    size_bytes: int
    last_used: float  # newest modification time of the folder or anything in it


@dataclass(frozen=True)
class SweepReport:
    removed: int
    freed_bytes: int
    kept: int
    kept_bytes: int


def job_roots(config) -> tuple[Path, ...]:
    """The folders whose sub-folders are per-job folders under retention."""
    return Path(config.output_dir) / WEB_JOBS, Path(config.temp_dir) / GRADIO_CACHE


def job_folders(config) -> list[JobFolder]:
    """Every per-job folder (and stray file) under the retention roots, least recently used first."""
    found = []
    for root in job_roots(config):
        if not root.is_dir():
            continue
        for child in root.iterdir():
            with contextlib.suppress(OSError):
                if child.is_symlink():
                    continue
                size, last = _size_and_last_use(child)
                found.append(JobFolder(child, size, last))
    return sorted(found, key=lambda folder: folder.last_used)


def _size_and_last_use(path: Path) -> tuple[int, float]:
    st = path.stat()
    if not path.is_dir():
        return st.st_size, st.st_mtime
    size, last = 0, st.st_mtime
    for item in path.rglob("*"):
        with contextlib.suppress(OSError):
            if item.is_symlink():
                continue
            item_st = item.stat()
            last = max(last, item_st.st_mtime)
            if item.is_file():
                size += item_st.st_size
    return size, last


def sweep(config, now: float | None = None) -> SweepReport:
    """Delete expired job folders, then the least recently used while over the size cap.

    Args:
        config: the app's Config (``output_dir``, ``temp_dir``, ``retention_hours``, ``retention_max_mb``).
        now: the current time (``time.time()``); tests pass their own.
    """
    now = time.time() if now is None else now
    cutoff = now - config.retention_hours * 3600
    cap = int(config.retention_max_mb * 2**20)
    folders = job_folders(config)
    total = sum(f.size_bytes for f in folders)
    removed = freed = 0
    kept = []
    for folder in folders:
        in_use = now - folder.last_used < IN_USE_SECONDS
        if not in_use and (folder.last_used < cutoff or total > cap):
            if _remove(folder.path):
                removed += 1
                freed += folder.size_bytes
                total -= folder.size_bytes
                continue
        kept.append(folder)
    if removed:
        logger.info("retention: removed %d job folder(s), %.1f MB", removed, freed / 2**20)
    return SweepReport(removed, freed, len(kept), sum(f.size_bytes for f in kept))


def _remove(path: Path) -> bool:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except OSError as exc:
        logger.warning("retention: could not remove %s: %s", path.name, exc)
        return False


def maybe_sweep(config) -> SweepReport | None:
    """:func:`sweep`, unless one ran for this output folder in the last :data:`SWEEP_INTERVAL_SECONDS`."""
    key = str(Path(config.output_dir).resolve())
    with _sweep_lock:
        if time.monotonic() - _last_sweep.get(key, float("-inf")) < SWEEP_INTERVAL_SECONDS:
            return None
        _last_sweep[key] = time.monotonic()
    return sweep(config)


def free_disk_bytes(config) -> int:
    folder = Path(config.output_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(config) -> None:
    """Refuse new work while the output disk has less than ``min_free_disk_mb`` free (after a sweep).

    Raises:
        DiskFullError: still too little space after expired and over-cap job folders were removed.
    """
    needed = int(config.min_free_disk_mb * 2**20)
    if needed <= 0 or free_disk_bytes(config) >= needed:
        maybe_sweep(config)
        return
    sweep(config)
    free = free_disk_bytes(config)
    if free < needed:
        raise DiskFullError(f"The server's disk is nearly full ({free / 2**20:.0f} MB free, at least "
                            f"{config.min_free_disk_mb:g} MB needed), so it takes no new work for now. Try again "
                            "later; the operator can free space in the System tab or lower "
                            "REALESRGAN_MIN_FREE_DISK_MB.")


def usage(config) -> dict:
    """Space held by job folders and free on the disk: ``{"folders", "bytes", "free_bytes", "cap_bytes"}``."""
    folders = job_folders(config)
    return {"folders": len(folders), "bytes": sum(f.size_bytes for f in folders),
            "free_bytes": free_disk_bytes(config), "cap_bytes": int(config.retention_max_mb * 2**20)}
