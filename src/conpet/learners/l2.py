"""L2 towards the previous PET weights: the rehearsal-free regularization baseline of Smith et
al. 2023, "A Closer Look at Rehearsal-Free Continual Learning".

After each task the PET parameters are stored; training the next task adds
``l2_lambda * sum_i (theta_i - theta_prev,i)^2`` (no Fisher weighting, no replay in ``l2``).
"""

from __future__ import annotations

import torch

from conpet.learners.static import Plugin, register_method


@register_method
class L2(Plugin):
    """L2 penalty towards the PET weights after the previous task (Smith et al. 2023)."""

    name = "l2"
    options = {"l2_lambda": 1.0}

    def __init__(self, learner, options) -> None:
        super().__init__(learner, options)
        self.previous: list[torch.Tensor] | None = None
        self.params: list[torch.nn.Parameter] = []

    def before_task(self, t: int) -> None:
        self.params = self.learner.pet_parameters()

    def after_task(self, t: int) -> None:
        self.previous = [p.detach().clone() for p in self.learner.pet_parameters()]

    def state(self):
        if self.previous is None:
            return {}, {"n": None}
        return {f"previous/{i}": v for i, v in enumerate(self.previous)}, {"n": len(self.previous)}

    def load_state(self, tensors, meta):
        n = meta["n"]
        self.previous = None if n is None else [tensors[f"previous/{i}"].clone() for i in range(n)]

    def extra_loss(self, indices, logits):
        if self.previous is None:
            return 0.0
        return float(self.opts["l2_lambda"]) * sum(((p - q) ** 2).sum() for p, q in zip(self.params, self.previous))
