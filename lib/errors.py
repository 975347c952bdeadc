"""User-facing errors: the tools print ``str(err)`` as one line and exit non-zero, no traceback."""
from __future__ import annotations

import re

# How torch re-raises an exception from a DataLoader worker: ``type(err)(msg)`` where ``msg`` is this header and
# the worker's whole formatted traceback (torch._utils.ExceptionWrapper.reraise).
_WORKER_HEADER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _unwrap_worker_message(message: object, name: str) -> object:
    """The original one-line message of an error of class ``name`` re-raised from a DataLoader worker: the text
    after ``<module>.<name>: `` on the traceback's last exception line; any other message unchanged."""
    if not isinstance(message, str) or not _WORKER_HEADER.match(message):
        return message
    lines = message.rstrip("\n").splitlines()
    prefix = re.compile(rf"^(?:[\w.]+\.)?{re.escape(name)}: ")
    for i in range(len(lines) - 1, 0, -1):
        found = prefix.match(lines[i])
        if found:
            return " ".join([lines[i][found.end():], *lines[i + 1:]])
    return message


class DeqlabError(Exception):
    """Bad input from the user (config, flag, file, dataset, checkpoint); the message says what and where.

    Raised in a DataLoader worker, it reaches the main process with the same one-line message (torch would
    otherwise prefix the worker's traceback)."""

    def __init__(self, *args: object) -> None:
        if args:
            args = (_unwrap_worker_message(args[0], type(self).__name__), *args[1:])
        super().__init__(*args)


class ConfigError(DeqlabError, ValueError):
    """A setting does not fit the defaults (unknown key, wrong type, value outside what the key allows).

    Also a ``ValueError``, so library code catching the bad-argument errors it always raised keeps working."""


class CheckpointError(DeqlabError):
    """A checkpoint cannot be read, or its tensors do not fit the model (missing, unexpected, wrong shape)."""


class DatasetError(DeqlabError):
    """A dataset is missing or malformed; the message says where we looked and how to get it."""
