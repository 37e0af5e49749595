"""Continual-learning metrics: pure functions of the accuracy matrix.

The accuracy matrix ``A`` is ``T x T``: ``A[i][j]`` is the accuracy (a float in ``[0, 1]``) on
task ``j``'s test set after learning task ``i`` (0-based). In the class-incremental setting the
model predicts over all classes seen so far. Entries with ``j > i`` were not evaluated: they are
``None`` (in JSON) or ``NaN`` and are ignored by every function here; entries with ``j <= i``
must be present.

``test_counts[j]`` is the number of test rows of task ``j``; it turns per-task accuracies into a
micro ("whole") accuracy over all rows seen so far.

The functions take plain nested lists or numpy arrays, use numpy only, and return Python floats,
so their results go straight into ``metrics.json``. The style follows avalanche's
``avalanche/evaluation/functional.py``: one formula per function, the source in its docstring.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Sequence

import numpy as np

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "whole_accuracy",
    "average_accuracy_over_steps",
    "whole_accuracy_over_steps",
    "forgetting",
    "backward_transfer",
    "summarize",
    "aggregate_seeds",
]

Matrix = Sequence[Sequence[Any]] | np.ndarray


# --------------------------------------------------------------------------- validation


def accuracy_matrix(A: Matrix) -> np.ndarray:
    """Check ``A`` and return it as a ``T x T`` float array with ``NaN`` above the diagonal.

    Raises ``ValueError`` if ``A`` is empty, ragged or not square, if an entry on or below the
    diagonal is missing (``None``/``NaN``) or not a number, or if any evaluated entry lies
    outside ``[0, 1]``. Entries above the diagonal are ignored (set to ``NaN``).
    """
    rows = list(A)
    T = len(rows)
    if T == 0:
        raise ValueError("accuracy matrix is empty: expected T x T rows, one per learned task")
    out = np.full((T, T), np.nan)
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != T:
            raise ValueError(
                f"accuracy matrix must be square: row {i} has {len(row)} entries, expected {T}"
            )
        for j in range(i + 1):
            value = row[j]
            if value is None or isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(
                    f"accuracy matrix entry A[{i}][{j}] is {value!r}: every task j <= i must be "
                    "evaluated after learning task i"
                )
            value = float(value)
            if math.isnan(value):
                raise ValueError(f"accuracy matrix entry A[{i}][{j}] is NaN (not evaluated)")
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"accuracy matrix entry A[{i}][{j}] = {value} is outside [0, 1]: "
                    "accuracies are fractions, not percentages"
                )
            out[i, j] = value
    return out


def _counts(test_counts: Sequence[Any], T: int) -> np.ndarray:
    counts = list(test_counts)
    if len(counts) != T:
        raise ValueError(
            f"test_counts has {len(counts)} entries but the accuracy matrix has {T} tasks"
        )
    for j, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, Real) or math.isnan(float(n)) or n < 0:
            raise ValueError(f"test_counts[{j}] = {n!r}: expected a number of test rows >= 0")
    return np.asarray(counts, dtype=float)


def _step(step: int | None, T: int) -> int:
    if step is None:
        return T - 1
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < T:
        raise ValueError(f"step = {step!r} is not a learned task: expected 0 <= step < {T}")
    return int(step)


# --------------------------------------------------------------------------- accuracies


def average_accuracy(A: Matrix, step: int | None = None) -> float:
    """Mean accuracy over the tasks seen after learning task ``step`` (default: the last).

    ``AA_i = (1 / (i + 1)) * sum_{j <= i} A[i][j]`` — every task counts the same, whatever its
    size. This is the "average accuracy" of ConPET (Song et al., 2023, "ConPET: Continual
    Parameter-Efficient Tuning for Large Language Models").
    """
    a = accuracy_matrix(A)
    i = _step(step, len(a))
    return float(np.mean(a[i, : i + 1]))


def whole_accuracy(A: Matrix, test_counts: Sequence[Any], step: int | None = None) -> float:
    """Micro accuracy over every test row seen after learning task ``step`` (default: the last).

    ``WA_i = sum_{j <= i} A[i][j] * n_j / sum_{j <= i} n_j`` with ``n_j = test_counts[j]`` — each
    test row counts the same, so large tasks weigh more. This is the "whole" (total) accuracy of
    ConPET (Song et al., 2023). Raises ``ValueError`` if the seen tasks have no test rows.
    """
    a = accuracy_matrix(A)
    n = _counts(test_counts, len(a))
    i = _step(step, len(a))
    total = n[: i + 1].sum()
    if total <= 0:
        raise ValueError(f"tasks 0..{i} have no test rows: whole accuracy is undefined")
    return float(np.dot(a[i, : i + 1], n[: i + 1]) / total)


def average_accuracy_over_steps(A: Matrix) -> float:
    """Average accuracy averaged over all steps: ``(1 / T) * sum_i AA_i``.

    The "averaged over steps" variant reported by ConPET (Song et al., 2023); it rewards a
    learner that is good all along the stream, not only at the end.
    """
    a = accuracy_matrix(A)
    return float(np.mean([average_accuracy(a, i) for i in range(len(a))]))


def whole_accuracy_over_steps(A: Matrix, test_counts: Sequence[Any]) -> float:
    """Whole accuracy averaged over all steps: ``(1 / T) * sum_i WA_i`` (ConPET, Song et al. 2023)."""
    a = accuracy_matrix(A)
    return float(np.mean([whole_accuracy(a, test_counts, i) for i in range(len(a))]))


# --------------------------------------------------------------------------- forgetting


def forgetting(A: Matrix) -> float:
    """Average forgetting after the last task (Chaudhry et al., 2018, "Riemannian Walk").

    ``F = (1 / (T - 1)) * sum_{j < T-1} ( max_{j <= i <= T-2} A[i][j] - A[T-1][j] )``: for each
    old task, the drop from its best accuracy before the last task to its accuracy now. It is
    ``>= 0`` whenever no old task ends above its best earlier accuracy, and ``0.0`` when
    ``T == 1``.
    """
    a = accuracy_matrix(A)
    T = len(a)
    if T == 1:
        return 0.0
    drops = [np.max(a[j : T - 1, j]) - a[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def backward_transfer(A: Matrix) -> float:
    """Backward transfer (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory", GEM).

    ``BWT = (1 / (T - 1)) * sum_{j < T-1} ( A[T-1][j] - A[j][j] )``: how much learning later
    tasks changed the accuracy on each old task, measured from just after it was learned.
    Negative means forgetting; ``0.0`` when ``T == 1``.
    """
    a = accuracy_matrix(A)
    T = len(a)
    if T == 1:
        return 0.0
    return float(np.mean([a[T - 1, j] - a[j, j] for j in range(T - 1)]))


def learning_accuracy(A: Matrix) -> float:
    """Mean over tasks of a task's accuracy right after it was learned, ``(1 / T) * sum_j A[j][j]``:
    how well a learner learns each new task, beside how well it keeps the old ones (forgetting)."""
    a = accuracy_matrix(A)
    return float(np.mean(np.diagonal(a)))


def summarize(A: Matrix, test_counts: Sequence[Any]) -> dict[str, Any]:
    """All metrics of one accuracy matrix, as a JSON-ready dict.

    Keys: ``average_accuracy``, ``whole_accuracy`` (after the last task),
    ``average_accuracy_over_steps``, ``whole_accuracy_over_steps``, ``forgetting``, ``bwt``,
    ``learning_accuracy`` (each task right after it was learned), and
    ``average_accuracy_per_step`` / ``whole_accuracy_per_step`` (lists, one value per task).
    """
    a = accuracy_matrix(A)
    T = len(a)
    _counts(test_counts, T)
    aa = [average_accuracy(a, i) for i in range(T)]
    wa = [whole_accuracy(a, test_counts, i) for i in range(T)]
    return {
        "average_accuracy": aa[-1],
        "whole_accuracy": wa[-1],
        "average_accuracy_over_steps": float(np.mean(aa)),
        "whole_accuracy_over_steps": float(np.mean(wa)),
        "forgetting": forgetting(a),
        "bwt": backward_transfer(a),
        "learning_accuracy": learning_accuracy(a),
        "average_accuracy_per_step": aa,
        "whole_accuracy_per_step": wa,
    }


# --------------------------------------------------------------------------- seeds


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_numeric_list(x: Any) -> bool:
    """A (nested) list of numbers and ``None``s, with at least one number."""
    if not isinstance(x, (list, tuple)):
        return False
    found = False
    stack = list(x)
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif _is_number(item):
            found = True
        elif item is not None:
            return False
    return found


def _shape(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_shape(item) for item in x]
    return None


def _elementwise(values: list[Any], reduce) -> Any:
    """Apply ``reduce`` to the numbers at each position of equally shaped nested lists."""
    if isinstance(values[0], (list, tuple)):
        return [_elementwise([v[k] for v in values], reduce) for k in range(len(values[0]))]
    numbers = [float(v) for v in values if v is not None]
    return reduce(numbers) if numbers else None


def _mean(numbers: list[float]) -> float:
    return float(np.mean(numbers))


def _std(numbers: list[float]) -> float:
    return float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0


def aggregate_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and sample standard deviation) of per-seed metrics dicts.

    For every key of the per-seed dicts:

    * numbers -> their mean; an integer equal across seeds (``tunable_params``) stays that int;
    * (nested) lists of numbers, such as ``accuracy_matrix`` or ``train_seconds`` -> the
      element-wise mean, where ``None`` entries are skipped and a position that is ``None`` in
      every seed stays ``None``;
    * anything else (strings, dicts, bools) -> kept if equal across seeds, otherwise the list of
      per-seed values;
    * ``seed`` is not averaged: the seeds are listed under ``"seeds"``.

    Added keys: ``"std"`` maps every numeric scalar and every flat per-task list to its sample
    standard deviation across seeds (``ddof=1``; ``0.0`` for one seed), ``"seeds"``,
    ``"n_seeds"`` and ``"per_seed"`` (the input). Raises ``ValueError`` if ``per_seed`` is empty,
    a seed lacks a key the others have, or lists differ in shape across seeds.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds needs the metrics of at least one seed")
    keys: list[str] = []
    for d in per_seed:
        keys.extend(k for k in d if k not in keys)
    for s, d in enumerate(per_seed):
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"metrics of seed #{s} lack {missing}: every seed needs the same keys")

    out: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key in keys:
        if key == "seed":
            continue
        values = [d[key] for d in per_seed]
        if all(_is_number(v) for v in values):
            if all(isinstance(v, (int, np.integer)) for v in values) and len(set(values)) == 1:
                out[key] = int(values[0])
            else:
                out[key] = _mean([float(v) for v in values])
            std[key] = _std([float(v) for v in values])
        elif all(_is_numeric_list(v) for v in values):
            shapes = [_shape(v) for v in values]
            if any(s != shapes[0] for s in shapes):
                raise ValueError(f"'{key}' has a different shape in different seeds")
            out[key] = _elementwise(values, _mean)
            if all(not isinstance(x, (list, tuple)) for x in values[0]):
                std[key] = _elementwise(values, _std)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            out[key] = values
    out["std"] = std
    out["seeds"] = [d.get("seed", s) for s, d in enumerate(per_seed)]
    out["n_seeds"] = len(per_seed)
    out["per_seed"] = per_seed
    return out
