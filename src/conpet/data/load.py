"""Load the stream a :class:`conpet.config.DataConfig` describes: a built-in benchmark, or rows
from a file split into tasks by a task file or at random."""

from __future__ import annotations

from pathlib import Path

from conpet.config import DataConfig
from conpet.data.benchmarks import load_benchmark
from conpet.data.formats import build_stream, read_rows, read_task_file, split_labels
from conpet.data.stream import Stream
from conpet.data.templates import infer_kind
from conpet.errors import DataError


def load_stream(data_cfg: DataConfig) -> Stream:
    """Build the stream described by a :class:`conpet.config.DataConfig`."""
    if data_cfg.file is None:
        stream = load_benchmark(data_cfg.benchmark, max_train_per_class=data_cfg.max_train_per_class)
        if data_cfg.template not in ("auto", stream.kind):
            stream.kind = data_cfg.template
        return stream
    path = Path(data_cfg.file)
    rows = read_rows(path)
    if data_cfg.tasks:
        groups = read_task_file(data_cfg.tasks)
        source = str(data_cfg.tasks)
    elif data_cfg.n_tasks:
        groups = split_labels(sorted({r.label for r in rows}), data_cfg.n_tasks, data_cfg.split_seed)
        source = f"--n-tasks {data_cfg.n_tasks}"
    else:
        raise DataError(f"{path}: give a task file (--tasks FILE) or a number of tasks (--n-tasks N)")
    kind = infer_kind(rows) if data_cfg.template == "auto" else data_cfg.template
    return build_stream(path.stem, rows, groups, kind, source, data_cfg.max_train_per_class, data_cfg.split_seed)
