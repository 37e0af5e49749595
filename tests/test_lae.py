"""LAE: the online module learns (frozen for the warm-up epochs of every later task), the offline
module is its EMA, prediction is the max-softmax ensemble of the two."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conpet.config import from_dict


def _learner(model, data, tasks, **options):
    from conpet.build import build_learner, prepare

    cfg = from_dict({"model": str(model), "learner": "lae", "data": {"file": str(data), "tasks": str(tasks)},
                     "learner_options": options,
                     "train": {"epochs": 3, "batch_size": 4, "lr": 0.01, "precision": "fp32", "top_layers": None}})
    prepared = prepare(cfg)
    return build_learner(cfg, prepared, seed=0), prepared


def _module(learner, name):
    return {n.replace(name, "M"): p.detach().clone() for n, p in learner.model.named_parameters()
            if f".{name}." in n or n.endswith(f".{name}")}


def test_offline_is_the_ema_of_online_and_the_warm_up_freezes_the_pet(tiny_encoder, typing_data):
    from conpet.learners.lae import OFFLINE

    data, tasks = typing_data
    learner, _ = _learner(tiny_encoder, data, tasks, ema_decay=0.9, freeze_epochs=2)
    learner.learn(0)
    online = learner.module_name
    snapshots, ema = [], learner.after_step

    def record(fit, step):  # the online module after each optimizer step, then the real EMA update
        snapshots.append(_module(learner, online))
        ema(fit, step)

    learner.after_step = record
    start = _module(learner, online)
    head_before = learner.head.weight.detach().clone()
    learner.learn(1)
    # the EMA by hand from the copy made at the start of task 2
    expected = {k: v.clone() for k, v in start.items()}
    for snap in snapshots:
        for k in expected:
            expected[k] = 0.9 * expected[k] + 0.1 * snap[k]
    offline = _module(learner, OFFLINE)
    assert offline.keys() == expected.keys() and snapshots
    for k in expected:
        assert torch.allclose(offline[k], expected[k], atol=1e-6), k
    # warm-up: 2 of 3 epochs with the PET frozen (its snapshots equal the start), the head moving
    steps_per_epoch = len(snapshots) // 3
    for snap in snapshots[: 2 * steps_per_epoch]:
        assert all(torch.equal(snap[k], start[k]) for k in start)
    assert not all(torch.equal(snapshots[-1][k], start[k]) for k in start)
    assert not torch.equal(learner.head.weight[: head_before.shape[0]], head_before)
    learner.close()


def test_prediction_is_the_max_softmax_ensemble(tiny_encoder, typing_data):
    from conpet.learners.lae import OFFLINE

    data, tasks = typing_data
    learner, prepared = _learner(tiny_encoder, data, tasks, ema_decay=0.5, freeze_epochs=0)
    learner.learn(0)
    learner.learn(1)
    rows = prepared.stream.tasks[0].test[:5]
    with torch.no_grad():
        on = F.softmax(learner.logits_of(learner.module_name, rows), dim=-1)
        off = F.softmax(learner.logits_of(OFFLINE, rows), dim=-1)
        got = learner.logits(rows)
    assert torch.allclose(got, torch.log(torch.maximum(on, off)), atol=1e-6)
    assert not torch.allclose(on, off)  # the two modules differ, so the ensemble is visible
    learner.close()


def test_ensemble_decoding_of_two_equal_modules_is_plain_decoding(lively_decoder, tmp_path):
    from test_generation import write_generative_data

    from conpet.build import build_learner, prepare
    from conpet.learners.lae import OFFLINE

    data = write_generative_data(tmp_path / "gen")
    cfg = from_dict({"model": str(lively_decoder), "learner": "lae", "data": {"file": str(data)},
                     "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}})
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.learn(0)
    rows = prepared.stream.tasks[0].test[:4]
    plain = learner.generate(rows)
    learner.ctx.pet.copy(learner.model, learner.module_name, OFFLINE)
    assert learner.generate(rows) == plain and len(set(plain)) > 1
    learner.close()


def test_bad_options(tiny_encoder, typing_data, tmp_path, capsys):
    from conpet.cli import main

    data, tasks = typing_data
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "lae[ema_decay=1.5]", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "ema_decay: must be <= 1.0, got 1.5" in capsys.readouterr().err


def test_generative_ensemble_needs_a_method_that_routes_rows(tiny_decoder, tmp_path, capsys):
    from test_generation import write_generative_data

    from conpet.cli import main

    data = write_generative_data(tmp_path / "gen")
    assert main(["run", "--model", str(tiny_decoder), "--data", str(data), "--learner", "lae", "--pet", "ia3",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "which 'ia3' cannot route; use one of: adapter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
