"""End-to-end behaviour of the runner and the reference learners on tiny random models."""

import json

import pytest
import torch

from conpet.config import from_dict, load_config
from conpet.runner import run


def _cfg(model, data_file, tasks, out, **extra):
    values = {"model": str(model), "out": str(out), "data": {"file": str(data_file), "tasks": str(tasks)},
              "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "head_lr": 5e-2, "precision": "fp32"}}
    for key, value in extra.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(values)


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "tiny_decoder"])
@pytest.mark.parametrize("learner", ["sequential", "joint"])
def test_run_writes_the_documented_run_directory(request, model_fixture, learner, typing_data, tmp_path):
    model = request.getfixturevalue(model_fixture)
    data, tasks = typing_data
    out = tmp_path / "run"
    metrics = run(_cfg(model, data, tasks, out, learner=learner), progress=False)
    for key in ("accuracy_matrix", "average_accuracy", "whole_accuracy", "forgetting", "bwt",
                "train_seconds", "tunable_params", "backbone_params"):
        assert key in metrics
        assert key in json.loads((out / "seed-0" / "metrics.json").read_text())
    A = metrics["accuracy_matrix"]
    assert len(A) == 2 and A[0][1] is None and all(0 <= a <= 1 for a in A[1])
    assert len(metrics["train_seconds"]) == 2
    assert 0 < metrics["tunable_params"] < metrics["backbone_params"]
    for task in ("task-01", "task-02"):
        folder = out / "seed-0" / "adapters" / task
        assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head.json",
                "conpet.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((out / "seed-0" / "adapters" / "task-02" / "head.json").read_text())["labels"] == \
        ["animal", "food", "tool", "place"]
    for name in ("config.yaml", "metrics.json", "summary.md", "accuracy_matrix.png", "accuracy_curve.png"):
        assert (out / name).is_file()


def test_training_lowers_the_loss_on_the_task(tiny_encoder, typing_data, tmp_path):
    from conpet.build import build_learner, prepare

    data, tasks = typing_data
    cfg = _cfg(tiny_encoder, data, tasks, tmp_path / "run", train={"epochs": 40})
    prepared = prepare(cfg)
    stream = prepared.stream
    learner = build_learner(cfg, prepared, seed=0)
    ctx = learner.ctx
    train = stream.tasks[0].train
    learner.learn(0)
    losses = learner.last_fit.losses
    assert len(losses) == 40 * 2  # 12 rows, batch 8 -> 2 steps per epoch
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    with torch.no_grad():
        preds = learner.logits(train).argmax(-1)
    assert (preds == ctx.targets(train)).float().mean() == 1.0
    learner.close()


def test_seeds_are_aggregated_and_reproducible(tiny_encoder, typing_data, tmp_path):
    data, tasks = typing_data
    m2 = run(_cfg(tiny_encoder, data, tasks, tmp_path / "a", seeds=2), progress=False)
    assert m2["n_seeds"] == 2 and m2["seeds"] == [0, 1] and "average_accuracy" in m2["std"]
    again = run(_cfg(tiny_encoder, data, tasks, tmp_path / "b", seeds=1), progress=False)
    assert again["accuracy_matrix"] == m2["per_seed"][0]["accuracy_matrix"]


def test_run_leaves_its_config_unchanged_and_records_what_it_resolved(tiny_decoder, typing_data, tmp_path):
    data, tasks = typing_data
    cfg = _cfg(tiny_decoder, data, tasks, tmp_path / "a", seeds=1)
    before = cfg.to_dict()
    first = run(cfg, progress=False)
    assert cfg.to_dict() == before  # "auto" stays "auto": nothing written back
    cfg.out = str(tmp_path / "b")  # the same config object, run again
    assert run(cfg, progress=False)["accuracy_matrix"] == first["accuracy_matrix"]
    saved = load_config(str(tmp_path / "a" / "config.yaml"))
    assert saved.backbone.pooling == "cloze" and saved.train.top_layers != "auto"


def test_a_seed_finished_before_a_metric_existed_gains_it_on_resume(tiny_encoder, typing_data, tmp_path):
    import shutil

    from conpet.runner import resume

    data, tasks = typing_data
    out = tmp_path / "run"
    first = run(_cfg(tiny_encoder, data, tasks, out, seeds=2), progress=False)
    old = json.loads((out / "seed-0" / "metrics.json").read_text())
    del old["learning_accuracy"]  # as written by a release without it
    (out / "seed-0" / "metrics.json").write_text(json.dumps(old))
    shutil.rmtree(out / "seed-1")
    again = resume(out, progress=False)
    assert again["per_seed"][0]["learning_accuracy"] == first["per_seed"][0]["learning_accuracy"]
    assert again["learning_accuracy"] == pytest.approx(first["learning_accuracy"])


def test_task_incremental_is_never_worse_than_class_incremental(tiny_encoder, typing_data, tmp_path):
    data, tasks = typing_data
    ci = run(_cfg(tiny_encoder, data, tasks, tmp_path / "ci"), progress=False)
    ti = run(_cfg(tiny_encoder, data, tasks, tmp_path / "ti", data={"setting": "task-incremental"}), progress=False)
    for a_ci, a_ti in zip(ci["accuracy_matrix"][1], ti["accuracy_matrix"][1]):
        assert a_ti >= a_ci


def test_saved_adapter_loads_in_plain_peft_with_identical_logits(tiny_decoder, typing_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from conpet.backbone import cloze_features, load_backbone
    from conpet.data import load_stream
    from conpet.heads import GrowingHead
    from conpet.inputs import collate, encode_rows
    from conpet.pet import get_pet

    data, tasks = typing_data
    cfg = _cfg(tiny_decoder, data, tasks, tmp_path / "run")
    run(cfg, progress=False)
    folder = tmp_path / "run" / "seed-0" / "adapters" / "task-02"

    stream = load_stream(cfg.data)
    bb = load_backbone(cfg.model)
    enc = encode_rows(stream.rows, stream.kind, bb.tokenizer, bb.is_decoder, 64)
    batch = collate(enc, list(range(len(stream.rows))), bb.pad_id)
    head = GrowingHead.load(folder)

    pet = get_pet("lora")
    ours = pet.attach(bb.model, "default")
    pet.load(ours, folder, "default")
    pet.activate(ours, "default")
    ours.eval()
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_decoder)), str(folder)).eval()
    with torch.no_grad():
        a = head(cloze_features(ours, batch))
        b = head(cloze_features(plain, batch))
    assert torch.equal(a, b)
    assert not torch.equal(a, head(cloze_features(AutoModel.from_pretrained(str(tiny_decoder)).eval(), batch)))
