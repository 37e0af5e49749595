"""``inflora``: interference-free LoRA (Liang & Li 2024, "InfLoRA: Interference-Free Low-Rank
Adaptation for Continual Learning", CVPR; official code liangyanshuo/InfLoRA).

As O-LoRA, every task adds a LoRA summed into the model (the frozen history of earlier tasks is
active beside it), but instead of a penalty the new down-projection A_t is **designed and frozen**:
its rows lie in the span of the current task's inputs and orthogonal to the stored input
subspace M of the earlier tasks, and only B_t trains. So ``dW_t x_old ~ 0`` for the earlier
tasks' inputs by construction (up to the energy threshold). Per task t, as ``methods/inflora.py``:

1. Before training, with the model as it is, the covariance ``C = mean x x^T`` of every targeted
   layer's input over the task's training tokens (padding excluded, as the reference's advice for
   decoder LMs).
2. ``A_t = (top-r left singular vectors of C_hat)^T / sqrt(3)``, ``C_hat = C`` at the first task,
   else ``C - M M^T C`` (the dual "retain" form of the official code, used when the basis grows
   past d/2, is the same matrix).
3. Train only B_t (zero-initialised) and the new task's classifier columns: cross-entropy over
   the new task's classes (the official code's per-task head; the LM loss on generative streams).
4. Fold the LoRA into the history (O-LoRA's storage: one plain peft LoRA of rank r x tasks), then
   the covariance again with the trained model and the GPM update of M with the threshold
   ``eps_t = eps_start + (eps_end - eps_start) t / T`` (t from 0, T the stream's tasks): at the
   first task the top singular directions of C up to a cumulative energy ``eps_t``; later the
   residual ``C - M M^T C``'s directions until the energy kept reaches ``eps_t`` (energies are
   squared singular values of the covariance, as ``update_DualGPM``).

Defaults from the official configs: ``eps_start`` 0.95, ``eps_end`` 1.0; rank: the PET's ``r``.
Deviations, named: conpet's LoRA targets and confinement (the official ViT code puts LoRA on K
and V of every block), conpet's AdamW settings; plain LoRA only. Cost per task: two passes over
the task's rows without gradients and one d x d SVD per targeted layer, then only B trains;
storage: the history (linear in the tasks) and M (at most d x d per layer, kept for training
only).
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
