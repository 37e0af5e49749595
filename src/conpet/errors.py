"""Errors a user can act on.

Every problem with the user's input (data files, task files, configs, model paths) raises
:class:`ConpetError` with a one-line message that names the file, line or field. The CLI
prints that line and exits with code 2, without a traceback.
"""


class ConpetError(Exception):
    """A user-facing error: the message says what is wrong, where, and what to do."""


class DataError(ConpetError):
    """Bad data or task file."""


class ConfigError(ConpetError):
    """Bad configuration value or file."""


class ModelError(ConpetError):
    """A model that cannot be found or loaded."""


class ConpetWarning(UserWarning):
    """Something in the input that is allowed but probably not meant (the CLI prints it as
    ``conpet: warning: ...``; library users can filter it with :mod:`warnings`)."""


def warn(message: str) -> None:
    """Warn the user about their input (a :class:`ConpetWarning`)."""
    import warnings

    warnings.warn(message, ConpetWarning, stacklevel=2)
