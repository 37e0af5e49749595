"""O-LoRA: a fresh LoRA per task, pushed orthogonal to the frozen earlier ones, all summed; the
history is one plain LoRA of rank r x tasks that opens in peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conpet.cli import main
from conpet.config import from_dict


def _cfg(model, data, tasks, out, **options):
    return from_dict({"model": str(model), "learner": "o-lora", "out": str(out),
                      "data": {"file": str(data), "tasks": str(tasks)}, "learner_options": options,
                      "pet": {"method": "lora", "options": {"r": 4, "lora_alpha": 8}},
                      "train": {"epochs": 3, "batch_size": 4, "lr": 0.05, "precision": "fp32", "top_layers": None}})


def _overlap(learner) -> float:
    """|A_1 A_2^T| summed over layers, relative to ||A_1|| ||A_2||: 0 when orthogonal."""
    from conpet.learners.o_lora import HISTORY

    total = 0.0
    for _, layer in learner.ctx.pet.tuner_layers(learner.model, HISTORY):
        a = layer.lora_A[HISTORY].weight.float()
        a1, a2 = a[:4], a[4:]
        total += float((a1 @ a2.T).abs().sum() / (a1.norm() * a2.norm()))
    return total


def _learn_two(cfg):
    from conpet.build import build_learner, prepare

    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.learn(0)
    return learner


def test_history_keeps_old_factors_frozen_and_the_penalty_makes_a_orthogonal(tiny_encoder, typing_data):
    from conpet.learners.o_lora import HISTORY

    data, tasks = typing_data
    overlaps = {}
    for lam in (0.0, 20.0):
        learner = _learn_two(_cfg(tiny_encoder, data, tasks, "unused", lambda_orth=lam))
        pet = learner.ctx.pet
        first = {k: (a.clone(), b.clone()) for k, (a, b) in pet.lora_factors(learner.model, HISTORY)[1].items()}
        assert learner.history_rank == 4 and learner.model.peft_config[HISTORY].r == 4
        learner.learn(1)
        assert learner.history_rank == 8
        config, after = pet.lora_factors(learner.model, HISTORY)
        assert config["r"] == 8 and config["lora_alpha"] == 8  # scaling 1: s is folded into B
        for key, (a, b) in after.items():  # task 1's factors are kept, untouched by task 2's training
            assert torch.equal(a[:4], first[key][0]) and torch.equal(b[:, :4], first[key][1])
        overlaps[lam] = _overlap(learner)
        learner.close()
    assert overlaps[20.0] < 0.5 * overlaps[0.0], overlaps


def test_the_penalty_is_the_official_l1_of_the_overlap(tiny_encoder, typing_data):
    from conpet.learners.o_lora import HISTORY, NEW

    data, tasks = typing_data
    learner = _learn_two(_cfg(tiny_encoder, data, tasks, "unused", lambda_orth=0.5, lambda_l2=0.1))
    pet = learner.ctx.pet
    pet.add(learner.model, NEW)
    learner.setup_forward(None)
    by_hand = 0.0
    history = dict(pet.tuner_layers(learner.model, HISTORY))
    for path, layer in pet.tuner_layers(learner.model, NEW):
        a, b = layer.lora_A[NEW].weight.detach(), layer.lora_B[NEW].weight.detach()
        by_hand += 0.5 * float((history[path].lora_A[HISTORY].weight @ a.T).abs().sum())
        by_hand += 0.1 * float(a.norm() + b.norm())
    assert float(learner.penalty().detach()) == pytest.approx(by_hand, rel=1e-5) and by_hand > 0
    # only the new LoRA trains; the history is active beside it
    assert all(not p.requires_grad for p in pet.tensors(learner.model, HISTORY))
    assert set(learner.model.base_model.active_adapter) == {NEW, HISTORY}
    learner.close()


def test_o_lora_runs_saves_a_plain_peft_adapter_and_predicts(tiny_encoder, typing_data, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModel

    from conpet.build import build_learner, prepare
    from conpet.runner import run

    data, tasks = typing_data
    cfg = _cfg(tiny_encoder, data, tasks, tmp_path / "run")
    metrics = run(cfg, progress=False)
    assert len(metrics["accuracy_matrix"]) == 2
    folder = Path(cfg.out) / "seed-0" / "adapters" / "task-02"
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.restore(Path(cfg.out), 0)
    assert learner.history_rank == 8
    batch = learner.ctx.batch(prepared.stream.tasks[0].test[:3])
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_encoder)), str(folder)).eval()
    with torch.no_grad():
        ours = learner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
    learner.close()
    assert main(["predict", str(tmp_path / "run"), "We saw the wolf.", "--entity", "wolf"]) == 0
    assert main(["verify", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "o-lora", "--pet", "ia3", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "stacks plain LoRA modules" in capsys.readouterr().err
