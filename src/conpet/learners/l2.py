"""L2 towards the earlier PET weights: the rehearsal-free regularization baseline of Smith et al.
2023, "A Closer Look at Rehearsal-Free Continual Learning".

The penalty applies **from task 1 on**: while the first task trains, the anchor is the PET
module's initial weights (the module as the pretrained model starts it, i.e. no update yet:
LoRA's ``B A = 0``); after each task the anchor moves to the weights that task ended with.
Training adds ``l2_lambda * sum_i (theta_i - anchor_i)^2`` (no Fisher weighting, no 1/2, as in
the paper's table; no replay in ``l2``). The anchor covers the PET parameters only, not the head.
"""

from __future__ import annotations

import torch

from conpet.learners.options import Option
from conpet.learners.static import Plugin, register_method


@register_method
class L2(Plugin):
    """L2 penalty towards the PET weights of the previous task, the initial ones on task 1 (Smith et al. 2023)."""

    generative = True

    name = "l2"
    paper = "Smith et al. 2023, A Closer Look at Rehearsal-Free Continual Learning (CVPR workshops)"
    shards_backbone = True
    options = {"l2_lambda": Option(1.0, float, minimum=0.0, help="weight of the L2 penalty")}
    state_attrs = ("anchor",)

    def __init__(self, learner, options) -> None:
        super().__init__(learner, options)
        self.anchor: list[torch.Tensor] | None = None
        self.params: list[torch.nn.Parameter] = []

    def before_task(self, t: int) -> None:
        self.params = self.learner.pet_parameters()
        if self.anchor is None:  # task 1: anchored to the module's initial weights
            self.anchor = [p.detach().clone() for p in self.params]

    def after_task(self, t: int) -> None:
        self.anchor = [p.detach().clone() for p in self.learner.pet_parameters()]

    def extra_loss(self, indices, logits):
        return self.opts["l2_lambda"] * l2_pull(self.params, self.anchor)


def l2_pull(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i (theta_i - anchor_i)^2`` over every element of every tensor (ZSCL's L2 too)."""
    return sum(((p - q) ** 2).sum() for p, q in zip(params, anchor))
