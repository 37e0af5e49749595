"""Static ConPET: former methods as plugins, with their original schedule and dynamic replay."""

import pytest
import torch

from conpet.build import build_learner, prepare
from conpet.config import from_dict
from conpet.errors import ConfigError
from conpet.learners import LEARNERS
from conpet.learners.training import update_memory
from conpet.runner import run

METHODS = ["emr", "ea-emr", "ewc", "lwf", "l2"]


def _cfg(model, data, tasks, out, learner, **options):
    return from_dict({"model": str(model), "out": str(out), "learner": learner, "learner_options": options,
                      "data": {"file": str(data), "tasks": str(tasks)},
                      "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "head_lr": 5e-2, "precision": "fp32"}})


def _learner(model, typing_data, tmp_path, name, **options):
    data, tasks = typing_data
    cfg = _cfg(model, data, tasks, tmp_path / "run", name, **options)
    return build_learner(cfg, prepare(cfg), seed=0)


def test_every_method_has_both_schedules():
    for m in METHODS:
        assert m in LEARNERS and f"{m}*" in LEARNERS
        assert not LEARNERS[m].dynamic and LEARNERS[f"{m}*"].dynamic


@pytest.mark.parametrize("name", [m + s for m in METHODS for s in ("", "*")])
def test_method_runs_a_stream_end_to_end(name, tiny_decoder, typing_data, tmp_path):
    data, tasks = typing_data
    metrics = run(_cfg(tiny_decoder, data, tasks, tmp_path / "run", name), progress=False)
    assert len(metrics["accuracy_matrix"]) == 2
    assert (tmp_path / "run" / "seed-0" / "adapters" / "task-02" / "adapter_model.safetensors").is_file()


def test_dynamic_replay_batches_mix_new_and_history_rows(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, "emr*")
    learner.learn(0)
    stream = learner.ctx.stream
    batches = learner.replay_batches(1)
    new, old = set(stream.tasks[1].train), set(stream.tasks[0].train)
    # 12 new rows, 4 new per batch, 2 epochs -> 6 steps, each exactly 4 new + 4 old rows
    assert len(batches) == 6
    assert all(set(b[:4]) <= new and set(b[4:]) <= old and len(b) == 8 for b in batches)
    assert learner.memory.rows_by_class == {}  # emr* replays the full history: no memory needed
    learner.close()


def test_steps_per_task_is_fixed_by_option(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, "ewc*", steps_per_task=5)
    learner.learn(0)
    learner.learn(1)
    assert learner.last_fit.steps == 5
    learner.close()


def test_emr_memory_is_bounded_and_replayed(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, "emr", memory_per_class=2)
    learner.learn(0)
    assert {k: len(v) for k, v in learner.memory.rows_by_class.items()} == {"animal": 2, "food": 2}
    replayed = learner.plugins[0].replay_rows(1)
    assert len(replayed) == 4 and set(replayed) <= set(learner.ctx.stream.tasks[0].train)
    learner.learn(1)
    assert learner.last_fit.samples == 2 * (12 + 4)
    learner.close()


def test_memory_replay_source(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, "l2*", replay_source="memory", memory_per_class=3)
    learner.learn(0)
    mem = set(learner.memory.rows(["animal", "food"]))
    assert len(mem) == 6
    assert all(set(b[4:]) <= mem for b in learner.replay_batches(1))
    learner.close()


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, "ewc", ewc_lambda=10.0)
    learner.learn(0)
    plugin = learner.plugins[0]
    assert plugin.n_penalties == 1 and all((a >= 0).all() for a, _, _ in plugin.sums)
    assert float(plugin.extra_loss([], None).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in learner.pet_parameters():
            p.add_(0.1)
    assert float(plugin.extra_loss([], None).detach()) > 0.0
    learner.close()


def test_ewc_running_sums_equal_one_penalty_per_old_task():
    from conpet.learners.ewc import accumulate, penalty

    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,)]
    tasks = [([torch.rand(s, generator=gen) for s in shapes], [torch.randn(s, generator=gen) for s in shapes])
             for _ in range(3)]
    sums = []
    for fisher, theta in tasks:
        sums = accumulate(sums, fisher, theta)
    params = [torch.randn(s, generator=gen) for s in shapes]
    explicit = sum((f * (p - th) ** 2).sum() for fisher, theta in tasks for p, f, th in zip(params, fisher, theta))
    assert float(penalty(params, sums)) == pytest.approx(float(explicit), rel=1e-5)


def test_l2_pulls_towards_the_previous_weights(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, "l2", l2_lambda=2.0)
    learner.learn(0)
    with torch.no_grad():
        params = learner.pet_parameters()
        params[0].add_(1.0)
    assert float(learner.plugins[0].extra_loss([], None).detach()) == pytest.approx(2.0 * params[0].numel())
    learner.close()


def test_lwf_teacher_is_a_frozen_copy_on_the_same_backbone(tiny_decoder, typing_data, tmp_path):
    learner = _learner(tiny_decoder, typing_data, tmp_path, "lwf")
    learner.learn(0)
    learner.head.grow(["tool", "place"])
    plugin = learner.plugins[0]
    plugin.before_task(1)
    rows = learner.ctx.stream.tasks[1].train[:4]
    logits = learner.logits(rows)
    assert float(plugin.extra_loss(rows, logits).detach()) == pytest.approx(0.0, abs=1e-6)  # teacher == student now
    teacher_params = [p for n, p in learner.model.named_parameters() if "lwf_teacher" in n]
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert all(p.requires_grad for p in learner.pet_parameters())
    assert learner.tunable_params()["pet_params"] == sum(p.numel() for p in teacher_params)
    learner.close()


def test_ea_emr_alignment_is_applied_at_prediction_and_refit_on_memory(tiny_encoder, typing_data, tmp_path):
    learner = _learner(tiny_encoder, typing_data, tmp_path, "ea-emr", align_lr=1e-2)
    learner.learn(0)
    plugin = learner.plugins[0]
    rows = learner.ctx.stream.tasks[0].test
    before = learner.logits(rows).detach()
    with torch.no_grad():
        plugin.align.weight.mul_(0.5)
    assert not torch.allclose(before, learner.logits(rows).detach())  # prediction goes through align
    stored = dict(plugin.stored)
    assert len(stored) == len(learner.memory)
    learner.head.grow(["tool", "place"])
    learner.train(learner.fit_on(1, learner.ctx.epoch_batches(learner.ctx.stream.tasks[1].train)))  # the features of old rows drift
    mem = sorted(stored)

    def drift() -> float:
        with torch.no_grad():
            aligned = plugin.align(learner.raw_features(mem))
        return float(((aligned - torch.stack([stored[i] for i in mem])) ** 2).mean())

    before_fit = drift()
    update_memory(learner.ctx, learner.memory, 1, learner.raw_features)
    plugin.after_task(1)
    assert drift() < before_fit
    learner.close()


def test_unknown_learner_option_is_a_clear_error(tiny_encoder, typing_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'ewc_lamda' for learner 'ewc'"):
        _learner(tiny_encoder, typing_data, tmp_path, "ewc", ewc_lamda=1.0)
    with pytest.raises(ConfigError, match="replay_source"):
        _learner(tiny_encoder, typing_data, tmp_path, "emr*", replay_source="disk")
