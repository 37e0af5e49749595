"""The dynamic replay sampler and exemplar memory: exact mix, balance, determinism, bounds."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conpet.replay import ExemplarMemory, dynamic_replay_batches, select_exemplars, split_batch

NEW = list(range(100, 130))
OLD = [list(range(0, 50)), list(range(50, 55)), list(range(1000, 1400))]


def test_exact_new_old_mix_in_every_batch():
    batches = dynamic_replay_batches(NEW, OLD, steps=40, batch_size=8, rng=np.random.default_rng(0))
    assert len(batches) == 40
    for b in batches:
        assert len(b) == 8
        assert sum(i in NEW for i in b[:4]) == 4
        assert all(i not in NEW for i in b[4:])


def test_ratio_is_configurable():
    assert split_batch(8, 1.0) == (4, 4)
    assert split_batch(8, 3.0) == (6, 2)
    assert split_batch(10, 0.25) == (2, 8)
    batches = dynamic_replay_batches(NEW, OLD, steps=5, batch_size=8, rng=np.random.default_rng(0), new_ratio=3.0)
    assert all(sum(i in NEW for i in b) == 6 for b in batches)


def test_old_rows_are_balanced_across_old_tasks_not_rows():
    """Task 1 has 5 rows and task 2 has 400: each still gets ~1/3 of the replay."""
    batches = dynamic_replay_batches(NEW, OLD, steps=3000, batch_size=8, rng=np.random.default_rng(1))
    old = [i for b in batches for i in b[4:]]
    shares = [np.mean([i in set(pool) for i in old]) for pool in OLD]
    assert all(abs(s - 1 / 3) < 0.02 for s in shares), shares
    counts = np.bincount([i for i in old if i < 50], minlength=50)  # uniform within a task too
    assert counts.min() > 0.6 * counts.mean()


def test_cycle_sampling_sees_every_new_row_equally():
    batches = dynamic_replay_batches(NEW, OLD, steps=30, batch_size=8, rng=np.random.default_rng(2))
    counts = np.bincount([i - 100 for b in batches for i in b[:4]], minlength=30)
    assert counts.min() == counts.max() == 4  # 30 steps x 4 new rows = 4 passes over 30 rows


def test_same_seed_same_batches_other_seed_other_batches():
    a = dynamic_replay_batches(NEW, OLD, 20, 8, np.random.default_rng(7))
    b = dynamic_replay_batches(NEW, OLD, 20, 8, np.random.default_rng(7))
    c = dynamic_replay_batches(NEW, OLD, 20, 8, np.random.default_rng(8))
    assert a == b and a != c


def test_first_task_has_no_replay():
    batches = dynamic_replay_batches(NEW, [], 10, 8, np.random.default_rng(0))
    assert all(len(b) == 8 and set(b) <= set(NEW) for b in batches)


def test_independent_sampling_is_without_replacement_within_a_batch():
    batches = dynamic_replay_batches(NEW, OLD, 50, 8, np.random.default_rng(0), new_sampling="independent")
    assert all(len(set(b[:4])) == 4 for b in batches)
    with pytest.raises(ValueError, match="new_sampling"):
        dynamic_replay_batches(NEW, OLD, 5, 8, np.random.default_rng(0), new_sampling="sometimes")


@settings(max_examples=40, deadline=None)
@given(n_old_tasks=st.integers(0, 6), batch=st.integers(2, 16), steps=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_cost_is_steps_times_batch_whatever_the_number_of_tasks(n_old_tasks, batch, steps, seed):
    pools = [list(range(1000 * (k + 1), 1000 * (k + 1) + 20)) for k in range(n_old_tasks)]
    batches = dynamic_replay_batches(NEW, pools, steps, batch, np.random.default_rng(seed))
    assert len(batches) == steps and all(len(b) == batch for b in batches)


def test_exemplars_are_one_per_cluster_and_bounded():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 10], [-10, 10]], dtype=float)
    x = np.concatenate([c + rng.normal(size=(30, 2)) for c in centers])
    chosen = select_exemplars(x, 3, seed=0)
    assert len(chosen) == 3
    assert sorted(i // 30 for i in chosen) == [0, 1, 2]  # one exemplar from each blob
    assert select_exemplars(x[:2], 5) == [0, 1]


def test_memory_respects_its_bound_per_class():
    mem = ExemplarMemory(per_class=4)
    rng = np.random.default_rng(0)
    mem.add_class("a", list(range(100, 120)), rng.normal(size=(20, 3)))
    mem.add_class("b", [7, 8], rng.normal(size=(2, 3)))
    assert len(mem.rows(["a"])) == 4 and set(mem.rows(["a"])) <= set(range(100, 120))
    assert mem.rows(["b"]) == [7, 8] and len(mem) == 6


def test_length_bucketed_replay_keeps_each_batch_mix_and_every_row_and_pads_less():
    from collections import Counter

    from conpet.replay import length_bucketed_replay

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=400)
    new, old_pools = list(range(100)), [list(range(100, 250)), list(range(250, 400))]
    batches = dynamic_replay_batches(new, old_pools, 120, 16, np.random.default_rng(1))
    bucketed = length_bucketed_replay(batches, 8, lengths, np.random.default_rng(2))
    assert len(bucketed) == len(batches)
    assert all(all(i < 100 for i in b[:8]) and all(i >= 100 for i in b[8:]) for b in bucketed)  # 8 new + 8 old
    for start in range(0, 120, 50):  # the same rows, as often, inside every pool of 50 batches
        assert Counter(i for b in batches[start:start + 50] for i in b) == \
            Counter(i for b in bucketed[start:start + 50] for i in b)

    def padding(bs):
        return sum(len(b) * max(lengths[b]) - sum(lengths[b]) for b in bs)

    assert padding(bucketed) < 0.5 * padding(batches)
