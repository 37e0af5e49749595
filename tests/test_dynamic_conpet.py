"""Dynamic ConPET: one module per task on one backbone, a selector, top-k routing; predict."""

import json

import pytest
import torch

from conpet.build import build_learner, prepare
from conpet.cli import main
from conpet.config import from_dict
from conpet.data.stream import Row
from conpet.learners.dynamic import SELECTOR, expert_name
from conpet.predict import predict
from conpet.runner import run


def _cfg(model, data, tasks, out, learner="dynamic", **options):
    return from_dict({"model": str(model), "out": str(out), "learner": learner, "learner_options": options,
                      "data": {"file": str(data), "tasks": str(tasks)},
                      "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "head_lr": 5e-2, "precision": "fp32"}})


def _learner(model, typing_data, tmp_path, **options):
    data, tasks = typing_data
    cfg = _cfg(model, data, tasks, tmp_path / "run", **options)
    return build_learner(cfg, prepare(cfg), seed=0)


def test_one_module_per_task_on_one_backbone(tiny_decoder, typing_data, tmp_path):
    learner = _learner(tiny_decoder, typing_data, tmp_path)
    learner.learn(0)
    after_first = {n: p.detach().clone() for n, p in learner.model.named_parameters() if expert_name(0) in n}
    learner.learn(1)
    assert set(learner.model.peft_config) == {expert_name(0), expert_name(1), SELECTOR}
    # the first expert is never touched by the second task
    for n, p in learner.model.named_parameters():
        if n in after_first:
            assert torch.equal(p, after_first[n])
    assert learner.selector_head.labels == ["task-01", "task-02"]
    # one backbone: every module's weights hang off the same base layers
    bases = {id(m.base_layer) for m in learner.model.modules() if hasattr(m, "base_layer")}
    assert len(bases) == len([m for m in learner.model.modules() if hasattr(m, "lora_A")])
    learner.close()


def test_prediction_fills_only_the_selected_experts_columns(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path)
    learner.learn(0)
    learner.learn(1)
    rows = learner.ctx.stream.tasks[1].test + learner.ctx.stream.tasks[0].test
    logits, (top, probs) = learner.logits_and_route(rows)
    assert torch.equal(learner.logits(rows), logits)
    assert logits.shape == (len(rows), 4) and top.shape == (len(rows), 1)
    for r in range(len(rows)):
        t = int(top[r, 0])
        finite = torch.isfinite(logits[r]).nonzero().flatten().tolist()
        assert finite == list(range(2 * t, 2 * t + 2))
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)))


def test_k2_runs_two_experts_and_teacher_forcing_keeps_the_gold_task(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, top_k=2)
    learner.learn(0)
    learner.learn(1)
    stream = learner.ctx.stream
    rows = stream.tasks[0].train[:6]
    gold = learner.selector.task_ids(rows)
    top, _ = learner.select(rows, 1, gold)
    assert torch.equal(top[:, 0], gold)
    logits = learner.logits(stream.tasks[0].test)
    assert torch.isfinite(logits).all()  # k = 2 of 2 tasks: every column filled
    # the old experts' logits were cached with their module version in the key
    assert learner.logit_cache and all(key[2] == 0 for key in learner.logit_cache)


def test_expert_k1_trains_on_its_own_rows_only(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path)
    learner.learn(0)
    learner.learn(1)
    assert learner.expert_fit.samples == 2 * len(learner.ctx.stream.tasks[1].train)


@pytest.mark.parametrize("learner", ["dynamic", "sequential", "ea-emr*"])
def test_run_then_predict_any_learner(learner, tiny_encoder, typing_data, tmp_path, capsys):
    data, tasks = typing_data
    out = tmp_path / "run"
    metrics = run(_cfg(tiny_encoder, data, tasks, out, learner=learner), progress=False)
    assert len(metrics["adapter_bytes"]) == 2 and all(b > 0 for b in metrics["adapter_bytes"])
    if learner == "dynamic":
        assert len(metrics["selector_accuracy"]) == 2 and metrics["selector_accuracy"][0][0] == 1.0
    rows = [Row(text="We talked about the wolf.", label="?", entity="wolf"),
            Row(text="We talked about the soup.", label="?", entity="soup")]
    preds = predict(out, rows)
    assert len(preds) == 2 and all(p["label"] in {"animal", "food", "tool", "place"} for p in preds)
    assert all(0 <= p["confidence"] <= 1 and p["task"] in ("task-01", "task-02") for p in preds)
    # the CLI gives the same answers
    assert main(["predict", str(out), "We talked about the wolf.", "--entity", "wolf", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["label"] == preds[0]["label"]


def test_task_balanced_selector_loss_weighs_every_task_the_same():
    import torch.nn.functional as F

    from conpet.learners.selector import task_balanced_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    targets = torch.tensor([2, 2, 2, 0])  # the newest task holds most of the batch
    per_task = [F.cross_entropy(logits[targets == c], targets[targets == c]) for c in (0, 2)]
    assert torch.allclose(task_balanced_cross_entropy(logits, targets), torch.stack(per_task).mean())
    assert not torch.allclose(task_balanced_cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    same = torch.tensor([1, 0, 2, 1])[:3]
    assert torch.allclose(task_balanced_cross_entropy(logits[:3], same), F.cross_entropy(logits[:3], same))
