"""LwF: learning without forgetting (Li & Hoiem 2017), on the shared PET module.

Before task t (t >= 2) the current PET module is copied into a frozen *teacher* module on the
same backbone (a second named peft adapter: no second copy of the model) and the head's old
columns are frozen into a teacher head. Every training batch then adds
``lwf_lambda * T^2 * KL(softmax(teacher_old / T) || softmax(student_old / T))`` over the old
classes, averaged over the batch (the official code sums over the batch with T = 1).

On a generative stream the distilled distribution is the teacher module's **next-token
distribution over the vocabulary at every target position** of the batch (the same KL with the
same temperature, averaged over target tokens): the previous module's answers are kept as
distributions, not only as their argmax tokens. Rows of the new task and replayed old rows are
distilled alike.

The teacher's logits are computed on the fly, one extra no-grad forward per step, so the cost of
a task does not grow with the number of old tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conpet.generation import token_logits
from conpet.learners.options import Option
from conpet.learners.static import Plugin, register_method

TEACHER = "lwf_teacher"


@register_method
class LwF(Plugin):
    """Distillation of the previous model's old-class logits (Li & Hoiem 2017)."""

    name = "lwf"
    paper = "Li & Hoiem 2017, Learning without Forgetting (TPAMI)"
    shards_backbone = True
    generative = True
    options = {"lwf_lambda": Option(1.0, float, minimum=0.0, help="weight of the distillation term"),
               "lwf_temperature": Option(2.0, float, minimum=1e-6, help="distillation temperature")}
    state_attrs = ("n_old", "teacher_head", "teacher_lm")

    def __init__(self, learner, options) -> None:
        super().__init__(learner, options)
        self.n_old = 0
        self.teacher_head: list[torch.Tensor] | None = None
        """[weight, bias] of the previous head's old-class rows (classification)."""
        self.teacher_lm = False
        """Generative stream: a teacher module exists and distils next-token distributions."""

    def before_task(self, t: int) -> None:
        learner = self.learner
        if t == 0:
            return
        pet, model, name = learner.ctx.pet, learner.model, learner.module_name
        pet.copy(model, name, TEACHER)
        pet.activate(model, name)
        if learner.ctx.generative:
            self.n_old = 0
            self.teacher_head = None
            self.teacher_lm = True
            return
        self.n_old = len(learner.ctx.stream.seen_labels(t - 1))
        self.teacher_head = [learner.head.weight[: self.n_old].detach().clone(),
                             learner.head.bias[: self.n_old].detach().clone()]

    def extra_loss(self, indices, logits):
        if self.teacher_head is None and not self.teacher_lm:
            return 0.0
        learner = self.learner
        ctx = learner.ctx
        pet, model, name = ctx.pet, learner.model, learner.module_name
        with torch.no_grad():
            pet.activate(model, TEACHER)
            if self.teacher_lm:
                teacher = token_logits(ctx.engine, model, ctx.lm_head, indices)
            else:
                teacher = F.linear(ctx.features(model, indices).float(), *self.teacher_head)
            pet.activate(model, name)
        T = self.opts["lwf_temperature"]
        student = (logits if self.teacher_lm else logits[:, : self.n_old]).float()
        kl = F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                      log_target=True, reduction="batchmean")
        return self.opts["lwf_lambda"] * T * T * kl
