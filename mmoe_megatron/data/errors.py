"""The one error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data files: the message names the file and how to fix it.

    A `ValueError`, like `ConfigError`, so callers can treat both as user mistakes.
    """
