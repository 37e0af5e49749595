"""``fpf`` / ``k-fpf``: FPF, Forgetting-Prone-part Fine-tuning (Zhao et al. 2023, "Does Continual
Learning Equally Forget All Parameters?", ICML).

``sequential``'s training on each task, then from the second task an FPF phase: ``fpf_steps``
steps of cross-entropy (FPF-CE; the LM loss on generative streams) on batches drawn from an
exemplar buffer (k-means, ``memory_per_class`` rows per class), training only the forgetting-prone
parts with everything else frozen. ``k-fpf`` runs the phase k times over the stream at fixed
intervals of training steps, whatever the task boundaries, on the earlier tasks' exemplars and
the current task's rows seen so far.

Deviations, named: the paper ranks modules by a sensitivity score measured on ResNets; here the
forgetting-prone set is conpet's mapping to a PET-tuned LLM, the head and the PET parameters of
the top ``fpf_layers`` PET layers; the set and ``fpf_steps`` (100) are options, not verified
against the paper's iteration counts.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from conpet.engine import find_layers
from conpet.learners.base import register_learner
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.options import Option
from conpet.learners.training import Fit, update_memory
from conpet.replay import ExemplarMemory


@register_learner("fpf")
class FPF(OneModuleLearner):
    """FPF: sequential PET training, then only the forgetting-prone parts fine-tuned on a buffer (Zhao et al. 2023)."""

    paper = "Zhao et al. 2023, Does Continual Learning Equally Forget All Parameters? (ICML)"
    shards_backbone = True
    generative = True
    options = {"memory_per_class": Option(16, int, minimum=1, help="buffer rows per class (k-means exemplars)"),
               "fpf_layers": Option(2, int, minimum=1, help="top PET layers in the forgetting-prone set"),
               "fpf_steps": Option(100, int, minimum=1, help="buffer steps of each FPF phase")}

    state_attrs = ("memory",)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.memory = ExemplarMemory(self.opts["memory_per_class"])

    def fits(self, t: int):
        """``sequential``'s training on the task's rows, the memory's update, then (from the second
        task) the FPF phase."""
        task = self.ctx.stream.tasks[t]
        yield self.fit_on(t, self.ctx.epoch_batches(task.train), desc=f"{task.name} train")
        update_memory(self.ctx, self.memory, t, self.raw_features)
        if t > 0:
            yield self.fpf_fit(t, self.memory.rows(self.ctx.stream.memory_keys_through(t)))

    def forgetting_prone(self) -> list[torch.nn.Parameter]:
        """The PET parameters of the top ``fpf_layers`` layers PET modules touch."""
        _, attr, _ = find_layers(self.ctx.backbone.model)
        pattern = re.compile(rf"\.{re.escape(attr)}\.(\d+)\.")
        own = {id(p) for p in self.ctx.pet.parameters(self.model, self.module_name)}  # listed once, not per parameter
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in own]
        indices = sorted({int(m.group(1)) for n, _ in named if (m := pattern.search(n))})
        top = set(indices[-self.opts["fpf_layers"]:])
        return [p for n, p in named if (m := pattern.search(n)) and int(m.group(1)) in top]

    def fpf_fit(self, t: int, buffer: list[int]) -> Fit:
        """``fpf_steps`` steps on batches drawn from ``buffer``, training only the head and the
        forgetting-prone PET parameters."""
        ctx = self.ctx
        buffer = np.asarray(buffer)
        size = ctx.cfg.train.batch_size
        batches = [sorted(ctx.rng.choice(buffer, size=min(size, len(buffer)), replace=False).tolist())
                   for _ in range(self.opts["fpf_steps"])]
        return self.fit_on(t, batches, desc=f"{ctx.stream.tasks[t].name} fpf", train_module=False, epochs=1,
                           groups=[{"params": self.forgetting_prone(), "lr": ctx.cfg.train.lr}], dev_score=None)


@register_learner("k-fpf")
class KFPF(FPF):
    """k-FPF: training on the current rows only, with FPF k times over the stream at fixed step intervals (Zhao et al. 2023)."""

    options = {**FPF.options, "k": Option(10, int, minimum=1, help="FPF phases over the whole stream")}

    def planned_steps(self) -> list[int]:
        """Training steps of each task of the stream (``epochs`` passes over its rows)."""
        train = self.ctx.cfg.train
        return [train.epochs * math.ceil(len(task.train) / train.batch_size) for task in self.ctx.stream.tasks]

    def triggers_in(self, t: int, n_steps: int) -> list[int]:
        """Positions (steps into task t) after which an FPF phase runs."""
        planned = self.planned_steps()
        total, start = sum(planned), sum(planned[:t])
        points = [round(total * (q + 1) / self.opts["k"]) for q in range(self.opts["k"])]
        return sorted({p - start for p in points if start < p <= start + n_steps})

    def fits(self, t: int):
        """The task's epochs cut at the FPF triggers that fall inside them, each followed by an FPF phase."""
        ctx = self.ctx
        batches = ctx.epoch_batches(ctx.stream.tasks[t].train)
        triggers = self.triggers_in(t, len(batches))
        done = 0
        for cut in sorted({*triggers, len(batches)}):
            if cut > done:
                yield self.fit_on(t, batches[done:cut], epochs=1, dev_score=None)
            if cut in triggers:
                buffer = self.buffer(t, [i for batch in batches[:cut] for i in batch])
                if buffer:
                    yield self.fpf_fit(t, buffer)
            done = cut

    def after_task(self, t: int) -> None:
        update_memory(self.ctx, self.memory, t, self.raw_features)

    def buffer(self, t: int, seen: list[int]) -> list[int]:
        """The earlier tasks' exemplars + up to ``memory_per_class`` random seen rows per class of task t."""
        stream = self.ctx.stream
        rows = self.memory.rows(stream.memory_keys_through(t - 1))
        by_label: dict[str, list[int]] = {}
        for i in dict.fromkeys(seen):
            by_label.setdefault(stream.rows[i].label, []).append(i)
        for label in sorted(by_label):
            own = by_label[label]
            keep = self.ctx.rng.choice(len(own), size=min(len(own), self.opts["memory_per_class"]), replace=False)
            rows.extend(own[k] for k in sorted(keep.tolist()))
        return rows
