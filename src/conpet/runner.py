"""Run a continual stream: for each seed, learn task after task and fill the accuracy matrix.

This is the library entry point behind ``conpet run``::

    from conpet import RunConfig, run
    cfg = RunConfig(model="minilm", learner="sequential")
    metrics = run(cfg)            # writes the run directory, returns the aggregate metrics
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from conpet import distributed
from conpet import metrics as M
from conpet.build import Prepared, build_learner, check, check_stream, compute_of, keeps_torch_threads, prepare
from conpet.checkpoint import Checkpointer
from conpet.config import RunConfig, default_out, parse_learner_spec, spec_dir_name
from conpet.data import load_stream
from conpet.data.stream import Stream, reorder_tasks
from conpet.errors import ConpetError
from conpet.evaluation import evaluate, evaluate_generation, reference_chunks, task_metric
from conpet.learners import CAPABILITIES, Learner, get_learner
from conpet.generation import perplexity
from conpet.plots import write_run_report
from conpet.runs import (LEARNER_FILE, adapter_dir, atomic_directory, atomic_write_json, atomic_write_text,
                         finished_run, hash_files, load_run_config, read_json, recover_interrupted, seed_dir, write_manifest)

__all__ = ["run", "run_many", "run_orders", "resume", "evaluate_run", "prepare", "Prepared"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


MIN_FREE_MB = 200
"""A run refuses to start with less free space than this in its output folder's file system."""


def check_out_dir(out: Path) -> None:
    """Fail before any training when the run directory cannot be written or its disk is full."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".conpet-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
        free_mb = shutil.disk_usage(out).free / 2**20
    except OSError as e:
        raise ConpetError(f"{out}: cannot write the run directory ({e.strerror})") from None
    if free_mb < MIN_FREE_MB:
        raise ConpetError(f"{out}: only {free_mb:.0f} MB free on its disk; a run needs at least {MIN_FREE_MB} MB "
                          f"(adapters, checkpoints) - free some space or choose another --out")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_progress() -> bool:
    return sys.stderr.isatty() and os.environ.get("CONPET_PROGRESS", "1") != "0"


OnTask = Callable[[int, int, list[float]], None]


@dataclass
class SeedProgress:
    """What one seed has done so far; saved as ``seed-<s>/state.json`` after every task."""

    finished_tasks: int = 0
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    test_counts: list[int] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    train_samples: list[int] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    """Mean loss of the last 20 steps of each task's last fit (over every process's rows)."""
    adapter_bytes: list[int] = field(default_factory=list)
    extra: dict[str, list] = field(default_factory=dict)
    """Learner-specific per-task metrics (selector accuracy, merge error...)."""
    base_reference_perplexity: float | None = None
    """Generative streams: perplexity of the reference text under the backbone alone."""
    reference_perplexity: list[float] = field(default_factory=list)
    """Generative streams: perplexity of the reference text after each task (general ability)."""
    artifacts: dict[str, str] = field(default_factory=dict)
    """SHA-256 of every adapter file written so far (``conpet verify`` of an unfinished run)."""

    @classmethod
    def read(cls, path: Path) -> "SeedProgress":
        values = read_json(path)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def write(self, path: Path) -> None:
        atomic_write_json(path, dataclasses.asdict(self))


def run_seed(cfg: RunConfig, prepared: Prepared, seed: int, out: Path, progress: bool = True,
             resume: bool = False, on_task: OnTask | None = None, options: dict | None = None) -> dict:
    """Learn the whole stream with one seed; write adapters and metrics under ``out/seed-<seed>``.
    ``on_task(seed, t, accs)`` is called after each finished (saved) task with the accuracy row of
    ``data.eval_split`` (a search's pruner; raising there stops the run, which can be resumed).

    With ``resume``, continue from the last finished task recorded in ``seed-<seed>/state.json``
    (and inside the next task from its in-task checkpoint, if one was written). ``options``: the
    learner's, from :func:`conpet.build.check`."""
    set_seed(seed)
    main = distributed.is_main()
    stream, engine = prepared
    sdir = seed_dir(out, seed)
    checkpointer = Checkpointer(sdir, cfg.train.checkpoint_seconds)
    learner = build_learner(cfg, prepared, seed, progress=progress, checkpointer=checkpointer, options=options)
    checkpointer.bind(learner, learner.ctx)
    T = len(stream.tasks)
    state = SeedProgress.read(sdir / "state.json") if resume and (sdir / "state.json").is_file() else SeedProgress()
    done = state.finished_tasks
    if done:
        for task in stream.tasks[:done]:  # the same cache build order as an uninterrupted run
            engine.warm(task.train)
        checkpointer.load_task_end(done - 1)
        if not progress and main:
            print(f"seed {seed}: resuming after task {done}/{T}", file=sys.stderr)
    if resume:
        checkpointer.find_in_task(done)
    chunks = reference_chunks(learner, cfg.train.max_length) if stream.generative else None
    if chunks is not None and state.base_reference_perplexity is None:
        state.base_reference_perplexity = perplexity(engine.backbone.model, learner.ctx.lm_head, chunks,
                                                     engine.compute, cfg.train.eval_batch_size)
    bar = tqdm(range(done, T), desc=f"seed {seed}", unit="task", disable=not (progress and main), dynamic_ncols=True,
               initial=done, total=T)
    try:
        for t in bar:
            task = stream.tasks[t]
            bar.set_description(f"seed {seed} task {t + 1}/{T}")
            checkpointer.start_task(t)
            start = time.perf_counter()
            engine.warm(task.train)
            learner.learn(t)
            state.train_seconds.append(time.perf_counter() - start)
            state.train_samples.append(learner.last_fit.samples if learner.last_fit else 0)
            loss = learner.last_fit.final_loss if learner.last_fit else float("nan")
            state.train_loss.append(None if loss != loss else loss)
            start = time.perf_counter()
            split = cfg.data.eval_split
            if stream.generative:
                accs, state.test_counts, scores = evaluate_generation(learner, t, split)
            else:
                (accs, state.test_counts), scores = evaluate(learner, t, split), {}
            state.eval_seconds.append(time.perf_counter() - start)
            state.accuracy_matrix.append(accs + [None] * (T - t - 1))
            extra = {**scores, **learner.eval_extra(t)}
            if chunks is not None:
                state.reference_perplexity.append(learner.reference_perplexity(chunks))
            if cfg.data.report_dev:
                extra["dev_accuracy"] = accs if split == "dev" else evaluate(learner, t, "dev")[0]
            for key, values in extra.items():
                state.extra.setdefault(key, []).append(values + [None] * (T - t - 1))
            folder = adapter_dir(out, seed, task.name)
            state.adapter_bytes.append(distributed.on_main(save_modules, learner, t, folder))
            state.artifacts.update(distributed.on_main(hash_files, out, folder))
            checkpointer.save_task_end(t)
            state.finished_tasks = t + 1
            distributed.on_main(state.write, sdir / "state.json")
            checkpointer.finish_task(t)
            bar.set_postfix(avg_acc=f"{100 * sum(accs) / len(accs):.1f}")
            if on_task is not None:
                on_task(seed, t, accs)
            if not progress and main:
                print(f"seed {seed} task {t + 1}/{T} {task.name}: train {state.train_seconds[-1]:.1f}s, "
                      f"avg acc {100 * sum(accs) / len(accs):.2f}%", file=sys.stderr)
        params = learner.tunable_params()
    finally:
        learner.close()
    backbone = engine.backbone
    result: dict[str, Any] = M.summarize(state.accuracy_matrix, state.test_counts)
    result.update({
        "accuracy_matrix": state.accuracy_matrix,
        "test_counts": state.test_counts,
        "train_seconds": state.train_seconds,
        "eval_seconds": state.eval_seconds,
        "train_samples": state.train_samples,
        "train_loss": state.train_loss,
        **({"base_reference_perplexity": state.base_reference_perplexity,
            "reference_perplexity": state.reference_perplexity,
            "task_metric": [task_metric(cfg, stream, j) for j in range(T)]} if stream.generative else {}),
        "adapter_bytes": state.adapter_bytes,
        **state.extra,
        **params,
        "backbone_params": backbone.n_params,
        "tunable_ratio": params["tunable_params"] / backbone.n_params,
        "peak_rss_mb": peak_rss_mb(),
        "seed": seed,
        "precision": engine.precision,
        "device": str(engine.device),
        "resumed": bool(resume and done),
    })
    if distributed.active():
        result["processes"] = distributed.world_size()
        result["peak_rss_mb_per_process"] = distributed.gather_objects(peak_rss_mb())
    if engine.backbone.shard_bytes is not None:
        result["backbone_bytes_per_process"], result["backbone_bytes"] = engine.backbone.shard_bytes
    distributed.on_main(atomic_write_json, sdir / "metrics.json", result)
    checkpointer.remove_all()
    return result


def save_modules(learner: Learner, t: int, folder: Path) -> int:
    """Write the learner's modules after task ``t`` into ``folder`` atomically; their size in bytes."""
    with atomic_directory(folder) as tmp:
        learner.save(t, tmp)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@keeps_torch_threads
def run(cfg: RunConfig, progress: bool | None = None, prepared: Prepared | None = None,
        on_task: OnTask | None = None) -> dict:
    """Run ``cfg.seeds`` seeds of the stream; write the run directory; return aggregate metrics.

    ``prepared`` (from :func:`conpet.build.prepare`) reuses a loaded backbone and its feature
    cache, e.g. to compare several learners on the same data and model (see :func:`run_many`).
    ``cfg`` is not changed: what the run resolved (its directory, what ``auto`` chose) is in the
    run directory's ``config.yaml``."""
    if cfg.orders > 1:
        return run_orders(cfg, progress, prepared)
    cfg = copy.deepcopy(cfg)
    progress = default_progress() if progress is None else progress
    options = check(cfg)
    prepared = prepared or prepare(cfg, options=options)
    save_resolved_settings(cfg, prepared)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    distributed.on_main(start_run_dir, cfg, out, prepared.stream)
    return _run_seeds(cfg, prepared, out, progress, resume=False, on_task=on_task, options=options)


ORDERS_CONFIG = "orders-config.yaml"
"""The configuration of a :func:`run_orders` folder (``conpet run --resume`` reads it)."""

ORDER_KEYS = ("average_accuracy", "whole_accuracy", "forgetting", "bwt")
"""The headline metrics summarised over task orders (plus the last reference perplexity of a
generative stream)."""


def task_orders(names: list[str], n: int) -> list[list[str]]:
    """``n`` distinct task orders: the stream's own, then seeded permutations (the k-th drawn
    from ``numpy.random.default_rng(k)``, re-drawn while it repeats an earlier order)."""
    if n > math.factorial(len(names)):
        raise ConpetError(f"orders: {len(names)} tasks have only {math.factorial(len(names))} orders, not {n}")
    orders, k = [list(names)], 1
    while len(orders) < n:
        order = [names[i] for i in np.random.default_rng(k).permutation(len(names))]
        if order not in orders:
            orders.append(order)
        k += 1
    return orders


@keeps_torch_threads
def run_orders(cfg: RunConfig, progress: bool | None = None, prepared: Prepared | None = None) -> dict:
    """Run the stream in ``cfg.orders`` task orders (:func:`task_orders`), ``cfg.seeds`` seeds
    each, as the Standard CL benchmark's orders 1-3; each order is a plain run directory
    ``out/order-<k>`` (its ``config.yaml`` names the order in ``data.task_order``, so resume,
    evaluate and predict work on it as on any run). The backbone is loaded and the rows
    tokenized once. Calling it again on the same ``out`` continues: finished orders are read,
    an interrupted one is resumed. Writes ``out/orders.json``: per order the mean over seeds,
    and mean ± std over orders (and over every order x seed run) of :data:`ORDER_KEYS`. ``cfg`` is
    not changed."""
    cfg = copy.deepcopy(cfg)
    options = check(cfg)
    prepared = prepared or prepare(dataclasses.replace(cfg, orders=1), options=options)
    save_resolved_settings(cfg, prepared)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    distributed.on_main(check_out_dir, out)
    distributed.on_main(atomic_write_text, out / ORDERS_CONFIG, cfg.to_yaml())
    base = prepared.stream
    if cfg.data.task_order:
        base = reorder_tasks(base, cfg.data.task_order)
    per_order = []
    for k, order in enumerate(task_orders([t.name for t in base.tasks], cfg.orders), start=1):
        one = dataclasses.replace(cfg, orders=1, out=str(out / f"order-{k}"),
                                  data=dataclasses.replace(cfg.data, task_order=order))
        folder = Path(one.out)
        if (folder / "metrics.json").is_file() or any(folder.glob("seed-*/state.json")):
            saved = load_run_config(folder / "config.yaml")
            saved.train.device = one.train.device  # a run may continue on another device
            if saved.to_dict() != one.to_dict():
                raise ConpetError(f"{folder}: holds a run of another configuration; choose another --out")
            metrics = (read_json(folder / "metrics.json") if (folder / "metrics.json").is_file()
                       else resume(folder, progress, device=cfg.train.device))
        else:
            metrics = run(one, progress, Prepared(reorder_tasks(base, order), prepared.engine))
        per_order.append(metrics)
    summary = orders_summary(per_order)
    distributed.on_main(atomic_write_json, out / "orders.json", summary)
    return summary


def orders_summary(per_order: list[dict]) -> dict:
    """Mean ± std (ddof=1) over task orders of each order's seed-mean, and over all order x seed runs."""
    keys = list(ORDER_KEYS)
    rows = []
    for m in per_order:
        seeds = m.get("per_seed") or [m]
        row = {key: m[key] for key in keys}
        runs = {key: [s[key] for s in seeds] for key in keys}
        if "reference_perplexity" in m:
            row["reference_perplexity"] = m["reference_perplexity"][-1]
            runs["reference_perplexity"] = [s["reference_perplexity"][-1] for s in seeds]
        rows.append({"tasks": m["run"]["tasks"], "n_seeds": len(seeds), **row, "runs": runs})
    summary_keys = [k for k in rows[0] if k in (*keys, "reference_perplexity")]

    def spread(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "n": len(values)}

    return {"run": {**per_order[0]["run"], "tasks": None}, "n_orders": len(rows), "orders": rows,
            "over_orders": {k: spread([r[k] for r in rows]) for k in summary_keys},
            "over_runs": {k: spread([v for r in rows for v in r["runs"][k]]) for k in summary_keys}}


def save_resolved_settings(cfg: RunConfig, prepared: Prepared) -> None:
    """A new run saves what ``auto`` chose, not the word: the number of top layers of
    ``train.top_layers`` (``null``: every layer) and the pooling of ``backbone.pooling``. What
    ``auto`` means may change between versions, and the run must resume and predict as it trained."""
    if cfg.train.top_layers == "auto":
        cfg.train.top_layers = prepared.engine.top_layers
    if cfg.backbone.pooling == "auto":
        cfg.backbone.pooling = prepared.engine.pooling


def start_run_dir(cfg: RunConfig, out: Path, stream: Stream) -> None:
    """Check that ``out`` can take a new run, then write its ``config.yaml`` and ``stream.json``."""
    check_out_dir(out)
    if (out / "config.yaml").exists() and any(out.glob("seed-*/state.json")):
        raise ConpetError(f"{out}: holds a run already; continue it with `conpet run --resume {out}` "
                          f"or choose another --out")
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    atomic_write_json(out / "stream.json", stream_description(stream))
    atomic_write_json(out / LEARNER_FILE, learner_description(cfg.learner))


def learner_description(name: str) -> dict:
    """``learner.json``: the learner's name, paper and declared capabilities."""
    cls = get_learner(name)
    return {"name": name, "paper": cls.paper, **{k: getattr(cls, k) for k in CAPABILITIES}}


def stream_description(stream: Stream) -> dict:
    return {"name": stream.name, "kind": stream.kind,
            "tasks": [{"name": t.name, "labels": list(t.labels)} for t in stream.tasks]}


@keeps_torch_threads
def resume(run_dir: str | Path, progress: bool | None = None, device: str | None = None,
           on_task: OnTask | None = None) -> dict:
    """Continue an interrupted run from its last finished task (and in-task checkpoint); seeds
    that finished are kept. Ends with the same metrics as an uninterrupted run (docs/reliability.md).
    ``device`` overrides the run's ``train.device`` (a run checkpointed on a GPU resumes on a CPU)."""
    out = Path(run_dir)
    if (out / ORDERS_CONFIG).is_file():  # a folder of task orders: continue every order
        cfg = load_run_config(out / ORDERS_CONFIG)
        cfg.out = str(out)
        if device is not None:
            cfg.train.device = device
        return run_orders(cfg, progress)
    if not (out / "config.yaml").is_file():
        raise ConpetError(f"{out}: not a conpet run directory (no config.yaml)")
    progress = default_progress() if progress is None else progress
    cfg = load_run_config(out / "config.yaml")
    cfg.out = str(out)
    if device is not None:
        cfg.train.device = device
    options = check(cfg)
    distributed.setup(compute_of(cfg).device)
    distributed.on_main(_reopen, out)
    prepared = prepare(cfg, options=options)
    saved = read_json(out / "stream.json") if (out / "stream.json").is_file() else None
    if saved is not None and saved != stream_description(prepared.stream):
        raise ConpetError(f"{out}: the data no longer matches the run's stream.json (tasks or labels changed); "
                          f"cannot resume")
    if not (out / LEARNER_FILE).is_file():
        distributed.on_main(atomic_write_json, out / LEARNER_FILE, learner_description(cfg.learner))
    return _run_seeds(cfg, prepared, out, progress, resume=True, on_task=on_task, options=options)


def _run_seeds(cfg: RunConfig, prepared: Prepared, out: Path, progress: bool, resume: bool,
               on_task: OnTask | None = None, options: dict | None = None) -> dict:
    if distributed.is_main():
        pooled = "" if prepared.engine.pooling == "cloze" else f", {prepared.engine.pooling}-pooled features"
        print(f"{out}: {cfg.learner} + {cfg.pet.method} on {cfg.model}, {prepared.engine.placement()}{pooled}, "
              f"{prepared.engine.precision}", file=sys.stderr)
    per_seed = []
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        finished = seed_dir(out, seed) / "metrics.json"
        if resume and finished.is_file():  # metrics added since it was written come from its matrix
            kept = read_json(finished)
            per_seed.append({**M.summarize(kept["accuracy_matrix"], kept["test_counts"]), **kept})
        else:
            per_seed.append(run_seed(cfg, prepared, seed, out, progress, resume=resume, on_task=on_task,
                                     options=options))
    metrics = M.aggregate_seeds(per_seed)
    metrics["run"] = {
        "learner": cfg.learner,
        "pet": cfg.pet.method,
        "model": cfg.model,
        "benchmark": prepared.stream.name,
        "tasks": [t.name for t in prepared.stream.tasks],
        "setting": cfg.data.setting,
    }
    distributed.on_main(_finish_run_dir, out, metrics)
    return metrics


def _reopen(out: Path) -> None:
    recover_interrupted(out)
    check_out_dir(out)


def _finish_run_dir(out: Path, metrics: dict) -> None:
    atomic_write_json(out / "metrics.json", metrics)
    write_run_report(out, metrics)
    write_manifest(out)


@keeps_torch_threads
def run_many(cfg: RunConfig, learners: list[str], out: str | Path | None = None,
             progress: bool | None = None) -> dict[str, dict]:
    """Run several learners on the same stream, model and settings, one after the other in this
    process: the backbone is loaded and the data tokenized (and lower layers cached) once.

    A learner may carry its own options in brackets, e.g. ``["dynamic", "dynamic[top_k=2]"]``
    (added to ``cfg.learner_options``). Each writes its own run directory ``out/<learner>``
    (``emr*`` -> ``emr-star``, ``dynamic[top_k=2]`` -> ``dynamic-top_k=2``); ``out`` defaults to
    ``runs/compare-<pet>-<model>-<data>``."""
    out = Path(out) if out is not None else default_out(cfg, compare=True)
    configs = []
    for spec in learners:
        name, options = parse_learner_spec(spec)
        one = dataclasses.replace(cfg, learner=name, out=str(out / spec_dir_name(spec)),
                                  learner_options={**cfg.learner_options, **options})
        check(one)  # every learner's options before anything is loaded or written
        configs.append((spec, one))
    stream = load_stream(cfg.data)
    for _, one in configs:  # every learner against the stream's kind, before any of them writes
        check_stream(one, stream)
    check_out_dir(out)
    prepared = prepare(cfg, stream, also_for=tuple(one.learner for _, one in configs))
    return {spec: run(one, progress=progress, prepared=prepared) for spec, one in configs}


@keeps_torch_threads
def evaluate_run(run_dir: str | Path, seed: int | None = None, prepared: Prepared | None = None,
                 device: str | None = None) -> dict:
    """Test accuracy of a run's final modules on every task of its stream (the data named in its
    ``config.yaml``): per-task, average and whole accuracy. Works for every learner and for the
    outputs of ``conpet merge`` / ``conpet compress``. ``prepared`` (:func:`conpet.build.prepare`
    of the same data and model) reuses a loaded backbone and its feature cache across many
    evaluations. ``device`` overrides the run's ``train.device``."""
    run_dir = Path(run_dir)
    cfg, seed, _, _ = finished_run(run_dir, seed)
    if device is not None:
        cfg.train.device = device
    prepared = prepared or prepare(cfg)
    stream = prepared.stream
    if read_json(run_dir / "stream.json") != stream_description(stream):
        raise ConpetError(f"{run_dir}: the data no longer matches the run's stream.json")
    learner = build_learner(cfg, prepared, seed)
    try:
        learner.restore(run_dir, seed)
        accs, counts = evaluate(learner, len(stream.tasks) - 1)
    finally:
        learner.close()
    return {"per_task": dict(zip([t.name for t in stream.tasks], accs)), "test_counts": counts,
            "average_accuracy": sum(accs) / len(accs),
            "whole_accuracy": sum(a * c for a, c in zip(accs, counts)) / sum(counts), "seed": seed}
