"""EWC on the PET parameters (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks"), one penalty per old task, as in ConPET's EWC baseline.

After task k the learner stores the PET parameters theta_k and a diagonal Fisher F_k estimated
on task k's training rows; training later tasks adds
``ewc_lambda / 2 * sum_k sum_i F_k,i (theta_i - theta_k,i)^2``.

Fisher estimate: the empirical Fisher from **per-sample** gradients, ``F_i = mean over rows of
(d log p(y | x) / d theta_i)^2`` on up to ``fisher_samples`` (default 256) training rows of the
task (a seeded draw when the task has more), one row per backward pass, so ``ewc_lambda`` means
what it means in Kirkpatrick et al. Named deviation: the gold label ``y`` is used (the empirical
Fisher) rather than an expectation over the model's predicted labels; the official ConPET code
squares the gradient of the *batch-mean* loss, about ``1 / batch_size`` of this estimate.

The sum of penalties is computed in constant time per step, whatever the number of old tasks:
``sum_k F_k (theta - theta_k)^2 = A theta^2 - 2 B theta + C`` with ``A = sum_k F_k``,
``B = sum_k F_k theta_k``, ``C = sum_k F_k theta_k^2`` accumulated after each task (the same
value and gradient as one penalty per old task, up to float rounding).
"""

from __future__ import annotations

import torch

import numpy as np

from conpet.learners.options import Option
from conpet.learners.static import Plugin, register_method


@register_method
class EWC(Plugin):
    """Elastic weight consolidation on the PET parameters (Kirkpatrick et al. 2017)."""

    generative = True

    name = "ewc"
    paper = "Kirkpatrick et al. 2017, Overcoming catastrophic forgetting in neural networks (PNAS)"
    shards_backbone = True
    options = {"ewc_lambda": Option(1.0, float, minimum=0.0, help="weight of the EWC penalty"),
               "fisher_samples": Option(256, int, minimum=1, help="training rows of a task the Fisher is estimated on")}
    state_attrs = ("n_penalties", "fisher_sum", "anchor_sum", "square_sum")

    def __init__(self, learner, options) -> None:
        super().__init__(learner, options)
        self.n_penalties = 0
        self.fisher_sum: list[torch.Tensor] = []
        """A = sum_k F_k, per PET tensor (B and C alike: ``sum_k F_k theta_k``, ``sum_k F_k theta_k^2``)."""
        self.anchor_sum: list[torch.Tensor] = []
        self.square_sum: list[torch.Tensor] = []
        self.params: list[torch.nn.Parameter] = []

    @property
    def sums(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(A, B, C)`` per PET tensor."""
        return list(zip(self.fisher_sum, self.anchor_sum, self.square_sum))

    def before_task(self, t: int) -> None:
        self.params = self.learner.pet_parameters()

    def fisher_rows(self, t: int) -> list[int]:
        """The rows of task ``t`` the Fisher is estimated on: all of them, or a seeded draw of
        ``fisher_samples``."""
        rows = list(self.learner.ctx.stream.tasks[t].train)
        n = self.opts["fisher_samples"]
        if len(rows) <= n:
            return rows
        order = np.random.default_rng(self.learner.ctx.seed + 7919 * (t + 1)).permutation(len(rows))[:n]
        return [rows[k] for k in sorted(order)]

    def fisher(self, t: int) -> list[torch.Tensor]:
        """Diagonal empirical Fisher of the PET parameters on task ``t``: per-sample squared
        gradients of the log-likelihood of the gold label, averaged over the rows."""
        learner, ctx = self.learner, self.learner.ctx
        params = learner.pet_parameters()
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        rows = self.fisher_rows(t)
        learner.model.eval()
        for i in rows:
            with ctx.compute.autocast():
                loss = learner.objective_loss([i])[0]  # -log p(y | x): the gold label, or the target tokens
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.detach().float() ** 2
        return [f / len(rows) for f in fisher]

    def after_task(self, t: int) -> None:
        params = self.learner.pet_parameters()
        sums = accumulate(self.sums, self.fisher(t), [p.detach() for p in params])
        self.fisher_sum, self.anchor_sum, self.square_sum = (list(column) for column in zip(*sums))
        self.n_penalties += 1

    def extra_loss(self, indices, logits):
        if not self.n_penalties:
            return 0.0
        return self.opts["ewc_lambda"] / 2 * penalty(self.params, self.sums)


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
