"""Tables and summaries of run directories (their plots: :mod:`conpet.plots`).

A run directory holds ``DIR/metrics.json``: the dict of :func:`conpet.metrics.aggregate_seeds`
(mean over seeds, ``std``, ``seeds``, ``n_seeds``, ``per_seed``; also for one seed) plus
``"run": {"learner", "pet", "model", "benchmark", "tasks", "setting"}``. Everything here reads
that dict; nothing recomputes metrics.

Accuracies are stored as fractions and shown in percent. ``mean ± std`` (sample std across
seeds) is shown when a run has more than one seed. Missing values show as ``-``, so a table of
an older or partial run still prints.

"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from conpet.errors import ConpetError
from conpet.runs import read_json

__all__ = [
    "load_run",
    "metrics_table",
    "per_task_seconds_table",
    "accuracy_matrix_table",
    "orders_table",
    "summary_markdown",
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
    ("learning accuracy (%)", "learning_accuracy"),
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


# -- readers of a metrics dict (public: the plots read runs the same way) --------------------------------
def as_number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def n_seeds(metrics: dict[str, Any]) -> int:
    return int(metrics.get("n_seeds", 1) or 1)


def seed_std(metrics: dict[str, Any], key: str) -> Any:
    std = metrics.get("std")
    return std.get(key) if isinstance(std, dict) else None


def _mean_std(mean: float | None, std: float | None, n_seeds: int, fmt: str) -> str:
    if mean is None:
        return MISSING
    text = format(mean, fmt)
    if n_seeds > 1 and std is not None:
        text += " ± " + format(std, fmt)
    return text


def mean_matrix(metrics: dict[str, Any]) -> np.ndarray | None:
    rows = metrics.get("accuracy_matrix")
    if not rows:
        return None
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows])


def n_tasks(metrics: dict[str, Any]) -> int:
    for key in ("average_accuracy_per_step", "train_seconds", "accuracy_matrix"):
        if isinstance(metrics.get(key), list) and metrics[key]:
            return len(metrics[key])
    return len(_run_info(metrics).get("tasks") or [])


def _run_info(metrics: dict[str, Any]) -> dict[str, Any]:
    run = metrics.get("run")
    return run if isinstance(run, dict) else {}


def task_names(metrics: dict[str, Any]) -> list[str]:
    T = n_tasks(metrics)
    tasks = _run_info(metrics).get("tasks")
    if isinstance(tasks, list) and len(tasks) == T:
        return [str(t) for t in tasks]
    return [f"task {j + 1}" for j in range(T)]


def run_title(metrics: dict[str, Any]) -> str:
    run = _run_info(metrics)
    head = " + ".join(str(run[k]) for k in ("learner", "pet") if run.get(k)) or "run"
    if run.get("model"):
        head += f" on {run['model']}"
    tail = [str(run["benchmark"])] if run.get("benchmark") else []
    n = n_seeds(metrics)
    tail.append(f"mean of {n} seeds" if n > 1 else "1 seed")
    return head + "\n" + ", ".join(tail)


def _per_seed_seconds(metrics: dict[str, Any], reduce) -> list[float]:
    """``reduce`` of each seed's ``train_seconds`` list (for the std across seeds)."""
    values = []
    for seed in metrics.get("per_seed") or []:
        secs = [s for s in (seed.get("train_seconds") or []) if as_number(s) is not None]
        if secs:
            values.append(float(reduce(secs)))
    return values


def _seconds_cell(metrics: dict[str, Any], reduce) -> str:
    secs = [s for s in (metrics.get("train_seconds") or []) if as_number(s) is not None]
    if not secs:
        return MISSING
    per_seed = _per_seed_seconds(metrics, reduce)
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    return _mean_std(float(reduce(secs)), std, n_seeds(metrics), ".2f")


def _ratio_cell(ratio: Any) -> str:
    r = as_number(ratio)
    if r is None or r <= 0:
        return MISSING
    text = f"{r * 100:.4f}%"
    if r < 1:
        text += f" (1:{round(1 / r):,})"
    return text


def _int_cell(value: Any) -> str:
    v = as_number(value)
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


def _generative(runs: Runs) -> bool:
    """Every run is of a generative stream (its matrix holds each task's primary metric)."""
    return bool(runs) and all("task_metric" in m for _, m in runs)


def _score_label(label: str, generative: bool) -> str:
    return label.replace("accuracy", "score").replace("acc ", "score ") if generative else label


def _metric_names(m: dict) -> str:
    names = m.get("task_metric") or []
    return ", ".join(dict.fromkeys(names if isinstance(names[0], str) else names[0])) if names else "-"


def _metrics_rows(runs: Runs) -> list[list[str]]:
    rows = []
    generative = _generative(runs)
    if generative:
        rows.append(["score = task's metric", *(_metric_names(m) for _, m in runs)])
    for label, key in PERCENT_ROWS:
        cells = []
        for _, m in runs:
            mean, std = as_number(m.get(key)), as_number(seed_std(m, key))
            cells.append(
                _mean_std(
                    None if mean is None else 100 * mean,
                    None if std is None else 100 * std,
                    n_seeds(m),
                    ".2f",
                )
            )
        rows.append([_score_label(label, generative), *cells])
    if generative:
        rows.append(["reference ppl: base -> last", *(_perplexity_cell(m) for _, m in runs)])
        for key, label in (("score_exact_match", "final exact match (%)"), ("score_chrf", "final chrF (%)")):
            if any(m.get(key) for _, m in runs):
                rows.append([label, *(_last_row_cell(m, key) for _, m in runs)])
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
                _mean_std(as_number(m.get("peak_rss_mb")), as_number(seed_std(m, "peak_rss_mb")),
                          n_seeds(m), ".1f")
                for _, m in runs
            ),
        ]
    )
    rows.append(
        ["seeds", *(f"{n_seeds(m)} ({', '.join(str(s) for s in m.get('seeds') or [])})" for _, m in runs)]
    )
    return rows


def _perplexity_cell(m: dict) -> str:
    base, after = as_number(m.get("base_reference_perplexity")), m.get("reference_perplexity") or []
    last = as_number(after[-1]) if after else None
    return "-" if base is None or last is None else f"{base:.2f} -> {last:.2f}"


def orders_table(runs: list[tuple[str, dict]]) -> str:
    """Plain-text table of :func:`conpet.runner.run_orders` summaries, one column per run:
    mean ± std over task orders (accuracy-like keys in percent)."""
    keys = list(dict.fromkeys(k for _, s in runs for k in s["over_orders"]))
    rows = []
    for key in keys:
        row = [key.replace("_", " ") + (" (%)" if key != "reference_perplexity" else "")]
        for _, summary in runs:
            cell = summary["over_orders"].get(key)
            scale = 1 if key == "reference_perplexity" else 100
            row.append("-" if cell is None else _mean_std(scale * cell["mean"], scale * cell["std"], cell["n"], ".2f"))
        rows.append(row)
    rows.append(["orders x seeds", *(f"{s['n_orders']} x {s['orders'][0]['n_seeds']}" for _, s in runs)])
    return _text_table(["over task orders", *(name for name, _ in runs)], rows)


def metrics_table(runs: Runs) -> str:
    """Plain-text table of the main metrics, one column per ``(name, metrics)`` run.

    Accuracies, forgetting and BWT are in percent; seconds per task is the mean over tasks;
    ``± std`` is across seeds and shown only for runs with several seeds.
    """
    return _text_table(["metric", *(name for name, _ in runs)], _metrics_rows(runs))


def _seconds_rows(runs: Runs) -> list[list[str]]:
    T = max((n_tasks(m) for _, m in runs), default=0)
    names = [task_names(m) for _, m in runs]
    rows = []
    for j in range(T):
        labels = {n[j] for n in names if j < len(n)}
        row = [labels.pop() if len(labels) == 1 else f"task {j + 1}"]
        for _, m in runs:
            secs, std = m.get("train_seconds") or [], seed_std(m, "train_seconds") or []
            mean = as_number(secs[j]) if j < len(secs) else None
            sd = as_number(std[j]) if j < len(std) else None
            row.append(_mean_std(mean, sd, n_seeds(m), ".2f"))
        rows.append(row)
    rows.append(["total", *(_seconds_cell(m, np.sum) for _, m in runs)])
    return rows


def per_task_seconds_table(runs: Runs) -> str:
    """Plain-text table of training seconds: one row per task (plus a total), one column per run."""
    return _text_table(["task", *(name for name, _ in runs)], _seconds_rows(runs))


def _matrix_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    a = mean_matrix(metrics)
    if a is None:
        return ["after \\ on"], []
    names = task_names(metrics)
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
    tasks = task_names(metrics)
    lines = [f"# {run_title(metrics).splitlines()[0]}", ""]
    for label, key in [("learner", "learner"), ("PET method", "pet"), ("model", "model"),
                       ("benchmark", "benchmark"), ("setting", "setting")]:
        lines.append(f"- **{label}**: {run.get(key) or MISSING}")
    lines.append(f"- **tasks** ({len(tasks)}): {', '.join(tasks) or MISSING}")
    seeds = ", ".join(str(s) for s in metrics.get("seeds") or []) or MISSING
    lines.append(f"- **seeds** ({n_seeds(metrics)}): {seeds}")
    lines += ["", "## Metrics", ""]
    if n_seeds(metrics) > 1:
        lines += ["Mean ± sample standard deviation across seeds.", ""]
    lines.append(_markdown_table(["metric", name], _metrics_rows([(name, metrics)])))
    lines += ["## Accuracy matrix (%)", "",
              "Row: after learning that task; column: task evaluated; `.`: not evaluated.", ""]
    header, rows = _matrix_rows(metrics)
    lines.append(_markdown_table(header, rows) if rows else "(no accuracy matrix)\n")
    lines += ["## Training seconds per task", ""]
    lines.append(_markdown_table(["task", name], _seconds_rows([(name, metrics)])))
    return "\n".join(lines)
