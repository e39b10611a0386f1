"""Domain exceptions and the one table that says how each is reported: HTTP status, stage, UI title, exit code.

Every error the app raises on purpose is a subclass of :class:`EngineError` defined here, so that ``utils``
(validation, image I/O) can raise the same exceptions as the engine without importing it; ``engine.errors``
re-exports them. Each message says what went wrong and what the user can do about it.

How a failure reaches a person is decided in one place:

* :data:`ERROR_TABLE` maps an exception class to an :class:`ErrorKind` (status, stage, title, exit code);
  :func:`error_kind` looks an exception up along its MRO, so the most specific class wins and a subclass defined
  elsewhere inherits its parent's row. Classes in no row are unexpected (:data:`UNEXPECTED`).
* :func:`user_message` is the text every surface shows (CLI, web UI, REST API): the exception's own text with
  server paths removed, or one generic line that names no class for unexpected errors (whose details only the
  log gets; logging them is the caller's job).

Cheap to import and free of side effects: nothing here imports ``gradio`` or the engine, and ``torch`` is only
consulted (through :func:`utils.gpu.is_out_of_memory`) to recognise an out-of-memory ``RuntimeError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ERROR_TABLE",
    "UNEXPECTED",
    "BuiltinPresetError",
    "CancelledError",
    "ChecksumMismatchError",
    "DiskFullError",
    "DownloadError",
    "EngineError",
    "ErrorKind",
    "FaceEnhancementError",
    "InputTooLargeError",
    "InvalidInputError",
    "JobTooLargeError",
    "InvalidSettingsError",
    "JobTimeLimitError",
    "ModelNotAvailableError",
    "NoFaceFoundError",
    "OutOfMemoryError",
    "PresetNotFoundError",
    "QueueFullError",
    "SettingsStorageError",
    "Stage",
    "UnsafeEnvironmentError",
    "UnsupportedFormatError",
    "VideoError",
    "error_kind",
    "is_expected",
    "scrub_paths",
    "user_message",
]


# ---------------------------------------------------------------------------------------------------- exceptions
class EngineError(Exception):
    """Base of every error the app raises on purpose; its text is written for the user."""


class InvalidSettingsError(EngineError, ValueError):
    """A setting is out of range or inconsistent; the message names the setting and the allowed values."""


class InvalidInputError(EngineError, ValueError):
    """The input is not a usable image or video (missing, corrupt, empty, an array of the wrong shape)."""


class UnsupportedFormatError(InvalidInputError):
    """The file type (judged from the content) or the pixel type is not one the app handles."""


class InputTooLargeError(InvalidInputError):
    """The input (bytes, pixels, frames, seconds) or the requested output is over a configured limit.

    Attributes:
        actual: the measured amount (bytes or pixels), when the raiser knows it; else None.
        limit: the configured limit in the same unit; else None.
    """

    def __init__(self, message: str, *, actual: float | None = None, limit: float | None = None):
        super().__init__(message)
        self.actual = actual
        self.limit = limit


class JobTooLargeError(InputTooLargeError):
    """The job's planned memory (see ``engine.inference.memory_plan``) does not fit this machine's budget; refused
    before any pixel buffer is allocated. ``actual`` and ``limit`` are bytes."""


class NoFaceFoundError(InvalidInputError):
    """Face restoration was required (REST ``face_enhance=true``) but no face was detected in the image."""


class ModelNotAvailableError(EngineError):
    """The weights for a model are not on disk and could not be fetched; the message says how to get them."""


class DownloadError(ModelNotAvailableError):
    """A download failed after its retries (network, HTTP status, truncated stream)."""


class ChecksumMismatchError(DownloadError):
    """A weights file (a download, a converted file, an installed package's file) does not have its pinned hash.

    The file is not used. A download's partial file is deleted by the downloader; a file already in the weights
    folder or in an installed package is left where it is.
    """

    def __init__(self, name: str, expected: str, actual: str, what_happened: str | None = None):
        super().__init__(
            f"Checksum mismatch for {name}: expected sha256 {expected}, got {actual}. The file is damaged or not "
            "the pinned version, so it was not used. " + (what_happened or (
                "Download it again (or check your mirror); for offline weights, reinstall the package they come "
                "from."))
        )
        self.name, self.expected, self.actual = name, expected, actual


class UnsafeEnvironmentError(EngineError):
    """The environment would make model loading unsafe (for example TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""


class OutOfMemoryError(EngineError):
    """Inference did not fit in memory even at the smallest tile; the message says what to change."""


class FaceEnhancementError(EngineError):
    """Face detection or restoration failed on an image that was otherwise fine."""


class VideoError(EngineError):
    """A video could not be probed, decoded or encoded."""


class CancelledError(EngineError):
    """The user cancelled the job; partial outputs have been removed."""


class JobTimeLimitError(EngineError):
    """A job ran past the server's per-job time limit and was stopped at its next tile."""


class DiskFullError(EngineError):
    """The disk holding the results is nearly full, so new work is refused until space is freed."""


class QueueFullError(EngineError):
    """Every slot is busy and the wait line is full; ``retry_after`` is a whole number of seconds to wait."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class PresetNotFoundError(EngineError, KeyError):
    """No preset (built-in or user) has this name."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        super().__init__(f"No preset named {name!r}. Available presets: {', '.join(available) or 'none'}.")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class BuiltinPresetError(InvalidSettingsError):
    """A built-in preset cannot be deleted or overwritten."""


class SettingsStorageError(EngineError):
    """The settings folder could not be read, written or locked; the message says which file and why."""


# ---------------------------------------------------------------------------------------------------- the table
#: The pipeline step a failure is reported at (the REST API's ``stage`` field).
Stage = Literal["validation", "decode", "model", "inference", "faces", "metrics", "encode", "settings"]

#: Process exit codes of the command line.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130

_OUT_OF_MEMORY = ("Out of memory while processing this image. Try a smaller image, a smaller scale or a smaller "
                  "tile size, or try again later.")
_TOO_DEEP = ("The request is nested too deeply to be read; send the settings as one flat JSON object such as "
             "{\"model\": \"auto\", \"outscale\": 2}.")
_UNEXPECTED = ("Something unexpected went wrong; the details are in the log. Please try again, or try other "
               "settings.")


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of failure is reported on every surface.

    Attributes:
        status: HTTP status of the REST API's answer.
        stage: the pipeline step named in the REST answer.
        title: the heading of the web UI's error toast.
        exit_code: the command line's exit status when this error ends a command.
        message: a fixed text shown instead of the exception's own (for exceptions whose text is not written
            for users); None to show the exception's text.
    """

    status: int
    stage: Stage
    title: str
    exit_code: int
    message: str | None = None


#: The one table from exception class to :class:`ErrorKind`. Looked up along the MRO (:func:`error_kind`), so
#: rows may be listed in any order.
ERROR_TABLE: Mapping[type[BaseException], ErrorKind] = MappingProxyType({
    EngineError: ErrorKind(500, "inference", "Something went wrong", EXIT_FAILED),
    InvalidSettingsError: ErrorKind(422, "validation", "Check the settings", EXIT_USAGE),
    InvalidInputError: ErrorKind(422, "decode", "Can't read this file", EXIT_FAILED),
    UnsupportedFormatError: ErrorKind(415, "validation", "Unsupported file", EXIT_FAILED),
    InputTooLargeError: ErrorKind(413, "validation", "Input too large", EXIT_FAILED),
    JobTooLargeError: ErrorKind(413, "validation", "Job does not fit in memory", EXIT_FAILED),
    NoFaceFoundError: ErrorKind(422, "faces", "No face found", EXIT_FAILED),
    ModelNotAvailableError: ErrorKind(503, "model", "Model not available", EXIT_FAILED),
    DownloadError: ErrorKind(503, "model", "Download failed", EXIT_FAILED),
    ChecksumMismatchError: ErrorKind(503, "model", "Damaged model file", EXIT_FAILED),
    UnsafeEnvironmentError: ErrorKind(503, "model", "Unsafe environment", EXIT_FAILED),
    OutOfMemoryError: ErrorKind(503, "inference", "Out of memory", EXIT_FAILED),
    FaceEnhancementError: ErrorKind(500, "faces", "Face enhancement", EXIT_FAILED),
    VideoError: ErrorKind(500, "decode", "Video problem", EXIT_FAILED),
    CancelledError: ErrorKind(500, "inference", "Cancelled", EXIT_CANCELLED),
    QueueFullError: ErrorKind(429, "inference", "Server busy", EXIT_FAILED),
    JobTimeLimitError: ErrorKind(503, "inference", "Time limit", EXIT_FAILED),
    DiskFullError: ErrorKind(507, "validation", "Disk nearly full", EXIT_FAILED),
    PresetNotFoundError: ErrorKind(404, "validation", "Preset not found", EXIT_USAGE),
    SettingsStorageError: ErrorKind(500, "settings", "Settings not saved", EXIT_FAILED),
    MemoryError: ErrorKind(503, "inference", "Out of memory", EXIT_FAILED, message=_OUT_OF_MEMORY),
    # Only hostile input nests deep enough to exhaust the interpreter's stack (JSON settings thousands deep).
    RecursionError: ErrorKind(422, "validation", "Check the settings", EXIT_USAGE, message=_TOO_DEEP),
})

#: The kind of every exception in no row of :data:`ERROR_TABLE` (a bug, or a failure nobody planned for).
UNEXPECTED = ErrorKind(500, "inference", "Something went wrong", EXIT_FAILED, message=_UNEXPECTED)


def error_kind(error: BaseException | type[BaseException]) -> ErrorKind:
    """The :class:`ErrorKind` of an exception (or exception class): the row of the first class in its MRO that
    has one. Out-of-memory errors of torch (a ``RuntimeError``) count as ``MemoryError``; anything else with no
    row is :data:`UNEXPECTED`."""
    cls = error if isinstance(error, type) else type(error)
    for klass in cls.__mro__:
        kind = ERROR_TABLE.get(klass)
        if kind is not None:
            return kind
    if isinstance(error, RuntimeError):
        from utils.gpu import is_out_of_memory

        if is_out_of_memory(error):
            return ERROR_TABLE[MemoryError]
    return UNEXPECTED


def is_expected(error: BaseException) -> bool:
    """True when ``error`` has a row: a refusal or failure the app explains; False for bugs (log those in full)."""
    return error_kind(error) is not UNEXPECTED


def user_message(error: BaseException) -> str:
    """What every surface tells the user about ``error``: its own text without server paths, the row's fixed
    text, or (for an unexpected error) a generic line that names neither the class nor any detail."""
    kind = error_kind(error)
    if kind.message is not None:
        return kind.message
    return scrub_paths(str(error).strip()) or f"{kind.title}."


# ---------------------------------------------------------------------------------------------------- paths
# Absolute paths: POSIX ("/a/b") not part of a URL or a relative path, and Windows ("C:\a" or "C:/a"); quoted or
# bare.
_POSIX_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"/,;:()]+/)*[^\s'\"/,;:()]+")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:[\\/](?:[^\s'\"\\/,;:()]+[\\/])*[^\s'\"\\/,;:()]+")


def scrub_paths(text: str) -> str:
    """Replace absolute file-system paths in ``text`` by their last component (``/srv/a/b.png`` → ``b.png``);
    URLs are kept. Used for every message a user sees. Pure."""

    def last_part(match: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", match.group(0)) if p]
        return parts[-1] if parts else "(folder)"

    return _POSIX_PATH.sub(last_part, _WINDOWS_PATH.sub(last_part, text))
