"""The base most learners build on: one PET module that answers every input, one growing head,
and a task as hooks a method overrides (:meth:`OneModuleLearner.learn`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F

from conpet.generation import target_tokens, token_logits
from conpet.heads import GrowingHead
from conpet.learners.base import Learner
from conpet.learners.context import Context
from conpet.learners.loop import FitStats
from conpet.learners.state import (head_tensors, load_head, load_module_tensors, module_tensors, read_attrs,
                                   write_attrs, write_module_meta)
from conpet.learners.training import Fit, dev_scorer, module_features, train
from conpet.runs import adapter_dir


class OneModuleLearner(Learner):
    """One PET module + one growing head, trained with cross-entropy over all seen classes.

    A task is :meth:`learn`: ``begin_task`` (the module at the first task, head columns), then the
    hooks :meth:`before_task`, :meth:`fits` (each :class:`~conpet.learners.training.Fit` is run by
    :meth:`train`, with :meth:`setup_forward`, :meth:`loss` and :meth:`after_step`; all of them
    inside :meth:`during_fits`) and :meth:`after_task`. Saving, restoring and resume state are
    generic: the answering module and the :attr:`saved_modules` it has, the head, the
    :attr:`saved_attrs`, the plugins and the declared ``state_attrs``.
    """

    module_name = "default"
    """The module that answers."""
    training_module: ClassVar[str | None] = None
    """The module a task's fits train, where it is not the answering one (O-LoRA's new LoRA)."""
    saved_modules: ClassVar[tuple[str, ...]] = ()
    """Further modules saved beside the answering one (a sub-folder each) and restored with it,
    where the learner has made them (LAE's offline module, I-LoRA's slow one)."""
    saved_attrs: ClassVar[tuple[str, ...]] = ()
    """Attributes kept beside the saved module besides the modules and the head (CRL's
    prototypes, CoFiTune's importance; :func:`conpet.learners.state.write_attrs`), restored with it."""
    plugins: tuple = ()
    """Method plugins (see :class:`conpet.learners.static.Plugin`); none for sequential/joint."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.model = None
        self.head = ctx.new_head()
        self.fitting: Fit | None = None
        """The fit :meth:`train` is running (a resume inside it sets its forward pass up again)."""

    # -- a task ----------------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        self.begin_task(t)
        self.before_task(t)
        with self.during_fits(t):
            stats = [self.train(plan) for plan in self.fits(t)]
        self.last_fit = sum(stats[1:], stats[0])
        self.after_task(t)

    def begin_task(self, t: int):
        """The start every one-module learner shares: the module made at the first task, head
        columns for task ``t``'s labels; returns the task."""
        if self.model is None:
            self.new_module(t)
        task = self.ctx.stream.tasks[t]
        self.grow_head(list(task.labels))
        return task

    def before_task(self, t: int) -> None:
        for plugin in self.plugins:
            plugin.before_task(t)

    def fits(self, t: int) -> Iterable[Fit]:
        """The fits of task ``t``, in order (a generator may build each after the previous ran):
        by default ``train.epochs`` passes over its rows."""
        return [self.fit_on(t, self.ctx.epoch_batches(self.ctx.stream.tasks[t].train))]

    def during_fits(self, t: int) -> contextlib.AbstractContextManager:
        """A context held while task ``t``'s fits run (CoFiTune's gradient masks), left on errors too."""
        return contextlib.nullcontext()

    def after_task(self, t: int) -> None:
        for plugin in self.plugins:
            plugin.after_task(t)

    def fit_on(self, t: int, batches: list[list[int]], **fields: Any) -> Fit:
        """A fit of the answering module on ``batches`` in task ``t``: :meth:`loss`, the head and
        the plugins' groups, a dev score over tasks 0..t; ``fields`` override any of these."""
        task = self.ctx.stream.tasks[t]
        values = {"task": t, "desc": f"{task.name} {self.name}", "batches": batches, "loss": self.loss,
                  "module": self.training_module or self.module_name, "params": list(self.head.parameters()),
                  "groups": [g for plugin in self.plugins for g in plugin.param_groups()]}
        values.update(fields)
        if "dev_score" not in values:
            values["dev_score"] = dev_scorer(self.ctx, self.model, list(range(t + 1)), self.logits, self.ctx.targets)
        return Fit(**values)

    def train(self, plan: Fit) -> FitStats:
        """Run one fit through the loop with this learner's hooks."""
        self.fitting = plan
        try:
            return train(self.ctx, self.model, plan, self)
        finally:
            self.fitting = None

    def new_module(self, t: int | None = None) -> None:
        """(Re)create a freshly initialised PET module (data-aware methods calibrate on task
        ``t``'s rows) and an empty head."""
        if self.model is not None:
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
        torch.manual_seed(int(self.ctx.rng.integers(2**31)))
        calibration = self.ctx.calibration(t) if t is not None else None
        self.model = self.ctx.pet.attach(self.ctx.backbone.model, self.module_name, calibration)
        self.head = self.ctx.new_head()

    def grow_head(self, labels: list[str]) -> None:
        """Add head columns for ``labels`` (classification; a generative stream answers through the LM head)."""
        if not self.ctx.generative:  # a label an earlier task brought (domain-incremental) keeps its column
            self.head.grow(labels, self.ctx.torch_gen)

    # -- the loss --------------------------------------------------------------------------------------
    def objective_loss(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss of a batch and the logits it came from: cross-entropy over the seen
        classes, or (generative streams) the LM loss on the target tokens, with the next-token
        logits [target tokens of the batch, vocabulary] (prompt tokens are never counted)."""
        if self.ctx.generative:
            logits = token_logits(self.ctx.engine, self.model, self.ctx.lm_head, indices)
            return F.cross_entropy(logits, target_tokens(self.ctx.engine, indices)), logits
        logits = self.logits(indices)
        return F.cross_entropy(logits, self.ctx.targets(indices)), logits

    def loss(self, indices: list[int]) -> torch.Tensor:
        loss, logits = self.objective_loss(indices)
        for plugin in self.plugins:
            loss = loss + plugin.extra_loss(indices, logits)
        return loss

    # -- answering -------------------------------------------------------------------------------------
    def features(self, indices: list[int]) -> torch.Tensor:
        """Cloze features of rows, after any plugin's feature transform (EA-EMR's alignment)."""
        features = self.ctx.features(self.model, indices)
        for plugin in self.plugins:
            features = plugin.transform(features)
        return features

    def logits(self, indices: list[int]) -> torch.Tensor:
        return self.head(self.features(indices))

    def answering_model(self) -> torch.nn.Module:
        """The model with the answering module active (in eval mode); a learner that merged its
        module into the backbone's weights (OSF) answers with the backbone alone."""
        if self.has_module(self.module_name):
            self.ctx.pet.activate(self.model, self.module_name)
        self.model.eval()
        return self.model

    def generate(self, indices: list[int]) -> list[str]:
        """Greedy answers to the prompts of rows ``indices`` (generative streams)."""
        return self.ctx.generate(self.answering_model(), indices)

    def reference_model(self) -> torch.nn.Module:
        """The backbone with the module that answers, for the reference-text perplexity."""
        return self.answering_model()

    def pet_parameters(self) -> list[torch.nn.Parameter]:
        return self.ctx.pet.parameters(self.model, self.module_name)

    def raw_features(self, indices: list[int]) -> torch.Tensor:
        """Backbone + PET cloze features (no plugin transform), in fp32, for memories and fits."""
        return module_features(self.ctx, self.model, indices)

    # -- saving, restoring, resuming -------------------------------------------------------------------
    def has_module(self, name: str) -> bool:
        return self.model is not None and name in self.ctx.pet.modules(self.model)

    def save(self, t: int, folder: Path) -> None:
        self.ctx.pet.save(self.model, self.module_name, folder)
        for name in self.saved_modules:
            if self.has_module(name):
                (folder / name).mkdir()
                self.ctx.pet.save(self.model, name, folder / name)
        self.head.save(folder)
        if self.saved_attrs:
            write_attrs(self, self.saved_attrs, folder)
        for plugin in self.plugins:
            plugin.save(folder)
        write_module_meta(self.ctx, t, folder, self.name, self.module_name, self.head.labels)

    def restore(self, run_dir: Path, seed: int) -> None:
        """Load the state after the stream's last task of seed ``seed`` of run ``run_dir``."""
        folder = adapter_dir(run_dir, seed, self.ctx.stream.tasks[-1].name)
        self.model = self.ctx.pet.attach_from(self.ctx.backbone.model, folder, self.module_name)
        for name in self.saved_modules:
            if (folder / name).is_dir():
                self.ctx.pet.load(self.model, folder / name, name)
        self.ctx.pet.activate(self.model, self.module_name)
        self.model.eval()
        self.head = GrowingHead.load(folder, self.ctx.device)
        if self.saved_attrs:
            read_attrs(self, self.saved_attrs, folder, self.ctx.device)
        for plugin in self.plugins:
            plugin.load(folder)

    def add_module(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Make module ``name`` of the method's config, before ``tensors`` (a resume's saved
        values, keyed ``pet/<path>``) are loaded into it."""
        if self.model is None:
            self.model = self.ctx.pet.attach(self.ctx.backbone.model, name)
        else:
            self.ctx.pet.add(self.model, name)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        meta["modules"] = self.ctx.pet.modules(self.model) if self.model is not None else []
        tensors.update(module_tensors(self.model, meta["modules"]) if meta["modules"] else {})
        tensors.update({f"head/{k}": v for k, v in head_tensors(self.head).items()})
        meta["head_labels"] = list(self.head.labels)
        for k, plugin in enumerate(self.plugins):
            t, m = plugin.state()
            tensors.update({f"plugin{k}/{name}": v for name, v in t.items()})
            meta[f"plugin{k}"] = m
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        for name in meta["modules"]:
            if not self.has_module(name):
                self.add_module(name, tensors)
        if meta["modules"]:
            load_module_tensors(self.ctx.pet, self.model, meta["modules"], tensors)
            if self.fitting is not None:  # inside a fit (an in-task checkpoint): train as before the kill
                self.setup_forward(self.fitting)
            else:
                self.ctx.pet.activate(self.model, self.module_name)
        self.head = load_head(self.head, {k[5:]: v for k, v in tensors.items() if k.startswith("head/")},
                              meta["head_labels"])
        for k, plugin in enumerate(self.plugins):
            prefix = f"plugin{k}/"
            plugin.load_state({n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)},
                              meta[f"plugin{k}"])

    def tunable_params(self) -> dict[str, int]:
        """What trains (``tunable_params``) and, with :attr:`saved_modules`, what is stored."""
        pet = self.ctx.pet.count(self.model, self.module_name)
        head = sum(p.numel() for p in self.head.parameters())
        method = sum(p.numel() for plugin in self.plugins for g in plugin.param_groups() for p in g["params"])
        out = {"pet_params": pet, "head_params": head, "method_params": method, "tunable_params": pet + head + method}
        extra = [name for name in self.saved_modules if self.has_module(name)]
        if extra:
            out["stored_params"] = pet * (1 + len(extra)) + head + method
        return out

    def close(self) -> None:
        if self.model is not None:
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
            self.model = None
