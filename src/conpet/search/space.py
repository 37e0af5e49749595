"""The search space of ``conpet search``: a YAML file, checked before any trial runs.

    base:                       # an ordinary run config every trial starts from
      model: smollm2
      data: {benchmark: wordnet-relations, max_train_per_class: 32}
      train: {epochs: 2}
    params:                     # dotted config keys (as ``--set``) -> what to try
      pet.method: [lora, ia3, adapter, bitfit]          # a list: one of these values
      train.top_layers: [2, 4, 8]
      pet.options.r: {values: [4, 8, 16], when: {pet.method: lora}}
      learner: ["emr*", "ewc*"]
      learner_options.new_ratio: {low: 0.5, high: 2.0, log: true, when: {learner: "emr*"}}
      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      train.epochs: {low: 1, high: 3, int: true}

A parameter is a list of values (categorical) or a range ``{low, high}`` (``log: true`` for a
log scale, ``int: true`` for integers). ``when: {KEY: VALUE or [VALUES]}`` makes it conditional
on another parameter (or a base value), so ``pet.options.r`` is only drawn for LoRA trials.

:func:`load_space` checks everything a trial would otherwise find out late: unknown config keys
(with a did-you-mean), empty lists, ``low >= high``, a ``when`` on an unknown key or a value the
key can never take, and every value of every categorical parameter by building the trial's
config, its learner's options and its PET method (so a misspelt LoRA option fails now, naming the
file and line, not after an hour of trials).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conpet.build import check
from conpet.config import from_dict, set_dotted
from conpet.errors import ConfigError, ConpetError, read_user_text

SECTIONS = ("base", "params", "trials", "seeds", "objectives")
OBJECTIVES = ("accuracy", "params", "seconds")
"""What a trial is scored on: average dev accuracy after the stream (maximised), tunable
parameters and training seconds (minimised)."""


@dataclass
class Param:
    key: str
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    when: dict[str, list[Any]] = field(default_factory=dict)
    line: int = 0

    def active(self, chosen: dict[str, Any]) -> bool:
        """Whether the parameter applies given the values chosen so far (and the base config)."""
        return all(chosen.get(key, _MISSING) in allowed for key, allowed in self.when.items())

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws for this parameter."""
        if self.values is not None:
            # Optuna stores choices as strings/numbers/None only: draw an index for anything else
            if all(v is None or isinstance(v, (str, int, float, bool)) for v in self.values):
                return trial.suggest_categorical(self.key, self.values)
            return self.values[trial.suggest_categorical(self.key, list(range(len(self.values))))]
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)


_MISSING = object()


@dataclass
class Space:
    path: Path
    base: dict[str, Any]
    params: list[Param]
    trials: int = 30
    seeds: int = 1
    objectives: tuple[str, ...] = OBJECTIVES

    def sample(self, trial) -> dict[str, Any]:
        """The dotted values of one trial (only the parameters whose ``when`` holds)."""
        chosen = flat(self.base)
        picked: dict[str, Any] = {}
        for param in self.params:  # in file order, so a `when` sees the parameters above it
            if param.active(chosen):
                picked[param.key] = chosen[param.key] = param.suggest(trial)
        return picked

    def config(self, picked: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The run config (a plain dict) of a trial: base + picked values + ``extra`` dotted keys."""
        values = copy.deepcopy(self.base)
        for key, value in {**picked, **extra}.items():
            set_dotted(values, key, value)
        return values


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (the dotted view ``when`` conditions read)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("options",):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
    return out


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of each mapping key under ``params``."""


def _mapping_with_lines(loader, node):
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__lines__"] = {loader.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_lines)


def _strip_lines(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != "__lines__"}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def load_space(path: str | Path) -> Space:
    """Read and check a search-space file (every problem a ``ConfigError`` naming ``file:line``)."""
    path = Path(path)
    text = read_user_text(path, "search space", ConfigError)
    try:
        raw = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search space is a mapping with 'base' and 'params'")
    lines = raw.get("__lines__", {})
    for key in raw:
        if key != "__lines__" and key not in SECTIONS:
            raise ConfigError(f"{path}:{lines.get(key, 1)}: unknown section '{key}' (known: {', '.join(SECTIONS)})")
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not [k for k in params_raw if k != "__lines__"]:
        raise ConfigError(f"{path}:{lines.get('params', 1)}: 'params' is empty: name at least one config key to "
                          f"search over, e.g. 'pet.method: [lora, ia3]'")
    base = _strip_lines(raw.get("base") or {})
    if not isinstance(base, dict):
        raise ConfigError(f"{path}:{lines.get('base', 1)}: 'base' must be a mapping (a run config)")
    try:
        from_dict(base, f"{path} (base)")
    except ConpetError as e:
        raise ConfigError(f"{path}:{lines.get('base', 1)}: {e}") from None
    trials, seeds = raw.get("trials", 30), raw.get("seeds", 1)
    for name, value in (("trials", trials), ("seeds", seeds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{path}:{lines.get(name, 1)}: '{name}' must be an integer >= 1, got {value!r}")
    objectives = tuple(_strip_lines(raw.get("objectives", list(OBJECTIVES))))
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or "accuracy" not in objectives or len(set(objectives)) != len(objectives):
        raise ConfigError(f"{path}:{lines.get('objectives', 1)}: objectives must be distinct names among "
                          f"{', '.join(OBJECTIVES)}, with accuracy among them")
    plines = params_raw.get("__lines__", {})
    params = [_param(path, key, spec, plines.get(key, 1)) for key, spec in params_raw.items() if key != "__lines__"]
    space = Space(path, base, params, trials, seeds, objectives)
    _check_conditions(space)
    _check_values(space)
    return space


def _param(path: Path, key: str, spec: Any, line: int) -> Param:
    where = f"{path}:{line}: params.{key}"
    if key in ("seed", "seeds", "out", "orders") or key.startswith("data."):
        raise ConfigError(f"{where}: '{key}' is not a setting to tune (the stream and the seeds are the protocol's)")
    when: dict[str, list[Any]] = {}
    if isinstance(spec, dict):
        spec = dict(spec)
        spec.pop("__lines__", None)
        raw_when = spec.pop("when", {}) or {}
        if not isinstance(raw_when, dict):
            raise ConfigError(f"{where}: 'when' must map a key to a value or a list of values")
        when = {k: (v if isinstance(v, list) else [v]) for k, v in _strip_lines(raw_when).items()}
    if isinstance(spec, list) or (isinstance(spec, dict) and "values" in spec):
        values = spec if isinstance(spec, list) else spec.pop("values")
        if isinstance(spec, dict) and spec:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(spec)} beside 'values'")
        values = _strip_lines(values)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: the list of values is empty")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: a value is listed twice")
        return Param(key, values=values, when=when, line=line)
    if isinstance(spec, dict) and "low" in spec and "high" in spec:
        unknown = set(spec) - {"low", "high", "log", "int"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (a range takes low, high, "
                              f"log, int, when)")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
        if low >= high:
            raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
        integer = bool(spec.get("int"))
        if integer and (math.floor(low) != low or math.floor(high) != high):
            raise ConfigError(f"{where}: an integer range needs integer low and high")
        return Param(key, low=low, high=high, log=bool(spec.get("log")), integer=integer, when=when, line=line)
    raise ConfigError(f"{where}: give a list of values, or a range {{low: .., high: ..}}")


def _check_conditions(space: Space) -> None:
    """Each ``when`` names a parameter above it (or a base value) and a value it can take."""
    base = flat(space.base)
    seen: dict[str, Param] = {}
    for param in space.params:
        if param.key in seen:
            raise ConfigError(f"{space.path}:{param.line}: params.{param.key} is listed twice")
        for key, allowed in param.when.items():
            if key in seen:
                other = seen[key]
                possible = other.values if other.values is not None else None
                if possible is not None and not any(v in possible for v in allowed):
                    raise ConfigError(f"{space.path}:{param.line}: params.{param.key}: 'when {key}' asks for "
                                      f"{allowed}, which {key} never takes ({possible}): it would never be drawn")
            elif key in base:
                if base[key] not in allowed:
                    raise ConfigError(f"{space.path}:{param.line}: params.{param.key}: 'when {key}' asks for "
                                      f"{allowed}, but base sets {key} to {base[key]!r}: it would never be drawn")
            else:
                raise ConfigError(f"{space.path}:{param.line}: params.{param.key}: 'when' names '{key}', which is "
                                  f"neither a parameter above it nor set in base")
        seen[param.key] = param


def _check_values(space: Space) -> None:
    """Build the config of every categorical value (and each range's ends), with its conditions
    met, and run the checks a run makes before loading anything (learner and PET options)."""
    by_key = {p.key: p for p in space.params}
    for param in space.params:
        candidates = param.values if param.values is not None else [param.low, param.high]
        for value in candidates:
            picked = {param.key: int(value) if param.integer else value}
            for key, allowed in param.when.items():  # satisfy the conditions (and theirs, one level up)
                if key in by_key:
                    picked[key] = allowed[0]
                    for k2, a2 in by_key[key].when.items():
                        picked.setdefault(k2, a2[0])
            try:
                check(from_dict(space.config(picked), str(space.path)))
            except ConpetError as e:
                shown = ", ".join(f"{k}={v!r}" for k, v in picked.items())
                raise ConfigError(f"{space.path}:{param.line}: params.{param.key}: with {shown}: {e}") from None
