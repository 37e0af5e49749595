"""Plots of run directories, and the report files a run directory gets (``summary.md`` + plots).

Plots use matplotlib's object API with the Agg canvas (no ``pyplot``), so they work without a
display, never change the backend of the caller (a notebook, say) and leave no open figures.
Every file is written atomically with :mod:`conpet.runs`. The numbers come from the run's
``metrics.json`` through the readers of :mod:`conpet.report`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from conpet.report import (Runs, as_number, mean_matrix, n_seeds, n_tasks, run_title, seed_std, summary_markdown,
                           task_names)
from conpet.runs import atomic_write_bytes, atomic_write_text

__all__ = ["plot_accuracy_matrix", "plot_accuracy_curve", "plot_comparison", "write_run_report"]


def _figure(width: float, height: float, ncols: int = 1, **kw):
    """A figure on an Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, **kw)
    return fig, axes


def _save(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    fig.clear()
    return atomic_write_bytes(path, buf.getvalue())


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _short(label: str, n: int = 16) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _band(ax, x, mean: np.ndarray, std: Any, color) -> None:
    if isinstance(std, list) and len(std) == len(mean):
        sd = 100 * np.array([np.nan if s is None else s for s in std], dtype=float)
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)


def _per_step(metrics: dict[str, Any], key: str) -> np.ndarray:
    values = metrics.get(key) or []
    return 100 * np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_accuracy_matrix(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Heatmap of the (mean) accuracy matrix in percent: row = after learning task i, column =
    task j; cells are annotated, tasks not evaluated yet are blank. Returns the PNG path."""
    a = mean_matrix(metrics)
    if a is None:
        raise ValueError("metrics have no accuracy_matrix to plot")
    import matplotlib

    T = len(a)
    names = [_short(n) for n in task_names(metrics)]
    if len(names) != T:
        names = [f"task {j + 1}" for j in range(T)]
    size = min(4 + 0.6 * T, 16)
    fig, ax = _figure(size + 1.2, size)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(100 * a), cmap=cmap, vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    if T <= 20:
        fontsize = 9 if T <= 8 else 7
        for i in range(T):
            for j in range(T):
                if not np.isnan(a[i, j]):
                    v = 100 * a[i, j]
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=fontsize,
                            color="black" if v >= 60 else "white")
    ax.set_xticks(range(T), names, rotation=45 if T > 4 else 0, ha="right" if T > 4 else "center")
    ax.set_yticks(range(T), names)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title(run_title(metrics))
    return _save(fig, path)


def plot_accuracy_curve(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Average and whole accuracy after each task (x = number of tasks learned), in percent,
    shaded by ± one std across seeds when there are several. Returns the PNG path."""
    fig, ax = _figure(6.4, 4.2)
    std = metrics.get("std") if n_seeds(metrics) > 1 else None
    for key, label, color, style in [
        ("average_accuracy_per_step", "average accuracy", "C0", dict(marker="o")),
        ("whole_accuracy_per_step", "whole accuracy", "C1", dict(marker="s", linestyle="--")),
    ]:
        y = _per_step(metrics, key)
        if not len(y):
            continue
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color=color, label=f"{label} (final {y[-1]:.1f}%)", **style)
        if std:
            _band(ax, x, y, std.get(key), color)
    T = n_tasks(metrics)
    ax.set_xticks(range(1, T + 1) if T <= 20 else np.linspace(1, T, 10, dtype=int))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on seen tasks (%)")
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0), min(high, 100.5))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(run_title(metrics))
    return _save(fig, path)


def plot_comparison(runs: Runs, path: str | os.PathLike) -> Path:
    """Compare runs: left, average accuracy after each task (one line per run, ± std band);
    right, bars of final average and whole accuracy (± std). Returns the PNG path."""
    if not runs:
        raise ValueError("plot_comparison needs at least one run")
    fig, (left, right) = _figure(11, 4.5, ncols=2, width_ratios=[3, 2])
    for k, (name, m) in enumerate(runs):
        y = _per_step(m, "average_accuracy_per_step")
        if not len(y):
            continue
        x = np.arange(1, len(y) + 1)
        left.plot(x, y, marker="o", color=f"C{k % 10}", label=name)
        if n_seeds(m) > 1:
            _band(left, x, y, seed_std(m, "average_accuracy_per_step"), f"C{k % 10}")
    T = max(n_tasks(m) for _, m in runs)
    left.set_xticks(range(1, T + 1) if T <= 20 else np.linspace(1, T, 10, dtype=int))
    left.set_xlabel("tasks learned")
    left.set_ylabel("average accuracy (%)")
    left.grid(alpha=0.3)
    left.legend()
    left.set_title("average accuracy after each task")

    x = np.arange(len(runs))
    width = 0.38
    for offset, key, label in [(-width / 2, "average_accuracy", "average"),
                               (width / 2, "whole_accuracy", "whole")]:
        means = [100 * _or(as_number(m.get(key)), np.nan) for _, m in runs]
        errs = [100 * _or(as_number(seed_std(m, key)), 0.0) if n_seeds(m) > 1 else 0.0
                for _, m in runs]
        bars = right.bar(x + offset, means, width, yerr=errs, capsize=3, label=label)
        right.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    right.set_xticks(x, [_short(name, 20) for name, _ in runs],
                     rotation=30 if len(runs) > 3 else 0, ha="right" if len(runs) > 3 else "center")
    right.set_ylim(0, 118)
    right.set_yticks(range(0, 101, 20))
    right.set_ylabel("final accuracy (%)")
    right.legend(loc="upper center", ncols=2)
    right.set_title("after the last task")
    return _save(fig, path)


def write_run_report(run_dir: str | os.PathLike, metrics: dict[str, Any]) -> list[Path]:
    """Write ``summary.md``, ``accuracy_matrix.png`` and ``accuracy_curve.png`` into
    ``run_dir`` (atomically) and return their paths."""
    run_dir = Path(run_dir)
    text = summary_markdown(metrics)
    text += "\n## Plots\n\n![accuracy matrix](accuracy_matrix.png)\n\n"
    text += "![accuracy after each task](accuracy_curve.png)\n"
    return [
        atomic_write_text(run_dir / "summary.md", text),
        plot_accuracy_matrix(metrics, run_dir / "accuracy_matrix.png"),
        plot_accuracy_curve(metrics, run_dir / "accuracy_curve.png"),
    ]
