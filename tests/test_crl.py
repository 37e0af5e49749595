"""CRL (ConPET's third former method): supervised contrastive loss against a memory bank,
prototype distillation on old classes, nearest-prototype prediction; ``crl`` and ``crl*``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conpet.cli import main
from conpet.config import from_dict
from conpet.learners.crl import MomentBank, supcon_loss


def test_supcon_loss_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels, bank_labels = torch.tensor([0]), torch.tensor([0, 1, 0])
    # sims / tau = [10, 0, 10]; two positives, each log(e^10 / (2 e^10 + 1))
    expected = -math.log(math.exp(10) / (2 * math.exp(10) + 1))
    assert float(supcon_loss(z, labels, bank, bank_labels, 0.1)) == pytest.approx(expected, rel=1e-6)
    # a row without a positive in the bank does not count
    assert float(supcon_loss(z, torch.tensor([5]), bank, bank_labels, 0.1)) == 0.0


def test_bank_refreshes_and_samples_every_needed_label():
    import numpy as np

    bank = MomentBank()
    bank.fill([10, 11, 12, 13], torch.eye(4), torch.tensor([0, 0, 1, 2]))
    bank.update([12, 99], torch.full((2, 4), 0.5))  # row 99 is not in the bank
    assert torch.equal(bank.z[2], torch.full((4,), 0.5)) and torch.equal(bank.z[0], torch.eye(4)[0])
    z, labels = bank.sample(1, torch.tensor([0, 1, 2]), np.random.default_rng(0))
    assert set(labels.tolist()) == {0, 1, 2}  # one draw, then the missing labels added


@pytest.mark.parametrize("learner", ["crl", "crl*"])
def test_crl_learns_predicts_by_nearest_prototype_and_resumes_its_state(tiny_encoder, typing_data, tmp_path, learner):
    from conpet.build import build_learner, prepare
    from conpet.runner import run

    data, tasks = typing_data
    cfg = from_dict({"model": str(tiny_encoder), "learner": learner, "out": str(tmp_path / "run"),
                     "data": {"file": str(data), "tasks": str(tasks)},
                     "learner_options": {"memory_per_class": 3},
                     "train": {"epochs": 2, "batch_size": 4, "precision": "fp32", "top_layers": None}})
    metrics = run(cfg, progress=False)
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["head_params"] > 0
    assert main(["verify", str(tmp_path / "run")]) == 0
    prepared = prepare(cfg)
    trained = build_learner(cfg, prepared, seed=0)
    trained.restore(Path(cfg.out), 0)
    stream = prepared.stream
    rows = stream.tasks[0].test[:4]
    with torch.no_grad():
        h = trained.ctx.features(trained.model, rows).float()
        logits = trained.logits(rows)
    assert logits.shape == (4, 4)
    assert torch.allclose(logits, -torch.cdist(h, trained.prototypes) ** 2, atol=1e-4)
    # every seen class has a prototype: the mean feature of its exemplars (3 per class)
    assert trained.prototypes.shape == (4, h.shape[1]) and bool((trained.prototypes.abs().sum(1) > 0).all())
    trained.close()


def test_stage_two_distils_old_prototype_similarities(tiny_encoder, typing_data):
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    cfg = from_dict({"model": str(tiny_encoder), "learner": "crl", "data": {"file": str(data), "tasks": str(tasks)},
                     "learner_options": {"memory_per_class": 3},
                     "train": {"epochs": 1, "batch_size": 4, "precision": "fp32", "top_layers": None}})
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.learn(0)
    assert learner.old_prototypes is None and learner.prototypes.shape[0] == 2
    seen = []
    original = learner.distilled_loss
    learner.distilled_loss = lambda idx: (seen.append(list(idx)), original(idx))[1]
    learner.learn(1)
    assert seen and learner.old_prototypes.shape[0] == 2  # stage 2 ran, against task 1's prototypes
    memory = set(learner.memory.rows(prepared.stream.seen_labels(1)))
    assert all(i in memory for batch in seen for i in batch)  # crl's stage 2 trains on exemplars only
    learner.close()
