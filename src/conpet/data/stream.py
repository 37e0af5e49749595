"""The continual-learning vocabulary: a Row, a Task (a set of labels with train/dev/test rows)
and a Stream (an ordered list of class-disjoint tasks).

A generative row (``kind == "generate"``) has a prompt (``text``) and a ``target`` answer; its
``label`` is its task's name, so a generative task is a task with one "class", itself: replay
memories, task ids and the Dynamic ConPET selector work on both kinds unchanged.

Tasks hold *indices* into ``Stream.rows`` so that every row is tokenized once per run and
shared by every learner, replay buffer and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conpet.errors import ConfigError, ConpetError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Row:
    text: str
    label: str
    split: str | None = None
    entity: str | None = None
    head: str | None = None
    tail: str | None = None
    id: str | None = None
    target: str | None = None
    """The answer of a generative row (``None`` for classification rows): what training teaches."""
    answers: tuple[str, ...] | None = None
    """Every answer that counts as right at evaluation (default: the target alone)."""
    task: str | None = None
    """A classification row's task when the data names it (field ``task``): tasks may then share
    labels, the domain-incremental setting. ``None``: the task follows from the label."""

    @property
    def references(self) -> tuple[str, ...]:
        """What a generated answer is scored against (the best match counts)."""
        return self.answers or ((self.target,) if self.target is not None else ())
    where: str = ""
    """``file:line`` the row came from, for error messages."""


@dataclass
class Task:
    name: str
    labels: tuple[str, ...]
    train: list[int] = field(default_factory=list)
    dev: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)

    def split(self, name: str) -> list[int]:
        return {"train": self.train, "dev": self.dev, "test": self.test}[name]


@dataclass
class Stream:
    name: str
    kind: str
    """Prompt template kind: ``typing``, ``relation`` or ``text`` (classification), or
    ``generate`` (prompt -> target)."""
    rows: list[Row]
    tasks: list[Task]
    metric: str | None = None
    """Generative streams: the metric the stream recommends (a built-in benchmark's meta), used
    when ``data.metric`` is ``auto``."""

    def __post_init__(self) -> None:
        # the label space: every task's labels in order of first appearance (class-disjoint
        # tasks: their concatenation); the classes seen after task t are always a prefix of it
        self.labels: list[str] = list(dict.fromkeys(label for task in self.tasks for label in task.labels))
        self.label_index: dict[str, int] = {label: i for i, label in enumerate(self.labels)}
        self.task_of_label: dict[str, int] = {}
        for t, task in enumerate(self.tasks):
            for label in task.labels:
                self.task_of_label.setdefault(label, t)
        self._index_rows()
        self.domain_incremental: bool = len(self.labels) < sum(len(task.labels) for task in self.tasks)
        """Tasks share labels (rows name their task): the domain-incremental setting."""
        seen = [0]
        known: set[str] = set()
        for task in self.tasks:
            known.update(task.labels)
            seen.append(len(known))
        self._ranges: list[tuple[int, int]] = list(zip(seen[:-1], seen[1:]))

    def _index_rows(self) -> None:
        self.targets: list[int] = [self.label_index.get(row.label, -1) for row in self.rows]
        self.task_of_row: list[int] = [-1] * len(self.rows)
        """The task each row belongs to (-1: in no task, e.g. rows to predict)."""
        for t, task in enumerate(self.tasks):
            for i in (*task.train, *task.dev, *task.test):
                self.task_of_row[i] = t

    def replace_rows(self, rows: list[Row]) -> None:
        """Hold ``rows`` (rows to answer, in no task) instead of the current ones: what a served
        batch does with a stream of tasks whose own rows are not kept."""
        if any(task.train or task.dev or task.test for task in self.tasks):
            raise ValueError("replace_rows: the stream's tasks index its rows; only a stream of task names and "
                             "labels (a finished run's) takes rows to answer")
        self.rows = list(rows)
        self._index_rows()

    @property
    def generative(self) -> bool:
        return self.kind == "generate"

    def seen_labels(self, t: int) -> list[str]:
        """Labels of tasks 0..t, in the head's column order (each once)."""
        return self.labels[: self._ranges[t][1]]

    def task_columns(self, t: int) -> list[int]:
        """The columns (global label indices) of task t's labels, in ``task.labels`` order."""
        return [self.label_index[label] for label in self.tasks[t].labels]

    def memory_key(self, t: int, label: str) -> str:
        """The exemplar-memory class of ``label`` in task t: the label, or in the
        domain-incremental setting ``task/label`` (each domain keeps its own exemplars)."""
        return f"{self.tasks[t].name}/{label}" if self.domain_incremental else label

    def memory_keys(self, t: int) -> list[str]:
        return [self.memory_key(t, label) for label in self.tasks[t].labels]

    def memory_keys_through(self, t: int) -> list[str]:
        """The memory classes of tasks 0..t (none for t < 0)."""
        return [key for j in range(t + 1) for key in self.memory_keys(j)]

    def class_range(self, t: int) -> tuple[int, int]:
        """Column range [start, end) of the classes task t adds to the global label order (O(1));
        with class-disjoint tasks, exactly task t's classes (:meth:`task_columns`)."""
        return self._ranges[t]

    def describe(self) -> str:
        sizes = ", ".join(
            f"{task.name}: {len(task.labels)} classes {len(task.train)}/{len(task.dev)}/{len(task.test)}"
            for task in self.tasks
        )
        return f"{self.name} ({self.kind}, {len(self.tasks)} tasks, {len(self.labels)} classes; train/dev/test: {sizes})"


class SealedSplit(list):
    """A task's test rows while settings are being chosen: any read is an error (the two-phase
    protocol: the test split is never looked at when tuning)."""

    def _refuse(self, *args, **kwargs):
        raise ConpetError(f"the test rows of task '{self.task}' are sealed while settings are chosen "
                          f"(data.eval_split: dev); only dev rows may be read")

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task

    __iter__ = __len__ = __getitem__ = __bool__ = __contains__ = _refuse


def seal_test(stream: Stream) -> Stream:
    """The same stream with every task's test rows sealed (:class:`SealedSplit`)."""
    for task in stream.tasks:
        task.test = SealedSplit(task.name)
    return stream


def slice_tasks(stream: Stream, part: slice) -> Stream:
    """The same rows with only the tasks ``part`` (``data.task_slice``)."""
    tasks = stream.tasks[part]
    if part.stop > len(stream.tasks):
        raise ConfigError(f"data.task_slice: {stream.name} has {len(stream.tasks)} tasks, so {part.start}:{part.stop} "
                          f"runs past its end")
    return Stream(name=stream.name, kind=stream.kind, rows=stream.rows, tasks=tasks, metric=stream.metric)


def reorder_tasks(stream: Stream, names: list[str], where: str = "data.task_order") -> Stream:
    """The same rows with the tasks in the order ``names`` (every task of the stream once)."""
    have = [t.name for t in stream.tasks]
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ConfigError(f"{where}: no task '{unknown[0]}' in {stream.name} (tasks: {', '.join(have)})")
    if len(names) != len(set(names)) or len(names) != len(have):
        missing = [n for n in have if n not in names]
        raise ConfigError(f"{where}: name every task of {stream.name} once"
                          + (f" (missing: {', '.join(missing)})" if missing else " (a task is repeated)"))
    by_name = {t.name: t for t in stream.tasks}
    return Stream(name=stream.name, kind=stream.kind, rows=stream.rows, tasks=[by_name[n] for n in names],
                  metric=stream.metric)
