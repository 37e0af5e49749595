"""Run a continual stream: for each seed, learn task after task and fill the accuracy matrix.

This is the library entry point behind ``conpet run``::

    from conpet import RunConfig, run
    cfg = RunConfig(model="minilm", learner="sequential")
    metrics = run(cfg)            # writes the run directory, returns the aggregate metrics
"""

from __future__ import annotations

import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from conpet import metrics as M
from conpet.backbone import cast_frozen_linears, load_backbone
from conpet.engine import FeatureEngine
from conpet.config import RunConfig
from conpet.data.formats import load_stream
from conpet.data.stream import Stream
from conpet.errors import ConpetError
from conpet.inputs import encode_rows, sorted_batches
from conpet.learners import Context, get_learner
from conpet.learners.loop import predict, resolve_precision
from conpet.pet import get_pet
from conpet.checkpoint import Checkpointer
from conpet.runs import (adapter_dir, atomic_directory, atomic_write_json, atomic_write_text, hash_files, read_json,
                         recover_interrupted, seed_dir, write_manifest)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_out(cfg: RunConfig) -> Path:
    data = cfg.data.benchmark if cfg.data.file is None else Path(cfg.data.file).stem
    model = Path(cfg.model).stem if cfg.model not in ("minilm", "smollm2") else cfg.model
    learner = cfg.learner.replace("*", "-star")
    return Path("runs") / f"{learner}-{cfg.pet.method}-{model}-{data}"


MIN_FREE_MB = 200
"""A run refuses to start with less free space than this in its output folder's file system."""


def check_out_dir(out: Path) -> None:
    """Fail before any training when the run directory cannot be written or its disk is full."""
    import shutil

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


def evaluate(learner, ctx: Context, t: int) -> tuple[list[float], list[int]]:
    """Accuracy on the test set of every task 0..t, predicting over all seen classes
    (or only the task's classes in the task-incremental setting)."""
    stream = ctx.stream
    lengths = ctx.encoded.all_lengths
    accs, counts = [], []
    for j in range(t + 1):
        test = stream.tasks[j].test
        allowed = stream.class_range(j) if ctx.cfg.data.setting == "task-incremental" else None
        batches = sorted_batches(test, lengths[test], ctx.cfg.train.eval_batch_size)
        preds = predict(learner.logits, batches, ctx.precision, allowed)
        correct = sum(preds[i] == stream.targets[i] for i in test)
        accs.append(correct / len(test))
        counts.append(len(test))
    return accs, counts


def run_seed(cfg: RunConfig, stream: Stream, engine: FeatureEngine, seed: int, out: Path,
             progress: bool = True, resume: bool = False) -> dict:
    """Learn the whole stream with one seed; write adapters and metrics under ``out/seed-<seed>``.

    With ``resume``, continue from the last finished task recorded in ``seed-<seed>/state.json``
    (and inside the next task from its in-task checkpoint, if one was written)."""
    set_seed(seed)
    backbone, encoded, precision = engine.backbone, engine.encoded, engine.precision
    pet = get_pet(cfg.pet.method, engine.pet_options(cfg.pet.method, cfg.pet.options))
    pet.bf16_autocast = engine.precision == "bf16"
    sdir = seed_dir(out, seed)
    checkpointer = Checkpointer(sdir, cfg.train.checkpoint_seconds)
    ctx = Context(cfg=cfg, stream=stream, backbone=backbone, encoded=encoded, pet=pet, seed=seed,
                  precision=precision, progress=progress, engine=engine, checkpointer=checkpointer)
    learner = get_learner(cfg.learner)(ctx)
    checkpointer.bind(learner, ctx)
    T = len(stream.tasks)
    progress_state: dict = {"finished_tasks": 0, "accuracy_matrix": [], "test_counts": [], "train_seconds": [],
                            "eval_seconds": [], "train_samples": [], "adapter_bytes": [], "extra": {},
                            "artifacts": {}}
    if resume and (sdir / "state.json").is_file():
        progress_state.update(read_json(sdir / "state.json"))
    done = progress_state["finished_tasks"]
    matrix, counts = progress_state["accuracy_matrix"], progress_state["test_counts"]
    train_seconds, eval_seconds = progress_state["train_seconds"], progress_state["eval_seconds"]
    train_samples, adapter_bytes = progress_state["train_samples"], progress_state["adapter_bytes"]
    extra, artifacts = progress_state["extra"], progress_state["artifacts"]
    if done:
        for task in stream.tasks[:done]:  # the same cache build order as an uninterrupted run
            engine.warm(task.train)
        checkpointer.load_task_end(done - 1)
        if not progress:
            print(f"seed {seed}: resuming after task {done}/{T}", file=sys.stderr)
    if resume:
        checkpointer.find_in_task(done)
    bar = tqdm(range(done, T), desc=f"seed {seed}", unit="task", disable=not progress, dynamic_ncols=True,
               initial=done, total=T)
    try:
        for t in bar:
            task = stream.tasks[t]
            bar.set_description(f"seed {seed} task {t + 1}/{T}")
            checkpointer.start_task(t)
            start = time.perf_counter()
            engine.warm(task.train)
            pet.calibration = engine.calibration(task.train)
            learner.learn(t)
            train_seconds.append(time.perf_counter() - start)
            train_samples.append(learner.last_fit.samples if learner.last_fit else 0)
            start = time.perf_counter()
            accs, counts = evaluate(learner, ctx, t)
            eval_seconds.append(time.perf_counter() - start)
            matrix.append(accs + [None] * (T - t - 1))
            for key, values in learner.eval_extra(t).items():
                extra.setdefault(key, []).append(values + [None] * (T - t - 1))
            folder = adapter_dir(out, seed, task.name)
            with atomic_directory(folder) as tmp:
                learner.save(t, tmp)
            adapter_bytes.append(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
            artifacts.update(hash_files(out, folder))
            checkpointer.save_task_end(t)
            atomic_write_json(sdir / "state.json", {
                "finished_tasks": t + 1, "accuracy_matrix": matrix, "test_counts": counts,
                "train_seconds": train_seconds, "eval_seconds": eval_seconds, "train_samples": train_samples,
                "adapter_bytes": adapter_bytes, "extra": extra, "artifacts": artifacts,
            })
            checkpointer.finish_task(t)
            bar.set_postfix(avg_acc=f"{100 * sum(accs) / len(accs):.1f}")
            if not progress:
                print(f"seed {seed} task {t + 1}/{T} {task.name}: train {train_seconds[-1]:.1f}s, "
                      f"avg acc {100 * sum(accs) / len(accs):.2f}%", file=sys.stderr)
        params = learner.tunable_params()
    finally:
        learner.close()
    result = M.summarize(matrix, counts)
    result.update({
        "accuracy_matrix": matrix,
        "test_counts": counts,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "train_samples": train_samples,
        "adapter_bytes": adapter_bytes,
        **extra,
        **params,
        "backbone_params": backbone.n_params,
        "tunable_ratio": params["tunable_params"] / backbone.n_params,
        "peak_rss_mb": peak_rss_mb(),
        "seed": seed,
        "precision": precision,
        "resumed": bool(resume and done) or progress_state.get("resumed", False),
    })
    atomic_write_json(sdir / "metrics.json", result)
    checkpointer.remove_all()
    return result


def prepare(cfg: RunConfig) -> tuple[Stream, FeatureEngine]:
    """Load and validate the data (first: bad data fails fast), then the backbone; tokenize once;
    build the feature engine shared by every seed (its lower-layer cache is seed-independent)."""
    stream = load_stream(cfg.data)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    backbone = load_backbone(cfg.model)
    if resolve_precision(cfg.train.precision) == "bf16":
        cast_frozen_linears(backbone.model)
    encoded = encode_rows(stream.rows, stream.kind, backbone.tokenizer, backbone.is_decoder, cfg.train.max_length)
    engine = FeatureEngine(backbone, encoded, cfg.train.top_layers, resolve_precision(cfg.train.precision),
                           cfg.train.eval_batch_size, cfg.train.cache_mb, pet_method=cfg.pet.method)
    engine.check(backbone.model, stream.tasks[0].train[:8])
    return stream, engine


def run(cfg: RunConfig, progress: bool | None = None,
        prepared: tuple[Stream, FeatureEngine] | None = None) -> dict:
    """Run ``cfg.seeds`` seeds of the stream; write the run directory; return aggregate metrics.

    ``prepared`` (from :func:`prepare`) reuses a loaded backbone and its feature cache, e.g. to
    compare several learners on the same data and model (see :func:`run_many`)."""
    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("CONPET_PROGRESS", "1") != "0"
    get_learner(cfg.learner).check_options(cfg)
    get_pet(cfg.pet.method, cfg.pet.options)
    stream, engine = prepared or prepare(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    check_out_dir(out)
    if (out / "config.yaml").exists() and any(out.glob("seed-*/state.json")):
        raise ConpetError(f"{out}: holds a run already; continue it with `conpet run --resume {out}` "
                          f"or choose another --out")
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    atomic_write_json(out / "stream.json", stream_description(stream))
    return _run_seeds(cfg, stream, engine, out, progress, resume=False)


def stream_description(stream: Stream) -> dict:
    return {"name": stream.name, "kind": stream.kind,
            "tasks": [{"name": t.name, "labels": list(t.labels)} for t in stream.tasks]}


def resume(run_dir: str | Path, progress: bool | None = None) -> dict:
    """Continue an interrupted run from its last finished task (and in-task checkpoint); seeds
    that finished are kept. Ends with the same metrics as an uninterrupted run (docs/reliability.md)."""
    from conpet.config import load_config

    out = Path(run_dir)
    if not (out / "config.yaml").is_file():
        raise ConpetError(f"{out}: not a conpet run directory (no config.yaml)")
    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("CONPET_PROGRESS", "1") != "0"
    recover_interrupted(out)
    cfg = load_config(str(out / "config.yaml"))
    cfg.out = str(out)
    check_out_dir(out)
    stream, engine = prepare(cfg)
    saved = read_json(out / "stream.json") if (out / "stream.json").is_file() else None
    if saved is not None and saved != stream_description(stream):
        raise ConpetError(f"{out}: the data no longer matches the run's stream.json (tasks or labels changed); "
                          f"cannot resume")
    return _run_seeds(cfg, stream, engine, out, progress, resume=True)


def _run_seeds(cfg: RunConfig, stream: Stream, engine: FeatureEngine, out: Path, progress: bool,
               resume: bool) -> dict:
    from conpet.report import write_run_report

    per_seed = []
    for k in range(cfg.seeds):
        seed = cfg.seed + k
        finished = seed_dir(out, seed) / "metrics.json"
        if resume and finished.is_file():
            per_seed.append(read_json(finished))
        else:
            per_seed.append(run_seed(cfg, stream, engine, seed, out, progress, resume=resume))
    metrics = M.aggregate_seeds(per_seed)
    metrics["run"] = {
        "learner": cfg.learner,
        "pet": cfg.pet.method,
        "model": cfg.model,
        "benchmark": stream.name,
        "tasks": [t.name for t in stream.tasks],
        "setting": cfg.data.setting,
    }
    atomic_write_json(out / "metrics.json", metrics)
    write_run_report(out, metrics)
    write_manifest(out)
    return metrics


def parse_learner_spec(spec: str) -> tuple[str, dict]:
    """``"dynamic[top_k=2,new_ratio=0.5]"`` -> ``("dynamic", {"top_k": 2, "new_ratio": 0.5})``."""
    import yaml

    spec = spec.strip()
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ConpetError(f"learner '{spec}': options go in brackets at the end, e.g. dynamic[top_k=2]")
    name, inner = spec[:-1].split("[", 1)
    options = {}
    for pair in filter(None, (x.strip() for x in inner.split(","))):
        if "=" not in pair:
            raise ConpetError(f"learner '{spec}': expected KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    return name.strip(), options


def spec_dir_name(spec: str) -> str:
    """A folder name for a learner spec: ``emr*`` -> ``emr-star``, ``dynamic[top_k=2]`` -> ``dynamic-top_k=2``."""
    name, options = parse_learner_spec(spec)
    return "-".join([name.replace("*", "-star")] + [f"{k}={v}" for k, v in options.items()])


def run_many(cfg: RunConfig, learners: list[str], out: str | Path, progress: bool | None = None) -> dict[str, dict]:
    """Run several learners on the same stream, model and settings, one after the other in this
    process: the backbone is loaded and the data tokenized (and lower layers cached) once.

    A learner may carry its own options in brackets, e.g. ``["dynamic", "dynamic[top_k=2]"]``
    (added to ``cfg.learner_options``). Each writes its own run directory ``out/<learner>``
    (``emr*`` -> ``emr-star``, ``dynamic[top_k=2]`` -> ``dynamic-top_k=2``)."""
    import dataclasses

    parsed = []
    for spec in learners:
        name, options = parse_learner_spec(spec)
        get_learner(name).check_options(dataclasses.replace(cfg, learner_options={**cfg.learner_options, **options}))
        parsed.append((spec, name, options))
    check_out_dir(Path(out))
    prepared = prepare(cfg)
    results = {}
    for spec, name, options in parsed:
        one = dataclasses.replace(cfg, learner=name, out=str(Path(out) / spec_dir_name(spec)),
                                  learner_options={**cfg.learner_options, **options})
        results[spec] = run(one, progress=progress, prepared=prepared)
    return results


def evaluate_run(run_dir: str | Path, seed: int | None = None,
                 prepared: tuple[Stream, FeatureEngine] | None = None) -> dict:
    """Test accuracy of a run's final modules on every task of its stream (the data named in its
    ``config.yaml``): per-task, average and whole accuracy. Works for every learner and for the
    outputs of ``conpet merge`` / ``conpet compress``. ``prepared`` (:func:`prepare` of the same
    data and model) reuses a loaded backbone and its feature cache across many evaluations."""
    from conpet.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConpetError(f"{run_dir}: not a conpet run directory (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"))
    seed = cfg.seed if seed is None else seed
    stream, engine = prepared or prepare(cfg)
    if (run_dir / "stream.json").is_file() and read_json(run_dir / "stream.json") != stream_description(stream):
        raise ConpetError(f"{run_dir}: the data no longer matches the run's stream.json")
    pet = get_pet(cfg.pet.method, engine.pet_options(cfg.pet.method, cfg.pet.options))
    pet.bf16_autocast = engine.precision == "bf16"
    ctx = Context(cfg=cfg, stream=stream, backbone=engine.backbone, encoded=engine.encoded, pet=pet, seed=seed,
                  precision=engine.precision, progress=False, engine=engine)
    learner = get_learner(cfg.learner)(ctx)
    try:
        learner.restore(seed_dir(run_dir, seed))
        accs, counts = evaluate(learner, ctx, len(stream.tasks) - 1)
    finally:
        learner.close()
    return {"per_task": dict(zip([t.name for t in stream.tasks], accs)), "test_counts": counts,
            "average_accuracy": sum(accs) / len(accs),
            "whole_accuracy": sum(a * c for a, c in zip(accs, counts)) / sum(counts), "seed": seed}
