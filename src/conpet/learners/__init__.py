"""Continual learners: ``sequential`` (lower bound), ``joint`` (upper bound), Static ConPET's
former methods, each as ``<name>`` (original schedule) and ``<name>*`` (dynamic replay),
Dynamic ConPET (``dynamic``), adapter merging (``merge``) and the continual-LLM literature's methods
(``o-lora``, ``inflora``, ``lae``, ``crl``, ``fpf``, ``i-lora``, ``osf``, ``zscl``, ``cofitune``,
``model-surgery``)."""

from conpet.learners.base import CAPABILITIES, LEARNERS, Learner, Route, get_learner, register_learner
from conpet.learners.context import Context
from conpet.learners import (cofitune, crl, dynamic, ea_emr, emr, ewc, fpf, i_lora, inflora, joint, l2,  # noqa: F401
                             lae, lwf, merge, model_surgery, o_lora, osf, sequential,
                             zscl)  # (importing registers the learners)

__all__ = ["CAPABILITIES", "LEARNERS", "Context", "Learner", "Route", "get_learner", "register_learner"]
