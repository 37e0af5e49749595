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

from conpet.errors import ConfigError

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

    def __post_init__(self) -> None:
        self.labels: list[str] = [label for task in self.tasks for label in task.labels]
        self.label_index: dict[str, int] = {label: i for i, label in enumerate(self.labels)}
        self.task_of_label: dict[str, int] = {
            label: t for t, task in enumerate(self.tasks) for label in task.labels
        }
        self.targets: list[int] = [self.label_index.get(row.label, -1) for row in self.rows]
        starts = [0]
        for task in self.tasks:
            starts.append(starts[-1] + len(task.labels))
        self._ranges: list[tuple[int, int]] = list(zip(starts[:-1], starts[1:]))

    @property
    def generative(self) -> bool:
        return self.kind == "generate"

    def seen_labels(self, t: int) -> list[str]:
        """Labels of tasks 0..t, in the head's column order."""
        return [label for task in self.tasks[: t + 1] for label in task.labels]

    def class_range(self, t: int) -> tuple[int, int]:
        """Column range [start, end) of task t's classes in the global label order (O(1))."""
        return self._ranges[t]

    def describe(self) -> str:
        sizes = ", ".join(
            f"{task.name}: {len(task.labels)} classes {len(task.train)}/{len(task.dev)}/{len(task.test)}"
            for task in self.tasks
        )
        return f"{self.name} ({self.kind}, {len(self.tasks)} tasks, {len(self.labels)} classes; train/dev/test: {sizes})"


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
    return Stream(name=stream.name, kind=stream.kind, rows=stream.rows, tasks=[by_name[n] for n in names])
