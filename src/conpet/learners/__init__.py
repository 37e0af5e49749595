"""Continual learners: ``sequential`` (lower bound), ``joint`` (upper bound), Static ConPET's
former methods, each as ``<name>`` (original schedule) and ``<name>*`` (dynamic replay),
Dynamic ConPET (``dynamic``), adapter merging (``merge``) and O-LoRA (``o-lora``)."""

from conpet.learners.base import LEARNERS, Context, Learner, get_learner, register_learner
from conpet.learners import crl, dynamic, ea_emr, emr, ewc, fpf, inflora, joint, l2, lae, lwf, merge, o_lora, sequential  # noqa: F401  (registers the learners)

__all__ = ["LEARNERS", "Context", "Learner", "get_learner", "register_learner"]
