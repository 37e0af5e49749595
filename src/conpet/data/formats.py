"""Read rows (JSONL or CSV, optionally gzipped; Parquet; a folder saved by Hugging Face
``datasets``) and task files, validate them, build a Stream.

Every problem is a :class:`DataError` whose message starts with ``file:line`` (or ``file``)
and says what is wrong; nothing is written anywhere before the data has been validated.

Row fields: ``text`` and ``label`` (required), ``split`` (``train``/``dev``/``test``; all rows
or none), ``entity``, ``head``, ``tail`` (a string, or ``[start, end]`` character offsets into
``text``), ``id``. Other fields are kept out of the way (ignored).

Task file: JSON or YAML, either a list of label groups ``[["a", "b"], ["c"]]`` or a mapping
``{task name: [labels]}``. Without a task file, ``n_tasks`` splits the labels at random (seeded).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path
from typing import Any, Iterator

import yaml

from conpet.data.stream import SPLITS, Row, Stream, Task
from conpet.errors import DataError, closest, read_user_text, warn

SPLIT_ALIASES = {"train": "train", "dev": "dev", "valid": "dev", "validation": "dev", "val": "dev", "test": "test"}
AUTO_SPLIT = (0.7, 0.1, 0.2)
"""Train/dev/test fractions per class when rows carry no ``split``."""
MAX_LINE_BYTES = 1_000_000


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")  # a BOM is read, not refused


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext in (".csv", ".tsv"):
        return ext[1:]
    if ext == ".parquet" and path.suffix.lower() != ".gz":
        return "parquet"
    raise DataError(f"{path}: unknown data format '{ext or path.name}' (use .jsonl, .csv (optionally .gz), "
                    f".parquet, or a folder saved by Hugging Face datasets' save_to_disk)")


def _pyarrow(path: Path):
    try:
        import pyarrow  # noqa: F401  (optional: only Parquet and datasets folders need it)
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading Parquet or a datasets folder needs pyarrow: "
                        f"pip install 'conpet[data]' (or pip install pyarrow)") from None
    return pyarrow


def is_datasets_folder(path: Path) -> bool:
    """A folder written by Hugging Face ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _datasets_json(path: Path) -> dict:
    try:
        value = json.loads(read_user_text(path, "datasets metadata file", DataError))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def _arrow_records(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, where) of every row of a Parquet file or a saved ``datasets`` folder, read with
    pyarrow (no ``datasets`` import). ``where`` is ``file:row`` (1-based). A ``DatasetDict``'s
    split folders (``train``, ``validation``/``dev``, ``test``) give rows without ``split`` theirs."""
    pa = _pyarrow(path)
    if path.is_file():
        try:
            table = pa.parquet.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read Parquet: {e}") from None
        for k, record in enumerate(table.to_pylist(), 1):
            yield record, f"{path}:{k}"
        return
    if (path / "dataset_dict.json").is_file():
        splits = _datasets_json(path / "dataset_dict.json").get("splits", [])
        folders = [(path / name, name) for name in splits]
    else:
        folders = [(path, None)]
    for folder, split_name in folders:
        split = None
        if split_name is not None:
            split = SPLIT_ALIASES.get(split_name.lower())
            if split is None:
                raise DataError(f"{folder}: split '{split_name}' is not train, validation/dev or test; "
                                f"save only those splits, or give rows a 'split' field")
        state = folder / "state.json"
        if not state.is_file():
            raise DataError(f"{folder}: not a saved datasets split (no state.json)")
        files = [f["filename"] for f in _datasets_json(state).get("_data_files", [])]
        for name in files:
            try:
                with pa.memory_map(str(folder / name)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{folder / name}: cannot read the Arrow file: {e}") from None
            for k, record in enumerate(table.to_pylist(), 1):
                if split is not None and record.get("split") in (None, ""):
                    record["split"] = split
                yield record, f"{folder / name}:{k}"


def _span(value: Any, text: str, name: str, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        start, end = value
        if not 0 <= start < end <= len(text):
            raise DataError(f"{where}: field '{name}' span {list(value)} is outside the text (length {len(text)})")
        return text[start:end]
    raise DataError(f"{where}: field '{name}' must be a string or [start, end] offsets, got {value!r}")


KNOWN_FIELDS = ("text", "label", "split", "entity", "head", "tail", "id",
                "prompt", "target", "instruction", "input", "output", "task", "answers")
GENERATIVE_FIELDS = ("prompt", "target", "instruction", "output")


def _check_fields(record: dict[str, Any], where: str) -> None:
    """A field that looks like a misspelt known field is an error (its data would be lost);
    other extra fields are metadata and are ignored."""
    for name in record:
        if name in KNOWN_FIELDS or not isinstance(name, str):
            continue
        close = closest(name.lower(), KNOWN_FIELDS)
        if close and name.lower() != close:
            raise DataError(f"{where}: unknown field '{name}' (did you mean '{close}'?)")
        if name.lower() in KNOWN_FIELDS:
            raise DataError(f"{where}: unknown field '{name}' (field names are lower case: '{name.lower()}')")


def _text_field(record: dict[str, Any], name: str, where: str) -> str | None:
    value = record.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _generative_row(record: dict[str, Any], where: str, require_target: bool) -> Row:
    """``prompt`` + ``target``, or ``instruction`` (+ ``input``) + ``output``; ``task`` names the task."""
    prompt, instruction = _text_field(record, "prompt", where), _text_field(record, "instruction", where)
    if prompt is not None and instruction is not None:
        raise DataError(f"{where}: give 'prompt' or 'instruction' (+ 'input'), not both")
    if prompt is None:
        if instruction is None:
            raise DataError(f"{where}: a generative row needs 'prompt' (or 'instruction')")
        extra = _text_field(record, "input", where)
        prompt = instruction if extra is None else f"{instruction}\n\n{extra}"
    target, output = _text_field(record, "target", where), _text_field(record, "output", where)
    if target is not None and output is not None:
        raise DataError(f"{where}: give 'target' or 'output', not both")
    target = target if target is not None else output
    if target is None and require_target:
        raise DataError(f"{where}: the row has a prompt but no target (field 'target' or 'output')")
    task = record.get("task")
    if task is None or task == "":
        if require_target:
            raise DataError(f"{where}: a generative row needs field 'task' (the name of its task)")
        task = "?"
    if "label" in record and record["label"] not in (None, ""):
        raise DataError(f"{where}: a generative row has no 'label' (its task is field 'task')")
    answers = record.get("answers")
    if answers is not None:
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
        if target is not None and target not in answers:
            answers = [target, *answers]
    split = _split_of(record, where)
    rid = record.get("id")
    return Row(text=prompt, label=str(task).strip(), split=split, id=None if rid is None else str(rid),
               target=target, answers=tuple(answers) if answers else None, where=where)


def _split_of(record: dict[str, Any], where: str) -> str | None:
    split = record.get("split")
    if split in (None, ""):
        return None
    if not isinstance(split, str) or split.lower() not in SPLIT_ALIASES:
        raise DataError(f"{where}: field 'split' must be one of train, dev, test; got {split!r}")
    return SPLIT_ALIASES[split.lower()]


def _make_row(record: dict[str, Any], where: str, require_label: bool = True) -> Row:
    _check_fields(record, where)
    if any(record.get(name) not in (None, "") for name in GENERATIVE_FIELDS):
        return _generative_row(record, where, require_target=require_label)
    task = record.get("task")
    if task not in (None, "") and not isinstance(task, (str, int)):
        raise DataError(f"{where}: field 'task' must be a string, got {type(task).__name__}")
    if not require_label and record.get("label") in (None, ""):
        record = {**record, "label": "?"}
    for name in ("text", "label"):
        if name not in record or record[name] is None or record[name] == "":
            raise DataError(f"{where}: missing field '{name}'")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    label = record["label"]
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        raise DataError(f"{where}: field 'label' must be a string, got {type(label).__name__}")
    split = _split_of(record, where)
    rid = record.get("id")
    return Row(
        text=text,
        label=label.strip(),
        task=None if task in (None, "") else str(task).strip(),
        split=split,
        entity=_span(record.get("entity"), text, "entity", where),
        head=_span(record.get("head"), text, "head", where),
        tail=_span(record.get("tail"), text, "tail", where),
        id=None if rid is None else str(rid),
        where=where,
    )


def _read_text_rows(path: Path, fmt: str, require_label: bool) -> list[Row]:
    """Rows of a JSONL or CSV/TSV file, each error naming its line."""
    rows: list[Row] = []
    try:
        with _open_text(path) as f:
            if fmt == "jsonl":
                for lineno, line in enumerate(f, 1):
                    if len(line) > MAX_LINE_BYTES:
                        raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} characters")
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                    rows.append(_make_row(record, f"{path}:{lineno}", require_label))
            else:
                reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",", strict=True)
                if reader.fieldnames is None:
                    raise DataError(f"{path}: empty file (expected a header line with text,label)")
                generative = any(c in reader.fieldnames for c in ("prompt", "instruction"))
                needed = ("prompt" if "prompt" in reader.fieldnames else "instruction", "task") if generative \
                    else ("text", "label")
                missing = [c for c in needed[: 2 if require_label else 1] if c not in reader.fieldnames]
                if missing:
                    raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
                while True:
                    before = reader.line_num
                    try:
                        record = next(reader)
                    except StopIteration:
                        break
                    except csv.Error as e:
                        raise DataError(f"{path}:{before + 1}: {e} (an unbalanced quote?)") from None
                    if reader.line_num - before > 1:
                        # a quoted field ran over the end of its line: almost always an unbalanced
                        # quote, which would otherwise swallow the lines after it into one row
                        raise DataError(f"{path}:{before + 1}: a quoted field runs on to line {reader.line_num} "
                                        f"(an unbalanced quote?); CSV rows must be one line each: quote "
                                        f"fields whole, double quotes inside them (\"\"), or use JSONL for texts "
                                        f"with line breaks")
                    if None in record:
                        raise DataError(f"{path}:{reader.line_num}: more values than header columns")
                    rows.append(_make_row(record, f"{path}:{reader.line_num}", require_label))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, csv.Error) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    return rows


def read_rows(path: str | Path, require_label: bool = True) -> list[Row]:
    """Read and validate a data file: JSONL or CSV (``.gz`` allowed), Parquet, or a folder saved by
    Hugging Face ``datasets`` (``save_to_disk``; read with pyarrow, the ``conpet[data]`` extra).

    ``require_label=False`` reads rows to predict (their label, if any, is kept)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir() and not is_datasets_folder(path):
        raise DataError(f"{path}: a folder, but not one saved by Hugging Face datasets (no state.json or "
                        f"dataset_dict.json); give a .jsonl, .csv or .parquet file")
    if not path.is_file() and not path.is_dir():
        raise DataError(f"{path}: not a file")
    fmt = "datasets" if path.is_dir() else _format_of(path)
    if fmt in ("parquet", "datasets"):
        rows = [_make_row(record, where, require_label) for record, where in _arrow_records(path)]
    else:
        rows = _read_text_rows(path, fmt, require_label)
    if not rows:
        raise DataError(f"{path}: no rows (empty file)")
    first_of_id: dict[str, str] = {}
    for r in rows:
        if r.id is not None:
            if r.id in first_of_id:
                raise DataError(f"{r.where}: duplicate id '{r.id}' (first used at {first_of_id[r.id]})")
            first_of_id[r.id] = r.where
    if require_label and len({r.target is not None for r in rows}) > 1:
        first = next(r for r in rows if (r.target is not None) != (rows[0].target is not None))
        raise DataError(f"{first.where}: this row is {'generative (prompt/target)' if first.target is not None else 'a classification row (text/label)'} "
                        f"but {rows[0].where} is not: a stream has one kind of task")
    with_split = sum(r.split is not None for r in rows)
    if 0 < with_split < len(rows):
        first = next(r for r in rows if r.split is None)
        raise DataError(f"{first.where}: field 'split' is missing here but set on other rows (set it on all rows or none)")
    return rows


def read_task_file(path: str | Path) -> list[tuple[str, list[str]]]:
    """Read a task file: a list of label groups (``[[a, b], [c]]``), a mapping task name ->
    labels, or a flat list of names (``[t1, t2]``: one label, or one generative task, per task).
    A single name where a group is expected is that one-name group."""
    path = Path(path)
    text = read_user_text(path, "task file", DataError, encoding="utf-8-sig")
    try:
        value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        line = getattr(e, "lineno", None) or (getattr(getattr(e, "problem_mark", None), "line", -1) + 1)
        raise DataError(f"{path}:{line}: cannot parse task file: {getattr(e, 'msg', None) or e}") from None
    if isinstance(value, dict) and "tasks" in value and isinstance(value["tasks"], (list, dict)):
        value = value["tasks"]
    if isinstance(value, dict):
        groups = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        groups = [(f"task-{i + 1:02d}", v) for i, v in enumerate(value)]
    else:
        raise DataError(f"{path}: expected a list of label lists or a mapping task -> labels")
    if not groups:
        raise DataError(f"{path}: no tasks")
    out = []
    for name, labels in groups:
        if isinstance(labels, (str, int)) and not isinstance(labels, bool):
            labels = [labels]
        if not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels):
            raise DataError(f"{path}: task '{name}' must be a label or a list of labels")
        if not labels:
            raise DataError(f"{path}: task '{name}' is empty (no labels)")
        out.append((name, [str(x).strip() for x in labels]))
    return out


def split_labels(labels: list[str], n_tasks: int, seed: int) -> list[tuple[str, list[str]]]:
    """Shuffle labels with ``seed`` and deal them into ``n_tasks`` groups of near-equal size."""
    if n_tasks > len(labels):
        raise DataError(f"--n-tasks {n_tasks}: more tasks than labels ({len(labels)})")
    order = sorted(labels)
    random.Random(seed).shuffle(order)
    base, extra = divmod(len(order), n_tasks)
    groups, start = [], 0
    for i in range(n_tasks):
        size = base + (1 if i < extra else 0)
        groups.append((f"task-{i + 1:02d}", order[start:start + size]))
        start += size
    return groups


def _assign_splits(rows: list[Row], seed: int) -> list[Row]:
    """Give rows without a split a per-class 70/10/20 train/dev/test split (seeded); rows that
    name their task are split per (task, class)."""
    by_label: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        by_label.setdefault((r.task or "", r.label), []).append(i)
    rng = random.Random(seed)
    split_of = {}
    for label in sorted(by_label):
        idx = by_label[label][:]
        rng.shuffle(idx)
        n = len(idx)
        n_test = max(1, round(n * AUTO_SPLIT[2])) if n >= 3 else 0
        n_dev = max(1, round(n * AUTO_SPLIT[1])) if n >= 5 else 0
        for k, i in enumerate(idx):
            split_of[i] = "test" if k < n_test else "dev" if k < n_test + n_dev else "train"
    from dataclasses import replace
    return [replace(r, split=split_of[i]) for i, r in enumerate(rows)]


def _index_rows(rows: list[Row], tasks: list[Task], task_of, class_of, max_train_per_class: int | None) -> None:
    """Append every row's index to its task's split (``task_of(row)``: the task's position),
    keeping at most ``max_train_per_class`` training rows per ``class_of(row)``."""
    per_class_train: dict = {}
    for i, r in enumerate(rows):
        if r.split == "train" and max_train_per_class is not None:
            key = class_of(r)
            if per_class_train.get(key, 0) >= max_train_per_class:
                continue
            per_class_train[key] = per_class_train.get(key, 0) + 1
        tasks[task_of(r)].split(r.split).append(i)


def _require_train_and_test(task: Task, task_source: str) -> None:
    for split in ("train", "test"):
        if not task.split(split):
            raise DataError(f"{task_source}: task '{task.name}' has no {split} rows")


def build_task_stream(name: str, rows: list[Row], task_names: list[str], kind: str, task_source: str,
                      max_train_per_class: int | None = None, seed: int = 0) -> Stream:
    """A stream whose rows name their task (field ``task``): each task holds its rows, its labels
    in order of first appearance; tasks may share labels (the domain-incremental setting)."""
    if rows and rows[0].split is None:
        rows = _assign_splits(rows, seed)
    position = {n: t for t, n in enumerate(task_names)}
    labels: list[dict[str, None]] = [{} for _ in task_names]
    for r in rows:
        labels[position[r.task]].setdefault(r.label)
    tasks = [Task(name=n, labels=tuple(labels[t])) for t, n in enumerate(task_names)]
    _index_rows(rows, tasks, lambda r: position[r.task], lambda r: (r.task, r.label), max_train_per_class)
    for task in tasks:
        _require_train_and_test(task, task_source)
        _warn_untested(rows, task.train, task.test, f"task '{task.name}' ({task_source})")
    return Stream(name=name, kind=kind, rows=rows, tasks=tasks)


def _warn_untested(rows: list[Row], train: list[int], test: list[int], where: str) -> None:
    """One warning naming the data file, line and label of the first label that has training
    rows but no test rows among ``train``/``test``: its accuracy could never be measured."""
    tested = {rows[i].label for i in test}
    first: dict[str, int] = {}
    for i in train:
        if rows[i].label not in tested:
            first.setdefault(rows[i].label, i)
    if not first:
        return
    label, i = next(iter(first.items()))
    count = sum(rows[k].label == label for k in train)
    more = f" ({len(first) - 1} more label(s) alike)" if len(first) > 1 else ""
    warn(f"{rows[i].where or 'the data'}: label '{label}' of {where} has {count} training row(s) but no test rows: its "
         f"accuracy is never measured{more} (give it rows with split: test, or at least 3 rows for the "
         f"automatic 70/10/20 split)")


def build_stream(name: str, rows: list[Row], groups: list[tuple[str, list[str]]], kind: str,
                 task_source: str = "task file", max_train_per_class: int | None = None,
                 seed: int = 0) -> Stream:
    """Check that tasks are class-disjoint and cover the data, then index rows into tasks."""
    owner: dict[str, str] = {}
    for task_name, labels in groups:
        for label in labels:
            if label in owner:
                other = owner[label]
                where = f"tasks '{other}' and '{task_name}'" if other != task_name else f"task '{task_name}' twice"
                raise DataError(f"{task_source}: label '{label}' is in {where} (tasks must be class-disjoint)")
            owner[label] = task_name
    for r in rows:
        if r.label not in owner:
            raise DataError(f"{r.where}: label '{r.label}' is in no task of {task_source}")
    if rows and rows[0].split is None:
        rows = _assign_splits(rows, seed)
    index = {label: t for t, (_, labels) in enumerate(groups) for label in labels}
    tasks = [Task(name=n, labels=tuple(labels)) for n, labels in groups]
    _index_rows(rows, tasks, lambda r: index[r.label], lambda r: r.label, max_train_per_class)
    present = {r.label for r in rows}
    for task in tasks:
        empty = [label for label in task.labels if label not in present]
        if empty:
            raise DataError(f"{task_source}: task '{task.name}' label '{empty[0]}' has no rows in the data")
        _require_train_and_test(task, task_source)
    _warn_untested(rows, [i for task in tasks for i in task.train], [i for task in tasks for i in task.test],
                   f"the tasks of {task_source}")
    return Stream(name=name, kind=kind, rows=rows, tasks=tasks)


__all__ = ["read_rows", "read_task_file", "split_labels", "build_stream", "build_task_stream", "SPLITS"]
