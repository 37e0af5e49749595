"""Continual learners: ``sequential`` (lower bound), ``joint`` (upper bound), Static ConPET's
former methods, each as ``<name>`` (original schedule) and ``<name>*`` (dynamic replay),
Dynamic ConPET (``dynamic``), adapter merging (``merge``) and the continual-LLM literature's methods
(``o-lora``, ``inflora``, ``lae``, ``crl``, ``fpf``, ``i-lora``, ``osf``, ``zscl``, ``cofitune``,
``model-surgery``). Learners of other packages join through the ``conpet.learners`` entry-point
group (docs/write-a-learner.md)."""

from importlib.metadata import entry_points

from conpet.errors import warn
from conpet.learners.base import CAPABILITIES, LEARNERS, Learner, Route, get_learner, register_learner
from conpet.learners.context import Context
from conpet.learners import (cofitune, crl, dynamic, ea_emr, emr, ewc, fpf, i_lora, inflora, joint, l2,  # noqa: F401
                             lae, lwf, merge, model_surgery, o_lora, osf, sequential,
                             zscl)  # (importing registers the learners)

PLUGIN_GROUP = "conpet.learners"
"""The entry-point group whose modules conpet imports to register their learners."""


def load_plugins() -> list[str]:
    """Import every module of the :data:`PLUGIN_GROUP` entry points (importing registers their
    learners); one that fails is a warning naming it, never a broken conpet. Returns the names loaded."""
    loaded = []
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as e:  # a third party's bug must not take conpet's own learners down
            warn(f"learner plugin '{point.name}' ({point.value}) could not be imported: {type(e).__name__}: {e}")
        else:
            loaded.append(point.name)
    return loaded


load_plugins()

__all__ = ["CAPABILITIES", "LEARNERS", "PLUGIN_GROUP", "Context", "Learner", "Route", "get_learner", "load_plugins",
           "register_learner"]
