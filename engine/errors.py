"""The engine's domain exceptions, re-exported from :mod:`utils.errors` (where ``utils`` can raise them too).

``from engine.errors import InvalidInputError`` and ``from utils.errors import InvalidInputError`` name the same
class. How each is shown to a user (HTTP status, stage, UI title, exit code, message) is the one table in
:mod:`utils.errors`.
"""

from __future__ import annotations

from utils.errors import (BuiltinPresetError, CancelledError, ChecksumMismatchError, DownloadError, EngineError,
                          FaceEnhancementError, InputTooLargeError, InvalidInputError, InvalidSettingsError, JobTooLargeError,
                          ModelNotAvailableError, NoFaceFoundError, OutOfMemoryError, PresetNotFoundError,
                          QueueFullError, SettingsStorageError, UnsafeEnvironmentError, UnsupportedFormatError,
                          VideoError)

__all__ = sorted(name for name in dir() if name.endswith("Error"))
