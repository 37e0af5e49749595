"""Where a run's memory goes: resident memory (RSS) per phase of a real ``conpet run``.

    python bench/memory_profile.py [--model smollm2] [--benchmark freedict-translation]
        [--learner sequential] [--tasks 2] [--max-train-per-class 200] [--epochs 1]
        [--set KEY=VALUE ...] [--json bench/results/memory-<model>-<benchmark>-<learner>.json]

One process runs the stream as ``conpet run`` would, while a thread samples the process's
resident set every 5 ms. Each sample is charged to the phase running then: ``load`` (backbone,
tokenizer, frozen-weight cast), ``cache`` (the lower layers computed once per training row),
``train`` (a task's fit: forward, backward, optimizer), ``generation`` (greedy answers to the
test rows), ``perplexity`` (the reference text), ``other`` (stream loading, saving, metrics).
For each phase the table gives the RSS on entry, the peak inside it and the rise of that peak
above the entry, per task. Beside it, what conpet itself holds at the end of each phase: the
frozen weights, the lower-layer cache (``engine.cache_bytes``) and the tunable parameters.
RSS counts what the allocator keeps after tensors are freed, so the peak of a phase can exceed
what its tensors need; the per-phase rise is what a bound on that phase would change.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from record import write_record
from rss import Sampler, rss_mb

def wrap(owner, attr: str, sampler: Sampler, name: str, extra=None) -> None:
    """Replace ``owner.attr`` by the same function run inside ``sampler.phase(name)``."""
    fn = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        with sampler.phase(name, **(extra(*args, **kwargs) if extra else {})):
            return fn(*args, **kwargs)

    setattr(owner, attr, wrapped)


def tensor_mb(params) -> float:
    return sum(p.numel() * p.element_size() for p in params) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--benchmark", default="freedict-translation")
    p.add_argument("--learner", default="sequential")
    p.add_argument("--tasks", type=int, default=2, help="the first N tasks of the stream")
    p.add_argument("--max-train-per-class", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, as conpet run")
    p.add_argument("--out", type=Path, default=Path("runs/memory-profile"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    sampler = Sampler().start()
    with sampler.phase("import"):
        import shutil

        import conpet.build as build
        import conpet.runner as runner
        from conpet.config import from_dict, parse_override, set_dotted, spec_dir_name
        from conpet.engine import FeatureEngine

    args.json = args.json or Path(f"bench/results/memory-{args.model}-{args.benchmark}-{spec_dir_name(args.learner)}.json")
    values = {"model": args.model, "learner": args.learner, "out": str(args.out),
                     "data": {"benchmark": args.benchmark, "max_train_per_class": args.max_train_per_class,
                              "task_slice": f"0:{args.tasks}"},
                     "train": {"epochs": args.epochs, "checkpoint_seconds": 1e9}}
    for item in args.set:
        set_dotted(values, *parse_override(item))
    cfg = from_dict(values)
    shutil.rmtree(args.out, ignore_errors=True)

    wrap(build, "load_backbone", sampler, "load")
    wrap(FeatureEngine, "warm", sampler, "cache", lambda engine, rows: {"rows": len(rows)})
    learners = []

    def build_learner(*a, **k):
        learner = make_learner(*a, **k)
        wrap(learner, "learn", sampler, "train", lambda t: {"task": t})
        wrap(learner, "reference_perplexity", sampler, "perplexity")
        learners.append(learner)
        return learner

    make_learner, runner.build_learner = runner.build_learner, build_learner
    wrap(runner, "evaluate_generation", sampler, "generation", lambda learner, t, split="test": {"task": t})
    wrap(runner, "evaluate", sampler, "evaluation", lambda learner, t, split="test": {"task": t})
    wrap(runner, "perplexity", sampler, "perplexity")

    holdings = []
    start = time.perf_counter()
    with sampler.phase("prepare"):
        prepared = build.prepare(cfg)
    engine = prepared.engine
    frozen = tensor_mb(t for t in list(engine.backbone.model.parameters()) + list(engine.backbone.model.buffers()))

    def on_task(seed, t, accs) -> None:
        learner = learners[-1]
        holdings.append({"after_task": t, "rss_mb": rss_mb(), "frozen_weights_mb": frozen,
                         "cache_mb": engine.cache_bytes / 2**20, "cache_rows": len(engine.cache),
                         "tunable_mb": tensor_mb(q for q in learner.model.parameters() if q.requires_grad)})

    runner.run(cfg, progress=False, prepared=prepared, on_task=on_task)
    total_s = time.perf_counter() - start
    sampler.stop()

    print(f"\n{args.model}, {args.benchmark} (first {args.tasks} tasks, <= {args.max_train_per_class} train rows "
          f"per task, {args.epochs} epoch), {args.learner}: RSS per phase (MB)")
    print(f"{'phase':12s} {'task':>4s} {'entry':>7s} {'peak':>7s} {'rise':>7s} {'exit':>7s} {'seconds':>8s}")
    for s in sampler.spans:
        print(f"{s['phase']:12s} {str(s.get('task', '')):>4s} {s['entry_mb']:7.0f} {s['peak_mb']:7.0f} "
              f"{s['peak_mb'] - s['entry_mb']:7.0f} {s['exit_mb']:7.0f} {s['seconds']:8.1f}")
    print("\nheld by conpet after each task (MB): frozen weights, lower-layer cache, tunable parameters")
    for h in holdings:
        print(f"task {h['after_task']}: RSS {h['rss_mb']:.0f}, frozen {h['frozen_weights_mb']:.0f}, cache "
              f"{h['cache_mb']:.0f} ({h['cache_rows']} rows), tunable {h['tunable_mb']:.1f}")
    peak = max(s["peak_mb"] for s in sampler.spans)
    print(f"\npeak RSS {peak:.0f} MB in {total_s:.0f} s")
    write_record(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                             "spans": sampler.spans, "holdings": holdings, "peak_rss_mb": peak,
                             "seconds": total_s})
    print(f"record: {args.json}")


if __name__ == "__main__":
    main()
