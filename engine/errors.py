"""Domain exceptions. Each message says what went wrong and what the user can do about it.

``ui/``, ``main.py`` and the REST API map these to user messages and status codes; nothing here knows about them.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose. ``stage`` names the pipeline step that failed."""

    stage = "inference"


class InvalidSettingsError(EngineError, ValueError):
    """A setting is out of range or inconsistent; the message names the setting and the allowed values."""

    stage = "validation"


class InvalidInputError(EngineError, ValueError):
    """The input is not a usable image or video (corrupt, wrong format, empty)."""

    stage = "decode"


class UnsupportedFormatError(InvalidInputError):
    """The file type is not on the allow-list."""

    stage = "validation"


class InputTooLargeError(InvalidInputError):
    """The input (bytes, pixels, frames, seconds) or the requested output is over a configured limit."""

    stage = "validation"


class ModelNotAvailableError(EngineError):
    """The weights for a model are not on disk and could not be fetched; the message says how to get them."""

    stage = "model"


class DownloadError(ModelNotAvailableError):
    """A download failed after its retries (network, HTTP status, truncated stream)."""


class ChecksumMismatchError(DownloadError):
    """A weights file does not have the pinned SHA-256. The bad file has already been deleted."""

    def __init__(self, name: str, expected: str, actual: str):
        super().__init__(
            f"Checksum mismatch for {name}: expected sha256 {expected}, got {actual}. "
            "The file was deleted; download it again, or check your mirror."
        )
        self.name, self.expected, self.actual = name, expected, actual


class UnsafeEnvironmentError(EngineError):
    """The environment would make model loading unsafe (for example TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""

    stage = "model"


class OutOfMemoryError(EngineError):
    """Inference did not fit in memory even at the smallest tile; the message says what to change."""

    stage = "inference"


class FaceEnhancementError(EngineError):
    stage = "faces"


class NoFaceFoundError(FaceEnhancementError):
    """Faces were required but none was detected."""


class VideoError(EngineError):
    """A video could not be probed, decoded or encoded."""

    stage = "decode"


class CancelledError(EngineError):
    """The user cancelled the job; partial outputs have been removed."""

    stage = "inference"
