"""One setting, several values: average accuracy per built-in stream, learner and seed, recorded as
it runs and resumable. How defaults are chosen (on **dev** rows) and what a setting costs.

    python bench/setting_sweep.py --key backbone.pooling --values cloze,mean [--split dev]
        [--model minilm] [--learners 'emr*'] [--seeds 3] [--epochs 3] [--max-train-per-class N] [--threads 0]
        [--benchmarks wordnet-typing,wordnet-relations,wordnet-fine,debian-sections]
        [--out runs/sweep] [--record bench/results/sweep-<key>-<model>-<split>.json] [--report]

With ``--split dev`` (the default) every run scores dev rows and test rows are sealed
(``data.eval_split: dev``), so a default chosen from the record never looked at a test split.
Each finished (benchmark, value, learner, seed) is written to the record at once, with its own
provenance, and never rerun; a run stopped in the middle is resumed. ``--report`` prints mean ±
sample std over seeds of the average accuracy after the stream.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from record import provenance, write_record

from conpet.build import prepare
from conpet.config import from_dict, spec_dir_name
from conpet.runner import resume, run


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", required=True, help="a config key, e.g. backbone.pooling or train.length_bucketing")
    p.add_argument("--values", required=True, help="comma-separated values (YAML: true, 3, mean)")
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--model", default="minilm")
    p.add_argument("--learners", default="emr*")
    p.add_argument("--benchmarks", default="wordnet-typing,wordnet-relations,wordnet-fine,debian-sections")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train-per-class", type=int, default=None, help="cap on training rows per class")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.add_argument("--record", type=Path, default=None)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    args.record = args.record or Path(f"bench/results/sweep-{args.key.replace('.', '-')}-{args.model}-{args.split}.json")
    return args


def nested(key: str, value) -> dict:
    """``"backbone.pooling", "mean"`` -> ``{"backbone": {"pooling": "mean"}}``."""
    head, _, rest = key.partition(".")
    return {head: nested(rest, value) if rest else value}


def merged(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def report(record: dict) -> None:
    cells: dict[tuple[str, str, str], list[float]] = {}
    for r in record["runs"]:
        cells.setdefault((r["benchmark"], r["learner"], str(r["value"])), []).append(r["average_accuracy"])
    values = list(dict.fromkeys(str(r["value"]) for r in record["runs"]))
    print(f"{record['key']} on {record['model']}, {record['split']} rows, average accuracy % after the stream "
          "(mean ± sample std over seeds, seeds counted)")
    print(f"{'benchmark':20s} {'learner':10s} " + " ".join(f"{v:>20s}" for v in values))
    for bench, learner in sorted({k[:2] for k in cells}):
        row = []
        for v in values:
            acc = [100 * x for x in cells.get((bench, learner, v), [])]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            row.append(f"{statistics.fmean(acc):6.2f} ± {sd:5.2f} ({len(acc)})" if acc else "-")
        print(f"{bench:20s} {learner:10s} " + " ".join(f"{c:>20s}" for c in row))


def main(argv=None) -> int:
    args = parse(argv)
    setup = {"key": args.key, "model": args.model, "epochs": args.epochs, "split": args.split,
             "max_train_per_class": args.max_train_per_class}
    record = json.loads(args.record.read_text()) if args.record.is_file() else {**setup, "runs": []}
    if any(record.get(k) != v for k, v in setup.items()):
        raise SystemExit(f"{args.record}: records another setup; pass --record with a new file")
    if args.report:
        report(record)
        return 0
    values = [yaml.safe_load(v) for v in args.values.split(",")]
    for seed in range(args.seeds):
        for bench in args.benchmarks.split(","):
            for value in values:
                prepared = None
                for learner in args.learners.split(","):
                    key = (bench, value, learner, seed)
                    if any((r["benchmark"], r["value"], r["learner"], r["seed"]) == key for r in record["runs"]):
                        continue
                    out = args.out / args.key / bench / str(value) / spec_dir_name(learner) / f"seed-{seed}"
                    base = {"model": args.model, "learner": learner, "seed": seed, "out": str(out),
                            "data": {"benchmark": bench, "eval_split": args.split,
                                     "max_train_per_class": args.max_train_per_class},
                            "train": {"epochs": args.epochs, "threads": args.threads}}
                    cfg = from_dict(merged(base, nested(args.key, value)))
                    start = time.perf_counter()
                    if (out / "metrics.json").is_file():
                        metrics = json.loads((out / "metrics.json").read_text())
                    elif any(out.glob("seed-*/state.json")):  # stopped in the middle: go on
                        metrics = resume(out, progress=False)
                    else:
                        prepared = prepared or prepare(cfg)
                        metrics = run(cfg, progress=False, prepared=prepared)
                    m = (metrics.get("per_seed") or [metrics])[0]
                    row = {"benchmark": bench, "value": value, "learner": learner, "seed": seed,
                           "average_accuracy": m["average_accuracy"], "forgetting": m["forgetting"],
                           "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d"),
                           "provenance": provenance()}
                    record["runs"].append(row)
                    write_record(args.record, record)
                    print(json.dumps({k: v for k, v in row.items() if k != "provenance"}), flush=True)
    report(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
