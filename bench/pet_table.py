"""Every PET method on SmolLM2-135M and wordnet-typing: trainable parameters, seconds per training
step, and accuracy after the whole stream with `sequential` and with static ConPET (`emr*`).

    .venv/bin/python bench/pet_table.py [--methods lora,ia3,...] [--per-class 16] [--seed 0] \
        [--out runs/pet-table]

Settings (the same for every method): 10 tasks, at most --per-class training rows per class,
2 epochs, batch 16, bf16 autocast, each method at its documented defaults (docs/pets.md). Methods
that work inside the blocks are confined to the top 4 of 30 layers (train.top_layers=4, the fast
path of docs/speed.md); the input-level methods (prompt tuning, prefix tuning, P-tuning, DePT)
need every layer (train.top_layers: null), which makes their steps slower: the table says which.
Seconds per step are measured on the `sequential` run (training only: replay adds rows to each
step of `emr*`), with the lower-layer cache built before any timing. One seed; nothing tuned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from record import write_record

from conpet.config import RunConfig
from conpet.pet import get_pet_class
from conpet.runner import prepare, run

METHODS = ["lora", "ia3", "ln_tuning", "adapter", "parallel_adapter", "compacter", "bitfit", "mola", "mos",
           "sparse_ft", "hft", "lisa", "adalora", "corda", "prompt_tuning", "prefix_tuning", "p_tuning", "dept"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--learners", default="sequential,emr*")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--top-layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("runs/pet-table"))
    ap.add_argument("--json", type=Path, default=None, help="write the table as a record (bench/record.py)")
    args = ap.parse_args()
    base = RunConfig()
    base.model = args.model
    base.seeds, base.seed = 1, args.seed
    base.data.benchmark = "wordnet-typing"
    base.data.max_train_per_class = args.per_class
    base.train.epochs = 2
    prepared: dict = {}
    rows, failed = [], []
    t0 = time.perf_counter()
    for method in args.methods.split(","):
        input_level = get_pet_class(method).input_level
        top = None if input_level else args.top_layers
        results = {}
        for learner in args.learners.split(","):
            cfg = dataclasses.replace(
                base, learner=learner, out=str(args.out / method / learner.replace("*", "-star")),
                pet=dataclasses.replace(base.pet, method=method, options={}),
                train=dataclasses.replace(base.train, top_layers=top))
            if not (Path(cfg.out) / "metrics.json").is_file():  # else finished earlier: reuse
                if top not in prepared:
                    prepared.clear()  # one backbone in memory at a time
                    prepared[top] = prepare(cfg)
                    stream, engine = prepared[top]
                    # the lower-layer cache is built before any timing, not inside the first method's
                    engine.warm([i for task in stream.tasks for i in task.train])
                try:
                    run(cfg, progress=False, prepared=prepared[top])
                except Exception as e:  # report it and go on with the other methods
                    print(f"{method} / {learner}: FAILED: {type(e).__name__}: {e}", flush=True)
                    failed.append(f"{method} / {learner}: {type(e).__name__}: {e}")
                    break
            results[learner] = json.loads((Path(cfg.out) / "metrics.json").read_text())
        if len(results) < len(args.learners.split(",")):
            continue
        seq = results[args.learners.split(",")[0]]
        steps = sum(math.ceil(s / base.train.batch_size) for s in seq["train_samples"])
        row = {"method": method, "paper": get_pet_class(method).paper, "pet_params": int(seq["pet_params"]),
               "seconds_per_step": sum(seq["train_seconds"]) / steps,
               "layers": "all" if input_level else f"top {args.top_layers}",
               **{f"{l}_avg": results[l]["average_accuracy"] for l in results},
               **{f"{l}_whole": results[l]["whole_accuracy"] for l in results}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    learners = args.learners.split(",")
    print("\n| method | paper | trainable PET params | layers | s/step | "
          + " | ".join(f"{l} avg / whole" for l in learners) + " |")
    print("|---|---|---|---|---|" + "---|" * len(learners))
    for r in rows:
        print(f"| `{r['method']}` | {r['paper'].split(',')[0]} | {r['pet_params']:,} | {r['layers']} | "
              f"{r['seconds_per_step']:.3f} | "
              + " | ".join(f"{100 * r[f'{l}_avg']:.2f} / {100 * r[f'{l}_whole']:.2f}" for l in learners) + " |")
    for line in failed:
        print(f"FAILED {line}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.json:
        write_record(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "failed": failed,
                                 "seconds": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
