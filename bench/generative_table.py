"""The generative results table: learners on ``freedict-translation`` with SmolLM2, several seeds.

    python bench/generative_table.py [--learners 'sequential,joint,emr*,lwf*,dynamic'] [--seeds 3]
        [--model smollm2] [--benchmark freedict-translation] [--epochs 2] [--max-new-tokens 10]
        [--threads 0] [--out runs/generative-table] [--record bench/results/generative-freedict-smollm2.json]

Each (learner, seed) is one ``conpet run`` (one seed) in ``OUT/<learner>/seed-<k>``; the backbone
is loaded and the rows tokenized once. A finished pair is written to the ``--record`` JSON
(committed) at once and never rerun, and a run directory stopped in the middle is resumed, so
the table can be filled over several sessions. Columns: the stream's primary metric (chrF) as
average score after the last task, exact match beside it, forgetting and BWT (on chrF), the
reference-text perplexity after the last task (the base model's alone in the header), and
training seconds per task (mean over tasks; ``torch_threads`` in the record says how many
threads ran it). Means ± sample std over the recorded seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from conpet.build import prepare
from conpet.config import from_dict, spec_dir_name
from conpet.runner import resume, run

KEYS = ("average_accuracy", "final_exact_match", "forgetting", "bwt", "reference_perplexity", "seconds_per_task")


def summary(m: dict) -> dict:
    """The table's numbers of one finished one-seed run (``metrics.json``)."""
    seed = (m.get("per_seed") or [m])[0]
    last_em = [v for v in seed["score_exact_match"][-1] if v is not None]
    return {"average_accuracy": seed["average_accuracy"], "final_exact_match": float(np.mean(last_em)),
            "forgetting": seed["forgetting"], "bwt": seed["bwt"],
            "reference_perplexity": seed["reference_perplexity"][-1],
            "base_reference_perplexity": seed["base_reference_perplexity"],
            "seconds_per_task": float(np.mean(seed["train_seconds"])),
            "eval_seconds_per_task": float(np.mean(seed["eval_seconds"])),
            "tunable_params": seed["tunable_params"], "accuracy_matrix": seed["accuracy_matrix"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learners", default="sequential,joint,emr*,lwf*,dynamic")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--benchmark", default="freedict-translation")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/generative-table"))
    ap.add_argument("--record", type=Path, default=Path("bench/results/generative-freedict-smollm2.json"))
    ap.add_argument("--report", action="store_true", help="print the table of what the record holds; run nothing")
    args = ap.parse_args()
    setup = {"model": args.model, "benchmark": args.benchmark, "epochs": args.epochs,
             "max_new_tokens": args.max_new_tokens}
    record = json.loads(args.record.read_text()) if args.record.is_file() else {**setup, "runs": []}
    if any(record.get(k) != v for k, v in setup.items()):
        raise SystemExit(f"{args.record}: records another setup; pass --record with a new file")
    learners = args.learners.split(",")
    if args.report:
        print_table(record, learners)
        return 0
    base = {"model": args.model, "data": {"benchmark": args.benchmark, "max_new_tokens": args.max_new_tokens},
            "train": {"epochs": args.epochs, "threads": args.threads}}
    prepared = None
    t0 = time.perf_counter()
    for seed in range(args.seeds):  # seed-major: every learner gets seed 0 before any gets seed 1
        for learner in learners:
            if any(r["learner"] == learner and r["seed"] == seed for r in record["runs"]):
                continue
            out = args.out / spec_dir_name(learner) / f"seed-{seed}"
            if not (out / "metrics.json").is_file():
                if any(out.glob("seed-*/state.json")):
                    resume(out, progress=False)
                else:
                    cfg = from_dict({**base, "learner": learner, "seed": seed, "out": str(out)})
                    prepared = prepared or prepare(cfg)
                    run(cfg, progress=False, prepared=prepared)
            row = {"learner": learner, "seed": seed, **summary(json.loads((out / "metrics.json").read_text())),
                   "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
            record["runs"].append(row)
            tmp = args.record.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(args.record)
            print(json.dumps({k: row[k] for k in ("learner", "seed", *KEYS)}), flush=True)
    print_table(record, learners)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    return 0


def print_table(record: dict, learners: list[str]) -> None:
    def cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
        values = [scale * v for v in values]
        if not values:
            return "-"
        return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 \
            else f"{values[0]:.{digits}f}"

    runs = record["runs"]
    base = runs[0]["base_reference_perplexity"] if runs else float("nan")
    print(f"\n{record['benchmark']} on {record['model']}, {record['epochs']} epochs per task, greedy answers up to "
          f"{record['max_new_tokens']} tokens; reference perplexity of the base model: {base:.2f}")
    print("| learner | seeds | avg chrF % | final exact match % | forgetting % | BWT % | reference ppl | s / task |")
    print("|---|---|---|---|---|---|---|---|")
    for learner in learners:
        mine = [r for r in runs if r["learner"] == learner]
        if not mine:
            continue
        col = lambda k: [r[k] for r in mine]  # noqa: E731
        print(f"| {learner} | {len(mine)} | {cell(col('average_accuracy'))} | {cell(col('final_exact_match'))} | "
              f"{cell(col('forgetting'))} | {cell(col('bwt'))} | {cell(col('reference_perplexity'), 1.0)} | "
              f"{cell(col('seconds_per_task'), 1.0, 1)} |")


if __name__ == "__main__":
    sys.exit(main())
