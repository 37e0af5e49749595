"""``osf``: orthogonal subspace fine-tuning across a stream (Nayak et al. 2025, "Sculpting
Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning", arXiv 2504.07097), with
peft's OSF tuner (``--pet osf``, :mod:`conpet.pet.osf`).

Each task wraps the backbone in a fresh OSF module that preserves the top ``k_t`` singular
triplets of every targeted weight and trains the rest, then **merges** it (``merge_and_unload``,
never ``unload()``), so the next task decomposes the updated weights and preserves more: ``k_t``
goes linearly from ``preserve_start`` to ``preserve_end`` of ``min(m, n)`` (default ``t / n``,
peft's "Sequential Task Learning"; fraction 0 is rank 1, the smallest peft accepts). A task saves
the accumulated update ``W_t - W_0`` (``osf_update.safetensors``); the original weights are kept
on the CPU and written back by :meth:`close`. docs/learners.md has the costs.

Deviations, named: AdamW with weight decay (as peft's example), whose per-coordinate scaling lets
an update leave the projected subspace slightly; conpet's targets and top-layer confinement; the
growing head of ``sequential`` on classification streams; bf16 merges round the weights to bf16.
Not implemented: the paper's adaptive per-layer ranks (not in peft).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conpet.errors import ConfigError
from conpet.heads import GrowingHead
from conpet.learners.base import register_learner
from conpet.learners.context import Context
from conpet.learners.one_module import OneModuleLearner
from conpet.learners.options import Option
from conpet.learners.state import write_module_meta
from conpet.pet.osf import OSF
from conpet.runs import adapter_dir, check_safe_folder

UPDATE_FILE = "osf_update.safetensors"
"""The accumulated dense update of the targeted weights, ``W_t - W_0`` (fp32)."""


def linear_at(model: nn.Module, path: str) -> nn.Module:
    """The backbone's own linear layer at ``path`` (under an OSF layer while the model is wrapped)."""
    module = model.get_submodule(path)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@register_learner("osf")
class OSFLearner(OneModuleLearner):
    """OSF: each task trains the low singular subspace of the weights, then merges; the preserved rank grows."""

    paper = "Nayak et al. 2025, Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning"
    generative = True
    exports_lora = False  # the modules are merged into the backbone's weights
    requires_pet = "osf"
    options = {"preserve_start": Option(0.0, float, minimum=0.0,
                                        help="fraction of min(m, n) preserved at the first task (0: rank 1)"),
               "preserve_end": Option(None, float, minimum=0.0, nullable=True,
                                      help="fraction preserved at the last task; default (n - 1) / n, the "
                                           "peft docs' t / n schedule")}
    state_attrs = ("merged", "trained_params")

    @classmethod
    def validate(cls, cfg, opts) -> None:
        for key in ("preserve_start", "preserve_end"):
            if opts[key] is not None and opts[key] >= 1.0:
                raise ConfigError(f"learner_options.{key}: a fraction below 1 (1 preserves everything and leaves "
                                  f"nothing to train), got {opts[key]}")
        if opts["preserve_end"] is not None and opts["preserve_end"] < opts["preserve_start"]:
            raise ConfigError(f"learner_options.preserve_end: {opts['preserve_end']} is below preserve_start "
                              f"{opts['preserve_start']} (the preserved rank only grows)")
        for key in ("effective_rank", "rank_pattern"):
            if key in cfg.pet.options:
                raise ConfigError(f"pet.options.{key}: the osf learner sets the preserved rank of every task "
                                  f"(learner_options.preserve_start / preserve_end)")
        if cfg.backbone.quantize:
            raise ConfigError("learner 'osf' merges its updates into the weights: not on a quantized backbone")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        n = len(ctx.stream.tasks)
        start = self.opts["preserve_start"]
        end = self.opts["preserve_end"] if self.opts["preserve_end"] is not None else (n - 1) / n
        if end < start:
            raise ConfigError(f"learner_options.preserve_start: {start} is above the default preserve_end "
                              f"(n - 1) / n = {end:.3f} of this {n}-task stream; give preserve_end too")
        self.fractions = [start if n == 1 else round(start + (end - start) * t / (n - 1), 12) for t in range(n)]
        """The preserved fraction of min(m, n) at each task."""
        self.originals: dict[str, torch.Tensor] = {}
        """Backbone path -> the targeted weight before the first task (CPU copy, restored by close)."""
        self.trained_params: list[int] = []

    def method_for(self, t: int) -> OSF:
        """The OSF method of task ``t``: ``--pet osf`` with the schedule's preserved rank (rank 1 for 0)."""
        pet = self.ctx.pet
        return OSF({**pet.options, "lr": pet.lr, "effective_rank": self.fractions[t] or 1}, scope=pet.scope,
                   precision=pet.precision)

    # -- a task: wrap, train (the default fit), merge ----------------------------------------------------
    def begin_task(self, t: int):
        self.model = self.method_for(t).attach(self.ctx.backbone.model, self.module_name)
        self.keep_originals([path for path, _ in self.ctx.pet.tuner_layers(self.model, self.module_name)])
        self.trained_params.append(self.ctx.pet.count(self.model, self.module_name))
        task = self.ctx.stream.tasks[t]
        self.grow_head(list(task.labels))
        return task

    def after_task(self, t: int) -> None:
        """Merge the trained module into the backbone's weights (``merge_and_unload``)."""
        with torch.no_grad():
            self.ctx.backbone.model = self.model.merge_and_unload()
        self.model = self.ctx.backbone.model
        self.model.eval()

    def keep_originals(self, paths: list[str]) -> None:
        """A CPU copy of each targeted weight not yet kept (before anything changes it)."""
        for path in paths:
            if path not in self.originals:
                weight = linear_at(self.ctx.backbone.model, path).weight
                self.originals[path] = weight.detach().to("cpu", copy=True)

    def weight(self, path: str) -> nn.Parameter:
        return linear_at(self.ctx.backbone.model, path).weight

    @property
    def merged(self) -> dict[str, torch.Tensor]:
        """The targeted weights as merged so far: the resume state (the backbone itself changes)."""
        return {path: self.weight(path).detach() for path in self.originals}

    @merged.setter
    def merged(self, weights: dict[str, torch.Tensor]) -> None:
        self.keep_originals(list(weights))
        with torch.no_grad():
            for path, w in weights.items():
                self.weight(path).copy_(w)

    # -- saving and restoring: the update W_t - W_0 ---------------------------------------------------------
    def update(self) -> dict[str, torch.Tensor]:
        """``W_t - W_0`` of every targeted weight (fp32, CPU), keyed ``<path>.weight``."""
        return {f"{path}.weight": (self.weight(path).detach().float().cpu() - w0.float()).contiguous()
                for path, w0 in self.originals.items()}

    def save(self, t: int, folder: Path) -> None:
        save_file(self.update(), str(folder / UPDATE_FILE))
        self.head.save(folder)
        write_module_meta(self.ctx, t, folder, self.name, self.module_name, self.head.labels,
                          osf_preserved=self.fractions[: t + 1])

    def restore(self, run_dir: Path, seed: int) -> None:
        """The backbone plus the saved update ``W_t - W_0`` of the stream's last task."""
        folder = adapter_dir(run_dir, seed, self.ctx.stream.tasks[-1].name)
        check_safe_folder(folder)
        update = load_file(str(folder / UPDATE_FILE))
        paths = [key.removesuffix(".weight") for key in update]
        self.keep_originals(paths)
        with torch.no_grad():
            for path in paths:
                w = self.weight(path)
                w.copy_((self.originals[path].to(w.device).float() + update[f"{path}.weight"].to(w.device)).to(w.dtype))
        self.model = self.ctx.backbone.model
        self.model.eval()
        self.head = GrowingHead.load(folder, self.ctx.device)

    def tunable_params(self) -> dict[str, int]:
        pet = self.trained_params[-1] if self.trained_params else 0
        head = sum(p.numel() for p in self.head.parameters())
        stored = sum(w.numel() for w in self.originals.values())
        return {"pet_params": pet, "pet_params_first_task": self.trained_params[0] if self.trained_params else 0,
                "head_params": head, "tunable_params": pet + head, "stored_params": stored + head}

    def close(self) -> None:
        """Discard a module still being trained, then write the original weights back."""
        if self.has_module(self.module_name):
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
        with torch.no_grad():
            for path, w0 in self.originals.items():
                self.weight(path).copy_(w0)
        self.originals = {}
        self.model = None
