"""``osf``: orthogonal subspace fine-tuning across a stream (Nayak et al. 2025, "Sculpting
Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning", arXiv 2504.07097), with
peft's OSF tuner (the PET method ``osf``, :mod:`conpet.pet.osf`).

Task ``t`` wraps the backbone in a fresh OSF module: every targeted weight is decomposed, ``W = U
S V^T``, its top ``k_t`` singular triplets are preserved (frozen) and the rest train with their
gradients projected orthogonally to the preserved singular vectors. After the task the module is
**merged** into the weights (peft's ``merge_and_unload``: ``W <- W + U_l S_l V_l - U_l0 S_l0
V_l0``; never ``unload()``, which would throw the task away, the bug of peft's example), so the
next task decomposes the updated weights and preserves a larger rank. The schedule of preserved
fractions of ``min(m, n)`` is linear from ``preserve_start`` to ``preserve_end``; the defaults
give the peft docs' "Sequential Task Learning" text, ``t / n`` at task ``t`` of ``n``, where task
0's fraction 0 becomes rank 1, the smallest peft accepts (it rejects 0). ``preserve_start: 0.3,
preserve_end: 0.7`` is peft's three-task example (0.3 / 0.5 / 0.7).

The backbone is shared, so the learner keeps a CPU copy of the targeted weights as they were
before its first task and writes them back in :meth:`close` (bit for bit). What is saved after
each task is the accumulated dense update ``W_t - W_0`` of the targeted weights (fp32, keyed by
the backbone's parameter names, ``osf_update.safetensors``) beside the head: adding it to the
backbone gives the model (``conpet predict``). The resume state holds the current weights
themselves (exact) and, inside a task, the module being trained.

Cost per task: one fp32 SVD per targeted weight (``O(m n min(m, n))``); trainable ``(m + n + 1)
(min(m, n) - k_t)`` per target, shrinking as ``k_t`` grows; no parameter growth with the tasks:
the stored update is one dense matrix per target (plus the original weights kept on the CPU).

Deviations, named: conpet's AdamW with weight decay (as peft's example, which uses the HF
Trainer): Adam's per-coordinate scaling lets the update leave the projected subspace slightly, so
the top directions are preserved exactly only under plain SGD; conpet's targets and confinement
(the top ``train.top_layers`` layers; peft's example: the 7 projections of every layer); on
classification streams the growing head trains as ``sequential``'s; under bf16 the merged weights
are rounded to bf16 at every merge. The OSF targets come from ``--pet osf`` and its
``target_modules``; with another ``pet.method`` the learner still trains OSF modules with their
defaults (another method's ``pet.options`` are an error). Not implemented: the paper's adaptive
per-layer ranks (importance from input/output similarity; not in peft).
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
from conpet.learners.state import head_tensors, load_head, load_module_tensors, module_tensors, write_module_meta
from conpet.learners.options import Option
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
    options = {"preserve_start": Option(0.0, float, minimum=0.0,
                                        help="fraction of min(m, n) preserved at the first task (0: rank 1)"),
               "preserve_end": Option(None, float, minimum=0.0, nullable=True,
                                      help="fraction preserved at the last task; default (n - 1) / n, the "
                                           "peft docs' t / n schedule")}

    @classmethod
    def validate(cls, cfg, opts) -> None:
        for key in ("preserve_start", "preserve_end"):
            if opts[key] is not None and opts[key] >= 1.0:
                raise ConfigError(f"learner_options.{key}: a fraction below 1 (1 preserves everything and leaves "
                                  f"nothing to train), got {opts[key]}")
        if opts["preserve_end"] is not None and opts["preserve_end"] < opts["preserve_start"]:
            raise ConfigError(f"learner_options.preserve_end: {opts['preserve_end']} is below preserve_start "
                              f"{opts['preserve_start']} (the preserved rank only grows)")
        if cfg.pet.method == "osf":
            for key in ("effective_rank", "rank_pattern"):
                if key in cfg.pet.options:
                    raise ConfigError(f"pet.options.{key}: the osf learner sets the preserved rank of every task "
                                      f"(learner_options.preserve_start / preserve_end)")
        elif cfg.pet.options:
            raise ConfigError(f"learner 'osf' trains OSF modules; pet.options for '{cfg.pet.method}' do not apply "
                              f"(give --pet osf to set OSF's target_modules)")
        if cfg.backbone.quantize:
            raise ConfigError("learner 'osf' merges its updates into the weights: not on a quantized backbone")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        given = ctx.pet
        self.pet_options = {**given.options, "lr": given.lr} if given.name == "osf" else {}
        self.scope, self.pet_precision = given.scope, given.precision
        n = len(ctx.stream.tasks)
        start = self.opts["preserve_start"]
        end = self.opts["preserve_end"] if self.opts["preserve_end"] is not None else (n - 1) / n
        if end < start:
            raise ConfigError(f"learner_options.preserve_start: {start} is above the default preserve_end "
                              f"(n - 1) / n = {end:.3f} of this {n}-task stream; give preserve_end too")
        self.fractions = [start if n == 1 else round(start + (end - start) * t / (n - 1), 12) for t in range(n)]
        """The preserved fraction of min(m, n) at each task."""
        ctx.pet = self.pet_for(0)
        self.wrapped = False
        """Whether ``self.model`` carries the OSF module being trained (else: the merged backbone)."""
        self.originals: dict[str, torch.Tensor] = {}
        """Backbone path -> the targeted weight before the first task (CPU copy, restored by close)."""
        self.trained_params: list[int] = []

    def pet_for(self, t: int) -> OSF:
        """The OSF method of task ``t``: the preserved rank of the schedule (rank 1 for fraction 0)."""
        rank = self.fractions[t] or 1
        return OSF({**self.pet_options, "effective_rank": rank}, scope=self.scope, precision=self.pet_precision)

    # -- learning --------------------------------------------------------------------------------------
    def learn(self, t: int) -> None:
        ctx = self.ctx
        ctx.pet = self.pet_for(t)
        self.model = ctx.pet.attach(ctx.backbone.model, self.module_name)
        self.wrapped = True
        self.keep_originals([path for path, _ in ctx.pet.tuner_layers(self.model, self.module_name)])
        self.trained_params.append(ctx.pet.count(self.model, self.module_name))
        task = ctx.stream.tasks[t]
        self.grow_head(list(task.labels))
        self.last_fit = self.train(self.fit_on(t, ctx.epoch_batches(task.train)))
        self.merge()

    def merge(self) -> None:
        """Merge the trained module into the backbone's weights (``merge_and_unload``)."""
        with torch.no_grad():
            self.ctx.backbone.model = self.model.merge_and_unload()
        self.model = self.ctx.backbone.model
        self.model.eval()
        self.wrapped = False

    def keep_originals(self, paths: list[str]) -> None:
        """A CPU copy of each targeted weight not yet kept (before anything changes it)."""
        for path in paths:
            if path not in self.originals:
                weight = linear_at(self.ctx.backbone.model, path).weight
                self.originals[path] = weight.detach().to("cpu", copy=True)

    def weight(self, path: str) -> nn.Parameter:
        return linear_at(self.ctx.backbone.model, path).weight

    # -- prediction --------------------------------------------------------------------------------------
    def generate(self, indices: list[int]) -> list[str]:
        return self.ctx.generate(self.model, indices)

    def reference_model(self) -> nn.Module:
        self.model.eval()
        return self.model

    # -- saving and resuming -------------------------------------------------------------------------------
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

    def state(self):
        tensors = {f"osf/weight/{path}": self.weight(path).detach() for path in self.originals}
        if self.wrapped:
            tensors.update(module_tensors(self.model, [self.module_name]))
        tensors.update({f"head/{k}": v for k, v in head_tensors(self.head).items()})
        meta = {"targets": list(self.originals), "wrapped": self.wrapped, "head_labels": list(self.head.labels),
                "trained_params": self.trained_params}
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        """The weights as merged so far (and, inside a task, the module that the task's preamble has
        just wrapped again), in place."""
        self.keep_originals(meta["targets"])
        with torch.no_grad():
            for path in meta["targets"]:
                self.weight(path).copy_(tensors[f"osf/weight/{path}"])
        if meta["wrapped"]:
            load_module_tensors(self.ctx.pet, self.model, [self.module_name], tensors)
        self.trained_params = list(meta["trained_params"])
        self.head = load_head(self.head, {k[5:]: v for k, v in tensors.items() if k.startswith("head/")},
                              meta["head_labels"])

    def tunable_params(self) -> dict[str, int]:
        pet = self.trained_params[-1] if self.trained_params else 0
        head = sum(p.numel() for p in self.head.parameters())
        stored = sum(w.numel() for w in self.originals.values())
        return {"pet_params": pet, "pet_params_first_task": self.trained_params[0] if self.trained_params else 0,
                "head_params": head, "tunable_params": pet + head, "stored_params": stored + head}

    def close(self) -> None:
        """Discard a module still being trained, then write the original weights back."""
        if self.wrapped:
            self.ctx.backbone.model = self.ctx.pet.detach(self.model)
            self.wrapped = False
        with torch.no_grad():
            for path, w0 in self.originals.items():
                self.weight(path).copy_(w0)
        self.originals = {}
        self.model = None
