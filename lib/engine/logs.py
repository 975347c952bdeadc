"""Logging of the tools: rank 0 at INFO on stdout, and a training run's ``train.log`` once the run has trained
(a rerun that fails before its first step leaves an earlier run's log as it was)."""
from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


class _HeldForLogFile(logging.handlers.MemoryHandler):
    """Keeps a training run's first records until :func:`attach_log_file` gives them their file."""

    def __init__(self) -> None:
        super().__init__(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)


def setup_logging(is_main: bool, hold_for_log_file: bool = False) -> None:
    """Rank 0 logs INFO to stdout, other ranks only warnings. ``hold_for_log_file`` (a training run): rank 0
    also keeps the records until :func:`attach_log_file` names their file, once the run has trained a step."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main and hold_for_log_file:
        handlers.append(_HeldForLogFile())
    for handler in handlers:
        handler.setFormatter(LOG_FORMAT)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers, force=True)


def attach_log_file(log_file: Path) -> None:
    """Append the records held since ``setup_logging(hold_for_log_file=True)``, and every later one, to
    ``log_file``; nothing when no records are held (a library caller that set up no logging)."""
    root = logging.getLogger()
    for held in [h for h in root.handlers if isinstance(h, _HeldForLogFile)]:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(LOG_FORMAT)
        held.setTarget(handler)
        held.flush()
        root.removeHandler(held)
        root.addHandler(handler)
