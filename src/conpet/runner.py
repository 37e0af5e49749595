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
from conpet.backbone import load_backbone
from conpet.engine import FeatureEngine
from conpet.config import RunConfig
from conpet.data.formats import load_stream
from conpet.data.stream import Stream
from conpet.errors import ConpetError
from conpet.inputs import encode_rows, sorted_batches
from conpet.learners import Context, get_learner
from conpet.learners.loop import predict, resolve_precision
from conpet.pet import get_pet
from conpet.runs import adapter_dir, atomic_directory, atomic_write_json, atomic_write_text, seed_dir


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_out(cfg: RunConfig) -> Path:
    data = cfg.data.benchmark if cfg.data.file is None else Path(cfg.data.file).stem
    model = Path(cfg.model).stem if cfg.model not in ("minilm", "smollm2") else cfg.model
    learner = cfg.learner.replace("*", "-star")
    return Path("runs") / f"{learner}-{cfg.pet.method}-{model}-{data}"


def check_out_dir(out: Path) -> None:
    """Fail before any training when the run directory cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".conpet-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConpetError(f"{out}: cannot write the run directory ({e.strerror})") from None


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
             progress: bool = True) -> dict:
    """Learn the whole stream with one seed; write adapters and metrics under ``out/seed-<seed>``."""
    set_seed(seed)
    backbone, encoded, precision = engine.backbone, engine.encoded, engine.precision
    pet = get_pet(cfg.pet.method, {**cfg.pet.options, **engine.pet_layer_options()})
    ctx = Context(cfg=cfg, stream=stream, backbone=backbone, encoded=encoded, pet=pet, seed=seed,
                  precision=precision, progress=progress, engine=engine)
    learner = get_learner(cfg.learner)(ctx)
    T = len(stream.tasks)
    matrix: list[list[float | None]] = []
    counts: list[int] = []
    train_seconds: list[float] = []
    eval_seconds: list[float] = []
    train_samples: list[int] = []
    adapter_bytes: list[int] = []
    extra: dict[str, list] = {}
    sdir = seed_dir(out, seed)
    bar = tqdm(range(T), desc=f"seed {seed}", unit="task", disable=not progress, dynamic_ncols=True)
    try:
        for t in bar:
            task = stream.tasks[t]
            bar.set_description(f"seed {seed} task {t + 1}/{T}")
            start = time.perf_counter()
            engine.warm(task.train)
            learner.learn(t)
            train_seconds.append(time.perf_counter() - start)
            train_samples.append(learner.last_fit.samples if learner.last_fit else 0)
            start = time.perf_counter()
            accs, counts = evaluate(learner, ctx, t)
            eval_seconds.append(time.perf_counter() - start)
            matrix.append(accs + [None] * (T - t - 1))
            for key, values in learner.eval_extra(t).items():
                extra.setdefault(key, []).append(values + [None] * (T - t - 1))
            with atomic_directory(adapter_dir(out, seed, task.name)) as tmp:
                learner.save(t, tmp)
            adapter_bytes.append(sum(f.stat().st_size for f in adapter_dir(out, seed, task.name).rglob("*")
                                     if f.is_file()))
            atomic_write_json(sdir / "state.json", {
                "finished_tasks": t + 1, "accuracy_matrix": matrix, "train_seconds": train_seconds,
            })
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
    })
    atomic_write_json(sdir / "metrics.json", result)
    return result


def prepare(cfg: RunConfig) -> tuple[Stream, FeatureEngine]:
    """Load and validate the data (first: bad data fails fast), then the backbone; tokenize once;
    build the feature engine shared by every seed (its lower-layer cache is seed-independent)."""
    stream = load_stream(cfg.data)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    backbone = load_backbone(cfg.model)
    encoded = encode_rows(stream.rows, stream.kind, backbone.tokenizer, backbone.is_decoder, cfg.train.max_length)
    engine = FeatureEngine(backbone, encoded, cfg.train.top_layers, resolve_precision(cfg.train.precision),
                           cfg.train.eval_batch_size, cfg.train.cache_mb)
    engine.check(backbone.model, stream.tasks[0].train[:8])
    return stream, engine


def run(cfg: RunConfig, progress: bool | None = None) -> dict:
    """Run ``cfg.seeds`` seeds of the stream; write the run directory; return aggregate metrics."""
    from conpet.report import write_run_report

    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("CONPET_PROGRESS", "1") != "0"
    get_learner(cfg.learner)
    get_pet(cfg.pet.method, cfg.pet.options)
    stream, engine = prepare(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    check_out_dir(out)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    atomic_write_json(out / "stream.json", {
        "name": stream.name, "kind": stream.kind,
        "tasks": [{"name": t.name, "labels": list(t.labels)} for t in stream.tasks],
    })
    per_seed = [run_seed(cfg, stream, engine, cfg.seed + k, out, progress) for k in range(cfg.seeds)]
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
    return metrics
