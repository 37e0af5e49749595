"""Merge and compress the per-task LoRA experts of a finished `dynamic` run; print test accuracy
of every merge method and ComPEFT density against the per-task experts with their selector and
against `joint` (all seeds of the runs; mean and spread).

    .venv/bin/python bench/merge_compress.py runs/conpet/smollm2-wordnet-typing \
        [--ranks 8,80] [--densities 0.05,0.1,0.2] [--out runs/merge-compress]

RUNS holds the `dynamic` run (10 experts per seed) and the `joint` run of the same stream. Every
merged and compressed run directory is written under --out and can be loaded with
`conpet predict` / `conpet evaluate`. Nothing here is tuned: methods run at their documented
defaults (conpet merge --list).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from record import write_record

from conpet.adapters import compress_run, merge_run
from conpet.config import load_config
from conpet.merging import MERGE_METHODS
from conpet.runner import evaluate_run, prepare


def mean_sd(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):6.2f} ± {sd:4.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--ranks", default="8,80")
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--methods", default=",".join(MERGE_METHODS))
    ap.add_argument("--out", type=Path, default=Path("runs/merge-compress"))
    ap.add_argument("--json", type=Path, default=None, help="write the table as a record (bench/record.py)")
    args = ap.parse_args()
    dynamic, joint = args.runs / "dynamic", args.runs / "joint"
    cfg = load_config(str(dynamic / "config.yaml"))
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    print(f"backbone and data ready in {time.perf_counter() - t0:.0f}s; seeds {seeds}", flush=True)
    rows: list[tuple[str, list[float], list[float], str]] = []

    def record(label: str, results: list[dict], extra: str = "") -> None:
        rows.append((label, [r["average_accuracy"] for r in results], [r["whole_accuracy"] for r in results], extra))
        print(f"{label:38s} avg {mean_sd(rows[-1][1])}  whole {mean_sd(rows[-1][2])}  {extra}", flush=True)

    record("dynamic ConPET (10 experts + selector)", [evaluate_run(dynamic, s, prepared) for s in seeds])
    joint_metrics = [json.loads((joint / f"seed-{s}" / "metrics.json").read_text()) for s in seeds]
    record("joint (one LoRA, all data)", joint_metrics)
    for rank in [int(r) for r in args.ranks.split(",")]:
        for method in args.methods.split(","):
            results, errors = [], []
            for s in seeds:
                out = args.out / f"merge-{method}-r{rank}" / f"seed-{s}"
                info = merge_run(dynamic, method, rank, out, seed=s)
                errors.append(info["mean_relative_reconstruction_error"])
                results.append(evaluate_run(out, s, prepared))
            record(f"merge {method} rank {rank}", results, f"SVD rel. error {statistics.mean(errors):.3f}")
    for density in [float(d) for d in args.densities.split(",")]:
        out = args.out / f"compeft-{density:g}"
        info = compress_run(dynamic, density, out)
        record(f"ComPEFT density {density:g}", [evaluate_run(out, s, prepared) for s in seeds],
               f"{info['adapter_bytes']} -> {info['compressed_bytes']} bytes (x{info['compression_ratio']:.1f})")
    print("\n| modules | average accuracy | whole accuracy | notes |\n|---|---|---|---|")
    for label, avg, whole, extra in rows:
        print(f"| {label} | {mean_sd(avg)} | {mean_sd(whole)} | {extra} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.json:
        write_record(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": seeds,
                                 "rows": [{"modules": label, "average_accuracy": avg, "whole_accuracy": whole,
                                           "notes": extra} for label, avg, whole, extra in rows],
                                 "seconds": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
