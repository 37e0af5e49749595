"""The PET module selector of Dynamic ConPET (Song et al. 2023): its own PET module (``selector``)
on the shared backbone plus a head over task ids, trained with cross-entropy over tasks on
ConPET's dynamic replay batches; it picks the top-k experts each input runs through.

``balance`` (a conpet option, not in the paper): the loss is the mean over the tasks in the
batch of each task's mean cross-entropy, so the newest task, half of every replay batch, no
longer outweighs each old one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conpet.learners.context import Context
from conpet.learners.training import Fit, dev_scorer

SELECTOR = "selector"


def task_balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the targets present in the batch of each target's mean cross-entropy (every task
    weighs the same, however many of its rows the batch holds)."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    counts = torch.bincount(targets, minlength=logits.shape[-1])[targets].to(losses.dtype)
    return (losses / counts).sum() / (counts.reciprocal().sum())


class ModuleSelector:
    """Selector head + the training and routing of the ``selector`` PET module."""

    state_attrs = ("head",)

    def __init__(self, ctx: Context, balance: bool = False) -> None:
        self.ctx = ctx
        self.balance = balance
        self.head = ctx.new_head()

    def task_ids(self, indices: list[int]) -> torch.Tensor:
        stream = self.ctx.stream
        return torch.tensor([stream.task_of_row[i] for i in indices], device=self.ctx.device)

    def loss(self, model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
        logits, targets = self.head(self.ctx.features(model, indices)), self.task_ids(indices)
        return task_balanced_cross_entropy(logits, targets) if self.balance else F.cross_entropy(logits, targets)

    def fit(self, model: torch.nn.Module, batches: list[list[int]], desc: str, task: int) -> Fit:
        """The selector's fit of task ``task`` on ``batches`` (the learner runs it with its hooks)."""
        score = dev_scorer(self.ctx, model, list(range(task + 1)),
                           lambda idx: self.head(self.ctx.features(model, idx)), self.task_ids)
        return Fit(task, desc, batches, lambda idx: self.loss(model, idx), SELECTOR, list(self.head.parameters()),
                   dev_score=score)

    @torch.no_grad()
    def probabilities(self, model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
        """Selector probabilities [B, tasks] (the model's mode is kept)."""
        was_training = model.training
        model.eval()
        self.ctx.pet.activate(model, SELECTOR)
        feats = self.ctx.features(model, indices)
        model.train(was_training)
        return F.softmax(self.head(feats).float(), dim=-1)
