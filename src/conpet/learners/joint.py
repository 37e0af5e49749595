"""``joint``: multi-task training on every task seen so far (the upper bound).

At step t a fresh PET module and head are trained from scratch on the union of the training
rows of tasks 1..t for the configured number of epochs. Its cost grows with t; that is the
point of comparison for learners whose cost does not.
"""

from __future__ import annotations

from conpet.learners.base import CONPET_PAPER, register_learner
from conpet.learners.one_module import OneModuleLearner


@register_learner("joint")
class Joint(OneModuleLearner):
    """A fresh PET module trained on all tasks seen so far at every step (the upper bound)."""

    paper = f"{CONPET_PAPER} (its multi-task upper bound)"
    generative = True
    shards_backbone = True

    def begin_task(self, t: int):
        self.new_module(t)
        self.grow_head(self.ctx.stream.seen_labels(t))

    def fits(self, t: int):
        rows = [i for task in self.ctx.stream.tasks[: t + 1] for i in task.train]
        return [self.fit_on(t, self.ctx.epoch_batches(rows), desc=f"joint 1..{t + 1}")]
