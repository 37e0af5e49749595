"""Tables, summaries and plots of run directories.

A run directory holds ``DIR/metrics.json``: the dict of :func:`conpet.metrics.aggregate_seeds`
(mean over seeds, ``std``, ``seeds``, ``n_seeds``, ``per_seed``; also for one seed) plus
``"run": {"learner", "pet", "model", "benchmark", "tasks", "setting"}``. Everything here reads
that dict; nothing recomputes metrics.

Accuracies are stored as fractions and shown in percent. ``mean ± std`` (sample std across
seeds) is shown when a run has more than one seed. Missing values show as ``-``, so a table of
an older or partial run still prints.

Plots use matplotlib's object API with the Agg canvas (no ``pyplot``), so they work without a
display, never change the backend of the caller (a notebook, say) and leave no open figures.
Every file is written atomically with :mod:`conpet.runs`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from conpet.errors import ConpetError
from conpet.runs import atomic_write_bytes, atomic_write_text, read_json

__all__ = [
    "load_run",
    "metrics_table",
    "per_task_seconds_table",
    "accuracy_matrix_table",
    "summary_markdown",
    "plot_accuracy_matrix",
    "plot_accuracy_curve",
    "plot_comparison",
    "write_run_report",
]

Runs = Sequence[tuple[str, dict[str, Any]]]
MISSING = "-"

# (label, key) of the accuracy rows of the metrics table, all shown in percent.
PERCENT_ROWS = [
    ("average accuracy (%)", "average_accuracy"),
    ("whole accuracy (%)", "whole_accuracy"),
    ("avg acc over steps (%)", "average_accuracy_over_steps"),
    ("whole acc over steps (%)", "whole_accuracy_over_steps"),
    ("forgetting (%)", "forgetting"),
    ("BWT (%)", "bwt"),
]


# --------------------------------------------------------------------------- loading


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """Read the metrics of a run: ``path/metrics.json`` (or ``path`` itself if it is a file).

    Raises :class:`ConpetError` naming the path if there is no metrics file, it is not valid
    JSON, or it does not hold a JSON object.
    """
    path = Path(path)
    file = path if path.is_file() else path / "metrics.json"
    if not file.is_file():
        raise ConpetError(
            f"{path}: no metrics.json found; pass a run directory written by `conpet run`"
        )
    try:
        data = read_json(file)
    except json.JSONDecodeError as e:
        raise ConpetError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConpetError(f"{file}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise ConpetError(f"{file}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- small helpers


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _n_seeds(metrics: dict[str, Any]) -> int:
    return int(metrics.get("n_seeds", 1) or 1)


def _std(metrics: dict[str, Any], key: str) -> Any:
    std = metrics.get("std")
    return std.get(key) if isinstance(std, dict) else None


def _mean_std(mean: float | None, std: float | None, n_seeds: int, fmt: str) -> str:
    if mean is None:
        return MISSING
    text = format(mean, fmt)
    if n_seeds > 1 and std is not None:
        text += " ± " + format(std, fmt)
    return text


def _matrix(metrics: dict[str, Any]) -> np.ndarray | None:
    rows = metrics.get("accuracy_matrix")
    if not rows:
        return None
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows])


def _n_tasks(metrics: dict[str, Any]) -> int:
    for key in ("average_accuracy_per_step", "train_seconds", "accuracy_matrix"):
        if isinstance(metrics.get(key), list) and metrics[key]:
            return len(metrics[key])
    return len(_run_info(metrics).get("tasks") or [])


def _run_info(metrics: dict[str, Any]) -> dict[str, Any]:
    run = metrics.get("run")
    return run if isinstance(run, dict) else {}


def _task_names(metrics: dict[str, Any]) -> list[str]:
    T = _n_tasks(metrics)
    tasks = _run_info(metrics).get("tasks")
    if isinstance(tasks, list) and len(tasks) == T:
        return [str(t) for t in tasks]
    return [f"task {j + 1}" for j in range(T)]


def _title(metrics: dict[str, Any]) -> str:
    run = _run_info(metrics)
    head = " + ".join(str(run[k]) for k in ("learner", "pet") if run.get(k)) or "run"
    if run.get("model"):
        head += f" on {run['model']}"
    tail = [str(run["benchmark"])] if run.get("benchmark") else []
    n = _n_seeds(metrics)
    tail.append(f"mean of {n} seeds" if n > 1 else "1 seed")
    return head + "\n" + ", ".join(tail)


def _per_seed_seconds(metrics: dict[str, Any], reduce) -> list[float]:
    """``reduce`` of each seed's ``train_seconds`` list (for the std across seeds)."""
    values = []
    for seed in metrics.get("per_seed") or []:
        secs = [s for s in (seed.get("train_seconds") or []) if _number(s) is not None]
        if secs:
            values.append(float(reduce(secs)))
    return values


def _seconds_cell(metrics: dict[str, Any], reduce) -> str:
    secs = [s for s in (metrics.get("train_seconds") or []) if _number(s) is not None]
    if not secs:
        return MISSING
    per_seed = _per_seed_seconds(metrics, reduce)
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    return _mean_std(float(reduce(secs)), std, _n_seeds(metrics), ".2f")


def _ratio_cell(ratio: Any) -> str:
    r = _number(ratio)
    if r is None or r <= 0:
        return MISSING
    text = f"{r * 100:.4f}%"
    if r < 1:
        text += f" (1:{round(1 / r):,})"
    return text


def _int_cell(value: Any) -> str:
    v = _number(value)
    return MISSING if v is None else f"{round(v):,}"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)]) + "\n"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tables


def _kb_cell(values: Any) -> str:
    """Mean bytes on disk per task, in KB."""
    if not values:
        return MISSING
    return f"{np.mean([v for v in values if v is not None]) / 1024:,.0f}"


def _last_row_cell(m: dict[str, Any], key: str) -> str:
    """A per-task matrix (``selector_accuracy``, ``dev_accuracy``) after the last task, mean over
    the seen tasks (± std across seeds)."""
    def final(metrics: dict[str, Any]) -> float | None:
        rows = metrics.get(key) or []
        last = [v for v in rows[-1] if v is not None] if rows else []
        return 100 * float(np.mean(last)) if last else None

    per_seed = [final(s) for s in m.get("per_seed") or [m]]
    per_seed = [v for v in per_seed if v is not None]
    if not per_seed:
        return MISSING
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    return _mean_std(float(np.mean(per_seed)), std, len(per_seed), ".2f")


def _rows_per_second_cell(m: dict[str, Any]) -> str:
    """Training rows per second over the whole stream (replayed rows count), mean over seeds."""
    rates = []
    for seed in m.get("per_seed") or [m]:
        samples, seconds = seed.get("train_samples"), seed.get("train_seconds")
        if samples and seconds and sum(seconds) > 0:
            rates.append(sum(samples) / sum(seconds))
    return f"{np.mean(rates):.1f}" if rates else MISSING


def _metrics_rows(runs: Runs) -> list[list[str]]:
    rows = []
    for label, key in PERCENT_ROWS:
        cells = []
        for _, m in runs:
            mean, std = _number(m.get(key)), _number(_std(m, key))
            cells.append(
                _mean_std(
                    None if mean is None else 100 * mean,
                    None if std is None else 100 * std,
                    _n_seeds(m),
                    ".2f",
                )
            )
        rows.append([label, *cells])
    rows.append(["seconds per task", *(_seconds_cell(m, np.mean) for _, m in runs)])
    rows.append(["total train seconds", *(_seconds_cell(m, np.sum) for _, m in runs)])
    rows.append(["train rows per second", *(_rows_per_second_cell(m) for _, m in runs)])
    rows.append(["tunable params", *(_int_cell(m.get("tunable_params")) for _, m in runs)])
    rows.append(["storage per task (KB)", *(_kb_cell(m.get("adapter_bytes")) for _, m in runs)])
    if any(m.get("selector_accuracy") for _, m in runs):
        rows.append(["selector accuracy (%)", *(_last_row_cell(m, "selector_accuracy") for _, m in runs)])
    if any(m.get("dev_accuracy") for _, m in runs):
        rows.append(["dev average accuracy (%)", *(_last_row_cell(m, "dev_accuracy") for _, m in runs)])
    rows.append(["backbone params", *(_int_cell(m.get("backbone_params")) for _, m in runs)])
    rows.append(["tunable ratio", *(_ratio_cell(m.get("tunable_ratio")) for _, m in runs)])
    rows.append(
        [
            "peak RSS (MB)",
            *(
                _mean_std(_number(m.get("peak_rss_mb")), _number(_std(m, "peak_rss_mb")),
                          _n_seeds(m), ".1f")
                for _, m in runs
            ),
        ]
    )
    rows.append(
        ["seeds", *(f"{_n_seeds(m)} ({', '.join(str(s) for s in m.get('seeds') or [])})" for _, m in runs)]
    )
    return rows


def metrics_table(runs: Runs) -> str:
    """Plain-text table of the main metrics, one column per ``(name, metrics)`` run.

    Accuracies, forgetting and BWT are in percent; seconds per task is the mean over tasks;
    ``± std`` is across seeds and shown only for runs with several seeds.
    """
    return _text_table(["metric", *(name for name, _ in runs)], _metrics_rows(runs))


def _seconds_rows(runs: Runs) -> list[list[str]]:
    T = max((_n_tasks(m) for _, m in runs), default=0)
    names = [_task_names(m) for _, m in runs]
    rows = []
    for j in range(T):
        labels = {n[j] for n in names if j < len(n)}
        row = [labels.pop() if len(labels) == 1 else f"task {j + 1}"]
        for _, m in runs:
            secs, std = m.get("train_seconds") or [], _std(m, "train_seconds") or []
            mean = _number(secs[j]) if j < len(secs) else None
            sd = _number(std[j]) if j < len(std) else None
            row.append(_mean_std(mean, sd, _n_seeds(m), ".2f"))
        rows.append(row)
    rows.append(["total", *(_seconds_cell(m, np.sum) for _, m in runs)])
    return rows


def per_task_seconds_table(runs: Runs) -> str:
    """Plain-text table of training seconds: one row per task (plus a total), one column per run."""
    return _text_table(["task", *(name for name, _ in runs)], _seconds_rows(runs))


def _matrix_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    a = _matrix(metrics)
    if a is None:
        return ["after \\ on"], []
    names = _task_names(metrics)
    if len(names) != a.shape[1]:
        names = [f"task {j + 1}" for j in range(a.shape[1])]
    rows = [
        [names[i] if i < len(names) else f"task {i + 1}"]
        + ["." if np.isnan(v) else f"{100 * v:.1f}" for v in a[i]]
        for i in range(len(a))
    ]
    return ["after \\ on", *names], rows


def accuracy_matrix_table(metrics: dict[str, Any]) -> str:
    """The (mean) accuracy matrix as text, in percent: row = after learning that task,
    column = task evaluated; ``.`` = not evaluated (a task not learned yet)."""
    header, rows = _matrix_rows(metrics)
    if not rows:
        return "(no accuracy matrix)\n"
    return _text_table(header, rows)


def summary_markdown(metrics: dict[str, Any]) -> str:
    """A readable markdown summary of one run: what ran, the metrics, the accuracy matrix and
    the training seconds per task."""
    run = _run_info(metrics)
    name = str(run.get("learner") or "run")
    tasks = _task_names(metrics)
    lines = [f"# {_title(metrics).splitlines()[0]}", ""]
    for label, key in [("learner", "learner"), ("PET method", "pet"), ("model", "model"),
                       ("benchmark", "benchmark"), ("setting", "setting")]:
        lines.append(f"- **{label}**: {run.get(key) or MISSING}")
    lines.append(f"- **tasks** ({len(tasks)}): {', '.join(tasks) or MISSING}")
    seeds = ", ".join(str(s) for s in metrics.get("seeds") or []) or MISSING
    lines.append(f"- **seeds** ({_n_seeds(metrics)}): {seeds}")
    lines += ["", "## Metrics", ""]
    if _n_seeds(metrics) > 1:
        lines += ["Mean ± sample standard deviation across seeds.", ""]
    lines.append(_markdown_table(["metric", name], _metrics_rows([(name, metrics)])))
    lines += ["## Accuracy matrix (%)", "",
              "Row: after learning that task; column: task evaluated; `.`: not evaluated.", ""]
    header, rows = _matrix_rows(metrics)
    lines.append(_markdown_table(header, rows) if rows else "(no accuracy matrix)\n")
    lines += ["## Training seconds per task", ""]
    lines.append(_markdown_table(["task", name], _seconds_rows([(name, metrics)])))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


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
    a = _matrix(metrics)
    if a is None:
        raise ValueError("metrics have no accuracy_matrix to plot")
    import matplotlib

    T = len(a)
    names = [_short(n) for n in _task_names(metrics)]
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
    ax.set_title(_title(metrics))
    return _save(fig, path)


def plot_accuracy_curve(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """Average and whole accuracy after each task (x = number of tasks learned), in percent,
    shaded by ± one std across seeds when there are several. Returns the PNG path."""
    fig, ax = _figure(6.4, 4.2)
    std = metrics.get("std") if _n_seeds(metrics) > 1 else None
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
    T = _n_tasks(metrics)
    ax.set_xticks(range(1, T + 1) if T <= 20 else np.linspace(1, T, 10, dtype=int))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on seen tasks (%)")
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0), min(high, 100.5))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(_title(metrics))
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
        if _n_seeds(m) > 1:
            _band(left, x, y, _std(m, "average_accuracy_per_step"), f"C{k % 10}")
    T = max(_n_tasks(m) for _, m in runs)
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
        means = [100 * _or(_number(m.get(key)), np.nan) for _, m in runs]
        errs = [100 * _or(_number(_std(m, key)), 0.0) if _n_seeds(m) > 1 else 0.0
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
