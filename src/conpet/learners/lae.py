"""``lae``: Learning-Accumulation-Ensemble (Gao et al. 2023, "A Unified Continual Learning
Framework with General Parameter-Efficient Tuning", official code gqk/LAE ``main.py``).

- **Learning.** One *online* PET module trained on each task in turn; the cross-entropy uses only
  the new task's logits (the official code gives every task a new linear head and trains the new
  one; here the growing head's new columns, the same thing). No replay. From the second task on,
  the PET module is **frozen for the first** ``freeze_epochs`` **epochs of each task** (only the
  head trains): the official code's adaptation-speed calibration (3 of 5 epochs on CIFAR-100, 30
  of 50 on ImageNet-R and DomainNet: 60%, the default here, rounded).
- **Accumulation.** An *offline* module, created at the start of the second task as a copy of the
  online one, follows it as an exponential moving average after every optimizer step:
  ``theta_off <- decay theta_off + (1 - decay) theta_on`` (timm's ``ModelEmaV2``, decay 0.9999).
- **Ensemble.** Prediction takes, class by class, the larger of the two modules' softmax
  probabilities, then the argmax (``logits`` returns the log of that maximum). On a generative
  stream every decoding step does the same over the vocabulary: both modules run in one batch
  (peft's per-row ``adapter_names``) and the next token is the argmax of the element-wise max of
  their next-token distributions.

Cost: two backbone passes per input at inference (one batch), constant training cost per task
(the EMA is one pass over the module's parameters per step), two modules stored.

Deviations, named: LAE's PET is adapters/LoRA/prefix in ViT blocks 0-4 with Adam and no weight
decay; here conpet's PET method, confinement and AdamW settings apply. On a generative stream
the loss is the LM loss on the target tokens (there are no per-task logits to restrict) and
there is no warm-up (it trains a head, and a generative stream answers through the LM head).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from conpet.errors import ConfigError
from conpet.learners.base import Context, OneModuleLearner, new_task_loss, register_learner, train_module
from conpet.learners.options import Option
from conpet.pet import PET_METHODS, get_pet_class
from conpet.pet.base import module_pairs
from conpet.runs import adapter_dir

OFFLINE = "lae-offline"
"""The accumulated (EMA) module."""


@register_learner("lae")
class LAE(OneModuleLearner):
    """LAE: an online PET module, its EMA offline copy and their max-softmax ensemble (Gao et al. 2023)."""

    paper = "Gao et al. 2023, A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
    shards_backbone = True
    generative = True
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

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.has_offline = False
        self.ema_pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        """(online, offline) parameters of one place (the EMA's pairs, matched once per task)."""

    # -- learning --------------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        ctx = self.ctx
        task = self.begin_task(t)
        if t == 1 and not self.has_offline:
            ctx.pet.copy(self.model, self.module_name, OFFLINE)
            self.has_offline = True
        epochs = ctx.cfg.train.epochs
        # the warm-up trains the head alone: a generative stream has none, so it has no warm-up
        frozen = 0 if t == 0 or ctx.generative else min(epochs, self._freeze_epochs())
        loss = new_task_loss(ctx, t, lambda idx: self.logits_of(self.module_name, idx),
                             lambda idx: self.objective_loss(idx)[0])

        self.ema_pairs = module_pairs(self.model, self.module_name, OFFLINE) if self.has_offline else []
        hooks = [self.ema_step] if self.has_offline else []
        head = list(self.head.parameters())
        fits = []
        if frozen:
            fits.append(train_module(ctx, self.model, self.module_name, loss, ctx.epoch_batches(task.train, frozen),
                                     f"{task.name} lae warm-up", t, head, after_step=hooks, pet_frozen=True,
                                     epochs=frozen))
        if epochs - frozen:
            fits.append(train_module(ctx, self.model, self.module_name, loss,
                                     ctx.epoch_batches(task.train, epochs - frozen), f"{task.name} lae", t,
                                     head, after_step=hooks, epochs=epochs - frozen))
        self.last_fit = sum(fits[1:], fits[0])

    def _freeze_epochs(self) -> int:
        given = self.opts["freeze_epochs"]
        return given if given is not None else round(0.6 * self.ctx.cfg.train.epochs)

    @torch.no_grad()
    def ema_step(self, step: int) -> None:
        """``theta_off <- decay theta_off + (1 - decay) theta_on``, tensor by tensor (the
        (online, offline) pairs are matched once per task, not at every step)."""
        decay = self.opts["ema_decay"]
        for online, offline in self.ema_pairs:
            offline.mul_(decay).add_(online, alpha=1.0 - decay)

    # -- prediction ------------------------------------------------------------------------------------
    def logits_of(self, module: str, indices: list[int]) -> torch.Tensor:
        self.ctx.pet.activate(self.model, module)
        return self.head(self.ctx.features(self.model, indices))

    def logits(self, indices: list[int]) -> torch.Tensor:
        """log max(softmax(online), softmax(offline)) over the seen classes (the online module
        alone before the offline one exists); the online module is left active."""
        if not self.has_offline or self.model.training:
            return self.logits_of(self.module_name, indices)
        offline = F.softmax(self.logits_of(OFFLINE, indices).float(), dim=-1)
        online = F.softmax(self.logits_of(self.module_name, indices).float(), dim=-1)
        return torch.log(torch.maximum(online, offline))

    @torch.no_grad()
    def generate(self, indices: list[int]) -> list[str]:
        """Greedy answers; each step's token is the argmax of max(p_online, p_offline)."""
        if not self.has_offline:
            return super().generate(indices)
        names = [self.module_name] * len(indices) + [OFFLINE] * len(indices)
        answers = self.ctx.generate(self.model, indices, ensemble=2, adapter_names=names)
        self.ctx.pet.activate(self.model, self.module_name)
        return answers

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, t: int, folder: Path) -> None:
        super().save(t, folder)
        if self.has_offline:
            (folder / OFFLINE).mkdir()
            self.ctx.pet.save(self.model, OFFLINE, folder / OFFLINE)

    def restore(self, run_dir: Path, seed: int) -> None:
        super().restore(run_dir, seed)
        offline = adapter_dir(run_dir, seed, self.ctx.stream.tasks[-1].name) / OFFLINE
        if offline.is_dir():
            self.ctx.pet.load(self.model, offline, OFFLINE)
            self.has_offline = True
        self.ctx.pet.activate(self.model, self.module_name)

    def state(self):
        tensors, meta = super().state()
        meta["has_offline"] = self.has_offline
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        super().load_state(tensors, meta)
        self.has_offline = meta["has_offline"]

    def tunable_params(self) -> dict[str, int]:
        out = super().tunable_params()
        if self.has_offline:
            out["stored_params"] = out["pet_params"] * 2 + out["head_params"]
        return out
