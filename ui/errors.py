"""Turn exceptions into Gradio error toasts a user can act on: no tracebacks, no server paths.

The text and the title come from the one error table (:func:`utils.errors.user_message` and
:func:`utils.errors.error_kind`); this module only wraps them in a ``gr.Error`` and logs what was unexpected.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import gradio as gr

from utils.errors import error_kind, is_expected, user_message

logger = logging.getLogger(__name__)


def to_gr_error(exc: BaseException) -> gr.Error:
    """A ``gr.Error`` that shows ``user_message(exc)`` under the table's title (never the traceback)."""
    return gr.Error(user_message(exc), title=error_kind(exc).title, print_exception=False)


@contextlib.contextmanager
def friendly_errors(action: str) -> Iterator[None]:
    """Run a handler body; re-raise anything as a readable ``gr.Error`` (unexpected ones are logged in full)."""
    try:
        yield
    except gr.Error:
        raise
    except Exception as exc:  # the user sees a short line; the log keeps the traceback of what was unexpected
        if is_expected(exc):
            logger.info("%s refused: %s", action, exc)
        else:
            logger.exception("%s failed", action)
        raise to_gr_error(exc) from None
