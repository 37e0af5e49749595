"""docs/write-a-learner.md works as written: its learner runs, resumes its declared state, and
joins conpet from another package through the ``conpet.learners`` entry points."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conpet.config import from_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "write-a-learner.md"


def doc_code() -> str:
    """The page's first Python block: the whole learner."""
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


@pytest.fixture
def er():
    from conpet.learners import LEARNERS

    module = types.ModuleType("my_er")
    exec(compile(doc_code(), str(DOC), "exec"), module.__dict__)
    yield module.ExperienceReplay
    LEARNERS.pop("er", None)


def _cfg(model, data, tasks, **options):
    return from_dict({"model": str(model), "learner": "er", "learner_options": options,
                      "data": {"file": str(data), "tasks": str(tasks)},
                      "train": {"epochs": 2, "batch_size": 4, "precision": "fp32"}})


def test_the_page_is_about_forty_lines_of_code():
    lines = [line for line in doc_code().splitlines() if line.strip()]
    assert len(lines) <= 45, len(lines)


def test_the_pages_learner_replays_a_reservoir_and_resumes_its_state(er, tiny_encoder, typing_data):
    from conpet.build import build_learner, prepare

    cfg = _cfg(tiny_encoder, *typing_data, buffer_size=5)
    prepared = prepare(cfg)
    stream = prepared.stream
    learner = build_learner(cfg, prepared, seed=0)
    learner.learn(0)
    assert len(learner.buffer) == 5 and learner.seen == 2 * len(stream.tasks[0].train)  # each epoch's rows offered
    assert set(learner.buffer) <= set(stream.tasks[0].train)
    learner.begin_task(1)
    [fit] = learner.fits(1)
    first = set(stream.tasks[0].train)
    for batch in fit.batches:  # the task's rows, then as many replayed ones (the buffer has 5 or more)
        own = len(batch) // 2
        assert len(batch) == 2 * own and not set(batch[:own]) & first
    assert any(set(batch[len(batch) // 2:]) & first for batch in fit.batches)  # old rows come back
    tensors, meta = learner.state()
    buffer, seen = list(learner.buffer), learner.seen
    learner.close()  # the backbone back untouched, for the next learner
    again = build_learner(cfg, prepared, seed=0)
    again.load_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert again.buffer == buffer and again.seen == seen
    again.close()


def test_a_package_adds_the_learner_through_an_entry_point(tiny_encoder, typing_data, tmp_path):
    site = tmp_path / "site"
    (site / "my_er-1.0.dist-info").mkdir(parents=True)
    (site / "my_er.py").write_text(doc_code())
    (site / "broken_er.py").write_text("raise RuntimeError('no such thing')\n")
    (site / "my_er-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-er\nVersion: 1.0\n")
    (site / "my_er-1.0.dist-info" / "entry_points.txt").write_text(
        "[conpet.learners]\ner = my_er\nbroken = broken_er\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "conpet", "learners"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^\s*er\b", listed.stdout, re.M) and "Chaudhry et al. 2019" in listed.stdout
    assert "learner plugin 'broken' (broken_er) could not be imported: RuntimeError: no such thing" in listed.stderr
    data, tasks = typing_data
    out = tmp_path / "run"
    ran = subprocess.run([sys.executable, "-m", "conpet", "run", "--model", str(tiny_encoder), "--data", str(data),
                          "--tasks", str(tasks), "--learner", "er[buffer_size=6]", "--epochs", "1", "--out", str(out),
                          "--no-progress"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    assert (out / "seed-0" / "metrics.json").is_file() and '"name": "er"' in (out / "learner.json").read_text()
    bad = subprocess.run([sys.executable, "-m", "conpet", "run", "--model", str(tiny_encoder), "--data", str(data),
                          "--tasks", str(tasks), "--learner", "er[buffer_size=0]", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "buffer_size: must be >= 1" in bad.stderr and not (tmp_path / "bad").exists()
