"""Replay: ConPET's dynamic replay schedule and bounded exemplar memories. Pure and seeded.

Dynamic replay (Song et al. 2023, Static ConPET): from the second task on, a task trains a
*fixed* number of steps whatever the number of old tasks, and every batch mixes new-task rows and
old rows. Each old row comes from a uniformly chosen old task, then a uniformly chosen row of
that task, so replay is balanced across tasks and the cost of task t does not grow with t.

Deviation from the official code, named: the official loader draws the new rows of each batch
independently of other batches; here they are drawn from a reshuffled cycle over the new task's
rows (``new_sampling="cycle"``, the default), so every new row is seen equally often. The
official behaviour is available as ``new_sampling="independent"``. With length bucketing on
(``train.length_bucketing``, the default) the schedule's rows are then regrouped inside pools of
50 batches so that rows of similar length share a batch (:func:`length_bucketed_replay`): every
batch keeps its new/old mix and every row its count, so only padding changes.

:func:`replay_steps` is the per-task budget (``steps_per_task``, or ConPET's official
``batch_limit``) and :func:`replay_schedule` the whole schedule of one task.

Old rows come from the full history of every old task (ConPET's setting) or from a bounded
exemplar memory per class (EMR-style): ``select_exemplars`` runs k-means on the rows' features
and keeps the row nearest to each centroid.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from conpet.data.stream import Stream
from conpet.errors import ConfigError


def split_batch(batch_size: int, new_ratio: float) -> tuple[int, int]:
    """Number of (new, old) rows in a batch for a new:old ratio ``new_ratio`` (1.0 = 1:1).

    ``n_new = floor(B * r / (r + 1))`` as in the official code, at least 1.
    """
    if batch_size < 2:
        raise ConfigError("train.batch_size: dynamic replay needs batch_size >= 2 (one new and one old row)")
    if new_ratio <= 0:
        raise ConfigError(f"learner_options.new_ratio: must be > 0, got {new_ratio}")
    n_new = max(1, min(batch_size - 1, int(batch_size * new_ratio / (new_ratio + 1))))
    return n_new, batch_size - n_new


def dynamic_replay_batches(
    new_rows: Sequence[int],
    old_pools: Sequence[Sequence[int]],
    steps: int,
    batch_size: int,
    rng: np.random.Generator,
    new_ratio: float = 1.0,
    new_sampling: str = "cycle",
) -> list[list[int]]:
    """``steps`` batches, each ``n_new`` new rows followed by ``n_old`` replayed old rows.

    ``old_pools[k]`` holds the replayable rows of old task k (full history or memory). With no
    old pools (the first task) every batch is all new rows.
    """
    new_rows = np.asarray(list(new_rows))
    pools = [np.asarray(list(p)) for p in old_pools if len(p)]
    if len(new_rows) == 0:
        raise ValueError("the new task has no training rows")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    n_new, n_old = split_batch(batch_size, new_ratio) if pools else (batch_size, 0)
    n_new = min(n_new, len(new_rows)) if new_sampling == "independent" else n_new
    batches: list[list[int]] = []
    cycle, pos = rng.permutation(new_rows), 0
    for _ in range(steps):
        if new_sampling == "independent":
            new = rng.choice(new_rows, size=n_new, replace=False)
        elif new_sampling == "cycle":
            new = []
            while len(new) < n_new:
                if pos == len(cycle):
                    cycle, pos = rng.permutation(new_rows), 0
                take = min(n_new - len(new), len(cycle) - pos)
                new.extend(cycle[pos:pos + take].tolist())
                pos += take
            new = np.asarray(new)
        else:
            raise ValueError(f"new_sampling must be 'cycle' or 'independent', got {new_sampling!r}")
        tasks = rng.integers(len(pools), size=n_old) if n_old else np.zeros(0, dtype=int)
        old = [int(pools[k][rng.integers(len(pools[k]))]) for k in tasks]
        batches.append([int(i) for i in new] + old)
    return batches


def replay_steps(n_new_rows: int, batch_size: int, epochs: int, new_ratio: float = 1.0,
                 steps_per_task: int | None = None, batch_limit: int | None = None) -> int:
    """Steps of a task on the dynamic replay schedule, a number that does not grow with the
    number of old tasks: ConPET's official budget ``epochs x int(0.8 x batch_limit)`` when
    ``batch_limit`` is given (the same whatever the task's size), else ``steps_per_task``, else
    ``epochs x ceil(n_new_rows / n_new)`` (every new row seen ``epochs`` times)."""
    if batch_limit:
        return epochs * max(1, int(0.8 * batch_limit))
    if steps_per_task:
        return steps_per_task
    n_new, _ = split_batch(batch_size, new_ratio)
    return epochs * math.ceil(n_new_rows / n_new)


def length_bucketed_replay(batches: list[list[int]], n_new: int, lengths: np.ndarray, rng: np.random.Generator,
                           pool_batches: int = 50) -> list[list[int]]:
    """The same replay rows regrouped so that rows of similar length share a batch (little
    padding), keeping every batch's exact mix: inside pools of ``pool_batches`` consecutive
    batches the new rows are sorted by length, the old rows too, batch k takes the k-th slice of
    each, and the batches of the pool are shuffled. Every row keeps its number of appearances
    in the pool, so the schedule's balance over old tasks and new rows is unchanged."""
    out: list[list[int]] = []
    for start in range(0, len(batches), pool_batches):
        pool = batches[start:start + pool_batches]
        new = np.asarray([i for b in pool for i in b[:n_new]])
        old = np.asarray([i for b in pool for i in b[n_new:]])
        new = new[np.argsort(lengths[new], kind="stable")]
        old = old[np.argsort(lengths[old], kind="stable")] if len(old) else old
        n_old = len(pool[0]) - n_new
        regrouped = [new[k * n_new:(k + 1) * n_new].tolist() + old[k * n_old:(k + 1) * n_old].tolist()
                     for k in range(len(pool))]
        order = rng.permutation(len(regrouped))
        out.extend(regrouped[k] for k in order)
    return out


def replay_schedule(stream: Stream, t: int, opts: dict[str, Any], memory: "ExemplarMemory", batch_size: int,
                    epochs: int, rng: np.random.Generator, lengths: np.ndarray | None = None) -> list[list[int]]:
    """ConPET's dynamic replay batches for task ``t`` (``opts``: the replay options of
    :data:`conpet.learners.options.REPLAY_OPTIONS`): old rows from each old task's full training
    set (``replay_source: history``) or from its classes' exemplars in ``memory``. With row
    ``lengths`` the batches are length-bucketed (:func:`length_bucketed_replay`)."""
    new = stream.tasks[t].train
    steps = replay_steps(len(new), batch_size, epochs, opts["new_ratio"], opts["steps_per_task"],
                         opts["batch_limit"])
    if opts["replay_source"] == "memory":
        pools = [memory.rows(stream.memory_keys(j)) for j in range(t)]
    else:
        pools = [list(stream.tasks[j].train) for j in range(t)]
    batches = dynamic_replay_batches(new, pools, steps, batch_size, rng, new_ratio=opts["new_ratio"])
    if lengths is None or t == 0:
        return batches
    n_new, _ = split_batch(batch_size, opts["new_ratio"])
    return length_bucketed_replay(batches, n_new, lengths, rng)


def select_exemplars(features: np.ndarray, m: int, seed: int = 0) -> list[int]:
    """Indices (into ``features``) of at most ``m`` exemplars: k-means with m clusters, then the
    row nearest to each centroid (EMR, Wang et al. 2019, as in ConPET's ``kmeans_client``).

    All rows are kept when there are at most ``m``.
    """
    n = len(features)
    if m < 1:
        raise ConfigError("learner_options.memory_per_class: must be >= 1")
    if n <= m:
        return list(range(n))
    from sklearn.cluster import KMeans  # heavy (scipy): imported when first needed

    x = np.asarray(features, dtype=np.float64)
    km = KMeans(n_clusters=m, n_init=3, random_state=seed).fit(x)
    dist = ((x[:, None, :] - km.cluster_centers_[None, :, :]) ** 2).sum(-1)  # [n, m]
    chosen: list[int] = []
    for c in range(m):
        for i in np.argsort(dist[:, c], kind="stable"):
            if int(i) not in chosen:
                chosen.append(int(i))
                break
    return sorted(chosen)


class ExemplarMemory:
    """A bounded memory: at most ``per_class`` training rows of every class seen so far."""

    state_attrs = ("rows_by_class",)
    """Its resume state (:mod:`conpet.learners.state`)."""

    def __init__(self, per_class: int) -> None:
        if per_class < 1:
            raise ConfigError("learner_options.memory_per_class: must be >= 1")
        self.per_class = per_class
        self.rows_by_class: dict[str, list[int]] = {}

    def add_class(self, label: str, rows: Sequence[int], features: np.ndarray, seed: int = 0) -> None:
        keep = select_exemplars(features, self.per_class, seed)
        self.rows_by_class[label] = [int(rows[i]) for i in keep]

    def rows(self, labels: Sequence[str]) -> list[int]:
        return [i for label in labels for i in self.rows_by_class.get(label, [])]

    def __len__(self) -> int:
        return sum(len(v) for v in self.rows_by_class.values())
