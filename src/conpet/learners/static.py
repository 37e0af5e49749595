"""Static ConPET (Song et al. 2023): one shared PET module + a former continual-learning method
+ (optionally) dynamic replay.

A former method is a :class:`Plugin` on the one training loop. Each plugin gives two learners:

- ``<name>``: the method with its own original schedule (``epochs`` passes over the new task's
  rows, plus the rows the method itself replays, e.g. EMR's memory);
- ``<name>*``: the method on ConPET's *dynamic replay* schedule: from the second task on, a fixed
  number of steps whose batches mix new rows and old rows 1:1 (each old row from a uniformly
  chosen old task), so training task t costs the same for every t.

Learner options (``learner_options`` in the config, ``--set learner_options.KEY=VALUE``):

- ``steps_per_task`` (dynamic replay): default ``epochs * ceil(|new train rows| / n_new)``, i.e.
  every new row is seen ``epochs`` times, whatever the number of old tasks;
- ``new_ratio``: new:old ratio of a replay batch (default 1.0 = 1:1);
- ``replay_source``: ``history`` (ConPET: every old training row) or ``memory`` (a bounded
  exemplar memory per class, chosen by k-means on features);
- ``memory_per_class``: exemplar memory size per class (default 16);
- plus each method's own options (see its module).

Heads only ever have columns for classes seen so far, so no softmax runs over future classes
(a quirk of the official code); losses are means over the batch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from conpet.errors import ConfigError
from conpet.learners.base import Context, OneModuleLearner, register_learner
from conpet.replay import ExemplarMemory, dynamic_replay_batches, split_batch

COMMON_OPTIONS: dict[str, Any] = {
    "steps_per_task": None,
    "new_ratio": 1.0,
    "replay_source": "history",
    "memory_per_class": 16,
}


def replay_schedule(ctx: Context, t: int, opts: dict[str, Any], memory: ExemplarMemory) -> list[list[int]]:
    """ConPET's dynamic replay batches for task ``t``: ``steps_per_task`` steps (default: each new
    row seen ``epochs`` times), old rows from each old task's full training set or its memory."""
    stream, train = ctx.stream, ctx.cfg.train
    new = stream.tasks[t].train
    n_new, _ = split_batch(train.batch_size, float(opts["new_ratio"]))
    steps = opts["steps_per_task"] or train.epochs * math.ceil(len(new) / n_new)
    if opts["replay_source"] == "memory":
        pools = [memory.rows(stream.tasks[j].labels) for j in range(t)]
    else:
        pools = [list(stream.tasks[j].train) for j in range(t)]
    return dynamic_replay_batches(new, pools, int(steps), train.batch_size, ctx.rng,
                                  new_ratio=float(opts["new_ratio"]))


class Plugin:
    """A former continual-learning method as hooks on the training loop."""

    name: ClassVar[str] = "?"
    options: ClassVar[dict[str, Any]] = {}
    """The method's own options and their defaults."""

    def __init__(self, learner: "StaticConPET", options: dict[str, Any]) -> None:
        self.learner = learner
        self.opts = options

    def before_task(self, t: int) -> None:
        """Called before training task ``t``."""

    def after_task(self, t: int) -> None:
        """Called after training task ``t`` (memories, Fisher information, snapshots...)."""

    def extra_loss(self, indices: list[int], logits: torch.Tensor) -> torch.Tensor | float:
        """Added to the cross-entropy of every training batch."""
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

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The method's training state (for resume): tensors and JSON-able metadata."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state`."""

    def needs_memory(self) -> bool:
        """Whether an exemplar memory must be kept (default: only to replay from it)."""
        return self.learner.dynamic and self.opts["replay_source"] == "memory"

    def replay_rows(self, t: int) -> list[int]:
        """Old rows the method's *original* schedule adds to task ``t``'s epochs."""
        return []


class StaticConPET(OneModuleLearner):
    plugin_cls: ClassVar[type[Plugin]]
    dynamic: ClassVar[bool] = False

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.opts = self.check_options(ctx.cfg)
        self.memory = ExemplarMemory(int(self.opts["memory_per_class"]))
        self.plugins = (self.plugin_cls(self, self.opts),)

    @classmethod
    def check_options(cls, cfg) -> dict[str, Any]:
        known = {**COMMON_OPTIONS, **cls.plugin_cls.options}
        unknown = sorted(set(cfg.learner_options) - set(known))
        if unknown:
            raise ConfigError(f"learner_options: unknown option '{unknown[0]}' for learner '{cls.name}' "
                              f"(known: {', '.join(sorted(known))})")
        opts = {**known, **cfg.learner_options}
        if opts["replay_source"] not in ("history", "memory"):
            raise ConfigError("learner_options.replay_source: must be 'history' or 'memory'")
        if cls.dynamic:
            split_batch(cfg.train.batch_size, float(opts["new_ratio"]))
        return opts

    def replay_batches(self, t: int) -> list[list[int]]:
        """ConPET's dynamic replay schedule for task t >= 1."""
        return replay_schedule(self.ctx, t, self.opts, self.memory)

    def update_memory(self, t: int) -> None:
        """Add exemplars of task t's classes, chosen on the current model's features."""
        stream = self.ctx.stream
        for label in stream.tasks[t].labels:
            rows = [i for i in stream.tasks[t].train if stream.rows[i].label == label]
            feats = self.raw_features(rows).numpy()
            self.memory.add_class(label, rows, feats, seed=self.ctx.seed)

    def learn(self, t: int) -> None:
        if self.model is None:
            self.new_module()
        task = self.ctx.stream.tasks[t]
        self.head.grow(list(task.labels), self.ctx.torch_gen)
        for plugin in self.plugins:
            plugin.before_task(t)
        if t > 0 and self.dynamic:
            self.train_on(task.train, f"{task.name} {self.name}", batches=self.replay_batches(t))
        else:
            rows = list(task.train) + [i for plugin in self.plugins for i in plugin.replay_rows(t)]
            self.train_on(rows, f"{task.name} {self.name}")
        if any(plugin.needs_memory() for plugin in self.plugins):
            self.update_memory(t)
        for plugin in self.plugins:
            plugin.after_task(t)


def register_method(plugin_cls: type[Plugin]) -> type[Plugin]:
    """Register ``<name>`` (original schedule) and ``<name>*`` (dynamic replay) learners."""
    doc = (plugin_cls.__doc__ or "").strip().splitlines()[0]
    for dynamic in (False, True):
        name = plugin_cls.name + ("*" if dynamic else "")
        cls = type(f"StaticConPET_{plugin_cls.__name__}{'Star' if dynamic else ''}", (StaticConPET,),
                   {"plugin_cls": plugin_cls, "dynamic": dynamic,
                    "__doc__": f"{doc} ({'dynamic replay' if dynamic else 'original schedule'})",
                    "__module__": plugin_cls.__module__})
        register_learner(name)(cls)
    return plugin_cls
