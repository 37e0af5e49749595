"""How much accuracy does the fast path cost? ``train.top_layers`` L in {4, 8, 12, all} on every
built-in stream, several seeds, with dev accuracy reported beside test accuracy.

    python bench/top_layers_sweep.py [--streams wordnet-typing,wordnet-relations,wordnet-fine,debian-sections]
        [--layers 4,8,12,all] [--seeds 3] [--learner 'emr*'] [--model smollm2] [--out runs/top-layers-sweep]
        [--record bench/results/top-layers-sweep-3seeds.json]

Each (stream, L) is one ``conpet run`` (``data.report_dev: true``) in its own run directory;
finished ones are reused, so the sweep can be stopped and started again: a (stream, L) already in
the ``--record`` file (a committed JSON summary, written after every finished pair) is not rerun, and a
run directory stopped in the middle is continued with ``conpet.runner.resume``; the sweep can span
several sessions. L = 4, 8, 12: LoRA on
every linear layer of the top L layers, lower layers cached (conpet's confined default); ``all``:
LoRA in every layer on peft's default targets (q, v), no cache: what a plain peft loop does.
The rule for the default is read off the **dev** columns of the WordNet streams; ``debian-sections``
(held out, docs/debian-sections.md) then checks it. Test columns are printed for the record and
are never the basis of the choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import torch

from record import provenance

from conpet.config import from_dict
from conpet.runner import resume, run

PER_CLASS = {"wordnet-typing": 16, "wordnet-relations": 32, "wordnet-fine": 16, "debian-sections": 32}
HELD_OUT = "debian-sections"


def last_row_mean(per_seed: list[dict], key: str) -> list[float]:
    return [100 * float(np.mean([v for v in s[key][-1] if v is not None])) for s in per_seed]


def read_record(path: Path, setup: dict) -> dict:
    """The committed summary of an earlier (possibly partial) sweep with the same setup, or a new one."""
    if path.is_file():
        record = json.loads(path.read_text())
        if all(record.get(k) == v for k, v in setup.items()):
            return record
        raise SystemExit(f"{path}: records another setup ({ {k: record.get(k) for k in setup} }); "
                         f"pass --record with a new file")
    return {**setup, "command": "python " + " ".join(sys.argv), "rows": []}


def write_record(path: Path, record: dict) -> None:
    """The record with the provenance of this invocation on top; each row keeps its own."""
    from record import write_record as write

    write(path, record)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default=",".join(PER_CLASS))
    ap.add_argument("--layers", default="4,8,12,all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--learner", default="emr*")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/top-layers-sweep"))
    ap.add_argument("--record", type=Path, default=None,
                    help="JSON summary to reuse and extend (default: bench/results/top-layers-sweep-<N>seeds.json)")
    args = ap.parse_args()
    record_path = args.record or Path(f"bench/results/top-layers-sweep-{args.seeds}seed{'s' if args.seeds > 1 else ''}.json")
    setup = {"model": args.model, "learner": args.learner, "epochs": args.epochs, "seeds": args.seeds}
    record = read_record(record_path, setup)
    rows, t0 = [], time.perf_counter()
    for stream in args.streams.split(","):
        for layers in args.layers.split(","):
            done = [r for r in record["rows"] if (r["stream"], r["layers"]) == (stream, layers)]
            if done:
                rows.append(done[0])
                print(json.dumps(rows[-1]), "(recorded)", flush=True)
                continue
            top = None if layers == "all" else int(layers)
            out = args.out / stream / f"L{layers}"
            if not (out / "metrics.json").is_file():
                if any(out.glob("seed-*/state.json")):
                    resume(out, progress=False)
                else:
                    cfg = from_dict({"model": args.model, "learner": args.learner, "seeds": args.seeds,
                                     "out": str(out),
                                     "data": {"benchmark": stream, "max_train_per_class": PER_CLASS.get(stream),
                                              "report_dev": True},
                                     "train": {"epochs": args.epochs, "top_layers": top}})
                    run(cfg, progress=False)
            m = json.loads((out / "metrics.json").read_text())
            per_seed = m.get("per_seed") or [m]
            dev, test = last_row_mean(per_seed, "dev_accuracy"), [100 * s["average_accuracy"] for s in per_seed]
            seconds = [float(np.mean(s["train_seconds"])) for s in per_seed]
            rows.append({"stream": stream, "layers": layers, "dev": dev, "test": test, "seconds_per_task": seconds,
                         "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                         "provenance": provenance()})
            record["rows"].append(rows[-1])
            write_record(record_path, record)
            print(json.dumps(rows[-1]), flush=True)

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    print(f"\n{args.learner} on {args.model}, {args.epochs} epochs, {args.seeds} seed(s): average accuracy after the "
          "stream, dev (the choice) and test (the record), training seconds per task")
    print("| stream | L | dev % | test % | s / task |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stream']} | {r['layers']} | {cell(r['dev'])} | {cell(r['test'])} | "
              f"{np.mean(r['seconds_per_task']):.1f} |")
    chosen = [r for r in rows if r["stream"] != HELD_OUT]
    if chosen:
        by_layers: dict[str, list[float]] = {}
        for r in chosen:
            by_layers.setdefault(r["layers"], []).append(float(np.mean(r["dev"])))
        best = max(by_layers, key=lambda k: np.mean(by_layers[k]))
        print(f"\nmean dev accuracy over {sorted({r['stream'] for r in chosen})}: "
              + ", ".join(f"L={k}: {np.mean(v):.2f}" for k, v in by_layers.items()) + f" -> best L={best}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
