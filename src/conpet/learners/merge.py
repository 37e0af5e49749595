"""``merge``: one LoRA per task, merged after every task into a single module.

The adapter-merging recipe for continual learning (MOS, Sun et al. 2025, merges adapters
against parameter drift; the ComPEFT/TIES line stores one update per task and re-merges when a
task is added): task t trains a fresh LoRA module (the *expert*) and a head over its own classes
only; then the updates of all experts so far are merged on ``dW`` with a :mod:`conpet.merging`
method and factored back to one LoRA of rank ``rank`` (:func:`conpet.adapters.merge_lora`).
Prediction runs the one merged module and the concatenation of the experts' heads (argmax over
all seen classes): one backbone pass whatever the number of tasks, and the stream ends with one
module. The experts are kept only as LoRA factors (a few hundred KB each) to re-merge.

On a generative stream each expert trains with the LM loss on its task's target tokens and the
merged module answers every prompt (no heads).

Options (``learner_options``): ``method`` (``ties``; any name in ``conpet.merging``),
``rank`` (default: the PET module's ``r``), ``merge_options`` (the method's options, e.g.
``{density: 0.2, scaling: 1.0}``).

Deviation from MOS, named: MOS pulls each new adapter towards the mean of earlier ones *while*
it trains (EMA) and retrieves task-specific adapters at inference; here experts train
independently and a single merged module serves every input (no retrieval).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from conpet.adapters import merge_lora
from conpet.errors import ConfigError
from conpet.generation import lm_loss
from conpet.heads import GrowingHead, concat_heads
from conpet.learners.base import register_learner
from conpet.learners.context import Context
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.training import dev_scorer
from conpet.learners.options import Option
from conpet.merging import get_merge_method
from conpet.pet import get_pet_class

EXPERT = "expert"


@register_learner("merge")
class MergeLearner(OneModuleLearner):
    """One LoRA per task, all merged on dW into one module after every task."""

    module_name = "default"
    paper = ("Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (NeurIPS), the default "
             "rule; the others as peft's add_weighted_adapter defines them")
    generative = True
    shards_backbone = True
    options = {"method": Option("ties", str, help="merge rule (any name in conpet.merging)"),
               "rank": Option(None, int, minimum=1, nullable=True, help="rank of the merged LoRA (default: r)"),
               "merge_options": Option({}, dict, help="the merge rule's options, e.g. {density: 0.2}")}
    state_attrs = ("factors", "configs", "errors", "expert_head")

    @classmethod
    def validate(cls, cfg, opts) -> None:
        if not get_pet_class(cfg.pet.method).lora_mergeable:
            raise ConfigError(f"learner 'merge' merges LoRA updates (dW = B A); pet.method '{cfg.pet.method}' "
                              "is not a plain LoRA")
        get_merge_method(opts["method"]).check_options(opts["merge_options"])

    @classmethod
    def validate_domain_incremental(cls, cfg, opts) -> None:
        raise ConfigError("learner 'merge': its experts' heads are concatenated, one block of classes per task; "
                          "tasks that share labels (a domain-incremental stream) are not supported yet")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.rank = self.opts["rank"] or ctx.pet.rank
        self.merged_pet = ctx.pet.resized(self.rank)
        self.factors: dict[str, torch.Tensor] = {}
        """Every expert's LoRA factors (fp32), keyed ``<task>/<peft key>/A`` and ``.../B``."""
        self.configs: list[dict] = []
        """Every expert's LoRA config (``r``, ``lora_alpha``, ``use_rslora``)."""
        self.errors: list[float] = []
        self.expert_head: GrowingHead | None = None
        """The head of the task being learned, over its own classes (``self.head`` stacks the
        finished ones); ``None`` between tasks."""

    # -- a task: train an expert, merge every expert so far -------------------------------------------
    def begin_task(self, t: int):
        ctx, pet = self.ctx, self.ctx.pet
        task = ctx.stream.tasks[t]
        torch.manual_seed(int(ctx.rng.integers(2**31)))
        if self.model is None:
            self.model = pet.attach(ctx.backbone.model, EXPERT, ctx.calibration(t))
        elif EXPERT not in pet.modules(self.model):
            pet.add(self.model, EXPERT, ctx.calibration(t))
        self.expert_head = ctx.new_head()
        if not ctx.generative:  # a generative expert answers through the LM head
            self.expert_head.grow(list(task.labels), ctx.torch_gen)
        return task

    def fits(self, t: int):
        ctx, head = self.ctx, self.expert_head
        start = ctx.stream.class_range(t)[0]

        def expert_loss(indices):
            if ctx.generative:
                return lm_loss(ctx.engine, self.model, ctx.lm_head, indices)
            return F.cross_entropy(head(ctx.features(self.model, indices)), ctx.targets(indices) - start)

        score = dev_scorer(ctx, self.model, [t], lambda idx: head(ctx.features(self.model, idx)),
                           lambda idx: ctx.targets(idx) - start)
        task = ctx.stream.tasks[t]
        return [self.fit_on(t, ctx.epoch_batches(task.train), desc=f"{task.name} expert", loss=expert_loss,
                            module=EXPERT, params=list(head.parameters()), dev_score=score)]

    def after_task(self, t: int) -> None:
        """Keep the expert's factors, merge all of them into the answering module, drop the expert."""
        config, factors = self.ctx.pet.lora_factors(self.model, EXPERT)
        self.configs.append(config)
        for path, (a, b) in factors.items():
            self.factors[f"{t}/{path}/A"], self.factors[f"{t}/{path}/B"] = a, b
        experts = [(cfg, {key[len(f"{k}/"):-2]: (self.factors[key], self.factors[key[:-1] + "B"])
                          for key in self.factors if key.startswith(f"{k}/") and key.endswith("/A")})
                   for k, cfg in enumerate(self.configs)]
        result = merge_lora(experts, self.opts["method"], self.rank, **dict(self.opts["merge_options"]))
        self.errors.append(result.mean_error)
        if self.module_name not in self.ctx.pet.modules(self.model):
            self.merged_pet.add(self.model, self.module_name)
        self.merged_pet.set_lora_factors(self.model, self.module_name, result.factors)
        self.ctx.pet.activate(self.model, self.module_name)
        self.head = concat_heads([self.head, self.expert_head], self.ctx.backbone.hidden_size)
        self.expert_head = None
        self.ctx.pet.remove(self.model, EXPERT)

    def add_module(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A resumed run's modules: the merged one at the merge rank, an expert as ``pet`` makes it."""
        pet = self.merged_pet if name == self.module_name else self.ctx.pet
        if self.model is None:
            self.model = pet.attach(self.ctx.backbone.model, name)
        else:
            pet.add(self.model, name)

    def eval_extra(self, t: int) -> dict[str, list[float]]:
        return {"merge_reconstruction_error": [self.errors[-1]] * (t + 1)}

    def save(self, t: int, folder: Path) -> None:
        super().save(t, folder)
        (folder / "merge.json").write_text(json.dumps({
            "method": self.opts["method"], "merge_options": self.opts["merge_options"], "rank": self.rank,
            "tasks_merged": len(self.configs), "mean_relative_reconstruction_error": self.errors[-1],
        }, indent=2))
