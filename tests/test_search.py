"""``conpet search``: the space is checked before anything runs, trials are conpet runs on dev rows
with the test rows sealed, the Pareto front and the best configurations are written, workers share
one Optuna storage, and a killed worker's trial is failed and retried, not lost."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conpet.cli import main
from conpet.config import from_dict, load_config
from conpet.data.load import load_stream
from conpet.errors import ConfigError, ConpetError
from conpet.search import search
from conpet.search.pareto import best_per_budget, pareto_front, should_prune


def _space(tmp_path: Path, model: Path, data: Path, tasks: Path, params: dict | None = None, **top) -> Path:
    base = {"model": str(model), "learner": "sequential",
            "data": {"file": str(data), "tasks": str(tasks)},
            "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "top_layers": None}}
    params = params if params is not None else {
        "pet.method": ["lora", "bitfit"],
        "pet.options.r": {"values": [2, 4], "when": {"pet.method": "lora"}},
        "learner": ["sequential", "emr*"],
        "train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": base, "params": params, **top}, sort_keys=False))
    return path


# -- pure parts ----------------------------------------------------------------------------------------
def test_pareto_front_best_per_budget_and_median_rule():
    pts = [{"accuracy": 50, "params": 100}, {"accuracy": 60, "params": 1000}, {"accuracy": 55, "params": 2000},
           {"accuracy": 40, "params": 50}, {"accuracy": 50, "params": 100}]
    front = pareto_front(pts, ("accuracy", "params"))
    assert front == [1, 0, 4, 3]  # 2 is dominated by 1; equal points do not dominate each other
    assert best_per_budget(pts, [60, 100, 5000]) == {60: 3, 100: 0, 5000: 1}
    assert should_prune(30, [40, 50, 60, 70], min_trials=4)
    assert not should_prune(30, [40, 50, 60], min_trials=4)  # too few finished trials
    assert not should_prune(56, [40, 50, 60, 70], min_trials=4)


def test_sealed_test_rows_fail_when_read(typing_data):
    data, tasks = typing_data
    cfg = from_dict({"data": {"file": str(data), "tasks": str(tasks), "eval_split": "dev"}})
    stream = load_stream(cfg.data)
    assert stream.tasks[0].dev
    for touch in (len, list, lambda rows: rows[0], bool):
        with pytest.raises(ConpetError, match="sealed"):
            touch(stream.tasks[0].test)


# -- the space is checked up front -----------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({}, "'params' is empty"),
    ({"pet.method": []}, "list of values is empty"),
    ({"train.lr": {"low": 0.1, "high": 0.01}}, "must be below high"),
    ({"pet.options.r": {"values": [2], "when": {"pet.mehtod": "lora"}}}, "neither a parameter above it"),
    ({"pet.method": ["ia3"], "pet.options.r": {"values": [2], "when": {"pet.method": "lora"}}}, "never takes"),
    ({"pet.options.rr": {"values": [2]}}, "rr"),
    ({"learner": ["emr*", "nope"]}, "unknown learner 'nope'"),
    ({"learner": ["emr*"], "learner_options.new_ratoi": {"values": [0.5], "when": {"learner": "emr*"}}},
     "did you mean 'new_ratio'"),
    ({"trian.lr": [0.1]}, "trian"),
    ({"data.benchmark": ["wordnet-fine"]}, "not a setting to tune"),
])
def test_a_bad_space_is_an_error_naming_its_line_before_anything_is_written(tmp_path, tiny_encoder, typing_data,
                                                                             params, message, capsys):
    data, tasks = typing_data
    space = _space(tmp_path, tiny_encoder, data, tasks, params)
    out = tmp_path / "search"
    assert main(["search", str(space), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"conpet: error: {space}:") and message in err and err.count("\n") == 0, err
    assert not out.exists()


def test_bad_storage_and_mismatched_scenario_are_errors(tmp_path, tiny_encoder, typing_data, capsys):
    data, tasks = typing_data
    space = _space(tmp_path, tiny_encoder, data, tasks)
    assert main(["search", str(space), "--out", str(tmp_path / "s"), "--storage", "nosuchdb://x/y"]) == 2
    assert "--storage nosuchdb://x/y: cannot open it" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="scenario"):
        search(space, tmp_path / "s2", tune_on="wordnet-typing", eval_on="wordnet-fine[tasks=0:10]")
    assert not (tmp_path / "s2").exists()


# -- a real (tiny) search -------------------------------------------------------------------------------
def test_search_runs_trials_on_dev_rows_and_writes_front_plot_and_configs(tmp_path, tiny_encoder, typing_data,
                                                                           capsys):
    data, tasks = typing_data
    space = _space(tmp_path, tiny_encoder, data, tasks, trials=4)
    out = tmp_path / "search"
    result = search(space, out, sampler="random", prune=False)
    summary = json.loads((out / "search.json").read_text())
    assert summary["trials"]["complete"] == 4 and len(result.points) == 4
    assert result.front and (out / "pareto.png").stat().st_size > 1000
    for p in result.points:  # every trial is a run directory measured on dev rows
        cfg = load_config(str(Path(p["run_dir"]) / "config.yaml"))
        assert cfg.data.eval_split == "dev"
        assert 0 <= p["accuracy"] <= 100 and p["params"] > 0
    for path in summary["best_per_budget"].values():  # ready `conpet run --config` files, without the dev seal
        cfg = load_config(path)
        assert cfg.data.eval_split == "test" and cfg.pet.method in ("lora", "bitfit")
    text = (out / "search.md").read_text()
    assert "Pareto front" in text and "| trial |" in text
    assert main(["report", str(out)]) == 0  # `conpet report` reads a search folder too
    assert "Pareto front" in capsys.readouterr().out
    again = search(space, out, sampler="random", prune=False)  # joining a finished study runs no trial
    assert len(again.points) == 4 and len(list((out / "trials").iterdir())) == 4
    budgets = sorted(int(k) for k in json.loads((out / "search.json").read_text())["best_per_budget"])
    accuracy = {b: max(p["accuracy"] for p in result.points if int(p["params"]) == b) for b in budgets}
    assert all(accuracy[b] < accuracy[c] for b, c in zip(budgets, budgets[1:]))  # a bigger budget buys accuracy


def test_a_trial_that_reads_test_rows_fails(tmp_path, tiny_encoder, typing_data, monkeypatch):
    import conpet.runner as runner

    data, tasks = typing_data
    space = _space(tmp_path, tiny_encoder, data, tasks, {"pet.method": ["lora"]}, trials=1)
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda learner, t, split="test": real(learner, t, "test"))
    with pytest.raises(ConpetError, match="sealed"):
        search(space, tmp_path / "search", prune=False)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]


def _worker(space: Path, out: Path, db: Path, trials: int, heartbeat: int = 60) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "conpet.cli", "search", str(space), "--out", str(out), "--storage",
           f"sqlite:///{db}", "--study", "shared", "--trials", str(trials), "--sampler", "random", "--no-prune",
           "--heartbeat", str(heartbeat)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def test_two_workers_share_one_study(tmp_path, tiny_encoder, typing_data):
    data, tasks = typing_data
    space = _space(tmp_path, tiny_encoder, data, tasks)
    db = tmp_path / "study.db"
    optuna.create_study(study_name="shared", storage=f"sqlite:///{db}",
                        directions=["maximize", "minimize", "minimize"])  # created once, as a team would
    workers = [_worker(space, tmp_path / f"w{k}", db, trials=6) for k in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 6 <= len(done) <= 7  # 7 only if both workers start a trial within the same instant
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and all(t.state != optuna.trial.TrialState.FAIL for t in study.trials)
    by_worker = {Path(t.user_attrs["run_dir"]).parts[-3] for t in done}
    assert by_worker == {"w0", "w1"}  # both workers ran trials
    dirs = [t.user_attrs["run_dir"] for t in done]
    assert len(dirs) == len(set(dirs)) and all((Path(d) / "metrics.json").is_file() for d in dirs)


def test_a_worker_counts_the_trials_others_are_running_towards_the_budget(tmp_path):
    from conpet.search.study import StopAtBudget, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=60)
    study = optuna.create_study(study_name="s", storage=storage)
    other = study.ask()  # another worker's trial, alive (its heartbeat is fresh)
    storage.record_heartbeat(other._trial_id)
    mine = []
    study.optimize(lambda t: mine.append(t.number) or 0.0, callbacks=[StopAtBudget(3)])
    assert len(mine) == 2  # 2 of mine + the running one = 3 (Optuna's MaxTrialsCallback: 3 of mine)
    assert study.trials[other.number].state == optuna.trial.TrialState.RUNNING

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1)
    dead = optuna.create_study(study_name="d", storage=storage)
    gone = dead.ask()
    storage.record_heartbeat(gone._trial_id)
    time.sleep(4)  # past the grace period (2 heartbeats; SQLite keeps whole seconds): that worker is dead
    ran = []
    dead.optimize(lambda t: ran.append(t.number) or 0.0, callbacks=[StopAtBudget(3)])
    assert len(ran) == 3 and dead.trials[gone.number].state == optuna.trial.TrialState.FAIL


@pytest.mark.slow
def test_a_killed_worker_leaves_the_study_usable(tmp_path, tiny_encoder, typing_data):
    data, tasks = typing_data
    space = _space(tmp_path, tiny_encoder, data, tasks, {"pet.method": ["lora"], "train.epochs": [40]})
    db = tmp_path / "study.db"
    first = _worker(space, tmp_path / "w", db, trials=2, heartbeat=1)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it while its first trial runs (after its first task is saved)
        if list((tmp_path / "w" / "trials").glob("trial-0000/seed-*/state.json")):
            break
        time.sleep(0.2)
    else:
        first.kill()
        pytest.fail("the first worker never finished a task")
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # longer than the grace period (2 heartbeats)
    second = _worker(space, tmp_path / "w", db, trials=2, heartbeat=1)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    states = {t.number: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.FAIL  # marked failed, not left running
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].user_attrs["run_dir"].endswith("trial-0000")  # it resumed the dead trial's run directory
    metrics = json.loads((Path(retried[0].user_attrs["run_dir"]) / "metrics.json").read_text())
    assert metrics["per_seed"][0]["resumed"] is True
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 2
    with sqlite3.connect(db) as con:  # nothing left in the running state
        assert con.execute("select count(*) from trials where state='RUNNING'").fetchone()[0] == 0


def test_two_phase_tunes_on_one_half_and_reports_the_other(tmp_path, tiny_encoder, typing_data):
    data, tasks = typing_data
    space = _space(tmp_path, tiny_encoder, data, tasks, {"pet.method": ["lora", "bitfit"]}, trials=2)
    out = tmp_path / "search"
    result = search(space, out, tune_on=f"{data}[tasks=0:1]", eval_on=f"{data}[tasks=1:2]", sampler="random",
                    prune=False, eval_seeds=1)
    for p in result.points:  # phase 1 saw only the first task, on dev rows
        cfg = load_config(str(Path(p["run_dir"]) / "config.yaml"))
        assert (cfg.data.task_slice, cfg.data.eval_split) == ("0:1", "dev")
    rows = {r["name"]: r for r in result.phase2["rows"]}
    assert set(rows) == {"searched", "defaults"}
    for row in rows.values():  # phase 2: the other task, its test rows
        cfg = load_config(str(Path(row["run_dir"]) / "config.yaml"))
        assert (cfg.data.task_slice, cfg.data.eval_split) == ("1:2", "test")
        assert 0 <= row["accuracy"] <= 100
    assert "Phase 2 on" in (out / "search.md").read_text()


def test_conpet_runs_without_optuna_and_search_says_what_it_needs(monkeypatch, tmp_path):
    """Only `conpet search` needs Optuna (a GPU image may lack it): the CLI imports without it and
    a search is a clear ConfigError, not an ImportError at start-up."""
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['optuna'] = None\n"
                          "import conpet.cli; print('imported')"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]
    import conpet.search.study as study

    monkeypatch.setattr(study, "optuna", None)
    with pytest.raises(ConfigError, match="conpet search needs Optuna"):
        search(tmp_path / "space.yaml", tmp_path / "out")
