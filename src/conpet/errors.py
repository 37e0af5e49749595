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


def closest(name: str, known, cutoff: float = 0.75) -> str | None:
    """The one of ``known`` a misspelt ``name`` most likely meant (``-`` and ``_`` count as the
    same), or ``None``: the one did-you-mean of conpet's errors."""
    import difflib

    folded = {str(k).replace("-", "_"): k for k in known}
    close = difflib.get_close_matches(str(name).replace("-", "_"), list(folded), n=1, cutoff=cutoff)
    return folded[close[0]] if close else None


def choices_hint(name: str, known, prefix: str = "", cutoff: float = 0.75, listing: str = "available") -> str:
    """What to tell a user who named an unknown ``name``: the closest of ``known`` (as
    ``prefix`` + it), else all of them."""
    known = sorted(known)
    close = closest(name, known, cutoff)
    return f" (did you mean '{prefix}{close}'?)" if close else f" ({listing}: {', '.join(known) or 'none'})"


def warn(message: str) -> None:
    """Warn the user about their input (a :class:`ConpetWarning`)."""
    import warnings

    warnings.warn(message, ConpetWarning, stacklevel=2)


def read_user_text(path, what: str, error: type[ConpetError] = ConpetError, encoding: str = "utf-8") -> str:
    """The text of a user's file (``what``: "config file", "task file"...): a missing file or one
    that is not UTF-8 is an ``error`` naming the file (and the byte)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
