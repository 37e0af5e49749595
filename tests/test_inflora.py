"""InfLoRA: the new LoRA's A designed in the complement of the earlier tasks' input subspace
(GPM), frozen; only B trains; the history is summed as O-LoRA's."""

from __future__ import annotations

import math

import pytest
import torch

from conpet.cli import main
from conpet.config import from_dict
from conpet.learners.inflora import design_down_projection, update_basis


def test_design_and_gpm_update_by_hand():
    cov = torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.0]))
    a = design_down_projection(cov, None, 2)
    assert torch.allclose(a.abs(), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]) / math.sqrt(3))
    basis = torch.eye(4)[:, :1]  # the first direction belongs to an old task
    a = design_down_projection(cov, basis, 2)
    assert torch.allclose(a @ basis, torch.zeros(2, 1), atol=1e-6)
    assert torch.allclose(a.abs(), torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]) / math.sqrt(3))
    # energies (squared singular values) 81, 16, 1: 81/98 = 0.83 < 0.9 <= 97/98
    assert update_basis(cov, None, 0.9).shape[1] == 2
    assert update_basis(cov, None, 0.8).shape[1] == 1
    # with the first direction kept already (81/98), 0.9 needs one more residual direction
    grown = update_basis(cov, basis, 0.9)
    assert grown.shape[1] == 2 and torch.allclose(grown[:, 1].abs(), torch.tensor([0, 1.0, 0, 0]))


def test_the_new_down_projection_is_orthogonal_to_the_old_inputs_and_frozen(tiny_encoder, typing_data):
    from conpet.build import build_learner, prepare
    from conpet.learners.o_lora import HISTORY

    data, tasks = typing_data
    cfg = from_dict({"model": str(tiny_encoder), "learner": "inflora",
                     "data": {"file": str(data), "tasks": str(tasks)},
                     "pet": {"method": "lora", "options": {"r": 2, "lora_alpha": 4}},
                     "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "precision": "fp32", "top_layers": None}})
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.learn(0)
    pet = learner.ctx.pet
    bases = {k: v.clone() for k, v in learner.bases.items()}
    first = {k: a.clone() for k, (a, _) in pet.lora_factors(learner.model, HISTORY)[1].items()}
    for a in first.values():  # designed rows: orthonormal / sqrt(3), never trained
        assert torch.allclose(a @ a.T, torch.eye(2) / 3, atol=1e-5)
    learner.learn(1)
    _, after = pet.lora_factors(learner.model, HISTORY)
    for key, (a, b) in after.items():
        path = key.removeprefix("base_model.model.")
        assert torch.equal(a[:2], first[key])  # task 1's A kept
        assert torch.allclose(a[2:] @ bases[path], torch.zeros(2, bases[path].shape[1]), atol=1e-4)
        assert bool(b[:, 2:].abs().sum() > 0)  # B trained
    learner.close()


def test_inflora_runs_end_to_end(tiny_encoder, typing_data, tmp_path):
    data, tasks = typing_data
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "inflora", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
