"""A results table: learners x seeds on one stream, recorded as it runs, resumable across sessions.

    python bench/learner_table.py --benchmark wordnet-relations \
        [--learners 'sequential,joint,emr*,o-lora,inflora,lae,crl,crl*,fpf,k-fpf,i-lora,osf,zscl,cofitune,model-surgery']
        [--seeds 3]
        [--model smollm2] [--epochs 2] [--max-train-per-class N] [--top-layers auto] [--threads 0]
        [--out runs/learner-table] [--record bench/results/learners-<benchmark>-<model>.json] [--report]

Each (learner, seed) is one ``conpet run`` (one seed, the default fast path) in
``OUT/<benchmark>/<learner>/seed-<k>``; one backbone is prepared per PET method (``cofitune``
trains its own) and reused. A finished pair is written to the ``--record`` JSON (committed) at
once and never rerun, and a run directory stopped in the middle is resumed, so the table can be
filled over several sessions (seed-major: every learner gets seed 0 before any gets seed 1).
Columns: average accuracy after the stream (on a generative stream the primary metric, exact
match beside it, the reference-text perplexity after the last task), forgetting, BWT, on
classification streams the learning accuracy (a task's accuracy right after it was learned,
averaged over the tasks), training
seconds per task (``torch_threads`` in the record says how many threads ran it), tunable
parameters. Means ± sample std over the recorded seeds (``--report --seeds N``: over seeds below N only,
for a same-seed comparison while a table is still filling). A table keeps one ``train.top_layers``
(in its record's setup; each row also records the number its run resolved ``auto`` to), but for
the learners built around a PET method of their own (``requires_pet``: CoFiTune), which run with ``auto``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from record import provenance, write_record

from conpet.build import prepare
from conpet.config import from_dict, spec_dir_name
from conpet.learners import get_learner
from conpet.metrics import learning_accuracy
from conpet.runner import resume, run
from conpet.runs import load_run_config

def summary(m: dict) -> dict:
    """The table's numbers of one finished one-seed run (``metrics.json``)."""
    seed = (m.get("per_seed") or [m])[0]
    row = {"average_accuracy": seed["average_accuracy"], "forgetting": seed["forgetting"], "bwt": seed["bwt"],
           "seconds_per_task": float(np.mean(seed["train_seconds"])),
           "eval_seconds_per_task": float(np.mean(seed["eval_seconds"])),
           "tunable_params": seed["tunable_params"], "accuracy_matrix": seed["accuracy_matrix"]}
    if "reference_perplexity" in seed:  # a generative stream
        row.update({"final_exact_match": float(np.mean([v for v in seed["score_exact_match"][-1] if v is not None])),
                    "reference_perplexity": seed["reference_perplexity"][-1],
                    "base_reference_perplexity": seed["base_reference_perplexity"]})
    return row


def top_layers_setting(text: str) -> int | str | None:
    """``--top-layers`` text as the ``train.top_layers`` value it stands for (the record keeps the text)."""
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text in ("auto", "null"):
        return None if text == "null" else text
    raise argparse.ArgumentTypeError(f"a number >= 1, auto or null, not {text!r}")


def top_layers_arg(text: str) -> str:
    top_layers_setting(text)
    return text


def parse(argv: list[str] | None = None, defaults: dict | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learners", default="sequential,joint,emr*,o-lora,inflora,lae,crl,crl*,fpf,k-fpf,i-lora,osf,zscl,cofitune,"
                                          "model-surgery")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--benchmark", default="wordnet-relations")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train-per-class", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generative streams: longest answer")
    ap.add_argument("--top-layers", default="auto", type=top_layers_arg,
                    help="train.top_layers of every run (a number, auto or null); a table keeps one setting")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/learner-table"))
    ap.add_argument("--record", type=Path, default=None,
                    help="JSON record to extend (default: bench/results/learners-<benchmark>-<model>.json)")
    ap.add_argument("--report", action="store_true", help="print the table of what the record holds; run nothing")
    ap.set_defaults(**(defaults or {}))
    args = ap.parse_args(argv)
    args.record = args.record or Path(f"bench/results/learners-{args.benchmark}-{args.model}.json")
    return args


def main(argv: list[str] | None = None, defaults: dict | None = None) -> int:
    args = parse(argv, defaults)
    setup = {"model": args.model, "benchmark": args.benchmark, "epochs": args.epochs, "top_layers": args.top_layers}
    if args.max_new_tokens is not None:
        setup["max_new_tokens"] = args.max_new_tokens
    if args.max_train_per_class is not None:
        setup["max_train_per_class"] = args.max_train_per_class
    record = json.loads(args.record.read_text()) if args.record.is_file() else {**setup, "runs": []}
    if any(record.get(k) != v for k, v in setup.items()):
        raise SystemExit(f"{args.record}: records another setup; pass --record with a new file")
    learners = args.learners.split(",")
    if args.report:
        print_table({**record, "runs": [r for r in record["runs"] if r["seed"] < args.seeds]}, learners)
        return 0
    data = {"benchmark": args.benchmark, "max_train_per_class": args.max_train_per_class}
    if args.max_new_tokens is not None:
        data["max_new_tokens"] = args.max_new_tokens
    base = {"model": args.model, "data": data,
            "train": {"epochs": args.epochs, "threads": args.threads, "top_layers": top_layers_setting(args.top_layers)}}
    prepared: dict[str, object] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for learner in learners:
            if any(r["learner"] == learner and r["seed"] == seed for r in record["runs"]):
                continue
            out = args.out / args.benchmark / spec_dir_name(learner) / f"seed-{seed}"
            if not (out / "metrics.json").is_file():
                if any(out.glob("seed-*/state.json")):
                    resume(out, progress=False)
                else:
                    pet = get_learner(learner.split("[")[0]).requires_pet or "lora"
                    train = {**base["train"], "top_layers": "auto"} if pet != "lora" else base["train"]
                    cfg = from_dict({**base, "train": train, "learner": learner, "seed": seed, "out": str(out),
                                     "pet": {"method": pet}})
                    prepared[pet] = prepared.get(pet) or prepare(cfg)
                    run(cfg, progress=False, prepared=prepared[pet])
            row = {"learner": learner, "seed": seed, **summary(json.loads((out / "metrics.json").read_text())),
                   "top_layers": load_run_config(out / "config.yaml").train.top_layers,
                   "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                   "provenance": provenance()}
            record["runs"].append(row)
            write_record(args.record, record)
            print(json.dumps({k: v for k, v in row.items() if k != "accuracy_matrix"}), flush=True)
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
    generative = any("reference_perplexity" in r for r in runs)
    head = f"\n{record['benchmark']} on {record['model']}, {record['epochs']} epochs per task"
    if generative:
        by_value: dict[str, set] = {}  # the base model's figure moved in bf16 as the evaluation code changed
        for r in runs:
            if r["learner"] in learners:
                by_value.setdefault(f"{r['base_reference_perplexity']:.2f}", set()).add(r.get("date", "?"))
        base = ", ".join(f"{v} (rows of {', '.join(sorted(dates))})" for v, dates in sorted(by_value.items())) \
            if len(by_value) > 1 else next(iter(by_value), "-")
        print(head + f", greedy answers up to {record.get('max_new_tokens')} tokens; reference perplexity of the "
                     f"base model: {base}")
        print("| learner | seeds | avg score % | final exact match % | forgetting % | BWT % | reference ppl | s / task |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print(head)
        print("| learner | seeds | avg accuracy % | forgetting % | BWT % | learning acc % | s / task | tunable params |")
        print("|---|---|---|---|---|---|---|---|")
    for learner in learners:
        mine = [r for r in runs if r["learner"] == learner]
        if not mine:
            continue
        col = lambda k: [r[k] for r in mine]  # noqa: E731
        if generative:
            print(f"| {learner} | {len(mine)} | {cell(col('average_accuracy'))} | {cell(col('final_exact_match'))} | "
                  f"{cell(col('forgetting'))} | {cell(col('bwt'))} | {cell(col('reference_perplexity'), 1.0)} | "
                  f"{cell(col('seconds_per_task'), 1.0, 1)} |")
        else:
            print(f"| {learner} | {len(mine)} | {cell(col('average_accuracy'))} | {cell(col('forgetting'))} | "
                  f"{cell(col('bwt'))} | {cell([learning_accuracy(r['accuracy_matrix']) for r in mine])} | "
                  f"{cell(col('seconds_per_task'), 1.0, 1)} | {mine[0]['tunable_params']:,} |")


if __name__ == "__main__":
    sys.exit(main())
