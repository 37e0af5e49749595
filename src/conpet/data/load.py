"""Load the stream a :class:`conpet.config.DataConfig` describes: a built-in benchmark, or rows
from a file split into tasks by a task file or at random."""

from __future__ import annotations

from pathlib import Path

from conpet.config import DataConfig, task_slice
from conpet.data.benchmarks import load_benchmark
from conpet.data.formats import build_stream, build_task_stream, read_rows, read_task_file, split_labels
from conpet.data.stream import Stream, reorder_tasks, seal_test, slice_tasks
from conpet.data.templates import infer_kind
from conpet.errors import DataError, read_user_text


def load_stream(data_cfg: DataConfig) -> Stream:
    """Build the stream described by a :class:`conpet.config.DataConfig` (tasks in
    ``data.task_order`` when it is set)."""
    stream = _load_stream(data_cfg)
    if data_cfg.task_order:
        stream = reorder_tasks(stream, data_cfg.task_order)
    if data_cfg.task_slice:
        stream = slice_tasks(stream, task_slice(data_cfg.task_slice))
    return seal_test(stream) if data_cfg.eval_split == "dev" else stream


def _load_stream(data_cfg: DataConfig) -> Stream:
    if data_cfg.file is None:
        stream = load_benchmark(data_cfg.benchmark, max_train_per_class=data_cfg.max_train_per_class)
        if data_cfg.template not in ("auto", stream.kind):
            stream.kind = data_cfg.template
        return stream
    path = Path(data_cfg.file)
    rows = read_rows(path)
    if rows[0].target is not None:
        return _generative_stream(path, rows, data_cfg)
    named = [r for r in rows if r.task is not None]
    if named:
        if len(named) != len(rows):
            other = next(r for r in rows if (r.task is None) != (rows[0].task is None))
            raise DataError(f"{other.where}: {'no' if other.task is None else 'a'} field 'task' here, but "
                            f"{'every' if other.task is None else 'no'} row before it has one: name the task "
                            f"of every row or of none")
        if data_cfg.n_tasks:
            raise DataError(f"{path}: the rows name their task (field 'task'); drop --n-tasks")
        kind = infer_kind(rows) if data_cfg.template == "auto" else data_cfg.template
        names, source = _task_order(path, [r.task for r in rows], data_cfg)
        return build_task_stream(path.stem, rows, names, kind, source, data_cfg.max_train_per_class,
                                 data_cfg.split_seed)
    if data_cfg.tasks:
        groups = read_task_file(data_cfg.tasks)
        source = str(data_cfg.tasks)
    elif data_cfg.n_tasks:
        groups = split_labels(sorted({r.label for r in rows}), data_cfg.n_tasks, data_cfg.split_seed)
        source = f"--n-tasks {data_cfg.n_tasks}"
    else:
        raise DataError(f"{path}: give a task file (--tasks FILE) or a number of tasks (--n-tasks N)")
    kind = infer_kind(rows) if data_cfg.template == "auto" else data_cfg.template
    if kind == "generate":
        raise DataError(f"{path}: data.template generate needs rows with prompt and target")
    return build_stream(path.stem, rows, groups, kind, source, data_cfg.max_train_per_class, data_cfg.split_seed)


def _generative_stream(path: Path, rows, data_cfg: DataConfig) -> Stream:
    """Tasks from the rows' ``task`` field, in order of first appearance, or in the order of a
    task file listing the task names (each task is one group: ``[[t1], [t2]]`` or ``[t1, t2]``)."""
    if data_cfg.n_tasks:
        raise DataError(f"{path}: generative rows name their task (field 'task'); drop --n-tasks")
    if data_cfg.template not in ("auto", "generate"):
        raise DataError(f"{path}: rows with prompt/target are a generative stream; data.template "
                        f"'{data_cfg.template}' is for classification")
    names, source = _task_order(path, [r.label for r in rows], data_cfg)
    return build_stream(path.stem, rows, [(name, [name]) for name in names], "generate", source,
                        data_cfg.max_train_per_class, data_cfg.split_seed)


def _task_order(path: Path, row_tasks: list[str], data_cfg: DataConfig) -> tuple[list[str], str]:
    """Task names from the rows' ``task`` field, in order of first appearance, or in the order of
    a task file listing them (``[[t1], [t2]]`` or ``[t1, t2]``); and where the order came from."""
    names = list(dict.fromkeys(row_tasks))
    if not data_cfg.tasks:
        return names, "the rows' task field"
    groups = read_task_file(data_cfg.tasks)
    order = [label for _, labels in groups for label in labels]
    unknown = [t for t in order if t not in names]
    if unknown:
        raise DataError(f"{data_cfg.tasks}: task '{unknown[0]}' has no rows in {path}")
    missing = [t for t in names if t not in order]
    if missing:
        raise DataError(f"{data_cfg.tasks}: task '{missing[0]}' of {path} is in no group of the task file")
    return order, str(data_cfg.tasks)


REFERENCE_ROWS = 300
"""Sentences in the built-in reference text (about 5,000 SmolLM2 tokens)."""


def reference_text(path: str | None = None) -> str:
    """The text whose perplexity tracks general ability after every task of a generative stream:
    the file ``path`` (UTF-8), or the built-in sample: the first 300 distinct example sentences of
    WordNet 3.0 (``wordnet-typing``'s rows, real English; WordNet licence in the package)."""
    if path is not None:
        text = read_user_text(path, "reference text", DataError)
        if not text.strip():
            raise DataError(f"{path}: the reference text is empty")
        return text
    rows = load_benchmark("wordnet-typing").rows
    return "\n".join(list(dict.fromkeys(r.text for r in rows))[:REFERENCE_ROWS])
