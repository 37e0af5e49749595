"""The glue between a learner and the training loop: a :class:`Fit` says what one run of
:func:`conpet.learners.loop.fit` trains on and what it trains, :func:`train` runs it with the
PET method's own groups, regulariser and step hook and the learner's hooks; plus the losses,
dev scores and feature passes several learners share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from conpet.device import shrink_on_oom
from conpet.errors import ConfigError
from conpet.heads import task_targets
from conpet.inputs import sorted_batches
from conpet.learners.context import Context
from conpet.learners.loop import FitStats, fit, pet_training, predict
from conpet.replay import ExemplarMemory


@dataclass
class Fit:
    """One run of the training loop inside task ``task``."""

    task: int
    desc: str
    batches: list[list[int]]
    """Every optimizer step's rows (all epochs laid out)."""
    loss: Callable[[list[int]], torch.Tensor]
    module: str
    """The PET module this fit trains (and whose PET regulariser and step hook apply)."""
    params: list[torch.nn.Parameter] = field(default_factory=list)
    """Tensors trained at ``train.head_lr`` (heads, projections)."""
    groups: list[dict] = field(default_factory=list)
    """A method's own optimizer groups; they train even when the module is frozen."""
    train_module: bool = True
    """False: the module's own parameters stay frozen (LAE's warm-up; FPF and InfLoRA train
    chosen tensors of it through ``groups``)."""
    epochs: int | None = None
    """How many epochs ``batches`` hold, where a dev score is taken (default ``train.epochs``)."""
    dev_score: Callable[[], float] | None = None
    """:func:`dev_scorer`: keep the best epoch on dev rows."""


class FitHooks(Protocol):
    """What a learner adds to each fit (:class:`conpet.learners.base.Learner` has both, doing nothing special)."""

    def setup_forward(self, fit: Fit) -> None:
        """Set the model up for the fit's forward passes (which modules are active)."""

    def after_step(self, fit: Fit, step: int) -> None:
        """Run after each optimizer step of the fit (EMA, weight ensembles, memory banks)."""


def train(ctx: Context, model: torch.nn.Module, plan: Fit, hooks: FitHooks | None = None) -> FitStats:
    """Run ``plan`` through :func:`conpet.learners.loop.fit`; the model is left in eval mode."""
    if hooks is None:
        ctx.pet.activate(model, plan.module)
    else:
        hooks.setup_forward(plan)
    model.train()
    config = ctx.cfg.train
    loss_fn, step_hooks = plan.loss, []
    if plan.train_module:
        groups, loss_fn, step_hooks = pet_training(ctx.pet, model, plan.module, config.lr, loss_fn,
                                                   len(plan.batches), plan.task)
    else:
        for p in ctx.pet.parameters(model, plan.module):
            p.requires_grad_(False)
        groups = []
    groups.append({"params": list(plan.params), "lr": config.head_lr})
    groups.extend(plan.groups)
    for group in plan.groups:
        for p in group["params"]:
            p.requires_grad_(True)
    if hooks is not None:
        step_hooks.append(lambda step: hooks.after_step(plan, step))
    stats = fit(loss_fn, groups, plan.batches, config, ctx.compute, desc=plan.desc, progress=ctx.progress,
                after_step=step_hooks, checkpointer=ctx.checkpointer, dev_score=plan.dev_score,
                epochs=plan.epochs or config.epochs)
    model.eval()
    return stats


def new_task_loss(ctx: Context, t: int, logits: Callable[[list[int]], torch.Tensor],
                  lm_loss_fn: Callable[[list[int]], torch.Tensor]) -> Callable[[list[int]], torch.Tensor]:
    """Cross-entropy over task ``t``'s classes only (the per-task head of LAE and InfLoRA: the
    columns of its labels in ``logits(rows)``); ``lm_loss_fn`` on a generative stream."""
    columns, local = task_targets(ctx.stream, t, ctx.device)

    def loss(indices: list[int]) -> torch.Tensor:
        if ctx.generative:
            return lm_loss_fn(indices)
        return F.cross_entropy(logits(indices)[:, columns], local[ctx.targets(indices)])

    return loss


def dev_scorer(ctx: Context, model: torch.nn.Module, tasks: list[int], logits: Callable[[list[int]], torch.Tensor],
               targets: Callable[[list[int]], torch.Tensor]) -> Callable[[], float] | None:
    """With ``train.select_on_dev``: a function giving the mean over ``tasks`` of the accuracy of
    ``argmax logits(rows)`` against ``targets(rows)`` on each task's **dev** rows (test rows are
    never looked at); ``None`` otherwise."""
    if not ctx.cfg.train.select_on_dev:
        return None
    groups = [ctx.stream.tasks[j].dev for j in tasks if ctx.stream.tasks[j].dev]
    if not groups:
        raise ConfigError("train.select_on_dev: the tasks seen so far have no dev rows (give rows with split: dev, "
                          "or leave split out so that 10% of each class becomes dev)")

    def score() -> float:
        was_training = model.training
        model.eval()
        accs = []
        for rows in groups:
            preds = predict(logits, sorted_batches(rows, ctx.encoded.lengths(rows), ctx.cfg.train.eval_batch_size),
                            ctx.compute)
            accs.append(sum(preds[i] == int(gold) for i, gold in zip(rows, targets(rows))) / len(rows))
        model.train(was_training)
        return float(np.mean(accs))

    return score


@torch.no_grad()
def module_features(ctx: Context, model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
    """Cloze features [len(indices), hidden] in fp32 through the model's active module, in
    length-sorted batches under the run's autocast (memories, fits, Fisher-free passes)."""
    model.eval()
    out = torch.zeros(len(indices), ctx.backbone.hidden_size, device=ctx.device)
    position = {i: k for k, i in enumerate(indices)}

    def features(rows: list[int]) -> torch.Tensor:
        with ctx.compute.autocast():
            return ctx.features(model, rows).float()

    for batch in sorted_batches(indices, ctx.encoded.lengths(indices), ctx.cfg.train.eval_batch_size):
        out[[position[i] for i in batch]] = shrink_on_oom(features, batch, join=torch.cat,
                                                          on_shrink=ctx.compute.empty_cache)
    return out


def update_memory(ctx: Context, memory: ExemplarMemory, t: int, features) -> None:
    """Add exemplars of task ``t``'s classes to ``memory``, chosen on ``features(rows)`` (k-means
    nearest-to-centroid, :func:`conpet.replay.select_exemplars`); one batched pass over the task."""
    stream = ctx.stream
    rows = list(stream.tasks[t].train)
    feats = features(rows).cpu().numpy()
    position = {i: k for k, i in enumerate(rows)}
    for label in stream.tasks[t].labels:
        own = [i for i in rows if stream.rows[i].label == label]
        memory.add_class(stream.memory_key(t, label), own, feats[[position[i] for i in own]], seed=ctx.seed)


@torch.no_grad()
def ema_update(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float) -> None:
    """``target <- decay target + (1 - decay) source`` for every (source, target) pair (LAE's
    offline module, I-LoRA's slow one)."""
    for source, target in pairs:
        target.mul_(decay).add_(source, alpha=1.0 - decay)
