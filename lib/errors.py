"""User-facing errors: the tools print ``str(err)`` as one line and exit non-zero, no traceback."""


class DeqlabError(Exception):
    """Bad input from the user (config, flag, file, dataset, checkpoint); the message says what and where."""


class ConfigError(DeqlabError, ValueError):
    """A setting does not fit the defaults (unknown key, wrong type, value outside what the key allows).

    Also a ``ValueError``, so library code catching the bad-argument errors it always raised keeps working."""


class CheckpointError(DeqlabError):
    """A checkpoint cannot be read, or its tensors do not fit the model (missing, unexpected, wrong shape)."""


class DatasetError(DeqlabError):
    """A dataset is missing or malformed; the message says where we looked and how to get it."""
