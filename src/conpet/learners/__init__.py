"""Continual learners: ``sequential`` (lower bound), ``joint`` (upper bound), and the methods."""

from conpet.learners.base import LEARNERS, Context, Learner, get_learner, register_learner
from conpet.learners import joint, sequential  # noqa: F401  (registers the learners)

__all__ = ["LEARNERS", "Context", "Learner", "get_learner", "register_learner"]
