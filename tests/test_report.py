"""Reports of run directories: tables, markdown summary and plots."""

import pytest

from conpet.errors import ConpetError
from conpet.metrics import aggregate_seeds, summarize
from conpet.plots import plot_accuracy_curve, plot_accuracy_matrix, plot_comparison, write_run_report
from conpet.report import accuracy_matrix_table, load_run, metrics_table, per_task_seconds_table, summary_markdown
from conpet.runs import atomic_write_json, atomic_write_text, seed_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["animals", "plants", "tools"]
COUNTS = [50, 100, 150]


def seed_metrics(seed, A, seconds, rss):
    return {
        "seed": seed,
        **summarize(A, COUNTS[: len(A)]),
        "accuracy_matrix": A,
        "train_seconds": seconds,
        "tunable_params": 12_345,
        "backbone_params": 124_000_000,
        "tunable_ratio": 12_345 / 124_000_000,
        "peak_rss_mb": rss,
    }


def run_metrics(learner="conpet", shift=0.0):
    per_seed = [
        seed_metrics(0, [[0.9, None, None], [0.8 - shift, 0.85, None], [0.7, 0.75, 0.95]],
                     [10.0, 12.0, 14.0], 900.0),
        seed_metrics(1, [[0.92, None, None], [0.78, 0.8 - shift, None], [0.72, 0.7, 0.9]],
                     [11.0, 13.0, 16.0], 950.0),
    ]
    return {
        **aggregate_seeds(per_seed),
        "run": {"learner": learner, "pet": "lora", "model": "tiny-gpt2",
                "benchmark": "toy-fewrel", "tasks": TASKS, "setting": "class-incremental"},
    }


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as `conpet run` writes it, with two seeds."""
    metrics = run_metrics()
    d = tmp_path / "run"
    atomic_write_json(d / "metrics.json", metrics)
    for seed in metrics["per_seed"]:
        atomic_write_json(seed_dir(d, seed["seed"]) / "metrics.json", seed)
    return d


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000


def test_load_run_reads_metrics_json(run_dir):
    metrics = load_run(run_dir)
    assert metrics["run"]["learner"] == "conpet"
    assert metrics["n_seeds"] == 2
    assert load_run(run_dir / "metrics.json") == metrics


def test_load_run_names_the_path_when_it_is_not_a_run(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ConpetError, match="no-such-run.*metrics.json"):
        load_run(missing)
    atomic_write_text(tmp_path / "broken" / "metrics.json", "{not json")
    with pytest.raises(ConpetError, match="broken.*not valid JSON"):
        load_run(tmp_path / "broken")
    atomic_write_text(tmp_path / "list" / "metrics.json", "[1, 2]")
    with pytest.raises(ConpetError, match="JSON object"):
        load_run(tmp_path / "list")


def test_metrics_table_shows_each_run_with_mean_and_std(run_dir):
    runs = [("conpet", load_run(run_dir)), ("ewc", run_metrics("ewc", shift=0.1))]
    table = metrics_table(runs)
    print(table)
    lines = table.splitlines()
    assert "conpet" in lines[0] and "ewc" in lines[0]
    assert "±" in table
    for label in ("average accuracy", "whole accuracy", "avg acc over steps",
                  "whole acc over steps", "forgetting", "BWT", "seconds per task",
                  "total train seconds", "train rows per second", "tunable params", "backbone params",
                  "tunable ratio", "peak RSS", "seeds"):
        assert any(line.startswith(label) for line in lines), label
    # Columns are aligned: every row has the same width as the header rule.
    assert len({len(line) for line in lines}) == 1
    m = runs[0][1]
    expected = f"{100 * m['average_accuracy']:.2f} ± {100 * m['std']['average_accuracy']:.2f}"
    assert expected in table
    assert "12,345" in table and "124,000,000" in table
    assert "0.0100% (1:10,045)" in table
    assert "0, 1" in table
    assert "925.0 ± 35.4" in table  # peak RSS over the two seeds


def test_metrics_table_of_one_seed_has_no_std():
    per_seed = [seed_metrics(7, [[0.5]], [3.0], 100.0)]
    table = metrics_table([("single", aggregate_seeds(per_seed))])
    assert "±" not in table
    assert "50.00" in table
    assert "7" in table.splitlines()[-1]


def test_metrics_table_shows_dashes_for_missing_values():
    table = metrics_table([("partial", {"average_accuracy": 0.5})])
    assert "50.00" in table
    assert "-" in table.splitlines()[3]


def test_seconds_per_task_table(run_dir):
    table = per_task_seconds_table([("conpet", load_run(run_dir))])
    print(table)
    rows = table.splitlines()
    assert [r.split()[0] for r in rows[2:]] == TASKS + ["total"]
    assert "10.50 ± 0.71" in rows[2]
    assert "38.00 ± 2.83" in rows[-1]  # totals 36 and 40


def test_accuracy_matrix_table_marks_unevaluated_cells(run_dir):
    table = accuracy_matrix_table(load_run(run_dir))
    print(table)
    rows = table.splitlines()
    assert rows[2].split() == ["animals", "91.0", ".", "."]
    assert rows[4].split() == ["tools", "71.0", "72.5", "92.5"]


def test_summary_markdown_describes_the_run(run_dir):
    text = summary_markdown(load_run(run_dir))
    assert text.startswith("# conpet + lora on tiny-gpt2")
    for part in ("toy-fewrel", "class-incremental", "animals, plants, tools",
                 "## Metrics", "## Accuracy matrix", "## Training seconds per task", "±"):
        assert part in text


def test_write_run_report_writes_summary_and_plots(run_dir):
    paths = write_run_report(run_dir, load_run(run_dir))
    assert [p.name for p in paths] == ["summary.md", "accuracy_matrix.png", "accuracy_curve.png"]
    assert "accuracy_matrix.png" in (run_dir / "summary.md").read_text()
    assert_png(run_dir / "accuracy_matrix.png")
    assert_png(run_dir / "accuracy_curve.png")
    # No temporary files are left behind.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "accuracy_curve.png", "accuracy_matrix.png", "metrics.json", "seed-0", "seed-1",
        "summary.md",
    ]


def test_plots_of_a_single_seed_single_task_run(tmp_path):
    metrics = aggregate_seeds([seed_metrics(0, [[0.5]], [3.0], 100.0)])
    assert_png(plot_accuracy_matrix(metrics, tmp_path / "m.png"))
    assert_png(plot_accuracy_curve(metrics, tmp_path / "c.png"))


def test_plot_comparison(tmp_path):
    runs = [("conpet", run_metrics()), ("ewc", run_metrics("ewc", shift=0.2)),
            ("single-seed", aggregate_seeds([seed_metrics(0, [[0.5, None, None],
                                                              [0.4, 0.6, None],
                                                              [0.3, 0.5, 0.7]],
                                                          [1.0, 1.0, 1.0], 10.0)]))]
    assert_png(plot_comparison(runs, tmp_path / "compare.png"))
