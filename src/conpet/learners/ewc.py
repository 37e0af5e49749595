"""EWC on the PET parameters (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks"), one penalty per old task, as in ConPET's EWC baseline.

After task k the learner stores the PET parameters theta_k and a diagonal Fisher F_k estimated
on task k's training rows; training later tasks adds
``ewc_lambda / 2 * sum_k sum_i F_k,i (theta_i - theta_k,i)^2``.

Fisher estimate, named: squared gradients of the mini-batch cross-entropy, averaged over at most
``fisher_batches`` batches of the task (avalanche's EWC estimate); the official code weights
squared gradients by the predicted label distribution instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conpet.learners.loop import autocast
from conpet.learners.static import Plugin, register_method


@register_method
class EWC(Plugin):
    """Elastic weight consolidation on the PET parameters (Kirkpatrick et al. 2017)."""

    name = "ewc"
    options = {"ewc_lambda": 1.0, "fisher_batches": 32}

    def __init__(self, learner, options) -> None:
        super().__init__(learner, options)
        self.anchors: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def after_task(self, t: int) -> None:
        learner, ctx = self.learner, self.learner.ctx
        params = learner.pet_parameters()
        fisher = [torch.zeros_like(p) for p in params]
        batches = ctx.epoch_batches(ctx.stream.tasks[t].train, epochs=1)[: int(self.opts["fisher_batches"])]
        learner.model.eval()
        for indices in batches:
            learner.model.zero_grad(set_to_none=True)
            with autocast(ctx.precision):
                loss = F.cross_entropy(learner.logits(indices), ctx.targets(indices))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.detach().float() ** 2
        fisher = [f / max(1, len(batches)) for f in fisher]
        self.anchors.append(([p.detach().clone() for p in params], fisher))

    def extra_loss(self, indices, logits):
        if not self.anchors:
            return 0.0
        params = self.learner.pet_parameters()
        penalty = sum(
            (fk * (p - pk) ** 2).sum()
            for anchor, fisher in self.anchors
            for p, pk, fk in zip(params, anchor, fisher)
        )
        return float(self.opts["ewc_lambda"]) / 2 * penalty
