"""Learner options (``learner_options`` in the config, ``--set learner_options.KEY=VALUE``, or
``--learner 'dynamic[top_k=2]'``): declared once per learner as :class:`Option` values, checked
once by :func:`check_options`, which converts each to its type (``top_k=1.7`` is an error, not 1).

The options every replaying learner shares are declared once, in :data:`REPLAY_OPTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conpet.config import yaml_number
from conpet.errors import ConfigError, choices_hint


@dataclass(frozen=True)
class Option:
    default: Any
    kind: type
    """``int``, ``float``, ``bool``, ``str`` or ``dict``."""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    nullable: bool = False
    help: str = ""

    def convert(self, key: str, value: Any) -> Any:
        where = f"learner_options.{key}"
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{where}: must be set (got null)")
        if self.kind is float:
            value = yaml_number(value)
        if self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            raise ConfigError(f"{where}: must be {'an integer' if self.kind is int else self.kind.__name__}"
                              f"{' or null' if self.nullable else ''}, got {value!r}")
        value = self.kind(value) if self.kind in (int, float) else value
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{where}: must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{where}: must be <= {self.maximum}, got {value!r}")
        return value


def check_options(learner: str, declared: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` checked against ``declared`` (names with a did-you-mean, types, ranges, choices),
    completed with the defaults; the one place learner options are validated."""
    names = sorted(declared)
    for key in given:
        if key not in declared:
            hint = choices_hint(str(key), names, cutoff=0.6, listing="known") if names else " (it takes no options)"
            raise ConfigError(f"learner_options: unknown option '{key}' for learner '{learner}'{hint}")
    return {key: opt.convert(key, given[key]) if key in given else opt.default for key, opt in declared.items()}


REPLAY_OPTIONS: dict[str, Option] = {
    "steps_per_task": Option(None, int, minimum=1, nullable=True,
                             help="dynamic replay steps per task; default epochs x ceil(|new rows| / n_new)"),
    "batch_limit": Option(None, int, minimum=1, nullable=True,
                          help="ConPET's official budget: int(0.8 x batch_limit) batches per epoch, "
                               "whatever the task's size (overrides steps_per_task)"),
    "new_ratio": Option(1.0, float, help="new:old rows of a replay batch (1.0 = 1:1)"),
    "replay_source": Option("history", str, choices=("history", "memory"),
                            help="old rows from every old training row (ConPET) or from a bounded exemplar memory"),
    "memory_per_class": Option(16, int, minimum=1, help="exemplar memory size per class"),
}
