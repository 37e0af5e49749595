"""Learners with one PET module per task (Dynamic ConPET, Model Surgery): rows routed to their own
module in one pass, every task's saved module loaded back, and :class:`TaskModulesLearner`, the
base that answers through a route."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch

from conpet.heads import GrowingHead
from conpet.learners.base import Route, only_task
from conpet.learners.context import Context
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.state import read_attrs
from conpet.runs import adapter_dir


def routed_features(ctx: Context, model: torch.nn.Module, indices: list[int], modules: list[str]) -> torch.Tensor:
    """Features of each row through its own module: one pass with peft's per-row routing where the
    PET method allows it, else one pass per module over its rows (the same total cost per row)."""
    if len(set(modules)) > 1 and ctx.pet.routes_per_row:
        return ctx.features(model, indices, adapter_names=modules)
    out = None
    for name in dict.fromkeys(modules):
        rows = [r for r, m in enumerate(modules) if m == name]
        ctx.pet.activate(model, name)
        feats = ctx.features(model, [indices[r] for r in rows])
        out = feats.new_zeros(len(indices), feats.shape[-1]) if out is None else out
        out[rows] = feats
    return out


def routed_generate(ctx: Context, model: torch.nn.Module, indices: list[int], modules: list[str]) -> list[str]:
    """Greedy answers, each prompt generated through its own module: one batch with per-row
    routing where the PET method allows it, else one generation per module over its rows."""
    if len(set(modules)) > 1 and ctx.pet.routes_per_row:
        return ctx.generate(model, indices, adapter_names=modules)
    answers = [""] * len(indices)
    for name in dict.fromkeys(modules):
        rows = [r for r, m in enumerate(modules) if m == name]
        ctx.pet.activate(model, name)
        for r, answer in zip(rows, ctx.generate(model, [indices[r] for r in rows])):
            answers[r] = answer
    return answers


def load_task_modules(ctx: Context, model: torch.nn.Module | None, run_dir: Path, seed: int,
                      name_of: Callable[[int], str]) -> torch.nn.Module:
    """Every task's saved module of seed ``seed`` of run ``run_dir``, under the name ``name_of(t)``,
    attached to the backbone (or added to ``model``); the wrapped model."""
    for t, task in enumerate(ctx.stream.tasks):
        folder = adapter_dir(run_dir, seed, task.name)
        if model is None:
            model = ctx.pet.attach_from(ctx.backbone.model, folder, name_of(t))
        else:
            ctx.pet.load(model, folder, name_of(t))
    return model


class TaskModulesLearner(OneModuleLearner):
    """The base of learners with one PET module per task (:meth:`module_of`) whose predictions
    route each row to a module: :meth:`logits_and_route` decides (and records the route in
    :attr:`routed`), generation follows the same route, and a task saves its own module beside
    the head and the :attr:`saved_attrs`; a finished run loads every task's module back."""

    module_per_task = True
    module_prefix: ClassVar[str] = "task"
    routing_metric: ClassVar[str] = "routing_accuracy"
    """The ``metrics.json`` key of :meth:`eval_extra`: how often a row reaches its own task's module."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.n_tasks = 0
        self.routed: dict[int, int] = {}
        """The task each evaluated row was routed to (cleared by a learner when its modules change)."""

    @classmethod
    def module_of(cls, t: int) -> str:
        """Task ``t``'s module: ``<module_prefix>-<t, 3 digits>``."""
        return f"{cls.module_prefix}-{t:03d}"

    @property
    def module_name(self) -> str:
        """The latest task's module: what a resume activates and what the one-module ``save`` of task
    ``t`` writes (it runs right after task ``t``)."""
        return self.module_of(max(0, self.n_tasks - 1))

    # -- answering ---------------------------------------------------------------------------------------
    def logits(self, indices: list[int]) -> torch.Tensor:
        return self.logits_and_route(indices)[0]

    def generate(self, indices: list[int]) -> list[str]:
        return self.generate_and_route(indices)[0]

    @torch.no_grad()
    def generate_and_route(self, indices: list[int]) -> tuple[list[str], Route]:
        """Greedy answers, each prompt generated through the module its route picks first."""
        with self.ctx.compute.autocast():  # generation calls it outside the evaluation's autocast
            route = self.logits_and_route(indices)[1]
        modules = [self.module_of(int(j)) for j in route.tasks[:, 0].tolist()]
        return routed_generate(self.ctx, self.model, indices, modules), route

    @torch.no_grad()
    def task_logits(self, indices: list[int], t: int) -> torch.Tensor:
        """Rows through task ``t``'s module, read by :meth:`task_head_logits` (no routing)."""
        self.model.eval()
        features = routed_features(self.ctx, self.model, indices, [self.module_of(t)] * len(indices))
        return self.task_head_logits(features.float(), t)

    def task_head_logits(self, features: torch.Tensor, t: int) -> torch.Tensor:
        """Logits over the seen classes of ``features`` made by task ``t``'s module: by default
        the head's, every column outside task ``t``'s set to -inf."""
        return only_task(self.head(features).float(), self.ctx.stream.task_columns(t))

    @torch.no_grad()
    def task_generate(self, indices: list[int], t: int) -> list[str]:
        """Greedy answers through task ``t``'s module (no routing)."""
        self.ctx.pet.activate(self.model, self.module_of(t))
        self.model.eval()
        return self.ctx.generate(self.model, indices)

    def rows_replaced(self) -> None:
        self.routed.clear()

    def reference_model(self) -> torch.nn.Module:
        """The last task's module (general text has no task to route to)."""
        self.ctx.pet.activate(self.model, self.module_name)
        self.model.eval()
        return self.model

    def eval_extra(self, t: int) -> dict[str, list[float]]:
        """Routing accuracy (the row's own task first) on each seen task's evaluation rows."""
        ctx = self.ctx
        accs = []
        for j in range(t + 1):
            rows = ctx.stream.tasks[j].split(ctx.cfg.data.eval_split)
            missing = [i for i in rows if i not in self.routed]
            size = ctx.cfg.train.eval_batch_size
            for start in range(0, len(missing), size):
                with ctx.compute.autocast():
                    self.logits_and_route(missing[start:start + size])
            accs.append(sum(self.routed[i] == j for i in rows) / max(1, len(rows)))
        return {self.routing_metric: accs}

    # -- saving and restoring ----------------------------------------------------------------------------
    def restore(self, run_dir: Path, seed: int) -> None:
        """Every task's module; the head and the saved attributes after the last task."""
        tasks = self.ctx.stream.tasks
        self.model = load_task_modules(self.ctx, self.model, run_dir, seed, self.module_of)
        folder = adapter_dir(run_dir, seed, tasks[-1].name)
        self.head = GrowingHead.load(folder, self.ctx.device)
        if self.saved_attrs:
            read_attrs(self, self.saved_attrs, folder, self.ctx.device)
        self.n_tasks = len(tasks)
        self.model.eval()
