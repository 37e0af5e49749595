"""Task orders: ``data.task_order`` reorders a stream; ``--orders N`` runs N seeded orders, each a
plain run directory, and reports mean ± std over orders; a second call continues, not repeats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conpet.cli import main
from conpet.config import DataConfig, from_dict
from conpet.data import load_stream
from conpet.data.stream import reorder_tasks
from conpet.errors import ConfigError, ConpetError
from conpet.runner import orders_summary, task_orders


def test_task_orders_are_distinct_and_start_with_the_streams_own():
    names = ["a", "b", "c", "d"]
    orders = task_orders(names, 5)
    assert orders[0] == names and len({tuple(o) for o in orders}) == 5
    assert all(sorted(o) == names for o in orders)
    assert task_orders(names, 5) == orders  # seeded: the same orders every time
    assert len(task_orders(["x", "y"], 2)) == 2
    with pytest.raises(ConpetError, match="2 tasks have only 2 orders"):
        task_orders(["x", "y"], 3)


def test_task_order_reorders_tasks_and_class_columns(typing_data):
    data, tasks = typing_data
    stream = load_stream(DataConfig(benchmark=None, file=str(data), tasks=str(tasks)))
    names = [t.name for t in stream.tasks]
    flipped = load_stream(DataConfig(benchmark=None, file=str(data), tasks=str(tasks), task_order=names[::-1]))
    assert [t.name for t in flipped.tasks] == names[::-1]
    assert flipped.labels == ["tool", "place", "animal", "food"] and flipped.class_range(0) == (0, 2)
    assert flipped.tasks[0].train == stream.tasks[1].train  # the same rows, only the order changes
    with pytest.raises(ConfigError, match="no task 'nope'"):
        reorder_tasks(stream, ["nope", names[0]])
    with pytest.raises(ConfigError, match=f"missing: {names[1]}"):
        reorder_tasks(stream, [names[0]])
    with pytest.raises(ConfigError, match="repeated"):
        reorder_tasks(stream, [names[0], names[1], names[0]])


def test_orders_summary_is_mean_and_std_over_orders():
    def order(tasks, accs):
        seeds = [{"average_accuracy": a, "whole_accuracy": a, "forgetting": 0.1, "bwt": -0.1} for a in accs]
        return {**{k: float(np.mean([s[k] for s in seeds])) for k in seeds[0]}, "per_seed": seeds,
                "run": {"tasks": tasks, "benchmark": "b"}}

    summary = orders_summary([order(["a", "b"], [0.5, 0.7]), order(["b", "a"], [0.2, 0.4])])
    assert summary["over_orders"]["average_accuracy"]["mean"] == pytest.approx(0.45)
    assert summary["over_orders"]["average_accuracy"]["std"] == pytest.approx(np.std([0.6, 0.3], ddof=1))
    assert summary["over_runs"]["average_accuracy"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.2, 0.4], ddof=1))
    assert summary["orders"][1]["tasks"] == ["b", "a"] and summary["n_orders"] == 2


def test_orders_run_continue_and_resume(tiny_encoder, typing_data, tmp_path, capsys):
    data, tasks = typing_data
    out = tmp_path / "orders"
    flags = ["run", "--model", str(tiny_encoder), "--data", str(data), "--tasks", str(tasks), "--epochs", "1",
             "--orders", "2", "--out", str(out), "--no-progress", "--set", "train.precision=fp32"]
    assert main(flags) == 0
    printed = capsys.readouterr().out
    assert "order 1: task-01 -> task-02" in printed and "order 2: task-02 -> task-01" in printed
    assert "over task orders" in printed
    summary = json.loads((out / "orders.json").read_text())
    assert [o["tasks"] for o in summary["orders"]][0] != [o["tasks"] for o in summary["orders"]][1]
    for k, order in enumerate(summary["orders"], start=1):
        run = json.loads((out / f"order-{k}" / "metrics.json").read_text())
        assert run["run"]["tasks"] == order["tasks"]
        assert order["average_accuracy"] == pytest.approx(run["average_accuracy"])
        assert from_dict(__import__("yaml").safe_load((out / f"order-{k}" / "config.yaml").read_text())) \
            .data.task_order == order["tasks"]
    assert main(["verify", str(out / "order-2")]) == 0
    # a second call reads the finished orders instead of training them again
    stamp = (out / "order-1" / "metrics.json").stat().st_mtime_ns
    assert main(flags) == 0 and (out / "order-1" / "metrics.json").stat().st_mtime_ns == stamp
    # an order left unfinished (no metrics.json) is continued by --resume on the orders folder
    (out / "order-2" / "metrics.json").unlink()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    again = json.loads((out / "orders.json").read_text())
    assert again["over_orders"]["average_accuracy"]["mean"] == pytest.approx(summary["over_orders"]["average_accuracy"]["mean"])
    capsys.readouterr()
    # a different configuration in the same folder is refused
    assert main([*flags, "--lr", "0.01"]) == 2
    assert "holds a run of another configuration" in capsys.readouterr().err
