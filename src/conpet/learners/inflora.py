"""``inflora``: InfLoRA (Liang & Li 2024, "InfLoRA: Interference-Free Low-Rank Adaptation for
Continual Learning", CVPR; official code liangyanshuo/InfLoRA ``methods/inflora.py``).

As O-LoRA, every task adds a LoRA beside the frozen history, but its down-projection A is
**designed and frozen**: the top-r left singular vectors (/ sqrt 3) of the covariance of the
task's layer inputs with the earlier tasks' input subspace M projected out; only B (zero-
initialised) and the new task's classes train (the LM loss on generative streams). After the task
the LoRA joins the history (O-LoRA's storage) and M grows by GPM with the energy threshold
``eps_t = eps_start + (eps_end - eps_start) t / T`` (official 0.95 -> 1.0), from the covariance of
the trained model; padding is left out of every covariance.

Deviations, named: conpet's LoRA targets and confinement (official: K and V of every ViT block)
and AdamW settings; plain LoRA only.
"""

from __future__ import annotations

import math

import torch

from conpet.device import full_precision
from conpet.learners.base import register_learner
from conpet.learners.o_lora import HISTORY, NEW, OLoRA
from conpet.learners.options import Option
from conpet.learners.training import new_task_loss


def design_down_projection(covariance: torch.Tensor, basis: torch.Tensor | None, rank: int) -> torch.Tensor:
    """``A`` [rank, d]: the top-``rank`` left singular vectors of the covariance with the old
    subspace ``basis`` [d, k] projected out, scaled by 1/sqrt(3)."""
    c = covariance if basis is None or basis.shape[1] == 0 else covariance - basis @ (basis.T @ covariance)
    u, _, _ = torch.linalg.svd(c)
    return u[:, :rank].T / math.sqrt(3.0)


def update_basis(covariance: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """GPM: the basis [d, k'] extended by the directions of ``covariance`` it misses, until the
    kept share of the energy (squared singular values) reaches ``threshold``."""
    u, s, _ = torch.linalg.svd(covariance)
    energy = s ** 2
    total = float(energy.sum())
    if total == 0.0:
        return basis if basis is not None else covariance.new_zeros(covariance.shape[0], 0)
    if basis is None or basis.shape[1] == 0:
        kept = int((torch.cumsum(energy, 0) / total < threshold).sum()) + 1
        return u[:, :min(kept, u.shape[1])]
    residual = covariance - basis @ (basis.T @ covariance)
    ur, sr, _ = torch.linalg.svd(residual)
    accumulated = (total - float((sr ** 2).sum())) / total
    add = 0
    for value in (sr ** 2).tolist():
        if accumulated >= threshold:
            break
        accumulated += value / total
        add += 1
    room = covariance.shape[0] - basis.shape[1]
    return torch.cat([basis, ur[:, :min(add, room)]], dim=1) if add else basis


@register_learner("inflora")
class InfLoRA(OLoRA):
    """InfLoRA: each task's LoRA A designed orthogonal to the earlier tasks' input subspace, only B trains (Liang & Li 2024)."""

    paper = "Liang & Li 2024, InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning (CVPR)"
    options = {"eps_start": Option(0.95, float, minimum=0.0, help="GPM energy threshold at the first task"),
               "eps_end": Option(1.0, float, minimum=0.0, help="GPM energy threshold at the last task")}

    state_attrs = ("bases",)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.bases: dict[str, torch.Tensor] = {}
        """Per targeted layer path: the orthonormal basis [d_in, k] of the earlier tasks' inputs."""

    def before_task(self, t: int) -> None:
        """Design the new LoRA's A from the task's inputs (the model as it is) and zero its B."""
        pet = self.ctx.pet
        self.setup_forward(None)
        covariances = self.input_covariances(self.ctx.stream.tasks[t].train, NEW)
        with torch.no_grad():
            for path, layer in pet.tuner_layers(self.model, NEW):
                a = design_down_projection(covariances[path], self.bases.get(path), layer.lora_A[NEW].weight.shape[0])
                layer.lora_A[NEW].weight.copy_(a)
                layer.lora_B[NEW].weight.zero_()

    def fits(self, t: int):
        """Only B trains (and the head), on the new task's classes alone (the LM loss on generative streams)."""
        ctx = self.ctx
        b_params = [layer.lora_B[NEW].weight for _, layer in ctx.pet.tuner_layers(self.model, NEW)]
        loss = new_task_loss(ctx, t, self.logits, lambda idx: self.objective_loss(idx)[0])
        return [self.fit_on(t, ctx.epoch_batches(ctx.stream.tasks[t].train), loss=loss, train_module=False,
                            groups=[{"params": b_params, "lr": ctx.cfg.train.lr}])]

    def after_task(self, t: int) -> None:
        """Fold the LoRA into the history, then extend the input basis with the trained model's covariances."""
        super().after_task(t)
        n_tasks = len(self.ctx.stream.tasks)
        eps = self.opts["eps_start"] + (self.opts["eps_end"] - self.opts["eps_start"]) * t / max(1, n_tasks)
        for path, covariance in self.input_covariances(self.ctx.stream.tasks[t].train, HISTORY).items():
            self.bases[path] = update_basis(covariance, self.bases.get(path), eps)
        self.ctx.pet.activate(self.model, HISTORY)

    @torch.no_grad()
    def input_covariances(self, rows: list[int], module: str) -> dict[str, torch.Tensor]:
        """``mean x x^T`` [d_in, d_in] over the non-padding tokens of ``rows`` at the input of every
        layer module ``module`` touches (the current forward setup: whatever modules are active)."""
        ctx, pet, model = self.ctx, self.ctx.pet, self.model
        layers = dict(pet.tuner_layers(model, module))
        sums = {path: None for path in layers}
        count = 0
        mask_now: list[torch.Tensor] = []

        def hook(path):
            def record(_module, inputs):
                x = inputs[0].detach()
                keep = mask_now[0][:, : x.shape[1]].bool()
                with full_precision(x.device):  # the covariance in fp32
                    flat = x[keep].float()
                    total = flat.T @ flat
                sums[path] = total if sums[path] is None else sums[path] + total
            return record

        handles = [layer.register_forward_pre_hook(hook(path)) for path, layer in layers.items()]
        was_training = model.training
        model.eval()
        try:
            size = ctx.cfg.train.eval_batch_size
            for start in range(0, len(rows), size):
                batch = rows[start:start + size]
                lengths = torch.tensor([len(ctx.encoded.ids[i]) for i in batch], device=ctx.device)
                width = int(lengths.max())
                mask_now[:] = [torch.arange(width, device=ctx.device)[None, :] < lengths[:, None]]
                with ctx.compute.autocast():
                    ctx.engine.states(model, batch)
                count += int(lengths.sum())
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return {path: total / max(1, count) for path, total in sums.items() if total is not None}
