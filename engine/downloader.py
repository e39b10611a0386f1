"""Verified, resumable, crash-safe download of one weights file over HTTP(S).

The body streams into ``<dest>.part`` while it is hashed; an interrupted download resumes with a ``Range``
request. Only a file of the expected size and SHA-256 is fsynced and moved to ``dest`` with ``os.replace``,
so a killed process never leaves a file at ``dest``. A ``<dest>.lock`` file lock serialises two downloads
of the same file: the second one finds it done.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from engine.errors import ChecksumMismatchError, DownloadError, InvalidSettingsError

logger = logging.getLogger(__name__)

USER_AGENT = "realesrgan-ultimate-downloader/1.0"
Progress = Callable[[int, "int | None"], None]
_CHUNK = 1 << 16
_RETRYABLE_4XX = frozenset({408, 425, 429})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


@dataclass(frozen=True)
class DownloadPolicy:
    """How patiently one download is attempted.

    Attributes:
        timeout: Socket timeout in seconds for connecting and for each read (> 0).
        retries: Further attempts after a transient failure (5xx, timeout, reset, truncated body), >= 0.
            An attempt that received bytes resets the count, since the next one resumes from there.
        backoff: First wait in seconds between attempts (>= 0); doubles after each failure.

    Raises:
        InvalidSettingsError: (a ``ValueError``) a value out of range; the message names the field.
    """

    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0

    def __post_init__(self) -> None:
        for name, ok, wanted in (
            ("timeout", _is_number(self.timeout) and self.timeout > 0, "a number of seconds > 0 (default 60)"),
            ("retries", type(self.retries) is int and self.retries >= 0, "a whole number >= 0 (default 4)"),
            ("backoff", _is_number(self.backoff) and self.backoff >= 0, "a number of seconds >= 0 (default 1)"),
        ):
            if not ok:
                raise InvalidSettingsError(f"DownloadPolicy.{name} must be {wanted}, got {getattr(self, name)!r}.")


class _Transient(Exception):
    """One attempt failed in a way worth retrying (5xx, timeout, reset, truncated body)."""


class _Restart(Exception):
    """The partial file cannot be resumed (416 or a mismatched Content-Range): start again from zero."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of the file at ``path``, read ``chunk`` bytes at a time."""
    return _hash_into(hashlib.sha256(), Path(path), chunk).hexdigest()


def _hash_into(hasher: "hashlib._Hash", path: Path, chunk: int = 1 << 20) -> "hashlib._Hash":
    with open(path, "rb") as file:
        while block := file.read(chunk):
            hasher.update(block)
    return hasher


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    expected_size: int | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    policy: DownloadPolicy = DownloadPolicy(),
) -> Path:
    """Download ``url`` to ``dest``, verify it, and return ``dest``.

    Args:
        url: ``http://`` or ``https://`` address of the file.
        dest: Final path. Its folder is created if needed.
        sha256: Pinned lowercase hex SHA-256; ``None`` skips the check (logged as a warning).
        expected_size: Exact size in bytes, checked before the hash when given.
        name: Name used in messages (defaults to the file name).
        progress: Called as ``progress(bytes_done, total_or_None)`` while bytes arrive.
        policy: Timeout, retries and backoff between attempts (see :class:`DownloadPolicy`).

    Returns:
        ``dest``, holding the verified file.

    Raises:
        DownloadError: HTTP 4xx, a non-HTTP URL, a wrong size, or transient failures beyond
            ``policy.retries``.
        ChecksumMismatchError: The downloaded bytes do not have ``sha256``; the partial file is deleted.
    """
    dest = Path(dest)
    name = name or dest.name
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"Cannot download {name}: {url!r} is not an http(s) URL. Fix the URL or mirror.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with FileLock(f"{dest}.lock"):
        if dest.exists():
            if sha256 is None or sha256_file(dest) == sha256.lower():
                logger.debug("%s already present at %s", name, dest)
                return dest
            logger.warning("%s at %s has the wrong checksum; downloading it again", name, dest)
        logger.info("Downloading %s from %s", name, url)
        failures = 0
        while True:
            had = part.stat().st_size if part.exists() else 0
            try:
                actual = _attempt(url, part, expected_size, progress, policy.timeout)
                break
            except _Restart as exc:
                logger.warning("Cannot resume %s (%s); starting again from zero", name, exc)
                part.unlink(missing_ok=True)
            except _Transient as exc:
                now = part.stat().st_size if part.exists() else 0
                failures = 0 if now > had else failures + 1
                if failures > policy.retries:
                    raise DownloadError(
                        f"Download of {name} from {url} failed after {policy.retries + 1} attempts: {exc}. "
                        f"Check your connection or mirror, or place the file by hand at {dest}."
                    ) from exc
                delay = policy.backoff * 2 ** max(failures - 1, 0)
                logger.warning("Download of %s interrupted (%s); retrying in %.2fs", name, exc, delay)
                time.sleep(delay)
        _verify_and_publish(part, dest, name, sha256, expected_size, actual)
    logger.info("Downloaded %s to %s", name, dest)
    return dest


def _verify_and_publish(
    part: Path, dest: Path, name: str, sha256: str | None, expected_size: int | None, actual: str
) -> None:
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"Download of {name} has {size} bytes, expected {expected_size}. The partial file was deleted; "
            f"check the URL or mirror, or place the file by hand at {dest}."
        )
    if sha256 is None:
        logger.warning("No pinned checksum for %s; sha256 of the download is %s", name, actual)
    elif actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(name, sha256.lower(), actual)
    with open(part, "rb") as file:
        os.fsync(file.fileno())
    os.replace(part, dest)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _attempt(url: str, part: Path, expected_size: int | None, progress: Progress | None, timeout: float) -> str:
    """Fetch the rest of ``url`` into ``part`` once; return the hex SHA-256 of the whole ``part``."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            raise _Restart("server answered 416 Range Not Satisfiable") from exc
        if exc.code >= 500 or exc.code in _RETRYABLE_4XX:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(
            f"Download from {url} failed with HTTP {exc.code} {exc.reason}. Check the URL or mirror, "
            f"or place the file by hand in the weights dir ({part.parent})."
        ) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):  # offline: no point in retrying a host we cannot resolve
            raise DownloadError(
                f"Cannot reach {urllib.parse.urlsplit(url).hostname}: no network or DNS. Connect to the internet, "
                f"set a mirror, or place the file by hand in the weights dir ({part.parent})."
            ) from exc
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
    except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc

    with response:
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        if offset and response.status == 206:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                raise _Restart(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            logger.info("Resuming %s at byte %d", part.name, offset)
            hasher = _hash_into(hashlib.sha256(), part)
            done, mode = offset, "ab"
        else:
            if offset:
                logger.info("Server ignored the Range request; downloading %s from zero", part.name)
            hasher, done, mode = hashlib.sha256(), 0, "wb"
        total = done + remaining if remaining is not None else expected_size
        if progress is not None:
            progress(done, total)
        received = 0
        try:
            with open(part, mode) as file:
                while block := response.read1(_CHUNK):  # bytes as they arrive, kept on a timeout
                    file.write(block)
                    hasher.update(block)
                    received += len(block)
                    if progress is not None:
                        progress(done + received, total)
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            raise _Transient(f"connection lost after {done + received} bytes: {type(exc).__name__}") from exc
    if remaining is not None and received < remaining:
        raise _Transient(f"connection closed after {done + received} of {total} bytes")
    return hasher.hexdigest()
