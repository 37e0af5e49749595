"""FPF: sequential training, then only the forgetting-prone parts (head + the top PET layers)
fine-tuned on the exemplar buffer."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from conpet.cli import main
from conpet.config import from_dict


def test_only_the_forgetting_prone_parts_change_in_the_fpf_phase(tiny_decoder, typing_data):
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    cfg = from_dict({"model": str(tiny_decoder), "learner": "fpf", "data": {"file": str(data), "tasks": str(tasks)},
                     "learner_options": {"memory_per_class": 2, "fpf_layers": 1, "fpf_steps": 5},
                     "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "precision": "fp32", "top_layers": None}})
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    learner.learn(0)
    learner.begin_task(1)
    fits = learner.fits(1)
    learner.train(next(fits))  # the task's own training, then the memory's update
    phase = next(fits)
    pet = {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" in n}
    layers = sorted({int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in pet})
    head = learner.head.weight.detach().clone()
    learner.train(phase)
    after = {n: p.detach() for n, p in learner.model.named_parameters() if "lora_" in n}
    changed = {n for n in pet if not torch.equal(pet[n], after[n])}
    top = f".layers.{layers[-1]}."
    assert changed and all(top in n for n in changed)  # only the top PET layer moved
    assert not torch.equal(head, learner.head.weight)  # and the head
    learner.close()


def test_fpf_runs_end_to_end(tiny_encoder, typing_data, tmp_path):
    data, tasks = typing_data
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--learner",
                 "fpf[fpf_steps=3]", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    assert (Path(out) / "metrics.json").is_file()


def test_k_fpf_triggers_k_phases_over_the_stream_regardless_of_task_boundaries(tiny_encoder, typing_data):
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    cfg = from_dict({"model": str(tiny_encoder), "learner": "k-fpf",
                     "data": {"file": str(data), "tasks": str(tasks)},
                     "learner_options": {"memory_per_class": 2, "fpf_steps": 2, "k": 3},
                     "train": {"epochs": 2, "batch_size": 4, "precision": "fp32", "top_layers": None}})
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    planned = learner.planned_steps()
    total = sum(planned)  # 2 tasks x 2 epochs x ceil(12 / 4) = 12 steps: phases after steps 4, 8, 12
    assert total == 12
    assert learner.triggers_in(0, planned[0]) == [4] and learner.triggers_in(1, planned[1]) == [2, 6]
    phases = []
    original = learner.fpf_fit
    learner.fpf_fit = lambda t, buffer: (phases.append((t, list(buffer))), original(t, buffer))[1]
    for t in range(2):
        learner.learn(t)
    assert [t for t, _ in phases] == [0, 1, 1]  # one inside task 1, two in task 2 (one at its end)
    labels = {prepared.stream.rows[i].label for i in phases[1][1]}
    assert labels == {"animal", "food", "tool", "place"}  # old exemplars + the current task's seen rows
    assert learner.last_fit.samples > 2 * 4 * 2  # the task's steps and its phases, counted together
    learner.close()
