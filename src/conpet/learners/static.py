"""Static ConPET (Song et al. 2023): one shared PET module + a former continual-learning method
+ (optionally) dynamic replay.

A former method is a :class:`Plugin` on the one training loop. Each plugin gives two learners:

- ``<name>``: the method with its own original schedule (``epochs`` passes over the new task's
  rows, plus the rows the method itself replays, e.g. EMR's memory);
- ``<name>*``: the method on ConPET's *dynamic replay* schedule: from the second task on, a fixed
  number of steps whose batches mix new rows and old rows 1:1 (each old row from a uniformly
  chosen old task), so training task t costs the same for every t.

Learner options (``learner_options`` in the config, ``--set learner_options.KEY=VALUE``): the
replay options shared with Dynamic ConPET (:data:`conpet.learners.options.REPLAY_OPTIONS`:
``steps_per_task``, ConPET's official ``batch_limit`` budget, ``new_ratio``, ``replay_source``,
``memory_per_class``) plus each method's own options (see its module).

Heads only ever have columns for classes seen so far, so no softmax runs over future classes
(a quirk of the official code); losses are means over the batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from conpet.learners.base import CONPET_PAPER, register_learner
from conpet.learners.context import Context
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.state import pack, unpack
from conpet.learners.training import update_memory
from conpet.learners.options import REPLAY_OPTIONS, Option
from conpet.replay import ExemplarMemory, replay_schedule, split_batch


class Plugin:
    """A former continual-learning method as hooks on the training loop."""

    name: ClassVar[str] = "?"
    paper: ClassVar[str] = ""
    """The former method's paper (its ``*`` learner adds ConPET's dynamic replay)."""
    options: ClassVar[dict[str, Option]] = {}
    """The method's own options (:class:`conpet.learners.options.Option`)."""
    generative: ClassVar[bool] = False
    """Whether the method also works on generative streams (prompt -> target tasks)."""
    shards_backbone: ClassVar[bool] = False
    """Whether the method runs with ``backbone.fsdp`` (:attr:`conpet.learners.base.Learner.shards_backbone`)."""

    def __init__(self, learner: "StaticConPET", options: dict[str, Any]) -> None:
        self.learner = learner
        self.opts = options

    def before_task(self, t: int) -> None:
        """Called before training task ``t``."""

    def after_task(self, t: int) -> None:
        """Called after training task ``t`` (memories, Fisher information, snapshots...)."""

    def extra_loss(self, indices: list[int], logits: torch.Tensor) -> torch.Tensor | float:
        """Added to the task loss of every training batch (``logits``: the batch's class logits
        [rows, seen classes], or on a generative stream its next-token logits [target tokens,
        vocabulary], :func:`conpet.generation.token_logits`)."""
        return 0.0

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Applied to features before the head, in training and prediction."""
        return features

    def param_groups(self) -> list[dict]:
        """Extra trainable tensors of the method (optimizer groups)."""
        return []

    def save(self, folder) -> None:
        """Write the method's own state needed at prediction time (beside the adapter)."""

    def load(self, folder) -> None:
        """Read what :meth:`save` wrote."""

    state_attrs: ClassVar[tuple[str, ...]] = ()
    """The attributes holding the method's training state (:func:`conpet.learners.state.pack`)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The method's training state (for resume): its declared :attr:`state_attrs`."""
        return pack(self)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state`."""
        unpack(self, tensors, meta)

    def needs_memory(self) -> bool:
        """Whether an exemplar memory must be kept (default: only to replay from it)."""
        return self.learner.dynamic and self.opts["replay_source"] == "memory"

    def replay_rows(self, t: int) -> list[int]:
        """Old rows the method's *original* schedule adds to task ``t``'s epochs."""
        return []


class StaticConPET(OneModuleLearner):
    plugin_cls: ClassVar[type[Plugin]]
    dynamic: ClassVar[bool] = False
    state_attrs = ("memory",)

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.memory = ExemplarMemory(self.opts["memory_per_class"])
        self.plugins = (self.plugin_cls(self, self.opts),)

    @classmethod
    def validate(cls, cfg, opts) -> None:
        if cls.dynamic:
            split_batch(cfg.train.batch_size, opts["new_ratio"])

    def replay_batches(self, t: int) -> list[list[int]]:
        """ConPET's dynamic replay schedule for task t >= 1."""
        train = self.ctx.cfg.train
        lengths = self.ctx.encoded.all_lengths if train.length_bucketing else None
        return replay_schedule(self.ctx.stream, t, self.opts, self.memory, train.batch_size, train.epochs,
                               self.ctx.rng, lengths)

    def fits(self, t: int):
        if t > 0 and self.dynamic:
            return [self.fit_on(t, self.replay_batches(t))]
        rows = list(self.ctx.stream.tasks[t].train) + [i for plugin in self.plugins for i in plugin.replay_rows(t)]
        return [self.fit_on(t, self.ctx.epoch_batches(rows))]

    def after_task(self, t: int) -> None:
        if any(plugin.needs_memory() for plugin in self.plugins):
            update_memory(self.ctx, self.memory, t, self.raw_features)
        super().after_task(t)


def register_method(plugin_cls: type[Plugin]) -> type[Plugin]:
    """Register ``<name>`` (original schedule) and ``<name>*`` (dynamic replay) learners."""
    doc = (plugin_cls.__doc__ or "").strip().splitlines()[0]
    for dynamic in (False, True):
        name = plugin_cls.name + ("*" if dynamic else "")
        cls = type(f"StaticConPET_{plugin_cls.__name__}{'Star' if dynamic else ''}", (StaticConPET,),
                   {"plugin_cls": plugin_cls, "dynamic": dynamic, "generative": plugin_cls.generative,
                    "paper": plugin_cls.paper + (f"; on the dynamic replay of {CONPET_PAPER}" if dynamic else ""),
                    "shards_backbone": plugin_cls.shards_backbone,
                    "options": {**REPLAY_OPTIONS, **plugin_cls.options},
                    "__doc__": f"{doc} ({'dynamic replay' if dynamic else 'original schedule'})",
                    "__module__": plugin_cls.__module__})
        register_learner(name)(cls)
    return plugin_cls
