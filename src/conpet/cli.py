"""The ``conpet`` command line: a thin layer over the Python API.

    conpet run [--config FILE] [--model M] [--learner L] [--benchmark B | --data FILE ...]
    conpet report DIR [DIR ...] [--plot FILE]
    conpet search SPACE.yaml --out DIR [--tune-on A --eval-on B] [--storage URL --study NAME]
    conpet benchmarks | learners | pets

Any user error (bad data, bad config, missing model) prints one line ``conpet: error: ...``
and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from conpet import __version__, distributed
from conpet.adapters import compress_run, export_peft, merge_run
from conpet.config import (default_out, load_config, parse_learner_spec, parse_override, spec_dir_name,
                           split_learner_specs)
from conpet.data.benchmarks import BENCHMARKS, benchmark_meta
from conpet.data.formats import read_rows
from conpet.data.stream import Row
from conpet.errors import ConpetError, ConpetWarning
from conpet.learners import LEARNERS
from conpet.merging import MERGE_METHODS
from conpet.pet import PET_METHODS
from conpet.search import is_search_dir, report_search, search
from conpet.predict import predict
from conpet.serve import ServeSettings, serve
from conpet.vllm_export import export_vllm
from conpet.plots import plot_comparison
from conpet.report import load_run, metrics_table, orders_table, per_task_seconds_table
from conpet.runner import evaluate_run, resume, run, run_many
from conpet.runs import atomic_write_json, verify_run

RUN_FLAGS = [
    # flag, config key, type, help
    ("--model", "model", str, "minilm, smollm2, a local HF model folder or a .gguf file (default: minilm)"),
    ("--learner", "learner", str, "continual learner: sequential, joint, emr*, dynamic, ... (see `conpet learners`); a comma-separated list runs each on the same data and model and prints one comparison; per-learner options in brackets, e.g. 'dynamic,dynamic[top_k=2]' (default: sequential)"),
    ("--benchmark", "data.benchmark", str, "built-in benchmark (default: wordnet-typing; see `conpet benchmarks`)"),
    ("--data", "data.file", str, "your own rows: JSONL/CSV/Parquet or a datasets save_to_disk folder (text, label, "
     "optional split/entity/head/tail; or prompt, target, task)"),
    ("--tasks", "data.tasks", str, "task file: JSON/YAML list of label groups (with --data)"),
    ("--n-tasks", "data.n_tasks", int, "split the labels of --data into N tasks at random (seeded)"),
    ("--template", "data.template", str, "prompt template: auto, typing, relation, text"),
    ("--setting", "data.setting", str, "class-incremental (default) or task-incremental"),
    ("--max-train-per-class", "data.max_train_per_class", int, "cap on training rows per class"),
    ("--pet", "pet.method", str, "PET method (default: lora; see `conpet pets`)"),
    ("--epochs", "train.epochs", int, "epochs per task (default: 3)"),
    ("--batch-size", "train.batch_size", int, "training batch size (default: 16)"),
    ("--lr", "train.lr", float, "learning rate of the PET module (default: 1e-3)"),
    ("--device", "train.device", str, "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"),
    ("--precision", "train.precision", str, "auto (bf16 where the device runs it, fp16 on older GPUs), "
     "bf16, fp16 or fp32"),
    ("--grad-accum", "train.grad_accum", int, "micro-batches per optimizer step (same global batch)"),
    ("--quantize", "backbone.quantize", str, "nf4 or int8: a quantized frozen backbone (QLoRA; CUDA)"),
    ("--pooling", "backbone.pooling", str, "auto, cloze, mean or last: how a classification row becomes one "
     "feature vector (auto: the cloze slot)"),
    ("--threads", "train.threads", int, "torch threads (default: all cores)"),
    ("--seeds", "seeds", int, "number of seeds; reports mean ± std (default: 1)"),
    ("--orders", "orders", int, "task orders: the stream's own + N-1 seeded permutations, each in "
     "OUT/order-<k>; reports mean ± std over orders (default: 1)"),
    ("--seed", "seed", int, "first seed (default: 0)"),
    ("--out", "out", str, "run directory (default: runs/<learner>-<pet>-<model>-<data>)"),
]


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="learn a continual stream and write a run directory",
                       description="Learn a stream of tasks with a continual learner and a PET method. "
                                   "Writes config.yaml, metrics.json, summary.md, plots and per-task "
                                   "adapters (peft format) into the run directory.")
    p.add_argument("--config", help="YAML config file (flags below override it)")
    for flag, key, tp, help_text in RUN_FLAGS:
        p.add_argument(flag, dest=key, type=tp, default=None, help=help_text)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set pet.options.r=4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per task instead)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last finished task "
                   "(and in-task checkpoint) with the configuration saved in DIR; no other flag applies")


def cmd_run(args) -> int:
    if args.resume:
        return resume_run(args)

    overrides = {key: getattr(args, key) for _, key, _, _ in RUN_FLAGS}
    if overrides.get("data.file"):
        overrides.setdefault("data.benchmark", None)
    learners = split_learner_specs(args.learner or "")
    if len(learners) > 1:
        return run_compare(args, overrides, learners)
    name, options = parse_learner_spec(learners[0]) if learners else (None, {})
    if name:
        overrides["learner"] = name
    cfg = load_config(args.config, overrides, args.sets)
    cfg.learner_options.update(options)
    cfg.out = cfg.out or str(default_out(cfg))
    progress = None if not args.no_progress else False
    metrics = run(cfg, progress=progress)
    if not distributed.is_main():  # one process prints (torchrun, accelerate launch)
        return 0
    name = f"{cfg.learner}/{cfg.pet.method}/{cfg.model}"
    if cfg.orders > 1:
        print_orders([(name, metrics)], cfg.out)
        return 0
    print(f"\n{metrics['run']['benchmark']}: {len(metrics['run']['tasks'])} tasks, "
          f"{cfg.seeds} seed(s), {cfg.data.setting}")
    print(metrics_table([(name, metrics)]))
    print()
    print(per_task_seconds_table([(name, metrics)]))
    print(f"\nrun directory: {cfg.out}  (summary.md, metrics.json, plots, adapters/)")
    return 0


def resume_run(args) -> int:
    given = [flag for flag, key, _, _ in RUN_FLAGS if getattr(args, key) is not None and flag != "--device"]
    if given or args.sets or args.config:
        raise ConpetError(f"--resume uses the configuration saved in the run directory; drop "
                          f"{', '.join(given) or '--set/--config'} (only --device may change)")
    metrics = resume(args.resume, progress=None if not args.no_progress else False,
                     device=getattr(args, "train.device"))
    if not distributed.is_main():
        return 0
    run = metrics["run"]
    if "over_orders" in metrics:
        print_orders([(f"{run['learner']}/{run['pet']}/{run['model']}", metrics)], args.resume)
        return 0
    print(f"\n{run['benchmark']}: {len(run['tasks'])} tasks (resumed)")
    print(metrics_table([(f"{run['learner']}/{run['pet']}/{run['model']}", metrics)]))
    print(f"\nrun directory: {args.resume}")
    return 0


def cmd_serve(args) -> int:
    values = {name: getattr(args, name) for name in ServeSettings.names() if getattr(args, name, None) is not None}
    serve(args.run_dir, ServeSettings(**values))
    return 0


def cmd_verify(args) -> int:
    problems, notes = verify_run(args.run_dir)
    for line in notes:
        print(line)
    for line in problems:
        print(f"PROBLEM {line}")
    print(f"{args.run_dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def _print_accuracy(result: dict) -> None:
    for task, acc in result["per_task"].items():
        print(f"  {task:12s} {100 * acc:6.2f}%")
    print(f"average accuracy {100 * result['average_accuracy']:.2f}%, whole accuracy "
          f"{100 * result['whole_accuracy']:.2f}% (seed {result['seed']})")


def _evaluate_output(out: str, info: dict, seed: int | None = None) -> None:
    """Test accuracy of a merged/compressed run directory, printed and saved beside ``info``."""
    result = evaluate_run(out, seed)
    _print_accuracy(result)
    atomic_write_json(Path(out) / "metrics.json", {**info, **result})


def cmd_evaluate(args) -> int:
    _print_accuracy(evaluate_run(args.run_dir, args.seed, device=args.device))
    return 0


def cmd_merge(args) -> int:
    if args.list:
        for name, m in MERGE_METHODS.items():
            print(f"{name:16s} {m.paper}\n{'':16s} defaults: {m.defaults}")
        return 0
    if not args.run_dir or not args.out:
        raise ConpetError("merge: give RUN_DIR and --out (or --list)")
    options = dict(parse_override(pair) for pair in args.sets)
    info = merge_run(args.run_dir, args.method, args.rank, args.out, args.seed, **options)
    print(f"merged {info['tasks_merged']} experts with {args.method} {options or ''} -> rank {args.rank}; "
          f"relative reconstruction error mean {info['mean_relative_reconstruction_error']:.4f}, "
          f"max {info['max_relative_reconstruction_error']:.4f}")
    if not args.no_eval:
        _evaluate_output(args.out, info, info["seed"])
    print(f"run directory: {args.out}")
    return 0


def cmd_compress(args) -> int:
    info = compress_run(args.run_dir, args.density, args.out, args.alpha)
    print(f"ComPEFT density {args.density}, alpha {args.alpha}: adapters {info['adapter_bytes']:,} bytes -> "
          f"{info['compressed_bytes']:,} bytes on disk (x{info['compression_ratio']:.1f} smaller)")
    if not args.no_eval:
        _evaluate_output(args.out, info)
    print(f"run directory: {args.out}")
    return 0


def cmd_export(args) -> int:
    if args.to == "vllm":
        done = export_vllm(args.run_dir, args.out, args.seed)
        for task, folder in done["tasks"].items():
            print(f"{task}: {Path(args.out) / folder} (rank {done['ranks'][folder]})")
        print(f"serve it: see {Path(args.out) / 'README.md'}")
        return 0
    for folder in export_peft(args.run_dir, args.out, args.seed):
        print(folder)
    return 0


def run_compare(args, overrides: dict, learners: list[str]) -> int:
    """``conpet run --learner a,b,c``: the same stream and model for several learners, one table."""
    cfg = load_config(args.config, {**overrides, "learner": learners[0]}, args.sets)
    out = Path(cfg.out) if cfg.out else default_out(cfg, compare=True)
    results = run_many(cfg, learners, out, progress=None if not args.no_progress else False)
    rows = [(name, m) for name, m in results.items()]
    if cfg.orders > 1:
        print_orders(rows, f"{out}/<learner>")
        return 0
    first = next(iter(results.values()))
    print(f"\n{first['run']['benchmark']}: {len(first['run']['tasks'])} tasks, {cfg.seeds} seed(s), "
          f"{cfg.data.setting}, {cfg.pet.method} on {cfg.model}")
    print(metrics_table(rows))
    print()
    print(per_task_seconds_table(rows))
    plot_comparison([(spec, load_run(out / spec_dir_name(spec))) for spec in results], out / "comparison.png")
    print(f"\ncomparison plot: {out / 'comparison.png'}")
    print(f"run directories: {out}/<learner>  (compare again with `conpet report {out}/*`)")
    return 0


def print_orders(rows: list[tuple[str, dict]], where: str) -> None:
    """The summary of ``--orders N`` runs: each order's tasks, then mean ± std over orders."""
    first = rows[0][1]
    print(f"\n{first['run']['benchmark']}: {first['n_orders']} task orders x {first['orders'][0]['n_seeds']} "
          f"seed(s), {first['run']['setting']}")
    for k, order in enumerate(first["orders"], start=1):
        print(f"  order {k}: {' -> '.join(order['tasks'])}")
    print(orders_table(rows))
    print(f"\nper-order run directories: {where}/order-<k>  (`conpet report {where}/order-*`)")


def cmd_predict(args) -> int:
    if args.file:
        rows = read_rows(args.file, require_label=False)
    elif args.texts:
        rows = [Row(text=t, label="", entity=args.entity, head=args.head, tail=args.tail, where="argument")
                for t in args.texts]
    else:
        raise ConpetError("predict: give TEXT arguments or --file FILE")
    results = predict(args.run_dir, rows, seed=args.seed, device=args.device, task=args.task)
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    for r in results:
        conf = "" if r["confidence"] is None else f" ({r['confidence']:.2f})"
        if "prompt" in r:  # a generative run
            who = f"  [task {r['task']}{conf}]" if r["task"] else ""
            print(f"{r['prompt'][:70]}\n  -> {r['text']}{who}")
            continue
        print(f"{r['label']:24s} p={r['score']:.2f}  task {r['task'] + conf:24s} {r['text'][:70]}")
    return 0


def cmd_search(args) -> int:
    result = search(args.space, args.out, tune_on=args.tune_on, eval_on=args.eval_on, storage=args.storage,
                    study_name=args.study, sampler=args.sampler, seed=args.seed, trials=args.trials,
                    prune=not args.no_prune, heartbeat=args.heartbeat, eval_seeds=args.eval_seeds,
                    progress=args.progress)
    print(report_search(result.out))
    print(f"search folder: {result.out} (search.md, pareto.png, best/*.yaml)")
    return 0


def cmd_report(args) -> int:
    searches = [d for d in args.dirs if is_search_dir(Path(d))]
    for d in searches:
        print(report_search(Path(d)))
    if len(searches) == len(args.dirs):
        return 0
    args.dirs = [d for d in args.dirs if d not in searches]
    runs = [(Path(d).name, load_run(d)) for d in args.dirs]
    print(metrics_table(runs))
    print()
    print(per_task_seconds_table(runs))
    plot = Path(args.plot) if args.plot else Path(args.dirs[0]).parent / "comparison.png"
    plot_comparison(runs, plot)
    print(f"\ncomparison plot: {plot}")
    return 0


def cmd_list(args) -> int:
    if args.command == "benchmarks":
        for name in BENCHMARKS:
            meta = benchmark_meta(name)
            n = sum(sum(c.values()) for c in meta["counts"].values())
            classes = "generative" if meta["kind"] == "generate" else f"{len(meta['counts'])} classes"
            print(f"{name:20s} {meta['kind']:9s} {len(meta['tasks'])} tasks, {classes}, {n} rows. {meta['description']}")
    elif args.command == "learners":
        for name, cls in sorted(LEARNERS.items()):
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            paper = cls.paper
            works = (["generative streams"] * cls.generative + ["backbone.fsdp"] * cls.shards_backbone
                     + ["a module per task"] * cls.module_per_task + [f"routes by {cls.routes}"] * bool(cls.routes)
                     + [f"needs --pet {cls.requires_pet}"] * bool(cls.requires_pet))
            print(f"{name:12s} {doc}" + (f"\n{'':12s} paper: {paper}" if paper else "")
                  + (f"\n{'':12s} also: {', '.join(works)}" if works else ""))
    else:
        for name, cls in sorted(PET_METHODS.items()):
            print(f"{name:17s} {cls.paper}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conpet", description="Continual parameter-efficient tuning of LLMs.")

    parser.add_argument("--version", action="version", version=f"conpet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    p = sub.add_parser("report", help="print runs side by side and write a comparison plot",
                       description="Print the metrics of one or more run directories side by side "
                                   "and write a comparison plot.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (written by `conpet run`)")
    p.add_argument("--plot", help="comparison plot path (default: comparison.png beside the first DIR)")
    p = sub.add_parser("search", help="search PET x placement x size x learner settings (Optuna, two-phase)",
                       description="Multi-objective configuration search (dev accuracy up, tunable parameters "
                                   "and training seconds down) over a YAML space, tuned on the dev rows of one "
                                   "stream and, with --eval-on, reported on another (docs/search.md).")
    p.add_argument("space", metavar="SPACE.yaml", help="the search space (base config + params)")
    p.add_argument("--out", required=True, help="the search folder (trials, search.md, pareto.png, best/*.yaml)")
    p.add_argument("--tune-on", help="phase 1 stream: a benchmark, a data file, or NAME[tasks=START:STOP]")
    p.add_argument("--eval-on", help="phase 2 stream (same scenario), reported on its test rows")
    p.add_argument("--eval-seeds", type=int, default=3, help="seeds of each phase 2 run (default: 3)")
    p.add_argument("--storage", help="Optuna storage URL shared by workers (default: sqlite in --out)")
    p.add_argument("--study", help="study name (default: the --out folder's name); workers with the same "
                                   "storage and study share the trials")
    p.add_argument("--sampler", default="tpe", help="tpe (default: multi-objective TPE), nsga2 or random")
    p.add_argument("--trials", type=int, help="finished trials to reach (default: the space's 'trials')")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (each worker adds its process id)")
    p.add_argument("--no-prune", action="store_true", help="never stop a trial early")
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between a worker's heartbeats; a trial "
                                                             "silent for twice that is failed and retried")
    p.add_argument("--progress", action="store_true", help="progress bars for each trial")
    p = sub.add_parser("predict", help="answer inputs with a run's modules",
                       description="Classify each input (or answer each prompt of a generative run) with the "
                                   "modules of the tasks a run has finished (any learner). Prints the label, "
                                   "its probability, the task that answered and the router's confidence.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--file", help="JSONL/CSV rows to classify (text, and entity or head/tail)")
    p.add_argument("--entity", help="the entity of the TEXTs (typing runs)")
    p.add_argument("--head", help="the head of the TEXTs (relation runs)")
    p.add_argument("--tail", help="the tail of the TEXTs (relation runs)")
    p.add_argument("--seed", type=int, help="which seed's modules (default: the run's first seed)")
    p.add_argument("--device", help="where to predict (default: the run's train.device), e.g. cpu")
    p.add_argument("--task", help="answer as this task's (its module, its labels) instead of the run's routing")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p = sub.add_parser("evaluate", help="test accuracy of a run's final modules on its stream",
                       description="Test accuracy (per task, average, whole) of a run's final modules on the "
                                   "stream named in its config.yaml; works on merged and compressed runs too.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--seed", type=int, help="which seed's modules (default: the run's first seed)")
    p.add_argument("--device", help="where to evaluate (default: the run's train.device), e.g. cpu")
    p = sub.add_parser("merge", help="merge a dynamic run's per-task LoRA experts into one module",
                       description="Merge the per-task experts of a `dynamic` run on their weight updates dW "
                                   "(task arithmetic, TIES, DARE, Breadcrumbs, ...; `conpet merge --list`), "
                                   "factor the result back to one LoRA of rank --rank by truncated SVD, and write "
                                   "a run directory that `conpet predict`/`evaluate` load (a plain peft adapter).")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?")
    p.add_argument("--method", default="ties", help="merge method (default: ties)")
    p.add_argument("--rank", type=int, default=8, help="rank of the merged LoRA (default: 8)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a merge option, e.g. --set density=0.2 --set scaling=1.0 (repeatable)")
    p.add_argument("--seed", type=int, help="which seed's experts (default: the run's first seed)")
    p.add_argument("--out", help="output run directory")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the merged module on the test split")
    p.add_argument("--list", action="store_true", help="list the merge methods, their papers and defaults")
    p = sub.add_parser("compress", help="ComPEFT-compress every LoRA module of a run",
                       description="Keep the top --density magnitudes of every LoRA tensor as sign x one scale "
                                   "per tensor (ComPEFT), stored packed; writes a run directory that `conpet "
                                   "predict`/`evaluate` load. Prints bytes on disk and the compression ratio.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--density", type=float, required=True, help="fraction of entries kept, e.g. 0.1")
    p.add_argument("--alpha", type=float, default=1.0, help="scale = alpha x std of the tensor (default: 1)")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the compressed modules")
    p = sub.add_parser("export", help="write a run's final modules as plain peft adapter folders",
                       description="Write the modules prediction uses (every expert and the selector of a "
                                   "dynamic run; the final module otherwise) as plain peft folders, decompressing "
                                   "ComPEFT modules.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, help="which seed (default: the run's first seed)")
    p.add_argument("--to", choices=("peft", "vllm"), default="peft",
                   help="peft: the modules as saved; vllm: one LoRA folder per task in the form vLLM loads, checked "
                        "against the base model, with the `vllm serve` line in README.md (generative runs)")
    p = sub.add_parser("serve", help="answer requests with a run's modules over HTTP (OpenAI-compatible)",
                       description="Serve a run (finished or still training) on OpenAI-compatible endpoints: "
                                   "/v1/chat/completions and /v1/completions (generative runs), /v1/classify, "
                                   "/v1/models (auto + each task), /health, /metrics. Tasks the run finishes "
                                   "later are loaded live. Binds 127.0.0.1 unless --api-key-file is given.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    defaults = ServeSettings()
    for name, kind, help_text in [
            ("host", str, "address to bind (default 127.0.0.1; any other needs --api-key-file)"),
            ("port", int, "port (default 8000; 0: any free port, printed at start)"),
            ("api_key_file", str, "file whose first line is the key clients send as Authorization: Bearer KEY"),
            ("max_batch", int, f"most rows one forward pass serves (default {defaults.max_batch})"),
            ("max_wait_ms", float, f"how long the first request waits for others to batch with "
                                   f"(default {defaults.max_wait_ms:g})"),
            ("max_body_bytes", int, f"largest request body (default {defaults.max_body_bytes})"),
            ("max_prompt_tokens", int, "longest prompt or row in tokens (default: the run's train.max_length)"),
            ("max_tokens", int, f"largest max_tokens a request may ask (default {defaults.max_tokens})"),
            ("max_rows", int, f"most inputs in one request (default {defaults.max_rows})"),
            ("max_in_flight", int, f"requests answered at once; beyond: 429 (default {defaults.max_in_flight})"),
            ("timeout_s", float, f"seconds before an unanswered request gets 503 (default {defaults.timeout_s:g})"),
            ("watch_s", float, f"seconds between looks for newly finished tasks; 0: only POST /admin/reload "
                               f"(default {defaults.watch_s:g})"),
            ("upstream", str, "an OpenAI-compatible server (e.g. vLLM) holding the run's adapters exported by "
                              "`conpet export --to vllm`: only the router runs here, each request is answered "
                              "there with model=<task>"),
            ("upstream_key_file", str, "file holding the upstream server's API key, if it needs one"),
            ("seed", int, "which seed's modules (default: the run's first seed)"),
            ("device", str, "where to answer (default: the run's train.device), e.g. cpu")]:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=help_text)
    p = sub.add_parser("verify", help="check a run directory's files against their recorded SHA-256",
                       description="Check every artifact of a run directory against manifest.json (or, for an "
                                   "unfinished run, the adapter hashes in each seed's state.json). Exit 1 when a "
                                   "file is missing or changed.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    for name, help_text in [("benchmarks", "list the built-in benchmarks"), ("learners", "list the learners"),
                            ("pets", "list the PET methods")]:
        sub.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``conpet: warning: ...`` for the user's input (once per process: rank 0 under a launcher);
    other warnings as Python prints them."""
    if issubclass(category, ConpetWarning):
        if distributed.is_main():
            print(f"conpet: warning: {message}", file=sys.stderr)
        return
    print(warnings.formatwarning(message, category, filename, lineno, line), file=file or sys.stderr, end="")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    handlers = {"run": cmd_run, "report": cmd_report, "predict": cmd_predict, "serve": cmd_serve,
                "verify": cmd_verify,
                "evaluate": cmd_evaluate, "merge": cmd_merge, "compress": cmd_compress, "export": cmd_export,
                "search": cmd_search}
    try:
        return handlers.get(args.command, cmd_list)(args)
    except ConpetError as e:
        if not distributed.is_main():  # rank 0 says it once
            return 2
        print(f"conpet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conpet: interrupted; finished tasks are saved in the run directory", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
