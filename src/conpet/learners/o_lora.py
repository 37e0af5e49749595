"""``o-lora``: O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning", official code cmnfriend/O-LoRA).

Each task trains a fresh LoRA while every earlier task's LoRA stays frozen and active (their sum
answers every input, no task id). The loss is, as the official trainer's,
``L_task + lambda_orth * sum |A_hist A_t^T| + lambda_l2 * sum ||p||_F`` (defaults 0.5 and 0, the
Standard CL scripts), counted once per optimizer step whatever ``train.grad_accum``. After the task
the new factors join the history as the official code stores it: ``A_hist`` gains A_t's rows,
``B_hist`` gains ``s B_t``'s columns, so the history is one plain peft LoRA of rank ``r (t + 1)``
and scaling 1 (the saved adapter is the whole model).

Deviations, named: conpet's targets and confinement (the official LLaMA scripts: ``q_proj`` and
``v_proj`` of every layer, ``--set pet.options.target_modules=[q_proj,v_proj] --set
train.top_layers=null``); on classification streams a growing head as ``sequential``'s (the
official code is generative).
"""

from __future__ import annotations

import torch

from conpet.errors import ConfigError
from conpet.learners.base import register_learner
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.options import Option
from conpet.pet import get_pet_class

HISTORY = "o-lora"
"""The frozen history: every finished task's LoRA, concatenated (what answers after each task)."""
NEW = "o-lora-new"
"""The LoRA of the task being learned."""


@register_learner("o-lora")
class OLoRA(OneModuleLearner):
    """O-LoRA: a fresh LoRA per task, orthogonal to the earlier tasks' frozen LoRAs (Wang et al. 2023)."""

    paper = "Wang et al. 2023, Orthogonal Subspace Learning for Language Model Continual Learning"
    shards_backbone = True
    generative = True
    module_name = HISTORY
    training_module = NEW
    options = {"lambda_orth": Option(0.5, float, minimum=0.0, help="weight of the orthogonality penalty"),
               "lambda_l2": Option(0.0, float, minimum=0.0, help="weight of the new LoRA's Frobenius norms")}

    @classmethod
    def validate(cls, cfg, opts) -> None:
        options = cfg.pet.options
        if not get_pet_class(cfg.pet.method).lora_mergeable or options.get("use_dora") or options.get("use_rslora"):
            raise ConfigError(f"learner 'o-lora' stacks plain LoRA modules (dW = s B A); pet.method "
                              f"'{cfg.pet.method}' with these options is not one")

    @property
    def history_rank(self) -> int:
        """The rank of the history (r times the tasks folded in), 0 before the first task's end."""
        return self.model.peft_config[HISTORY].r if self.has_module(HISTORY) else 0

    # -- learning --------------------------------------------------------------------------------------
    def begin_task(self, t: int):
        """A fresh LoRA for task ``t`` (the model wrapped at the first task), head columns for its labels."""
        ctx, pet = self.ctx, self.ctx.pet
        torch.manual_seed(int(ctx.rng.integers(2**31)))
        if self.model is None:
            self.model = pet.attach(ctx.backbone.model, NEW, ctx.calibration(t))
        elif NEW not in pet.modules(self.model):
            pet.add(self.model, NEW, ctx.calibration(t))
        self._penalty_weights: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] | None = None
        self.grow_head(list(ctx.stream.tasks[t].labels))

    def setup_forward(self, fit) -> None:
        """The new LoRA trains with the frozen history active beside it."""
        if self.history_rank:
            self.ctx.pet.activate_stacked(self.model, NEW, [HISTORY])
        else:
            self.ctx.pet.activate(self.model, NEW)

    def loss(self, indices: list[int]) -> torch.Tensor:
        return self.objective_loss(indices)[0] + self.penalty()

    def penalty(self) -> torch.Tensor | float:
        """``lambda_orth * sum |A_hist A_new^T| + lambda_l2 * sum ||p||_F`` over the new LoRA's layers."""
        total = 0.0
        if self._penalty_weights is None:  # matched once per task (a step would walk every module of the model)
            pet, history = self.ctx.pet, dict(self.ctx.pet.tuner_layers(self.model, HISTORY)) if self.history_rank else {}
            self._penalty_weights = [(history[path].lora_A[HISTORY].weight if path in history else None,
                                      layer.lora_A[NEW].weight, layer.lora_B[NEW].weight)
                                     for path, layer in pet.tuner_layers(self.model, NEW)]
        for a_old, a_new, b_new in self._penalty_weights:
            if self.opts["lambda_orth"] and a_old is not None:
                total = total + self.opts["lambda_orth"] * (a_old.float() @ a_new.float().T).abs().sum()
            if self.opts["lambda_l2"]:
                total = total + self.opts["lambda_l2"] * (a_new.float().norm() + b_new.float().norm())
        return total

    def after_task(self, t: int) -> None:
        """Append the new factors to the history (A rows; ``s B`` columns), drop the new LoRA."""
        pet, model, rank = self.ctx.pet, self.model, self.history_rank
        config, new = pet.lora_factors(model, NEW)
        scaling = config["lora_alpha"] / config["r"]
        if rank:
            _, old = pet.lora_factors(model, HISTORY)
            factors = {k: (torch.cat([old[k][0], a]), torch.cat([old[k][1], scaling * b], dim=1))
                       for k, (a, b) in new.items()}
            pet.remove(model, HISTORY)
        else:
            factors = {k: (a, scaling * b) for k, (a, b) in new.items()}
        history_pet = pet.resized(rank + config["r"])  # scaling 1: the factors carry it
        history_pet.add(model, HISTORY)
        history_pet.set_lora_factors(model, HISTORY, factors)
        pet.activate(model, HISTORY)
        pet.remove(model, NEW)
        self._penalty_weights = None
        for p in pet.tensors(model, HISTORY):
            p.requires_grad_(False)

    # -- resuming and counting -------------------------------------------------------------------------
    def add_module(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """The history has its own rank (read from its saved factors); the new LoRA the method's."""
        pet = self.ctx.pet
        if name == HISTORY:
            pet = pet.resized(next(v.shape[0] for k, v in tensors.items() if f".lora_A.{HISTORY}." in k))
        if self.model is None:
            self.model = pet.attach(self.ctx.backbone.model, name)
        else:
            pet.add(self.model, name)

    def tunable_params(self) -> dict[str, int]:
        pet = self.ctx.pet
        stored = pet.count(self.model, HISTORY) if self.has_module(HISTORY) else 0
        tasks = max(1, self.history_rank // max(1, pet.rank))
        head = sum(p.numel() for p in self.head.parameters())
        return {"pet_params": stored, "pet_params_per_task": stored // tasks, "head_params": head,
                "tunable_params": stored // tasks + head}
