"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
via peft: SVD-form updates ``P diag(E) Q`` whose ranks are pruned by an importance score towards
a target budget during training, with an orthogonality penalty on P and Q.

How conpet drives it (peft leaves this to the training loop): every fit of a module runs
AdaLoRA's whole budget schedule, ``total_step`` = that fit's steps (``tinit``/``tfinal`` are
peft's options, default 0); ``update_and_allocate`` is called after each optimizer step, with
the gradients still present; ``orth_reg_weight`` (default 0.5) times the penalty is added to the
loss. peft trains one AdaLoRA module at a time: when another module trains (a new task's
expert, the selector), it becomes the trainable one and the others are frozen for peft.
Defaults: ``init_r=12, target_r=8`` (peft's), ``lora_alpha=16``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from conpet.pet.base import Calibration, in_module, register_pet
from conpet.pet.lora import LoRA, scoped_options, without_string_targets
from conpet.pet.peft_backed import PeftBacked


@register_pet("adalora")
class AdaLoRA(PeftBacked):
    """AdaLoRA via peft, its budget schedule run once per fit."""

    paper = "Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
    routes_per_row = False
    load_trainable = False
    defaults: dict[str, Any] = {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                "total_step": 1}

    def config_class(self):
        from peft import AdaLoraConfig

        return AdaLoraConfig

    def validation_options(self, options):
        return self._with_total_step(without_string_targets(options))

    def peft_options(self, model):
        return self._with_total_step(scoped_options(self.options, self.scope, model, all_linear_by_default=False))

    @staticmethod
    def _with_total_step(options: dict[str, Any]) -> dict[str, Any]:
        # each fit sets the real total_step (step_hook); until then any value with room for
        # peft's budgeting phase
        total = max(int(options["total_step"]), options.get("tinit", 0) + options.get("tfinal", 0) + 1)
        return {**options, "total_step": total}

    @property
    def rank(self) -> int:
        return int(self.options["init_r"])

    delta_weights = LoRA.delta_weights

    def tensors(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        # ``ranknum`` is a constant (the initial rank) that peft keeps as a frozen parameter
        return [p for n, p in model.named_parameters() if in_module(n, name) and ".ranknum." not in n]

    def add(self, model: nn.Module, name: str, calibration: Calibration | None = None) -> None:
        for config in model.peft_config.values():  # peft allows one trainable AdaLoRA module
            config.inference_mode = True
        super().add(model, name, calibration)

    def load(self, model: nn.Module, folder: Path, name: str) -> None:
        for config in model.peft_config.values():
            config.inference_mode = True
        super().load(model, folder, name)

    def step_hook(self, model: nn.Module, name: str, total_steps: int | None = None):
        """Make ``name`` peft's one trainable AdaLoRA module and start a fresh budget schedule of
        ``total_steps`` steps."""
        from peft.tuners.adalora.layer import RankAllocator

        tuner = model.base_model
        for n, other in model.peft_config.items():
            other.inference_mode = n != name
        config = model.peft_config[name]
        config.total_step = max(int(total_steps or 1), config.tinit + config.tfinal + 1)
        tuner.trainable_adapter_name = name
        tuner.rankallocator = RankAllocator(tuner.model, config, name)

        def update(step: int) -> None:
            tuner.update_and_allocate(step)

        return update

    def extra_loss(self, model: nn.Module, name: str):
        """peft's orthogonality penalty (``AdaLoraModel.forward`` adds it only to a loss computed
        by the model from labels, which conpet's heads never pass): mean over P and Q of
        ``||P P^T - I||_F`` / ``||Q^T Q - I||_F``, times ``orth_reg_weight``."""
        weight = model.peft_config[name].orth_reg_weight
        if not weight:
            return None
        terms = []
        for n, p in model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and in_module(n, name) and p.requires_grad:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye, "fro"))
        return weight * torch.stack(terms).mean() if terms else None
