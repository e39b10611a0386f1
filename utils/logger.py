"""Logging set-up: console plus a rotating file (10 MB, 5 backups). Configured once, by main."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_HANDLER_TAG = "_realesrgan_ultimate"


def setup_logging(log_file: str | Path | None = None, level: str = "INFO", max_bytes: int = 10 * 1024 * 1024,
                  backup_count: int = 5) -> logging.Logger:
    """Configure the root logger with a console handler and, if ``log_file`` is given, a rotating file.

    Calling it again replaces the handlers it added before (so tests and restarts don't duplicate lines).
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_FORMAT)
    console = logging.StreamHandler()
    console.setFormatter(formatter)
    setattr(console, _HANDLER_TAG, True)
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes,
                                                            backupCount=backup_count, encoding="utf-8")
        file_handler.setFormatter(formatter)
        setattr(file_handler, _HANDLER_TAG, True)
        root.addHandler(file_handler)
    return root


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
