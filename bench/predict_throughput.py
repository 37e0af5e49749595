"""Prediction throughput of Dynamic ConPET for streams of 1, 5, 10 and 20 tasks, against a
single-adapter model (one LoRA + one head) measured in the same run.

    python bench/predict_throughput.py [--model minilm] [--tasks 1,5,10,20] [--rows 512] [--top-k 1]

The modules are freshly initialised (non-zero LoRA weights): throughput does not depend on what
they learned. The stream is ``wordnet-typing`` split into 20 tasks (``--n-tasks``-style, seeded),
of which the first N are attached as experts, with a selector. Dynamic ConPET's cost per input is
1 + k backbone passes whatever N is, so its rows/s should stay flat in N (at about 1/(1+k) of
the single-adapter model).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from record import write_record

warnings.filterwarnings("ignore")


def main() -> None:
    import torch

    from conpet.build import build_learner, prepare
    from conpet.config import PETConfig, RunConfig, TrainConfig
    from conpet.data.benchmarks import load_benchmark
    from conpet.data.formats import build_stream, split_labels
    from conpet.device import autocast
    from conpet.heads import GrowingHead
    from conpet.learners.dynamic import SELECTOR, expert_name

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--tasks", default="1,5,10,20")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top-layers", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the rates as a record (bench/record.py)")
    args = p.parse_args()
    sizes = [int(x) for x in args.tasks.split(",")]

    base = load_benchmark("wordnet-typing")
    groups = split_labels(sorted(base.labels), max(sizes), seed=0)
    stream = build_stream("wordnet-typing-20", base.rows, groups, base.kind)
    train = TrainConfig(top_layers=args.top_layers, eval_batch_size=args.batch_size)
    pet = PETConfig("lora", {"init_lora_weights": False})
    prepared = prepare(RunConfig(model=args.model, train=train, pet=pet), stream)
    bb, precision = prepared.engine.backbone, prepared.engine.precision
    rows = [i for t in stream.tasks for i in t.test][: args.rows]

    def timed(logits_fn) -> float:
        batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
        with torch.no_grad(), autocast(precision):
            logits_fn(batches[0])  # warm-up (and fills the lower-layer cache when enabled)
            start = time.perf_counter()
            for b in batches:
                logits_fn(b)
        return len(rows) / (time.perf_counter() - start)

    results = {}
    cfg = RunConfig(model=args.model, learner="sequential", train=train, pet=pet)
    single = build_learner(cfg, prepared, seed=0)
    single.new_module()
    single.head.grow(stream.labels)
    single.model.eval()
    results["single adapter"] = timed(single.logits)
    single.close()

    for n in sizes:
        cfg = RunConfig(model=args.model, learner="dynamic", learner_options={"top_k": args.top_k}, train=train,
                        pet=pet)
        dyn = build_learner(cfg, prepared, seed=0)
        for t in range(n):
            dyn._new_module(expert_name(t), t)
            head = GrowingHead(bb.hidden_size)
            head.grow(list(stream.tasks[t].labels))
            dyn.expert_heads.append(head)
            dyn.selector_head.grow([stream.tasks[t].name])
        if n > 1:
            dyn._new_module(SELECTOR, n - 1)
        dyn.n_tasks = n
        dyn.model.eval()
        results[f"dynamic, {n} tasks"] = timed(dyn.logits)
        dyn.close()

    ref = results["single adapter"]
    print(f"\n{args.model}, {len(rows)} test rows, batch {args.batch_size}, top-k {args.top_k}, "
          f"top_layers {args.top_layers}, {precision}")
    print(f"{'model':22s} {'rows/s':>8s} {'x single':>9s}")
    for name, rate in results.items():
        print(f"{name:22s} {rate:8.1f} {rate / ref:9.2f}")
    if args.json:
        write_record(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "precision": precision,
                                 "rows": len(rows), "rows_per_second": results})


if __name__ == "__main__":
    main()
