"""The command line: bad input ends with one line `conpet: error: ...`, exit code 2, no traceback,
and nothing is written to the run directory."""

import json
import subprocess
import sys

import pytest

from conpet.cli import main


def _run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _bad_inputs(tmp_path, typing_data):
    data, tasks = typing_data
    malformed = tmp_path / "malformed.jsonl"
    lines = data.read_text().splitlines()
    lines[6] = lines[6][:-3]
    malformed.write_text("\n".join(lines) + "\n")
    missing_label = tmp_path / "tasks_missing.json"
    missing_label.write_text(json.dumps([["animal", "food"], ["tool"]]))
    empty_task = tmp_path / "tasks_empty.json"
    empty_task.write_text(json.dumps([["animal", "food"], [], ["tool", "place"]]))
    two_tasks = tmp_path / "tasks_twice.json"
    two_tasks.write_text(json.dumps([["animal", "food"], ["tool", "place", "food"]]))
    return {
        "malformed JSONL line": (["--data", str(malformed), "--tasks", str(tasks)], r"malformed.jsonl:7: invalid JSON"),
        "label missing from task file": (["--data", str(data), "--tasks", str(missing_label)],
                                         r"data.jsonl:\d+: label 'place' is in no task of .*tasks_missing.json"),
        "empty task": (["--data", str(data), "--tasks", str(empty_task)], r"tasks_empty.json: task 'task-02' is empty"),
        "one label in two tasks": (["--data", str(data), "--tasks", str(two_tasks)],
                                   r"tasks_twice.json: label 'food' is in tasks 'task-01' and 'task-02'"),
        "model path that does not exist": (["--data", str(data), "--tasks", str(tasks), "--model", str(tmp_path / "no-model")],
                                           r"model '.*no-model': no such file or folder"),
        "unknown learner": (["--learner", "ewc-typo"], r"learner: unknown learner 'ewc-typo'"),
        "bad config key": (["--set", "train.epoch=3"], r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"),
    }


@pytest.mark.parametrize("case", ["malformed JSONL line", "label missing from task file", "empty task",
                                  "one label in two tasks", "model path that does not exist", "unknown learner",
                                  "bad config key"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, typing_data, case):
    import re

    argv, pattern = _bad_inputs(tmp_path, typing_data)[case]
    out_dir = tmp_path / "out"
    code, out, err = _run_cli(capsys, ["run", *argv, "--out", str(out_dir), "--no-progress"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conpet: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_real_process_exit_code_and_no_traceback(tmp_path, typing_data):
    data, _ = typing_data
    proc = subprocess.run([sys.executable, "-m", "conpet", "run", "--data", str(data), "--tasks",
                           str(tmp_path / "nope.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"conpet: error: {tmp_path / 'nope.json'}: task file not found"


def test_help_on_every_command(capsys):
    for argv in (["--help"], ["run", "--help"], ["report", "--help"], ["benchmarks", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--learner" in capsys.readouterr().out


def test_run_then_report(capsys, tmp_path, typing_data, tiny_encoder):
    data, tasks = typing_data
    for learner in ("sequential", "joint"):
        code, out, _ = _run_cli(capsys, ["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks",
                                         str(tasks), "--learner", learner, "--epochs", "1", "--no-progress",
                                         "--out", str(tmp_path / learner)])
        assert code == 0 and "average accuracy (%)" in out
    code, out, _ = _run_cli(capsys, ["report", str(tmp_path / "sequential"), str(tmp_path / "joint")])
    assert code == 0 and "sequential" in out and "joint" in out
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = _run_cli(capsys, ["report", str(tmp_path / "missing")])
    assert code == 2 and "missing" in err


def test_listing_commands(capsys):
    assert main(["benchmarks"]) == 0 and "wordnet-typing" in capsys.readouterr().out
    assert main(["learners"]) == 0 and "joint" in capsys.readouterr().out
    assert main(["pets"]) == 0 and "lora" in capsys.readouterr().out
