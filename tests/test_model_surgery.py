"""MOS (``model-surgery``): the merge step is the official formula applied once per step, stored
modules never change (not even at evaluation), L_orth and the per-class Gaussians are the hand
computation, the batched self-refined retrieval gives the official per-row loop's predictions,
the alignment trains the head alone; runs on classification and generative streams, predicts, and
a run killed inside its second task resumes to the same result."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conpet.build import build_learner, check, check_stream, prepare
from conpet.cli import main
from conpet.config import from_dict
from conpet.data import load_stream
from conpet.errors import ConfigError
from conpet.learners.model_surgery import module_name, orth_loss, refine


def _learner(model, data, tasks, epochs=2, **options):
    cfg = from_dict({"model": str(model), "learner": "model-surgery", "learner_options": options,
                     "data": {"file": str(data), "tasks": str(tasks)},
                     "train": {"epochs": epochs, "batch_size": 4, "lr": 0.01, "precision": "fp32", "top_layers": None}})
    prepared = prepare(cfg)
    return build_learner(cfg, prepared, seed=0), prepared


def _three_tasks(typing_data):
    data, tasks = typing_data
    tasks.write_text(json.dumps([["animal"], ["food"], ["tool", "place"]]))
    return data, tasks


def _module(learner, name):
    return {n.replace(name, "M"): p.detach().clone() for n, p in learner.model.named_parameters()
            if f".{name}." in n or n.endswith(f".{name}")}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_is_the_official_formula_once_per_step_and_stored_modules_never_change(tiny_encoder, typing_data):
    learner, prepared = _learner(tiny_encoder, *_three_tasks(typing_data), adapter_momentum=0.3, align_epochs=1)
    learner.learn(0)
    learner.learn(1)
    old = [_module(learner, module_name(j)) for j in range(2)]
    mean = {k: (old[0][k] + old[1][k]) / 2 for k in old[0]}
    new = module_name(2)
    starts, pairs, merge, loss = [], [], learner.after_step, learner.task_loss

    def first_loss(*args):  # the new module before its first step: a copy of the previous one
        if not starts:
            starts.append(_module(learner, new))
        return loss(*args)

    def record(fit, step):  # the module right after the optimizer step, then after the real merge
        before = _module(learner, new)
        merge(fit, step)
        pairs.append((before, _module(learner, new)))

    learner.task_loss, learner.after_step = first_loss, record
    learner.learn(2)
    assert _same(starts[0], old[1])
    assert len(pairs) == len(prepared.stream.tasks[2].train) // 4 * 2  # one merge per optimizer step
    for before, after in pairs:
        for k in before:
            assert torch.allclose(after[k], 0.7 * before[k] + 0.3 * mean[k], atol=1e-7), k
    assert any(not torch.equal(before[k], after[k]) for before, after in pairs for k in before)
    # the stored modules did not move while task 3 trained, nor while every task is evaluated
    assert all(_same(old[j], _module(learner, module_name(j))) for j in range(2))
    stored = [_module(learner, module_name(j)) for j in range(3)]
    rows = [i for task in prepared.stream.tasks for i in task.test]
    learner.logits(rows)
    learner.eval_extra(2)
    assert all(_same(stored[j], _module(learner, module_name(j))) for j in range(3))
    # the running sum holds the three finished modules
    for k, total in learner.prefix.items():
        assert torch.allclose(total, sum(s[k.replace("*", "M")] for s in stored), atol=1e-7)
    learner.close()


def test_orth_loss_is_the_official_cross_entropy_of_the_similarities_by_hand():
    means = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    feats = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, -1.0]])
    for m, rows in ((means, means.tolist() + feats.tolist()), (None, feats.tolist())):
        total = 0.0
        for i, a in enumerate(rows):
            sims = [sum(x * y for x, y in zip(a, b)) / 0.8 for b in rows]
            total += math.log(sum(math.exp(s) for s in sims)) - sims[i]
        assert orth_loss(m, feats).item() == pytest.approx(total / len(rows), rel=1e-6)


def test_refinement_follows_each_row_to_the_task_whose_module_predicts_its_own_class():
    class_task = torch.tensor([0, 0, 1, 1, 2, 2])
    # the class each row's features through task j's module point to
    points = {(0, 0): 4, (0, 2): 2, (0, 1): 3,  # row 0: task 0 -> 2 -> 1, where module 1 predicts class 3 (task 1)
              (1, 1): 2,  # row 1: right at once
              (2, 0): 2, (2, 1): 0}  # row 2: 0 -> 1 -> 0 -> 1, stopped after 4 passes
    calls = []

    def logits_of(rows, tasks):
        calls.append(rows.tolist())
        out = torch.zeros(len(rows), 6)
        for k, (r, j) in enumerate(zip(rows.tolist(), tasks.tolist())):
            out[k, points[(r, j)]] = 10.0 + j  # which module answered shows in the value
        return out

    final, task = refine(torch.tensor([0, 1, 0]), class_task, logits_of, max_iter=4)
    assert task.tolist() == [1, 1, 1]
    assert final.argmax(-1).tolist() == [3, 2, 0] and final.max(-1).values.tolist() == [11.0, 11.0, 11.0]
    assert calls == [[0, 1, 2], [0, 2], [0, 2], [2]]  # only the rows still moving run again


def test_retrieval_gives_the_official_per_row_loop_over_all_modules(tiny_encoder, typing_data):
    learner, prepared = _learner(tiny_encoder, *_three_tasks(typing_data), align_epochs=2)
    for t in range(3):
        learner.learn(t)
    ctx, pet, model = learner.ctx, learner.ctx.pet, learner.model
    rows = [i for task in prepared.stream.tasks for i in task.test]
    with torch.no_grad():
        logits, route = learner.logits_and_route(rows)
        got = logits.exp() * 2
        feats = []
        for j in range(3):  # all T modules up front, one at a time (no per-row routing)
            pet.activate(model, module_name(j))
            feats.append(ctx.features(model, rows).float())
        cls2task = [prepared.stream.task_of_label[label] for label in learner.head.labels]
        proto = F.normalize(feats[0], dim=-1) @ F.normalize(learner.protos, dim=-1).T
        for r in range(len(rows)):  # models/mos.py _eval_cnn, row by row
            prev, loops = cls2task[int(proto[r].argmax())], 0
            while True:
                loops += 1
                cur = learner.head(feats[prev][r:r + 1])
                task = cls2task[int(cur.argmax())]
                if loops >= 4 or task == prev:
                    break
                prev = task
            expected = F.softmax(cur[0], dim=-1) + F.softmax(proto[r] * 3, dim=-1)
            assert torch.allclose(got[r], expected, atol=1e-5), r
    assert route.tasks.shape == (len(rows), 1) and route.confidence.shape == (len(rows), learner.n_tasks)
    assert torch.allclose(route.confidence.sum(-1), torch.ones(len(rows)), atol=1e-5)
    learner.close()


def test_gaussians_prototypes_and_an_alignment_that_moves_the_head_alone(tiny_encoder, typing_data):
    learner, prepared = _learner(tiny_encoder, *typing_data, align_epochs=0)
    learner.learn(0)
    learner.learn(1)
    ctx, pet, model, stream = learner.ctx, learner.ctx.pet, learner.model, prepared.stream
    with torch.no_grad():
        for t in range(2):
            for c in stream.task_columns(t):
                own = [i for i in stream.tasks[t].train if stream.targets[i] == c]
                pet.activate(model, module_name(t))
                x = ctx.features(model, own).float()
                pet.activate(model, module_name(0))
                assert torch.allclose(learner.protos[c], ctx.features(model, own).float().mean(0), atol=1e-5)
                assert torch.allclose(learner.means[c], x.mean(0), atol=1e-5)
                cov = torch.cov(x.T) + 1e-4 * torch.eye(x.shape[1])
                assert torch.allclose(learner.spreads[c], cov, atol=1e-5)
    modules = [_module(learner, module_name(j)) for j in range(2)]
    stats = [learner.means.clone(), learner.spreads.clone(), learner.protos.clone()]
    head = [p.detach().clone() for p in learner.head.parameters()]
    learner.opts["align_epochs"] = 3
    learner.align(seed=5)
    aligned = [p.detach().clone() for p in learner.head.parameters()]
    assert not torch.equal(aligned[0], head[0])
    assert all(_same(modules[j], _module(learner, module_name(j))) for j in range(2))
    assert all(torch.equal(a, b) for a, b in zip(stats, (learner.means, learner.spreads, learner.protos)))
    with torch.no_grad():
        for p, start in zip(learner.head.parameters(), head):
            p.copy_(start)
    learner.align(seed=5)  # seeded: the same pseudo-features, the same head
    assert all(torch.equal(p, a) for p, a in zip(learner.head.parameters(), aligned))
    learner.close()


def test_diagonal_covariance_keeps_variances(tiny_encoder, typing_data):
    learner, prepared = _learner(tiny_encoder, *typing_data, epochs=1, covariance="diagonal", align_epochs=1)
    learner.learn(0)
    learner.learn(1)
    assert learner.spreads.shape == (4, learner.ctx.backbone.hidden_size) and bool((learner.spreads >= 1e-4).all())
    learner.close()


def test_runs_saves_and_predicts_on_a_classification_stream(tiny_encoder, typing_data, tmp_path, capsys):
    data, tasks = typing_data
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "model-surgery[align_epochs=3]", "--epochs", "2", "--batch-size", "4", "--out", str(out),
                 "--no-progress"]) == 0
    seed = json.loads((out / "seed-0" / "metrics.json").read_text())
    assert len(seed["accuracy_matrix"]) == 2 and len(seed["retrieval_accuracy"][-1]) == 2
    assert seed["stored_params"] > seed["tunable_params"]
    assert (out / "seed-0" / "adapters" / "task-02" / "method.safetensors").is_file()
    capsys.readouterr()
    assert main(["predict", str(out), "We saw the wolf.", "--entity", "wolf", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["label"] in ("animal", "food", "tool", "place") and line["task"] in ("task-01", "task-02")
    assert main(["verify", str(out)]) == 0


def test_runs_on_a_generative_stream_retrieving_the_module_that_generates(tiny_decoder, tmp_path, capsys):
    from test_generation import write_generative_data

    out = tmp_path / "run"
    data = write_generative_data(tmp_path / "gen")
    assert main(["run", "--model", str(tiny_decoder), "--data", str(data), "--learner", "model-surgery[align_epochs=2]",
                 "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    seed = json.loads((out / "seed-0" / "metrics.json").read_text())
    assert len(seed["accuracy_matrix"]) == 2 and len(seed["reference_perplexity"]) == 2
    assert len(seed["retrieval_accuracy"][-1]) == 2
    capsys.readouterr()
    assert main(["predict", str(out), "Plural of cat?", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["prompt"] == "Plural of cat?" and answer["task"] in ("plural", "upper")


@pytest.mark.parametrize("options,match", [
    ({"adapter_momentum": 1.5}, "adapter_momentum: must be <= 1.0, got 1.5"),
    ({"covariance": "multi-centroid"}, "covariance: must be one of full, diagonal"),
    ({"max_refine": 0}, "max_refine: must be >= 1"),
    ({"align_lr": 0.0}, "align_lr: must be > 0"),
    ({"reg": -0.1}, "reg: must be >= 0"),
    ({"adapter_momentun": 0.2}, "did you mean 'adapter_momentum'"),
])
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        check(from_dict({"model": "minilm", "learner": "model-surgery", "learner_options": options}))


def test_a_domain_incremental_stream_is_refused(tmp_path):
    from test_domain_incremental import write_domains

    cfg = from_dict({"model": "minilm", "learner": "model-surgery", "data": {"file": str(write_domains(tmp_path))}})
    with pytest.raises(ConfigError, match="each label must belong to one task"):
        check_stream(cfg, load_stream(cfg.data))
