"""Errors a user can cause.

Everything a user can get wrong (a file, a flag, a recipe key, a path, an
adapter that does not fit) raises :class:`LoraqError` with ONE line that names
the thing and says what to do. The CLI prints that line and exits with code 2,
without a traceback. Anything else that escapes is a bug and may traceback.
"""
from __future__ import annotations


class LoraqError(Exception):
    """A user mistake: one line, naming the file/key/flag and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        # one line, always: multi-line messages are folded so the CLI contract holds
        super().__init__(" ".join(str(message).split()))


class DataError(LoraqError):
    """A dataset file that cannot be read or used."""


class ModelError(LoraqError):
    """A model that cannot be found, read or used."""


class AdapterError(LoraqError):
    """An adapter folder that is missing, corrupt, or does not fit the model."""


class ConfigError(LoraqError):
    """A flag or recipe key that is unknown, of the wrong type, out of range or contradictory."""


class OutputError(LoraqError):
    """A file or folder loraq must write cannot be written (disk full, read-only, no permission)."""
