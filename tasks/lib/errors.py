"""The errors a user can fix. Library and stage code raise them; only the command line (:mod:`tasks.lib.cli`) turns
them into one line and an exit code."""

from __future__ import annotations


class StageError(RuntimeError):
    """A problem the user can fix (missing file, bad input); its message is shown as one line, no traceback."""


class DataError(StageError):
    """A dataset file that is missing, unreadable or malformed; the message names the file."""
