"""Best-epoch selection on dev rows (``train.select_on_dev``, ConPET's checkpoint choice): the fit
keeps its best state on dev rows (the untrained start included), test rows are never scored, and
a run interrupted inside a task resumes to the same result."""

from __future__ import annotations

import json

import pytest
import torch

from conpet.build import build_learner, prepare
from conpet.checkpoint import Checkpointer
from conpet.config import TrainConfig, from_dict
from conpet.errors import ConfigError
from conpet.learners.loop import fit
from conpet.runner import resume, run


def test_fit_keeps_the_best_scored_epoch_and_ties_go_to_the_earlier():
    p = torch.nn.Parameter(torch.zeros(1))
    scores = iter([0.5, 0.9, 0.9, 0.1])  # start, after epoch 1, 2, 3: epoch 1 wins the tie
    seen = []

    def score():
        seen.append(p.detach().item())
        return next(scores)

    train = TrainConfig(epochs=3, grad_clip=0.0, weight_decay=0.0)
    stats = fit(lambda idx: -p.sum(), [{"params": [p], "lr": 0.1}], [[0]] * 6, train, "fp32", progress=False,
                dev_score=score, epochs=3)
    assert len(seen) == 4 and stats.best.step == 2
    assert p.detach().item() == pytest.approx(seen[1]), "the state after epoch 1 is restored"


def _cfg(model, typing_data, out, learner, **train):
    data, tasks = typing_data
    return from_dict({"model": str(model), "out": str(out), "learner": learner,
                      "data": {"file": str(data), "tasks": str(tasks)},
                      "train": {"epochs": 2, "batch_size": 4, "precision": "fp32", "select_on_dev": True,
                                "checkpoint_seconds": 0, **train}})


@pytest.mark.parametrize("learner", ["sequential", "emr*", "dynamic"])
def test_only_dev_rows_are_scored(tiny_encoder, typing_data, tmp_path, learner):
    cfg = _cfg(tiny_encoder, typing_data, tmp_path / "run", learner)
    prepared = prepare(cfg)
    learner_obj = build_learner(cfg, prepared, seed=0)
    engine = prepared.engine
    looked_at = set()
    original = engine.features

    def spy(model, indices, **kwargs):
        looked_at.update(indices)
        return original(model, indices, **kwargs)

    engine.features = spy
    for t in range(len(prepared.stream.tasks)):
        learner_obj.learn(t)
        assert learner_obj.last_fit.best is not None
    learner_obj.close()
    test_rows = {i for task in prepared.stream.tasks for i in task.test}
    dev_rows = {i for task in prepared.stream.tasks for i in task.dev}
    assert not looked_at & test_rows, "dev selection never looks at a test row"
    assert dev_rows <= looked_at


def test_a_stream_without_dev_rows_is_a_clear_error(tiny_encoder, tmp_path):
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as f:
        for k, label in enumerate(["a", "b"] * 8):
            f.write(json.dumps({"text": f"row {k} of {label}", "label": label,
                                "split": "test" if k < 4 else "train"}) + "\n")
    cfg = from_dict({"model": str(tiny_encoder), "out": str(tmp_path / "run"), "data": {"file": str(rows),
                     "n_tasks": 1}, "train": {"epochs": 1, "select_on_dev": True}})
    with pytest.raises(ConfigError, match="select_on_dev: the tasks seen so far have no dev rows"):
        run(cfg, progress=False)


def test_resume_inside_a_task_keeps_the_best_state_found_before_the_crash(tiny_encoder, typing_data, tmp_path,
                                                                          monkeypatch):
    whole = run(_cfg(tiny_encoder, typing_data, tmp_path / "whole", "emr*", epochs=3), progress=False)
    calls = {"n": 0}
    original = Checkpointer.after_step

    def crash_later(self, step, optimizer, stats, scaler=None):
        original(self, step, optimizer, stats, scaler)
        calls["n"] += 1
        if calls["n"] == 17:  # task 1 has 9 steps; the 8th of task 2 comes after its first scored epoch
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Checkpointer, "after_step", crash_later)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_cfg(tiny_encoder, typing_data, tmp_path / "crashed", "emr*", epochs=3), progress=False)
    monkeypatch.setattr(Checkpointer, "after_step", original)
    resumed = resume(tmp_path / "crashed", progress=False)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]


def test_report_dev_adds_dev_accuracy_without_changing_the_run(tiny_encoder, typing_data, tmp_path):
    from conpet.report import metrics_table

    data, tasks = typing_data
    base = {"model": str(tiny_encoder), "data": {"file": str(data), "tasks": str(tasks)},
            "train": {"epochs": 1, "batch_size": 4, "precision": "fp32"}}
    plain = run(from_dict({**base, "out": str(tmp_path / "plain")}), progress=False)
    with_dev = run(from_dict({**base, "out": str(tmp_path / "dev"),
                              "data": {**base["data"], "report_dev": True}}), progress=False)
    assert with_dev["accuracy_matrix"] == plain["accuracy_matrix"]
    dev = with_dev["dev_accuracy"]
    assert len(dev) == 2 and dev[0][1] is None and all(0 <= v <= 1 for v in dev[1])
    assert "dev average accuracy (%)" in metrics_table([("dev", with_dev)])
