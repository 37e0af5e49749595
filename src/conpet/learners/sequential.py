"""``sequential``: one PET module trained on task after task, no replay.

ConPET's "PET-only" lower bound: the shared module and the growing head see only the current
task's rows, so earlier tasks are forgotten as far as the backbone's plasticity allows.
"""

from __future__ import annotations

from conpet.learners.base import CONPET_PAPER, register_learner
from conpet.learners.one_module import OneModuleLearner


@register_learner("sequential")
class Sequential(OneModuleLearner):
    """One PET module trained task after task, no replay (ConPET's PET-only lower bound)."""

    paper = f"{CONPET_PAPER} (its PET-only lower bound)"
    generative = True
    shards_backbone = True
