"""EWC on the PET parameters (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks"), one penalty per old task, as in ConPET's EWC baseline.

After task k the learner stores the PET parameters theta_k and a diagonal Fisher F_k estimated
on task k's training rows; training later tasks adds
``ewc_lambda / 2 * sum_k sum_i F_k,i (theta_i - theta_k,i)^2``.

Fisher estimate, named: squared gradients of the mini-batch cross-entropy, averaged over at most
``fisher_batches`` batches of the task (avalanche's EWC estimate); the official code weights
squared gradients by the predicted label distribution instead.

The sum of penalties is computed in constant time per step, whatever the number of old tasks:
``sum_k F_k (theta - theta_k)^2 = A theta^2 - 2 B theta + C`` with ``A = sum_k F_k``,
``B = sum_k F_k theta_k``, ``C = sum_k F_k theta_k^2`` accumulated after each task (the same
value and gradient as one penalty per old task, up to float rounding).
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
        self.n_penalties = 0
        self.sums: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (A, B, C) per tensor
        self.params: list[torch.nn.Parameter] = []

    def before_task(self, t: int) -> None:
        self.params = self.learner.pet_parameters()

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
        self.sums = accumulate(self.sums, fisher, [p.detach() for p in params])
        self.n_penalties += 1

    def state(self):
        tensors = {f"{name}/{i}": v for i, sums in enumerate(self.sums) for name, v in zip("abc", sums)}
        return tensors, {"n_penalties": self.n_penalties, "n_tensors": len(self.sums)}

    def load_state(self, tensors, meta):
        self.n_penalties = meta["n_penalties"]
        self.sums = [tuple(tensors[f"{name}/{i}"].clone() for name in "abc") for i in range(meta["n_tensors"])]

    def extra_loss(self, indices, logits):
        if not self.n_penalties:
            return 0.0
        return float(self.opts["ewc_lambda"]) / 2 * penalty(self.params, self.sums)


def accumulate(sums, fisher: list[torch.Tensor], theta: list[torch.Tensor]):
    """Add one old task (Fisher ``F_k``, anchor ``theta_k``) to the running ``(A, B, C)`` sums."""
    if not sums:
        sums = [(torch.zeros_like(f), torch.zeros_like(f), torch.zeros_like(f)) for f in fisher]
    for (a, b, c), f, th in zip(sums, fisher, theta):
        th = th.float()
        a += f
        b += f * th
        c += f * th**2
    return sums


def penalty(params: list[torch.Tensor], sums) -> torch.Tensor:
    """``sum_k sum_i F_k,i (theta_i - theta_k,i)^2`` over every old task k, from the sums."""
    return sum((a * p**2 - 2 * b * p + c).sum() for p, (a, b, c) in zip(params, sums))
