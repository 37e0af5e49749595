"""Pure functions over finished trials: the Pareto front, the best configuration per parameter
budget, and the median rule that prunes a trial early.

A *point* is a dict with ``accuracy`` (maximised) and any of ``params``, ``seconds`` (minimised).
"""

from __future__ import annotations

from statistics import median
from typing import Sequence

MINIMISED = ("params", "seconds")


def dominates(a: dict, b: dict, objectives: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    def key(point: dict, name: str) -> float:
        return -point[name] if name in MINIMISED else point[name]

    at_least = all(key(a, o) >= key(b, o) for o in objectives)
    return at_least and any(key(a, o) > key(b, o) for o in objectives)


def pareto_front(points: Sequence[dict], objectives: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates, by decreasing accuracy."""
    front = [i for i, p in enumerate(points)
             if not any(dominates(q, p, objectives) for j, q in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: (-points[i]["accuracy"], points[i].get("params", 0)))


def best_per_budget(points: Sequence[dict], budgets: Sequence[float]) -> dict[float, int]:
    """For each parameter budget, the index of the most accurate point within it (fewer parameters
    on a tie); budgets no point fits are left out."""
    out: dict[float, int] = {}
    for budget in budgets:
        within = [i for i, p in enumerate(points) if p["params"] <= budget]
        if within:
            out[budget] = max(within, key=lambda i: (points[i]["accuracy"], -points[i]["params"]))
    return out


def should_prune(value: float, others: Sequence[float], min_trials: int) -> bool:
    """The median rule (Optuna's ``MedianPruner``): stop a trial whose dev accuracy after a task
    is below the median of the finished trials' accuracy after the same task, once at least
    ``min_trials`` finished trials reached it."""
    return len(others) >= min_trials and value < median(others)
