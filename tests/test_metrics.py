"""Continual-learning metrics on hand-computed accuracy matrices."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conpet.metrics import (
    accuracy_matrix,
    aggregate_seeds,
    average_accuracy,
    average_accuracy_over_steps,
    backward_transfer,
    forgetting,
    learning_accuracy,
    summarize,
    whole_accuracy,
    whole_accuracy_over_steps,
)

# After task 0: task0 = 0.9.
# After task 1: task0 dropped to 0.7, task1 = 0.8.
# After task 2: task0 recovered a bit to 0.8, task1 dropped to 0.5, task2 = 0.9.
A3 = [
    [0.9, None, None],
    [0.7, 0.8, None],
    [0.8, 0.5, 0.9],
]
COUNTS3 = [100, 300, 100]


def test_average_accuracy_is_the_mean_over_seen_tasks():
    assert average_accuracy(A3) == pytest.approx((0.8 + 0.5 + 0.9) / 3)
    assert average_accuracy(A3, step=0) == pytest.approx(0.9)
    assert average_accuracy(A3, step=1) == pytest.approx(0.75)


def test_whole_accuracy_weighs_tasks_by_their_test_rows():
    # 0.8*100 + 0.5*300 + 0.9*100 = 320 correct rows out of 500.
    assert whole_accuracy(A3, COUNTS3) == pytest.approx(320 / 500)
    # After task 1: (0.7*100 + 0.8*300) / 400.
    assert whole_accuracy(A3, COUNTS3, step=1) == pytest.approx(310 / 400)
    # With unequal counts whole and average accuracy differ ...
    assert whole_accuracy(A3, COUNTS3) != pytest.approx(average_accuracy(A3))
    # ... with equal counts they coincide.
    assert whole_accuracy(A3, [5, 5, 5]) == pytest.approx(average_accuracy(A3))


def test_accuracies_averaged_over_steps():
    assert average_accuracy_over_steps(A3) == pytest.approx((0.9 + 0.75 + 2.2 / 3) / 3)
    assert whole_accuracy_over_steps(A3, COUNTS3) == pytest.approx(
        (0.9 + 310 / 400 + 320 / 500) / 3
    )


def test_forgetting_is_the_drop_from_the_best_earlier_accuracy():
    # task0: best of A[0][0], A[1][0] = 0.9, now 0.8 -> 0.1
    # task1: best of A[1][1] = 0.8, now 0.5 -> 0.3
    assert forgetting(A3) == pytest.approx((0.1 + 0.3) / 2)


def test_backward_transfer_compares_with_just_after_learning():
    # task0: 0.8 - 0.9 = -0.1 ; task1: 0.5 - 0.8 = -0.3
    assert backward_transfer(A3) == pytest.approx((-0.1 - 0.3) / 2)


def test_learning_accuracy_is_the_mean_of_the_diagonal():
    # just after learning: task0 0.9, task1 0.8, task2 0.9 (later rows do not count)
    assert learning_accuracy(A3) == pytest.approx((0.9 + 0.8 + 0.9) / 3)


def test_forgetting_and_bwt_differ_when_a_task_improved_then_dropped():
    A = [[0.5, None], [0.4, 0.9]]
    assert forgetting(A) == pytest.approx(0.1)
    assert backward_transfer(A) == pytest.approx(-0.1)
    # Task 0 peaks after task 1 and drops after task 2: forgetting sees the peak, BWT does not.
    A = [[0.5, None, None], [0.9, 0.8, None], [0.6, 0.8, 0.7]]
    assert forgetting(A) == pytest.approx((0.3 + 0.0) / 2)
    assert backward_transfer(A) == pytest.approx((0.1 + 0.0) / 2)


def test_one_task_has_no_forgetting():
    A = [[0.75]]
    assert forgetting(A) == 0.0
    assert backward_transfer(A) == 0.0
    assert average_accuracy(A) == 0.75
    assert whole_accuracy(A, [10]) == 0.75
    summary = summarize(A, [10])
    assert summary["average_accuracy_per_step"] == [0.75]
    assert summary["forgetting"] == 0.0


def test_summarize_has_every_metric():
    s = summarize(A3, COUNTS3)
    assert set(s) == {
        "average_accuracy", "whole_accuracy", "average_accuracy_over_steps",
        "whole_accuracy_over_steps", "forgetting", "bwt", "learning_accuracy",
        "average_accuracy_per_step", "whole_accuracy_per_step",
    }
    assert s["learning_accuracy"] == pytest.approx((0.9 + 0.8 + 0.9) / 3)
    assert s["average_accuracy_per_step"] == pytest.approx([0.9, 0.75, 2.2 / 3])
    assert s["whole_accuracy_per_step"] == pytest.approx([0.9, 310 / 400, 320 / 500])
    assert s["forgetting"] == pytest.approx(0.2)
    assert s["bwt"] == pytest.approx(-0.2)
    assert all(isinstance(v, float) for k, v in s.items() if not k.endswith("per_step"))


def test_numpy_matrix_with_nan_is_accepted():
    a = np.array([[0.9, np.nan, np.nan], [0.7, 0.8, np.nan], [0.8, 0.5, 0.9]])
    assert summarize(a, np.array(COUNTS3)) == summarize(A3, COUNTS3)


@pytest.mark.parametrize(
    "A, message",
    [
        ([], "empty"),
        ([[0.9, None], [0.7]], "square"),
        ([[0.9, None, None], [0.7, 0.8, None]], "square"),
        ([[0.9, None], [None, 0.8]], r"A\[1\]\[0\]"),
        ([[0.9, None], [0.7, float("nan")]], r"A\[1\]\[1\].*NaN"),
        ([[90.0, None], [0.7, 0.8]], "outside"),
        ([[0.9, None], [-0.1, 0.8]], "outside"),
        ([["0.9", None], [0.7, 0.8]], r"A\[0\]\[0\]"),
    ],
)
def test_bad_matrices_are_rejected(A, message):
    with pytest.raises(ValueError, match=message):
        forgetting(A)


def test_bad_counts_and_steps_are_rejected():
    with pytest.raises(ValueError, match="test_counts has 2 entries"):
        whole_accuracy(A3, [1, 2])
    with pytest.raises(ValueError, match="test_counts has 2 entries"):
        summarize(A3, [1, 2])
    with pytest.raises(ValueError, match=r"test_counts\[1\]"):
        whole_accuracy(A3, [1, -2, 3])
    with pytest.raises(ValueError, match="no test rows"):
        whole_accuracy(A3, [0, 0, 5], step=1)
    with pytest.raises(ValueError, match="step = 3"):
        average_accuracy(A3, step=3)


def test_entries_above_the_diagonal_are_ignored():
    assert np.isnan(accuracy_matrix([[0.5, 0.3], [0.4, 0.6]])[0, 1])
    assert forgetting([[0.5, 0.3], [0.4, 0.6]]) == pytest.approx(0.1)


# --------------------------------------------------------------------------- properties

accuracy = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def matrices(draw, decreasing=False):
    T = draw(st.integers(1, 6))
    A = [[None] * T for _ in range(T)]
    for j in range(T):
        value = draw(accuracy)
        for i in range(j, T):
            if i > j:
                step = draw(accuracy)
                value = value * step if decreasing else step
            A[i][j] = value
    return A


@given(st.integers(1, 6), accuracy)
def test_a_learner_that_never_changes_has_no_forgetting(T, value):
    A = [[value if j <= i else None for j in range(T)] for i in range(T)]
    assert forgetting(A) == 0.0
    assert backward_transfer(A) == 0.0
    assert average_accuracy(A) == pytest.approx(value)


@given(matrices(decreasing=True))
def test_forgetting_is_non_negative_when_accuracies_only_decrease(A):
    assert forgetting(A) >= 0.0
    assert backward_transfer(A) <= 0.0
    # With monotone decrease the best earlier accuracy is the one just after learning.
    assert forgetting(A) == pytest.approx(-backward_transfer(A))


@settings(max_examples=50)
@given(matrices(), st.data())
def test_every_metric_stays_in_range(A, data):
    T = len(A)
    counts = data.draw(st.lists(st.integers(1, 1000), min_size=T, max_size=T))
    s = summarize(A, counts)
    for key in ("average_accuracy", "whole_accuracy", "average_accuracy_over_steps",
                "whole_accuracy_over_steps"):
        assert -1e-12 <= s[key] <= 1 + 1e-12
    assert -1 <= s["bwt"] <= 1 and -1 <= s["forgetting"] <= 1
    # The best earlier accuracy includes the one just after learning: forgetting >= -BWT.
    assert s["forgetting"] >= -s["bwt"] - 1e-12


# --------------------------------------------------------------------------- seeds


def _seed_metrics(seed, A, counts, seconds, rss):
    return {
        "seed": seed,
        **summarize(A, counts),
        "accuracy_matrix": A,
        "test_counts": counts,
        "train_seconds": seconds,
        "tunable_params": 1000,
        "backbone_params": 1_000_000,
        "tunable_ratio": 0.001,
        "peak_rss_mb": rss,
        "learner": "conpet",
        "started_at": f"2024-01-0{seed + 1}",
    }


SEEDS = [
    _seed_metrics(0, [[0.8, None], [0.6, 0.9]], [10, 30], [1.0, 3.0], 100.0),
    _seed_metrics(1, [[1.0, None], [0.8, 0.7]], [10, 30], [2.0, 5.0], 200.0),
    _seed_metrics(2, [[0.9, None], [0.7, 0.8]], [10, 30], [3.0, 4.0], 300.0),
]


def test_aggregate_takes_means_and_sample_std():
    agg = aggregate_seeds(SEEDS)
    assert agg["n_seeds"] == 3
    assert agg["seeds"] == [0, 1, 2]
    assert agg["per_seed"] is SEEDS
    assert agg["average_accuracy"] == pytest.approx(np.mean([0.75, 0.75, 0.75]))
    assert agg["forgetting"] == pytest.approx(0.2)  # 0.2, 0.2, 0.2
    assert agg["peak_rss_mb"] == pytest.approx(200.0)
    assert agg["std"]["peak_rss_mb"] == pytest.approx(100.0)  # ddof=1
    assert agg["std"]["forgetting"] == pytest.approx(0.0)
    # Element-wise means of lists and matrices; never-evaluated entries stay None.
    assert agg["train_seconds"] == pytest.approx([2.0, 4.0])
    assert agg["std"]["train_seconds"] == pytest.approx([1.0, 1.0])
    assert agg["accuracy_matrix"][0] == [pytest.approx(0.9), None]
    assert agg["accuracy_matrix"][1] == pytest.approx([0.7, 0.8])
    assert agg["std"]["average_accuracy_per_step"] == pytest.approx([0.1, 0.0])
    assert "accuracy_matrix" not in agg["std"]
    # Equal ints and strings are kept as they are; differing strings become a per-seed list.
    assert agg["tunable_params"] == 1000 and isinstance(agg["tunable_params"], int)
    assert agg["test_counts"] == [10, 30]
    assert agg["learner"] == "conpet"
    assert agg["started_at"] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert "seed" not in agg


def test_aggregate_of_one_seed_has_zero_std():
    agg = aggregate_seeds(SEEDS[:1])
    assert agg["n_seeds"] == 1
    assert agg["average_accuracy"] == SEEDS[0]["average_accuracy"]
    assert agg["std"]["average_accuracy"] == 0.0
    assert agg["std"]["train_seconds"] == [0.0, 0.0]


def test_aggregate_of_two_seeds_whole_accuracy():
    agg = aggregate_seeds(SEEDS[:2])
    w0 = (0.6 * 10 + 0.9 * 30) / 40
    w1 = (0.8 * 10 + 0.7 * 30) / 40
    assert agg["whole_accuracy"] == pytest.approx((w0 + w1) / 2)
    assert agg["std"]["whole_accuracy"] == pytest.approx(abs(w0 - w1) / math.sqrt(2))


def test_aggregate_rejects_inconsistent_seeds():
    with pytest.raises(ValueError, match="at least one seed"):
        aggregate_seeds([])
    with pytest.raises(ValueError, match="lack"):
        aggregate_seeds([{"seed": 0, "bwt": 0.1}, {"seed": 1}])
    with pytest.raises(ValueError, match="shape"):
        aggregate_seeds([{"train_seconds": [1.0, 2.0]}, {"train_seconds": [1.0]}])
