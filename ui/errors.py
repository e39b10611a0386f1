"""Turn exceptions into short messages a user can act on: no tracebacks, no server paths.

Engine errors already say what went wrong and what to do; this module only removes file-system paths from them
and picks a title. Anything unexpected becomes a generic message (the details go to the log).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

import gradio as gr

from engine.errors import (CancelledError, DownloadError, EngineError, FaceEnhancementError, InputTooLargeError,
                           InvalidInputError, InvalidSettingsError, ModelNotAvailableError, OutOfMemoryError,
                           UnsupportedFormatError, VideoError)

logger = logging.getLogger(__name__)

# An absolute POSIX path ("/home/u/x.png") or a Windows one ("C:\\x\\y.png"); quoted or bare.
# Absolute paths: POSIX ("/a/b") not part of a URL or a relative path, and Windows ("C:\a" or "C:/a").
_POSIX_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"/,;:()]+/)*[^\s'\"/,;:()]+")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:[\\/](?:[^\s'\"\\/,;:()]+[\\/])*[^\s'\"\\/,;:()]+")

_TITLES: tuple[tuple[type[BaseException], str], ...] = (
    (CancelledError, "Cancelled"),
    (InputTooLargeError, "Input too large"),
    (UnsupportedFormatError, "Unsupported file"),
    (InvalidInputError, "Can't read this file"),
    (InvalidSettingsError, "Check the settings"),
    (DownloadError, "Download failed"),
    (ModelNotAvailableError, "Model not available"),
    (OutOfMemoryError, "Out of memory"),
    (FaceEnhancementError, "Face enhancement"),
    (VideoError, "Video problem"),
    (EngineError, "Something went wrong"),
)


def scrub_paths(text: str) -> str:
    """Replace absolute file-system paths in ``text`` by their last component (``/srv/a/b.png`` → ``b.png``);
    URLs are kept. Used for every message the UI or the REST API shows. Pure."""

    def last_part(match: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", match.group(0)) if p]
        return parts[-1] if parts else "(folder)"

    return _POSIX_PATH.sub(last_part, _WINDOWS_PATH.sub(last_part, text))


def title_for(exc: BaseException) -> str:
    for kind, title in _TITLES:
        if isinstance(exc, kind):
            return title
    return "Something went wrong"


def user_message(exc: BaseException) -> str:
    """The message to show for ``exc``: the engine's own text without paths, or a generic line."""
    if isinstance(exc, gr.Error):
        return scrub_paths(str(exc.message))
    if isinstance(exc, EngineError):
        text = str(exc).strip() or type(exc).__name__
        return scrub_paths(text)
    if isinstance(exc, ValueError):  # validation errors from utils are plain ValueErrors with clear messages
        from utils.validation import ValidationError

        if isinstance(exc, ValidationError):
            text = str(exc).strip()
            return scrub_paths(text[:1].upper() + text[1:] + ("" if text.endswith(".") else "."))
    if isinstance(exc, MemoryError):
        return "The computer ran out of memory. Try a smaller image, a smaller scale or a smaller tile size."
    return (f"An unexpected error happened ({type(exc).__name__}). The details are in the app's log; "
            "please try again or with other settings.")


def to_gr_error(exc: BaseException) -> gr.Error:
    """A ``gr.Error`` that shows ``user_message(exc)`` (never the traceback)."""
    return gr.Error(user_message(exc), title=title_for(exc), print_exception=False)


@contextlib.contextmanager
def friendly_errors(action: str) -> Iterator[None]:
    """Run a handler body; re-raise anything as a readable ``gr.Error`` (unexpected ones are logged in full)."""
    try:
        yield
    except gr.Error:
        raise
    except (EngineError, ValueError, MemoryError) as exc:
        logger.info("%s refused: %s", action, exc)
        raise to_gr_error(exc) from None
    except Exception as exc:  # the user sees a short line; the log keeps the traceback
        logger.exception("%s failed", action)
        raise to_gr_error(exc) from None
