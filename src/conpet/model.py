"""Use what a run learned: :class:`ContinualModel` loads the backbone and the bank of modules of a
run once and answers rows of any of its tasks (``peft``'s ``PeftModel.from_pretrained`` is the feel).

    from conpet import ContinualModel
    model = ContinualModel.from_run("runs/dynamic")
    model.tasks                                   # the tasks the run has finished
    model.predict([{"text": "The ship steamed off.", "entity": "steamed"}])   # label, score, task
    model.generate(["Translate to French: house"], max_new_tokens=16)          # generative runs
    model.route(["..."])                          # which task's module a row reaches
    model.refresh()                               # load tasks the run finished since

Every learner works: one shared module, a module per task with its router, stacked or merged
banks. Only adapter files whose SHA-256 matches the run's records are loaded. Calls are
serialised by a lock, so one object can be shared by threads (``conpet serve`` does).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from conpet.backbone import backbone_from_model
from conpet.build import Prepared, build_learner, keeps_torch_threads, prepare
from conpet.config import RunConfig
from conpet.data.stream import Row, Stream, Task
from conpet.errors import ConpetError, DataError
from conpet.inputs import chat_template_on, encode_generation, encode_rows, sorted_batches
from conpet.learners import Learner
from conpet.runs import adapter_dir, check_binding, read_json, run_config, seed_dir, verified_tasks

PROBE = Row(text="The quick brown fox jumps over the lazy dog.", label="", entity="fox", head="fox", tail="dog",
            target="")
"""The row the split forward pass is checked on when the model is loaded (no data is needed)."""
ROW_FIELDS = ("text", "entity", "head", "tail", "label", "task", "id")


@dataclass
class Prediction:
    """One classified row: the ``label``, its probability (``score``), the ``task`` that answered
    (its module for a routing learner, else the task the label belongs to) and ``confidence``:
    the router's probability of that task (a routing learner), else the probability mass of the
    task's labels; ``None`` when the client named the task."""

    text: str
    label: str
    score: float
    task: str
    confidence: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """One answered prompt: the answer ``text``; ``task``: the task whose module answered (a
    routing learner, or a task the client named), ``None`` when one shared module answers every
    task; ``confidence``: the router's probability of it; token counts and why it ended
    (``stop``: end of answer or a stop string, ``length``: ``max_new_tokens`` reached)."""

    prompt: str
    text: str
    task: str | None
    confidence: float | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Routing:
    """Where a row goes: the ``task`` and the probability of every finished task (``scores``);
    ``task`` is ``None`` for a generative run with one shared module (nothing to route)."""

    text: str
    task: str | None
    confidence: float | None
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ContinualModel:
    """A run's backbone and bank of modules, loaded once (:meth:`from_run`)."""

    def __init__(self, run_dir: Path, seed: int, cfg: RunConfig, prepared: Prepared,
                 all_tasks: list[dict[str, Any]], finished: int, bound: bool) -> None:
        self.run_dir = run_dir
        self.seed = seed
        self.cfg = cfg
        """The run's configuration (as loaded, with ``device`` / ``batch_size`` applied)."""
        self.engine = prepared.engine
        self._meta = prepared.stream
        self._all_tasks = all_tasks
        self._bound = bound
        self._lock = threading.RLock()
        self.problems: list[str] = []
        """Why tasks past :attr:`tasks` were not loaded (a file whose SHA-256 differs from the run's)."""
        self.learner: Learner | None = None
        self._load(finished)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    @keeps_torch_threads
    def from_run(cls, run_dir: str | Path, seed: int | None = None, device: str | None = None,
                 model: torch.nn.Module | None = None, tokenizer=None, batch_size: int | None = None
                 ) -> "ContinualModel":
        """Load run ``run_dir``'s backbone once and its modules after the last task seed ``seed``
        (default: the run's first) has finished, verified against the run's records; the run may
        still be training (:meth:`refresh` loads what it finishes later). ``device``: where to
        answer (default: the run's ``train.device``). ``model``/``tokenizer``: a backbone already
        in memory, the same base the run trained on (its files are then not read).
        ``batch_size``: rows per forward pass (default: the run's ``train.eval_batch_size``)."""
        run_dir = Path(run_dir)
        cfg = run_config(run_dir)
        seed = cfg.seed if seed is None else seed
        if device is not None:
            cfg.train.device = device
        if batch_size is not None:
            cfg.train.eval_batch_size = batch_size
        meta = read_json(run_dir / "stream.json")
        finished, problems = verified_tasks(run_dir, seed, [t["name"] for t in meta["tasks"]])
        if not finished:
            why = "; ".join(problems) if problems else "no task has finished yet"
            raise ConpetError(f"{seed_dir(run_dir, seed)}: nothing to load ({why})")
        if (model is None) != (tokenizer is None):
            raise ConpetError("ContinualModel.from_run: give both model= and tokenizer=, or neither")
        backbone = backbone_from_model(model, tokenizer, str(cfg.model)) if model is not None else None
        stream = Stream(name=meta["name"], kind=meta["kind"], rows=[PROBE], tasks=_tasks(meta["tasks"][:finished]))
        prepared = prepare(cfg, stream, backbone=backbone)
        out = cls(run_dir, seed, cfg, prepared, meta["tasks"], finished, bound=backbone is None)
        out.problems = problems
        return out

    def _load(self, finished: int) -> None:
        """Build the learner over the first ``finished`` tasks and restore its modules."""
        names = [t["name"] for t in self._all_tasks[:finished]]
        if self._bound:
            for name in names:
                check_binding(adapter_dir(self.run_dir, self.seed, name), self.engine.backbone.fingerprint,
                              str(self.engine.backbone.path))
        stream = Stream(name=self._meta.name, kind=self._meta.kind, rows=list(self._meta.rows),
                        tasks=_tasks(self._all_tasks[:finished]))
        learner = build_learner(self.cfg, Prepared(stream, self.engine), self.seed)
        try:
            learner.restore(self.run_dir, self.seed)
        except BaseException:
            learner.close()
            raise
        self.learner, self._meta = learner, stream

    def refresh(self) -> list[str]:
        """Load the tasks the run has finished since (their files verified first); returns their
        names. A task whose files do not verify is not loaded: :attr:`problems` says why, and the
        modules loaded before keep answering."""
        with self._lock:
            finished, problems = verified_tasks(self.run_dir, self.seed, [t["name"] for t in self._all_tasks])
            self.problems = problems
            before = len(self.tasks)
            if finished <= before:
                return []
            old = self.learner
            old.close()
            try:
                self._load(finished)
            except BaseException:
                self.learner = old
                self._load(before)
                raise
            return self.tasks[before:]

    def close(self) -> None:
        """Give the backbone back without modules."""
        with self._lock:
            if self.learner is not None:
                self.learner.close()

    # -- what it holds ---------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """The tasks loaded (the run's finished ones, in stream order)."""
        return [t.name for t in self._meta.tasks]

    @property
    def generative(self) -> bool:
        return self._meta.generative

    @property
    def labels(self) -> list[str]:
        """Every label of the loaded tasks (classification runs)."""
        return list(self._meta.labels)

    @property
    def routes(self) -> str | None:
        """How a row reaches its module (``selector``, ``prototype``), or ``None``: one module answers."""
        return type(self.learner).routes

    @property
    def chat_template(self) -> bool:
        """Whether prompts are wrapped in the model's chat template as a user turn (as the run trained)."""
        return chat_template_on(self.tokenizer, self.cfg.data.chat_template)

    @property
    def tokenizer(self):
        return self.engine.backbone.tokenizer

    def task_index(self, task: str) -> int:
        """The position of a loaded task; a clear error naming the loaded ones otherwise."""
        names = self.tasks
        if task not in names:
            later = [t["name"] for t in self._all_tasks[len(names):]]
            hint = f" (not finished yet: {task})" if task in later else ""
            raise ConpetError(f"unknown task '{task}'{hint}; loaded: {', '.join(names)}")
        return names.index(task)

    # -- answering -------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, inputs: Sequence[str | Mapping[str, Any] | Row], task: str | None = None) -> list[Prediction]:
        """Classify rows: texts, or dicts / :class:`Row` with the fields the run's template needs
        (``entity`` for typing, ``head`` and ``tail`` for relations); no label needed.
        ``task``: ``None`` or ``"auto"`` (the run's own answer and routing) or a task's name (its
        module / its labels only)."""
        if self.generative:
            raise ConpetError("predict: this run is generative (prompt -> answer); use generate()")
        rows = [_row(x, k) for k, x in enumerate(inputs)]
        with self._serving(rows) as learner:
            forced = None if task in (None, "auto") else self.task_index(task)
            stream, compute = self._meta, self.engine.compute
            out: list[Prediction | None] = [None] * len(rows)
            for batch in self._batches(self.engine.encoded.all_lengths):
                with compute.autocast():
                    if forced is None:
                        logits, route = learner.logits_and_route(batch)
                    else:
                        logits, route = learner.task_logits(batch, forced), None
                probs = torch.softmax(logits.float(), dim=-1).cpu()
                for r, i in enumerate(batch):
                    k = int(probs[r].argmax())
                    label = stream.labels[k]
                    if forced is not None:
                        t, confidence = forced, None
                    elif route is not None:
                        t = int(route.tasks[r, 0])
                        confidence = float(route.confidence[r, t])
                    else:
                        t = stream.task_of_label[label]
                        confidence = float(probs[r, stream.task_columns(t)].sum())
                    out[i] = Prediction(rows[i].text, label, float(probs[r, k]), stream.tasks[t].name, confidence)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int | Sequence[int] | None = None,
                 task: str | None = None, stop: Sequence[str] | None = None) -> list[Generation]:
        """Greedy answers to ``prompts`` (generative runs), each through the module its route picks
        (``task=None`` or ``"auto"``) or task ``task``'s. ``max_new_tokens``: one number or one per
        prompt (default: the run's ``data.max_new_tokens``); ``stop``: strings that end an answer
        (not included)."""
        if not self.generative:
            raise ConpetError("generate: this run classifies; use predict()")
        rows = [Row(text=_text(p, k), label="", target="") for k, p in enumerate(prompts)]
        default = self.cfg_data_max_new_tokens
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else \
            [max_new_tokens or default] * len(rows)
        if len(limits) != len(rows) or any(int(m) < 1 for m in limits):
            raise ConpetError("generate: max_new_tokens must be one positive number or one per prompt")
        with self._serving(rows) as learner:
            forced = None if task in (None, "auto") else self.task_index(task)
            encoded, tok = self.engine.encoded, self.tokenizer
            out: list[Generation | None] = [None] * len(rows)
            for batch in self._batches(np.asarray(encoded.target_start)):
                with self._max_new_tokens(learner, max(int(limits[i]) for i in batch)):
                    if forced is None:
                        answers, route = learner.generate_and_route(batch)
                    else:
                        answers, route = learner.task_generate(batch, forced), None
                made = learner.ctx.answer_tokens
                for r, (i, answer) in enumerate(zip(batch, answers)):
                    t = forced if route is None else int(route.tasks[r, 0])
                    confidence = None if route is None else float(route.confidence[r, t])
                    text, tokens, reason = _finish(tok, answer, made.get(i), int(limits[i]), stop or ())
                    out[i] = Generation(rows[i].text, text, None if t is None else self.tasks[t], confidence,
                                        len(encoded.prompt(i)), tokens, reason)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def route(self, inputs: Sequence[str | Mapping[str, Any] | Row]) -> list[Routing]:
        """Which task each row reaches and the probability of every task: the router's (a routing
        learner), else the probability mass of each task's labels (classification) or nothing to
        route (a generative run with one shared module)."""
        rows = [_row(x, k) if not self.generative else Row(text=_text(x, k), label="", target="")
                for k, x in enumerate(inputs)]
        with self._serving(rows) as learner:
            stream, names = self._meta, self.tasks
            out: list[Routing | None] = [None] * len(rows)
            lengths = np.asarray(self.engine.encoded.target_start) if self.generative else \
                self.engine.encoded.all_lengths
            for batch in self._batches(lengths):
                if self.generative and learner.routes is None:
                    for i in batch:
                        out[i] = Routing(rows[i].text, None, None, {})
                    continue
                with self.engine.compute.autocast():
                    logits, route = learner.logits_and_route(batch)
                if route is not None:
                    scores = route.confidence.float().cpu()
                else:
                    probs = torch.softmax(logits.float(), dim=-1).cpu()
                    scores = torch.stack([probs[:, stream.task_columns(t)].sum(-1) for t in range(len(names))], -1)
                for r, i in enumerate(batch):
                    t = int(route.tasks[r, 0]) if route is not None else int(scores[r].argmax())
                    out[i] = Routing(rows[i].text, names[t], float(scores[r, t]),
                                     {n: float(scores[r, j]) for j, n in enumerate(names)})
        return out  # type: ignore[return-value]

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def cfg_data_max_new_tokens(self) -> int:
        """The run's ``data.max_new_tokens``: the default answer length."""
        return int(self.cfg.data.max_new_tokens)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the model's tokenizer, as a prompt holds them (limits and usage)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @contextlib.contextmanager
    def _serving(self, rows: list[Row]) -> Iterator[Learner]:
        """Hold the lock, put ``rows`` in place of the stream's rows (encoded as the run encodes
        them) and set the run's thread count, for one call."""
        if not rows:
            raise ConpetError("nothing to answer: give at least one input")
        with self._lock:
            cfg = self.cfg
            tok = self.tokenizer
            if self.generative:
                encoded = encode_generation(rows, tok, cfg.train.max_length, cfg.data.chat_template)
            else:
                encoded = encode_rows(rows, self._meta.kind, tok, self.engine.backbone.is_decoder,
                                      cfg.train.max_length)
            self._meta.replace_rows(rows)
            self.engine.replace_rows(encoded)
            self.learner.rows_replaced()
            self.learner.ctx.answer_tokens.clear()
            before = torch.get_num_threads()
            if cfg.train.threads:
                torch.set_num_threads(cfg.train.threads)
            try:
                yield self.learner
            finally:
                if torch.get_num_threads() != before:
                    torch.set_num_threads(before)

    def _batches(self, lengths: np.ndarray) -> list[list[int]]:
        """The staged rows in length-sorted batches of the run's ``train.eval_batch_size`` (as the
        run's own evaluation batches them)."""
        return sorted_batches(range(len(lengths)), lengths, self.cfg.train.eval_batch_size)

    @staticmethod
    @contextlib.contextmanager
    def _max_new_tokens(learner: Learner, n: int) -> Iterator[None]:
        data = learner.ctx.cfg.data
        before, data.max_new_tokens = data.max_new_tokens, n
        try:
            yield
        finally:
            data.max_new_tokens = before


def _tasks(meta: list[dict[str, Any]]) -> list[Task]:
    return [Task(name=t["name"], labels=tuple(t["labels"])) for t in meta]


def _text(x: Any, k: int) -> str:
    if not isinstance(x, str) or not x.strip():
        raise DataError(f"input {k}: a prompt must be a non-empty string")
    return x


def _row(x: str | Mapping[str, Any] | Row, k: int) -> Row:
    """A row to classify from a text, a dict of row fields or a :class:`Row`."""
    if isinstance(x, Row):
        return x
    if isinstance(x, str):
        return Row(text=_text(x, k), label="", where=f"input {k}")
    if isinstance(x, Mapping):
        unknown = sorted(set(x) - set(ROW_FIELDS))
        if unknown:
            raise DataError(f"input {k}: unknown field(s) {', '.join(unknown)}; a row has {', '.join(ROW_FIELDS)}")
        fields = {f: x[f] for f in ROW_FIELDS if x.get(f) is not None}
        if not all(isinstance(v, str) for v in fields.values()):
            raise DataError(f"input {k}: row fields must be strings")
        fields["text"] = _text(fields.get("text"), k)
        fields.setdefault("label", "")
        return Row(**fields, where=f"input {k}")
    raise DataError(f"input {k}: give a text, or a dict with 'text' (and 'entity' or 'head'/'tail')")


def _finish(tokenizer, answer: str, tokens: list[int] | None, limit: int, stop: Sequence[str]) -> tuple[str, int, str]:
    """An answer cut at ``limit`` of its generated ``tokens`` (``None``: counted again from the
    text) and at its first stop string; its token count and the finish reason."""
    ids = list(tokens) if tokens is not None else tokenizer(answer, add_special_tokens=False)["input_ids"]
    reason = "length" if len(ids) >= limit else "stop"
    if len(ids) > limit:
        ids = ids[:limit]
        answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
    cuts = [answer.find(s) for s in stop if s and s in answer]
    if cuts:
        answer = answer[:min(cuts)]
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        reason = "stop"
    return answer, len(ids), reason
