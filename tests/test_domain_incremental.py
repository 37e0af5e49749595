"""The domain-incremental setting: classification rows that name their task (field ``task``),
tasks that share labels. One label space for the whole stream, exemplars kept per (task, label),
the selector trained on the rows' tasks, expert heads placed in the shared columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ANIMALS, FOODS, PLACES, TOOLS
from conpet.cli import main
from conpet.config import DataConfig, from_dict
from conpet.data import load_stream
from conpet.errors import DataError

DOMAINS = {"news": "Reporters wrote about the {w} yesterday.", "chat": "lol my {w} is so random haha"}


def write_domains(folder: Path) -> Path:
    """Two domains (tasks) x the same two labels; the second domain also brings a third label."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "domains.jsonl"
    with open(path, "w") as f:
        for task, template in DOMAINS.items():
            groups = [("animal", ANIMALS), ("food", FOODS)] + ([("tool", TOOLS)] if task == "chat" else [])
            for label, words in groups:
                for k, w in enumerate(words):
                    split = "test" if k % 4 == 0 else "dev" if k % 4 == 1 else "train"
                    f.write(json.dumps({"text": template.format(w=w), "entity": w, "label": label, "task": task,
                                        "split": split}) + "\n")
    return path


@pytest.fixture
def domains(tmp_path) -> Path:
    return write_domains(tmp_path / "data")


def test_rows_with_a_task_field_make_tasks_that_share_labels(domains):
    stream = load_stream(DataConfig(benchmark=None, file=str(domains)))
    assert [t.name for t in stream.tasks] == ["news", "chat"] and stream.domain_incremental
    assert stream.tasks[0].labels == ("animal", "food") and stream.tasks[1].labels == ("animal", "food", "tool")
    assert stream.labels == ["animal", "food", "tool"]  # one label space, in order of first appearance
    assert stream.seen_labels(0) == ["animal", "food"] and stream.class_range(1) == (2, 3)
    assert stream.task_columns(1) == [0, 1, 2]
    assert all(stream.task_of_row[i] == 1 for i in stream.tasks[1].train)
    assert stream.memory_key(0, "animal") == "news/animal" and stream.memory_key(1, "animal") == "chat/animal"
    # the same label in two tasks: rows stay in their own task
    assert all("Reporters" in stream.rows[i].text for i in stream.tasks[0].train + stream.tasks[0].test)


def test_class_disjoint_rows_with_a_task_field_are_plain_class_incremental(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"the {w} here", "label": lab, "task": task, "split": s}) + "\n"
                            for task, lab, words in (("a", "animal", ANIMALS), ("b", "place", PLACES))
                            for k, w in enumerate(words) for s in [("test", "dev", "train", "train")[k % 4]]))
    stream = load_stream(DataConfig(benchmark=None, file=str(path)))
    assert not stream.domain_incremental and stream.memory_key(0, "animal") == "animal"


def test_misuse(domains, tmp_path, tiny_encoder, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(domains.read_text() + json.dumps({"text": "a dog", "label": "animal", "split": "train"}) + "\n")
    with pytest.raises(DataError, match="no field 'task' here, but every row before it has one"):
        load_stream(DataConfig(benchmark=None, file=str(mixed)))
    cases = [(["--learner", "merge"], "tasks that share labels (a domain-incremental stream) are not supported"),
             (["--learner", "dynamic", "--set", "learner_options.top_k=2"], "each input goes to one expert"),
             (["--setting", "task-incremental"], "the tasks share labels"),
             (["--n-tasks", "2"], "the rows name their task")]
    for k, (flags, message) in enumerate(cases):
        out = tmp_path / f"out-{k}"
        assert main(["run", "--model", str(tiny_encoder), "--data", str(domains), *flags, "--out", str(out),
                     "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.parametrize("learner", ["sequential", "emr*", "lwf*", "dynamic"])
def test_learners_run_a_domain_incremental_stream(tiny_encoder, domains, tmp_path, learner):
    from conpet.build import build_learner, prepare
    from conpet.runner import run

    cfg = from_dict({"model": str(tiny_encoder), "learner": learner, "out": str(tmp_path / "run"),
                     "data": {"file": str(domains)},
                     "learner_options": {"replay_source": "memory"} if learner != "sequential" else {},
                     "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}})
    metrics = run(cfg, progress=False)
    assert len(metrics["accuracy_matrix"]) == 2 and all(0 <= v <= 1 for v in metrics["accuracy_matrix"][1])
    assert main(["verify", str(tmp_path / "run")]) == 0
    prepared = prepare(cfg)
    trained = build_learner(cfg, prepared, seed=0)
    trained.restore(Path(cfg.out), 0)
    logits = trained.logits(prepared.stream.tasks[0].test[:4])
    assert logits.shape == (4, 3)  # every input scored over the one label space
    if learner == "dynamic":  # expert 0 (news: animal, food) writes only its columns
        top, _ = trained.select(prepared.stream.tasks[0].test[:4], 1)
        rows = (top[:, 0] == 0).nonzero().flatten()
        assert bool((logits[rows, 2] == float("-inf")).all())
        assert trained.selector.task_ids(prepared.stream.tasks[1].train[:3]).tolist() == [1, 1, 1]
    trained.close()


def test_replay_memory_keeps_each_domains_exemplars(tiny_encoder, domains):
    from conpet.build import build_learner, prepare

    cfg = from_dict({"model": str(tiny_encoder), "learner": "emr*", "data": {"file": str(domains)},
                     "learner_options": {"replay_source": "memory", "memory_per_class": 2, "steps_per_task": 2},
                     "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}})
    prepared = prepare(cfg)
    learner = build_learner(cfg, prepared, seed=0)
    for t in range(2):
        learner.learn(t)
    keys = learner.memory.rows_by_class
    assert sorted(keys) == ["chat/animal", "chat/food", "chat/tool", "news/animal", "news/food"]
    stream = prepared.stream
    assert all(stream.task_of_row[i] == 0 for i in keys["news/animal"])  # not overwritten by the chat domain
    learner.close()
