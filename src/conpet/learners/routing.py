"""Learners with one PET module per task (Dynamic ConPET, Model Surgery): rows routed to their own
module in one pass, and every task's saved module loaded back."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from conpet.learners.context import Context
from conpet.runs import adapter_dir


def routed_features(ctx: Context, model: torch.nn.Module, indices: list[int], modules: list[str]) -> torch.Tensor:
    """Features of each row through its own module: one pass with peft's per-row routing where the
    PET method allows it, else one pass per module over its rows (the same total cost per row)."""
    if len(set(modules)) > 1 and ctx.pet.routes_per_row:
        return ctx.features(model, indices, adapter_names=modules)
    out = None
    for name in dict.fromkeys(modules):
        rows = [r for r, m in enumerate(modules) if m == name]
        ctx.pet.activate(model, name)
        feats = ctx.features(model, [indices[r] for r in rows])
        out = feats.new_zeros(len(indices), feats.shape[-1]) if out is None else out
        out[rows] = feats
    return out


def routed_generate(ctx: Context, model: torch.nn.Module, indices: list[int], modules: list[str]) -> list[str]:
    """Greedy answers, each prompt generated through its own module: one batch with per-row
    routing where the PET method allows it, else one generation per module over its rows."""
    if len(set(modules)) > 1 and ctx.pet.routes_per_row:
        return ctx.generate(model, indices, adapter_names=modules)
    answers = [""] * len(indices)
    for name in dict.fromkeys(modules):
        rows = [r for r, m in enumerate(modules) if m == name]
        ctx.pet.activate(model, name)
        for r, answer in zip(rows, ctx.generate(model, [indices[r] for r in rows])):
            answers[r] = answer
    return answers


def load_task_modules(ctx: Context, model: torch.nn.Module | None, run_dir: Path, seed: int,
                      name_of: Callable[[int], str]) -> torch.nn.Module:
    """Every task's saved module of seed ``seed`` of run ``run_dir``, under the name ``name_of(t)``,
    attached to the backbone (or added to ``model``); the wrapped model."""
    for t, task in enumerate(ctx.stream.tasks):
        folder = adapter_dir(run_dir, seed, task.name)
        if model is None:
            model = ctx.pet.attach_from(ctx.backbone.model, folder, name_of(t))
        else:
            ctx.pet.load(model, folder, name_of(t))
    return model
