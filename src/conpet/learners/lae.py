"""``lae``: LAE, Learning-Accumulation-Ensemble (Gao et al. 2023, "A Unified Continual Learning
Framework with General Parameter-Efficient Tuning", official code gqk/LAE ``main.py``).

An online module learns each task on the new task's classes only, frozen for the first
``freeze_epochs`` epochs of every task from the second (60% of ``train.epochs``, the official
3 of 5 and 30 of 50) while the head trains; an offline copy made at the second task follows it as
an EMA after every step (decay 0.9999, timm's ``ModelEmaV2``); prediction takes, class by class
(or token by token), the larger of the two softmax probabilities. docs/learners.md has the costs.

Deviations, named: conpet's PET method, confinement and AdamW instead of ViT adapters/prefixes in
blocks 0-4 with Adam and no weight decay; on a generative stream the LM loss and no warm-up (the
warm-up trains a head, and a generative stream answers through the LM head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conpet.errors import ConfigError
from conpet.learners.base import register_learner
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.options import Option
from conpet.learners.training import ema_update, new_task_loss
from conpet.pet import PET_METHODS, get_pet_class
from conpet.pet.base import module_pairs

OFFLINE = "lae-offline"
"""The accumulated (EMA) module."""


@register_learner("lae")
class LAE(OneModuleLearner):
    """LAE: an online PET module, its EMA offline copy and their max-softmax ensemble (Gao et al. 2023)."""

    paper = "Gao et al. 2023, A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
    shards_backbone = True
    generative = True
    exports_lora = False  # the ensemble of the online and offline modules answers
    saved_modules = (OFFLINE,)
    options = {"ema_decay": Option(0.9999, float, minimum=0.0, maximum=1.0, help="EMA decay of the offline module"),
               "freeze_epochs": Option(None, int, minimum=0, nullable=True,
                                       help="epochs per task (from the second) with the PET frozen; "
                                            "default: 60% of train.epochs, rounded")}

    @classmethod
    def validate_generative(cls, cfg, opts) -> None:
        if not get_pet_class(cfg.pet.method).routes_per_row:  # the ensemble decodes both modules in one batch
            able = sorted(name for name, pet in PET_METHODS.items() if pet.routes_per_row)
            raise ConfigError(f"pet.method: lae on a generative stream decodes with the online and offline modules "
                              f"side by side in one batch, which '{cfg.pet.method}' cannot route; use one of: "
                              f"{', '.join(able)}")

    # -- learning --------------------------------------------------------------------------------------
    def before_task(self, t: int) -> None:
        if t == 1 and not self.has_module(OFFLINE):
            self.ctx.pet.copy(self.model, self.module_name, OFFLINE)
        self.ema_pairs = module_pairs(self.model, self.module_name, OFFLINE) if self.has_module(OFFLINE) else []

    def fits(self, t: int):
        """The warm-up (head only, the module frozen) from the second task on, then the rest of the epochs."""
        ctx, task = self.ctx, self.ctx.stream.tasks[t]
        epochs = ctx.cfg.train.epochs
        given = self.opts["freeze_epochs"]
        # the warm-up trains the head alone: a generative stream has none, so it has no warm-up
        frozen = 0 if t == 0 or ctx.generative else min(epochs, given if given is not None else round(0.6 * epochs))
        loss = new_task_loss(ctx, t, lambda idx: self.logits_of(self.module_name, idx),
                             lambda idx: self.objective_loss(idx)[0])
        if frozen:
            yield self.fit_on(t, ctx.epoch_batches(task.train, frozen), desc=f"{task.name} lae warm-up", loss=loss,
                              train_module=False, epochs=frozen, dev_score=None)
        if epochs - frozen:
            yield self.fit_on(t, ctx.epoch_batches(task.train, epochs - frozen), loss=loss, epochs=epochs - frozen,
                              dev_score=None)

    def after_step(self, fit, step: int) -> None:
        """``theta_off <- decay theta_off + (1 - decay) theta_on`` (pairs matched once per task)."""
        ema_update(self.ema_pairs, self.opts["ema_decay"])

    # -- prediction ------------------------------------------------------------------------------------
    def logits_of(self, module: str, indices: list[int]) -> torch.Tensor:
        self.ctx.pet.activate(self.model, module)
        return self.head(self.ctx.features(self.model, indices))

    def logits(self, indices: list[int]) -> torch.Tensor:
        """log max(softmax(online), softmax(offline)) over the seen classes (the online module
        alone before the offline one exists); the online module is left active."""
        if not self.has_module(OFFLINE) or self.model.training:
            return self.logits_of(self.module_name, indices)
        offline = F.softmax(self.logits_of(OFFLINE, indices).float(), dim=-1)
        online = F.softmax(self.logits_of(self.module_name, indices).float(), dim=-1)
        return torch.log(torch.maximum(online, offline))

    @torch.no_grad()
    def generate(self, indices: list[int]) -> list[str]:
        """Greedy answers; each step's token is the argmax of max(p_online, p_offline)."""
        if not self.has_module(OFFLINE):
            return super().generate(indices)
        names = [self.module_name] * len(indices) + [OFFLINE] * len(indices)
        answers = self.ctx.generate(self.model, indices, ensemble=2, adapter_names=names)
        self.ctx.pet.activate(self.model, self.module_name)
        return answers
