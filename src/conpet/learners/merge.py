"""``merge``: one LoRA per task, merged after every task into a single module.

The adapter-merging recipe for continual learning (MOS, Sun et al. 2025, merges adapters
against parameter drift; the ComPEFT/TIES line stores one update per task and re-merges when a
task is added): task t trains a fresh LoRA module (the *expert*) and a head over its own classes
only; then the updates of all experts so far are merged on ``dW`` with a :mod:`conpet.merging`
method and factored back to one LoRA of rank ``rank`` (:func:`conpet.adapters.merge_lora`).
Prediction runs the one merged module and the concatenation of the experts' heads (argmax over
all seen classes): one backbone pass whatever the number of tasks, and the stream ends with one
module. The experts are kept only as LoRA factors (a few hundred KB each) to re-merge.

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
from typing import Any

import torch
import torch.nn.functional as F

from conpet.adapters import merge_lora
from conpet.errors import ConfigError
from conpet.heads import GrowingHead
from conpet.learners.base import (Context, OneModuleLearner, head_tensors, load_expert_heads, load_module_tensors,
                                  module_tensors, register_learner)
from conpet.learners.loop import fit, pet_training
from conpet.merging import get_merge_method
from conpet.pet import get_pet

EXPERT = "expert"
OPTIONS: dict[str, Any] = {"method": "ties", "rank": None, "merge_options": {}}


@register_learner("merge")
class MergeLearner(OneModuleLearner):
    """One LoRA per task, all merged on dW into one module after every task."""

    module_name = "default"

    @classmethod
    def check_options(cls, cfg) -> dict[str, Any]:
        unknown = sorted(set(cfg.learner_options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"learner_options: unknown option '{unknown[0]}' for learner 'merge' "
                              f"(known: {', '.join(sorted(OPTIONS))})")
        opts = {**OPTIONS, **cfg.learner_options}
        if cfg.pet.method != "lora":
            raise ConfigError(f"learner 'merge' merges LoRA updates (dW = B A); pet.method is '{cfg.pet.method}'")
        if not isinstance(opts["merge_options"], dict):
            raise ConfigError("learner_options.merge_options: must be a mapping of the merge method's options")
        get_merge_method(opts["method"]).check_options(opts["merge_options"])
        if opts["rank"] is not None and int(opts["rank"]) < 1:
            raise ConfigError("learner_options.rank: must be >= 1")
        return opts

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.opts = self.check_options(ctx.cfg)
        self.rank = int(self.opts["rank"] or ctx.pet.peft_config().r)
        self.merged_pet = get_pet("lora", {**ctx.pet.options, "r": self.rank, "lora_alpha": self.rank,
                                           "use_rslora": False, "use_dora": False})
        self.merged_pet.bf16_autocast = ctx.pet.bf16_autocast
        self.experts: list[tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self.expert_heads: list[GrowingHead] = []
        self.errors: list[float] = []

    # -- learning ------------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        ctx, pet = self.ctx, self.ctx.pet
        task = ctx.stream.tasks[t]
        torch.manual_seed(int(ctx.rng.integers(2**31)))
        if self.model is None:
            self.model = pet.attach(ctx.backbone.model, EXPERT)
        elif EXPERT not in pet.modules(self.model):
            pet.add(self.model, EXPERT)
        head = GrowingHead(ctx.backbone.hidden_size)
        head.grow(list(task.labels), ctx.torch_gen)
        self.expert_heads.append(head)
        start = ctx.stream.class_range(t)[0]

        def expert_loss(indices):
            return F.cross_entropy(head(ctx.features(self.model, indices)), ctx.targets(indices) - start)

        pet.activate(self.model, EXPERT)
        self.model.train()
        train = ctx.cfg.train
        batches = ctx.epoch_batches(task.train)
        groups, loss_fn, hooks = pet_training(pet, self.model, EXPERT, train.lr, expert_loss, len(batches))
        groups.append({"params": list(head.parameters()), "lr": train.head_lr})
        self.last_fit = fit(loss_fn, groups, batches, train, ctx.precision, desc=f"{task.name} expert",
                            progress=ctx.progress, after_step=hooks, checkpointer=ctx.checkpointer)
        self.model.eval()
        self.experts.append(self._expert_factors())
        self._remerge()
        pet.remove(self.model, EXPERT)

    def _expert_factors(self):
        config = self.model.peft_config[EXPERT]
        cfg = {"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": bool(config.use_rslora)}
        params = dict(self.model.named_parameters())
        factors = {}
        for name, a in params.items():
            if f".lora_A.{EXPERT}." in name:
                path = name.split(".lora_A.")[0]
                b = params[name.replace(f".lora_A.{EXPERT}.", f".lora_B.{EXPERT}.")]
                factors[path] = (a.detach().float().clone(), b.detach().float().clone())
        return cfg, factors

    def _remerge(self) -> None:
        result = merge_lora(self.experts, self.opts["method"], self.rank, **dict(self.opts["merge_options"]))
        self.errors.append(result.mean_error)
        if self.module_name not in self.ctx.pet.modules(self.model):
            self.merged_pet.add(self.model, self.module_name)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for path, (a, b) in result.factors.items():
                params[f"{path}.lora_A.{self.module_name}.weight"].copy_(a)
                params[f"{path}.lora_B.{self.module_name}.weight"].copy_(b)
        self.ctx.pet.activate(self.model, self.module_name)
        self.head = concat_heads(self.expert_heads, self.ctx.backbone.hidden_size)

    def eval_extra(self, t: int) -> dict[str, list[float]]:
        return {"merge_reconstruction_error": [self.errors[-1]] * (t + 1)}

    def save(self, t: int, folder: Path) -> None:
        super().save(t, folder)
        (folder / "merge.json").write_text(json.dumps({
            "method": self.opts["method"], "merge_options": self.opts["merge_options"], "rank": self.rank,
            "tasks_merged": len(self.experts), "mean_relative_reconstruction_error": self.errors[-1],
        }, indent=2))

    # -- resume --------------------------------------------------------------------------------------
    def state(self):
        modules = self.ctx.pet.modules(self.model) if self.model is not None else []
        tensors = module_tensors(self.model, modules)
        for t, (cfg, factors) in enumerate(self.experts):
            for path, (a, b) in factors.items():
                tensors[f"experts/{t}/{path}/A"], tensors[f"experts/{t}/{path}/B"] = a, b
        for t, head in enumerate(self.expert_heads):
            tensors.update({f"expert_head/{t}/{k}": v for k, v in head_tensors(head).items()})
        meta = {"modules": modules,
                "expert_configs": [cfg for cfg, _ in self.experts],
                "expert_paths": [sorted(f) for _, f in self.experts],
                "expert_labels": [h.labels for h in self.expert_heads], "errors": self.errors}
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        pet = self.ctx.pet
        if meta["modules"]:
            if self.model is None:
                first = meta["modules"][0]
                self.model = (self.merged_pet if first == self.module_name else pet).attach(self.ctx.backbone.model, first)
            for name in meta["modules"]:
                if name not in pet.modules(self.model):
                    (self.merged_pet if name == self.module_name else pet).add(self.model, name)
            load_module_tensors(pet, self.model, meta["modules"], tensors)
        self.experts = [(cfg, {p: (tensors[f"experts/{t}/{p}/A"].clone(), tensors[f"experts/{t}/{p}/B"].clone())
                               for p in paths})
                        for t, (cfg, paths) in enumerate(zip(meta["expert_configs"], meta["expert_paths"]))]
        self.expert_heads = load_expert_heads(self.expert_heads, tensors, meta["expert_labels"],
                                              self.ctx.backbone.hidden_size)
        self.errors = list(meta["errors"])
        if self.expert_heads:
            self.head = concat_heads(self.expert_heads, self.ctx.backbone.hidden_size)


def concat_heads(heads: list[GrowingHead], hidden_size: int) -> GrowingHead:
    """One head over every class: the experts' heads stacked in task order."""
    out = GrowingHead(hidden_size)
    out.weight = torch.nn.Parameter(torch.cat([h.weight.detach() for h in heads]))
    out.bias = torch.nn.Parameter(torch.cat([h.bias.detach() for h in heads]))
    out.labels = [label for h in heads for label in h.labels]
    return out
