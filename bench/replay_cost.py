"""Training seconds per task: dynamic replay (flat) against full replay (growing).

    python bench/replay_cost.py [--model minilm] [--benchmark wordnet-typing] [--epochs 2]
                                [--top-layers 4 --all-linear] [--max-train-per-class 32]

Runs, one after the other in this process on the same machine:

- ``emr*``: EMR on ConPET's dynamic replay schedule (a fixed number of steps per task, half new
  rows, half old rows from uniformly chosen old tasks);
- ``emr`` with an unbounded memory (``memory_per_class`` larger than any class): the original
  schedule then replays the *whole* history every epoch, so task t costs ~t times task 1;
- ``dynamic`` (Dynamic ConPET) with ``top_k`` 1 and 2: the selector (and with k = 2 the expert)
  trains on the replay schedule; the work of a step must not grow with the number of old tasks.

Prints training seconds for t = 1..T and the ratio task T / task 2 for each; the ConPET claim is
that the ``*`` schedule and Dynamic ConPET stay flat (within 15%). The literature's learners
(``o-lora``, ``inflora``, ``lae``, ``crl``, ``crl*``, ``fpf``, ``k-fpf``) can be added; for those
whose steps follow the task's size a second table gives milliseconds per training row. ``--learners`` picks a subset. Both learners run in one process on one loaded
backbone; with ``--top-layers`` the lower-layer cache is built for every training row before
any timing starts, so neither learner pays for it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    from conpet.build import prepare
    from conpet.config import from_dict
    from conpet.learners import get_learner
    from conpet.runner import run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--benchmark", default="wordnet-typing")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--top-layers", type=int, default=None, help="train.top_layers (the cached fast path)")
    p.add_argument("--all-linear", action="store_true", help="LoRA on every linear layer (peft's all-linear)")
    p.add_argument("--max-train-per-class", type=int, default=None)
    p.add_argument("--learners", default="emr*,emr,dynamic,dynamic-k2",
                   help="comma-separated subset of: emr*, emr, dynamic, dynamic-k2, sequential, o-lora, inflora, lae, crl, "
                        "crl*, fpf, k-fpf, i-lora, osf, zscl, cofitune, model-surgery")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    # a fixed number of steps per task (the wordnet-typing tasks have 3 or 4 classes, so the
    # default rule, epochs * new rows / n_new, would vary with the task's size, not its index)
    steps = 16 * args.epochs * 2
    known = {
        "emr*": ("emr* (dynamic replay)", {"learner": "emr*", "learner_options": {"steps_per_task": steps}}),
        "emr": ("emr, full history", {"learner": "emr", "learner_options": {"memory_per_class": 100000}}),
        "dynamic": ("dynamic k=1", {"learner": "dynamic", "learner_options": {"steps_per_task": steps}}),
        "dynamic-k2": ("dynamic k=2", {"learner": "dynamic", "learner_options": {"steps_per_task": steps,
                                                                                    "top_k": 2}}),
        "sequential": ("sequential", {"learner": "sequential"}),
        "o-lora": ("o-lora", {"learner": "o-lora"}),
        "inflora": ("inflora", {"learner": "inflora"}),
        "lae": ("lae", {"learner": "lae"}),
        "crl": ("crl", {"learner": "crl"}),
        "crl*": ("crl* (dynamic replay)", {"learner": "crl*", "learner_options": {"steps_per_task": steps}}),
        "fpf": ("fpf", {"learner": "fpf"}),
        "k-fpf": ("k-fpf", {"learner": "k-fpf"}),
        "i-lora": ("i-lora", {"learner": "i-lora"}),
        "osf": ("osf", {"learner": "osf"}),
        "zscl": ("zscl", {"learner": "zscl"}),  # needs a causal LM (--model smollm2)
        "cofitune": ("cofitune", {"learner": "cofitune", "pet": "cofitune"}),
        "model-surgery": ("model-surgery", {"learner": "model-surgery"}),
    }
    configs = dict(known[name.strip()] for name in args.learners.split(","))
    lora = {"method": "lora", "options": {"target_modules": "all-linear"} if args.all_linear else {}}
    results, ready = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in configs.items():
            # one prepared backbone per PET method (CoFiTune caches below its own window) and LM-head need
            pet = {"method": extra["pet"], "options": {}} if "pet" in extra else lora
            cfg = from_dict({"model": args.model, "learner": extra["learner"],
                             "learner_options": extra.get("learner_options", {}),
                             "train": {"epochs": args.epochs, "top_layers": args.top_layers if "pet" not in extra
                                       else "auto"},
                             "data": {"benchmark": args.benchmark, "max_train_per_class": args.max_train_per_class},
                             "pet": pet, "out": str(Path(tmp) / name.replace(" ", "_"))})
            key = (pet["method"], get_learner(cfg.learner).needs_lm_head)
            if key not in ready:
                ready[key] = prepare(cfg)
                stream, engine = ready[key]
                engine.warm([i for task in stream.tasks for i in task.train])  # no learner pays for the cache
            m = run(cfg, progress=False, prepared=ready[key])
            results[name] = {"train_seconds": m["train_seconds"], "train_samples": m["train_samples"],
                             "average_accuracy": m["average_accuracy"]}
    T = len(next(iter(results.values()))["train_seconds"])
    print(f"\n{args.model} on {args.benchmark}, {args.epochs} epochs: training seconds per task")
    print("task  " + "  ".join(f"{n:>24s}" for n in results))
    for t in range(T):
        print(f"{t + 1:4d}  " + "  ".join(f"{r['train_seconds'][t]:24.1f}" for r in results.values()))
    print("T/2   " + "  ".join(f"{r['train_seconds'][-1] / r['train_seconds'][1]:24.2f}" for r in results.values()))
    if T >= 10:
        print("10/5  " + "  ".join(f"{r['train_seconds'][9] / r['train_seconds'][4]:24.2f}" for r in results.values()))
    print("avg acc" + "  ".join(f"{100 * r['average_accuracy']:23.2f}%" for r in results.values()))
    # learners whose steps follow the task's size (o-lora, lae, fpf...): the cost of a training row
    print("\nmilliseconds per training row (seconds / rows trained on, the task's size factored out)")
    for t in range(T):
        print(f"{t + 1:4d}  " + "  ".join(f"{1000 * r['train_seconds'][t] / max(1, r['train_samples'][t]):24.2f}"
                                          for r in results.values()))
    per_row = [[s / max(1, n) for s, n in zip(r["train_seconds"], r["train_samples"])] for r in results.values()]
    print("T/2   " + "  ".join(f"{row[-1] / row[1]:24.2f}" for row in per_row))
    if args.json:
        from record import write_record

        write_record(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
