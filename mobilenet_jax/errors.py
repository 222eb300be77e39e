"""Errors written for people.

Library functions raise :class:`UserError` subclasses (or the built-in errors listed
in :data:`USER_ERRORS`) whose message is one sentence saying what is wrong and what
to do; :mod:`mobilenet_jax.cli` turns them into one line on stderr and an exit code.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user asked for cannot work; the message says what and what to do."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the field."""


class DatasetError(UserError):
    """A dataset cannot be found, prepared or read as configured."""


class CheckpointError(UserError):
    """No usable checkpoint or model directory where one was named."""


class UnreadableFileError(UserError):
    """A weights file that cannot be read: truncated, corrupt, or not the format its name says."""


class DivergenceError(UserError, FloatingPointError):
    """Training produced a non-finite loss or update."""


# Errors whose message is written for the user; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)


def sentence(error: BaseException) -> str:
    """The error's message as one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text
