"""Speed benchmark: conpet against HF Trainer + peft on the same data, LoRA config and epochs.

    python bench/speed.py [--model smollm2] [--benchmark wordnet-typing] [--tasks 2] [--epochs 3]
                          [--top-layers 8] [--device cpu|cuda] [--json bench/results/speed-smollm2.json]

Every configuration runs in its own subprocess (so peak RSS is its own), one after the other on
the same machine, in one invocation:

- ``peak``: fp32 and bf16 matmul throughput of the device (2048^3 on a CPU with all threads,
  8192^3 on a GPU), the reference for "achieved GFLOP/s";
- ``trainer``: HF Trainer + peft as a careful user configures it: bf16 autocast where the CPU
  supports it, dynamic padding, ``train_sampling_strategy="group_by_length"``, no LM head (the
  same cloze classifier), the same AdamW groups, no checkpoints or logging; the frozen weights
  stay fp32 (``from_pretrained``'s default);
- ``trainer-bf16``: the same, with the base model loaded in bf16 (``dtype=torch.bfloat16``, every
  frozen weight: linears, embeddings, norms), as a careful peft user does when the device has
  bf16; peft keeps its LoRA weights in fp32. Left out on a device without native bf16, where
  that user keeps fp32 weights (``--emulated-bf16`` runs it there too). Ratios are quoted
  against the faster trainer arm;
- ``conpet``: conpet's loop with the same LoRA in every layer, step for step (same batches size,
  epochs, optimizer);
- ``conpet-fast``: conpet's fast path (LoRA in the top L layers, lower layers computed once per
  row and cached; the cache build is included in the timing).

Each reports wall seconds of training, samples/s, real (non-pad) tokens/s, achieved GFLOP/s
(model FLOPs actually needed, counted per real token: forward 2 x layer params + attention, and
backward to the inputs of every layer at or above the lowest PET layer, i.e. another 2 x), its
ratio to the two measured peaks, peak RSS (and peak device memory on a GPU), and test accuracy
after training. Ratios are conpet / trainer, each computed one way and labelled so: speed and
epoch time as ratios of the means over seeds, peak RSS (and device memory) as the ratio of the
means over seeds, against each trainer arm, the faster one (higher mean samples/s) marked. ``--device cuda`` runs all of it on a GPU (precision
``auto``: bf16 where the GPU has it, else fp16 with gradient scaling, for both arms).

On a generative benchmark (``--benchmark freedict-translation``) every arm trains the LM loss on
the target tokens: the trainer arm is HF Trainer + peft with a causal-LM collator (prompt labels
-100, dynamic padding, ``group_by_length``, bf16 where available) and HF's own loss over the
shifted labels; the accuracy column is the tasks' primary metric (exact match) of greedy answers
on the first ``--eval-rows`` test rows of each task.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def native_bf16(device: str) -> bool:
    """Whether the device computes bf16 natively (what ``train.precision: auto`` asks)."""
    from conpet.device import resolve_precision

    return resolve_precision("auto", device) == "bf16"


def measure_peaks(device: str = "cpu") -> dict:
    import torch

    out = {}
    n = 2048 if device == "cpu" else 8192
    kinds = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if native_bf16(device) else [])
    for name, dtype in kinds:  # emulated bf16 is no peak (and takes minutes on a CPU)
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        synchronize(device)
        reps, start = 20, time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        out[f"{name}_peak_gflops"] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    if device != "cpu":
        out["device_name"] = torch.cuda.get_device_name()
    return out


def first_tasks(args):
    """The benchmark's first ``tasks`` tasks as a stream."""
    from conpet.config import DataConfig
    from conpet.data import load_stream
    from conpet.data.stream import Stream

    stream = load_stream(DataConfig(benchmark=args.benchmark))
    return Stream(name=stream.name, kind=stream.kind, rows=stream.rows, tasks=stream.tasks[: args.tasks])


def layer_flops_per_token(bb, lengths) -> list[float]:
    """Forward FLOPs per real token of each transformer layer (weights + attention scores)."""
    from conpet.engine import find_layers

    _, _, layers = find_layers(bb.model)
    mean_len = float(sum(lengths)) / len(lengths)
    attn = 4 * mean_len * bb.hidden_size  # QK^T and AV, per token
    return [2 * sum(p.numel() for p in layer.parameters()) + attn for layer in layers]


def run_config(args) -> dict:
    import torch

    from conpet.build import build_learner, prepare
    from conpet.config import PETConfig, RunConfig, TrainConfig
    from conpet.device import resolve_precision
    from conpet.inputs import sorted_batches
    from conpet.learners.loop import predict

    if args.one == "peak":
        return measure_peaks(args.device)
    precision = resolve_precision("auto", args.device)
    pet_options = {"r": 8, "lora_alpha": 16}
    if args.one == "conpet-fast":
        pet_options.update(json.loads(args.fast_pet_options))
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, head_lr=5e-3,
                            precision=precision, device=args.device)
    if args.one == "conpet-fast" and args.fast_lr:
        train_cfg.lr = args.fast_lr
    top = args.top_layers if args.one == "conpet-fast" else None
    train_cfg.top_layers = top
    train_cfg.max_length = 128
    cfg = RunConfig(model=args.model, train=train_cfg, pet=PETConfig("lora", pet_options))
    trainer = args.one.startswith("trainer")
    # the trainer arms keep peft's defaults: "trainer" fp32 weights under autocast, as
    # from_pretrained loads them; "trainer-bf16" the whole base model in bf16, as
    # from_pretrained(dtype=torch.bfloat16) loads it. conpet's arms store the frozen linear
    # weights in bf16 and skip peft's input casts (what conpet's runner does)
    prepared = prepare(cfg, first_tasks(args), cast_frozen=not trainer)
    stream, engine = prepared
    bb, enc = engine.backbone, engine.encoded
    if args.one == "trainer-bf16":
        bb.model.to(torch.bfloat16)
        if getattr(bb, "lm_head", None) is not None:
            bb.lm_head.to(torch.bfloat16)
    # the trainers' PET module keeps peft's input casts: a plain peft model
    learner = build_learner(cfg, prepared, seed=args.seed, pet_precision="fp32" if trainer else None)
    ctx = learner.ctx
    train = [i for t in stream.tasks for i in t.train]
    test = [i for t in stream.tasks for i in t.test]
    lengths = [len(enc.ids[i]) for i in train]
    per_layer = layer_flops_per_token(bb, lengths)
    tokens = sum(lengths) * args.epochs
    torch.manual_seed(args.seed)
    learner.new_module()
    learner.grow_head(stream.seen_labels(len(stream.tasks) - 1))  # no columns on a generative stream

    cache_seconds = 0.0
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if trainer:
        seconds = (train_causal_lm_with_hf_trainer if stream.generative else train_with_hf_trainer)(
            learner, ctx, train, args)
    else:
        synchronize(args.device)
        start = time.perf_counter()
        engine.warm(train)
        synchronize(args.device)
        cache_seconds = time.perf_counter() - start
        learner.train(learner.fit_on(0, learner.ctx.epoch_batches(train), desc=f"bench-{args.seed}"))
        synchronize(args.device)
        seconds = time.perf_counter() - start
    peak_device_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if top is None:
        flops = tokens * 2 * sum(per_layer)  # forward + backward to every layer's inputs
    else:
        split = len(per_layer) - top
        flops = tokens * 2 * sum(per_layer[split:]) + sum(lengths) * sum(per_layer[:split])
    if stream.generative:
        accuracy = generation_score(learner, cfg, stream, args.eval_rows)
    else:
        lengths_all = ctx.encoded.all_lengths
        preds = predict(learner.logits, sorted_batches(test, lengths_all[test], 64), ctx.compute)
        accuracy = sum(preds[i] == stream.targets[i] for i in test) / len(test)
    return {
        "config": args.one, "seed": args.seed, "precision": precision, "train_seconds": seconds,
        "cache_seconds": cache_seconds, "epoch_seconds": (seconds - cache_seconds) / args.epochs,
        "samples": len(train) * args.epochs, "samples_per_s": len(train) * args.epochs / seconds,
        "tokens_per_s": tokens / seconds, "gflops": flops / seconds / 1e9, "accuracy": accuracy,
        "peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_mb, "device": args.device, "top_layers": top,
        "tunable_params": learner.tunable_params()["pet_params"],
        "frozen_dtypes": sorted({str(p.dtype) for p in bb.model.parameters() if not p.requires_grad}),
        "pet_dtypes": sorted({str(p.dtype) for p in learner.pet_parameters()}),
    }


def generation_score(learner, cfg, stream, rows_per_task: int) -> float:
    """Mean over tasks of each task's primary metric on its first ``rows_per_task`` test rows."""
    from conpet import text_metrics
    from conpet.evaluation import generate_rows, task_metric

    scores = []
    for j, task in enumerate(stream.tasks):
        rows = task.test[:rows_per_task]
        answers = generate_rows(learner, rows)
        scores.append(text_metrics.score(task_metric(cfg, stream, j), [answers[i] for i in rows],
                                         [stream.rows[i].references for i in rows]))
    return sum(scores) / len(scores)


def train_causal_lm_with_hf_trainer(learner, ctx, train, args) -> float:
    """HF Trainer + peft, causal-LM style: labels are the row's tokens with the prompt (and the
    padding) at -100, the loss HF's own shifted cross-entropy over the full-vocabulary logits of
    every position, as ``AutoModelForCausalLM(labels=...)`` computes it; returns seconds."""
    import torch
    import torch.nn.functional as F

    enc = ctx.encoded

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, k):
            i = train[k]
            ids, start = enc.ids[i], enc.target_start[i]
            return {"input_ids": ids, "labels": [-100] * start + ids[start:]}

    def collate(items):  # DataCollatorForSeq2Seq's padding: labels padded with -100
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), ctx.backbone.pad_id)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, x in enumerate(items):
            n = len(x["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class CausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = learner.model, ctx.lm_head

        def forward(self, input_ids, attention_mask, labels):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.lm_head(hidden).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            return {"loss": loss}

    seconds = run_hf_trainer(CausalLM(), Rows(), collate, [{"params": learner.pet_parameters(), "lr": 1e-3}],
                             ctx, args)
    learner.model.eval()
    return seconds


def run_hf_trainer(model, dataset, collate, groups: list[dict], ctx, args) -> float:
    """``Trainer.train()`` as a careful user sets it up (bf16/fp16 as the run, dynamic padding by
    ``collate``, ``group_by_length``, no checkpoints, logging or workers; AdamW on ``groups`` at a
    constant rate, as conpet's loop); returns its wall seconds."""
    import torch
    from transformers import Trainer, TrainingArguments

    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            bf16=ctx.precision == "bf16", fp16=ctx.precision == "fp16", use_cpu=args.device == "cpu",
            train_sampling_strategy="group_by_length",
            report_to="none", save_strategy="no", logging_strategy="no", remove_unused_columns=False,
            dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True, seed=args.seed,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate,
                          optimizers=(optimizer, scheduler))
        synchronize(args.device)
        start = time.perf_counter()
        trainer.train()
        synchronize(args.device)
        return time.perf_counter() - start


def train_with_hf_trainer(learner, ctx, train, args) -> float:
    """HF Trainer + peft on the same classifier, data and optimizer groups; returns seconds."""
    import torch
    import torch.nn.functional as F

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, k):
            i = train[k]
            return {"input_ids": ctx.encoded.ids[i], "cloze_pos": ctx.encoded.cloze_pos[i],
                    "labels": ctx.stream.targets[i]}

    def collate(items):
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), ctx.backbone.pad_id)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, x in enumerate(items):
            ids[r, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
            mask[r, : len(x["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "cloze_pos": torch.tensor([x["cloze_pos"] for x in items]),
                "labels": torch.tensor([x["labels"] for x in items])}

    class Cloze(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.head = learner.model, learner.head

        def forward(self, input_ids, attention_mask, cloze_pos, labels):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.head(hidden[torch.arange(len(labels)), cloze_pos])
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    groups = [{"params": learner.pet_parameters(), "lr": 1e-3}, {"params": list(learner.head.parameters()), "lr": 5e-3}]
    seconds = run_hf_trainer(Cloze(), Rows(), collate, groups, ctx, args)
    learner.model.eval()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--benchmark", default="wordnet-typing")
    p.add_argument("--tasks", type=int, default=2, help="train on the first N tasks' rows (default 2)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--top-layers", type=int, default=8, help="L of the fast path")
    p.add_argument("--eval-rows", type=int, default=100, help="generative benchmarks: test rows per task scored")
    p.add_argument("--fast-pet-options", default="{}", help="JSON LoRA options of the fast path only")
    p.add_argument("--fast-lr", type=float, default=None, help="PET learning rate of the fast path only")
    p.add_argument("--configs", default="peak,trainer,trainer-bf16,conpet,conpet-fast",
                   help="comma-separated arms: peak, trainer, trainer-bf16, conpet, conpet-fast")
    p.add_argument("--device", default="cpu", help="cpu or cuda (every arm on it)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every training config with seeds 0..N-1")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="run trainer-bf16 on a device without native bf16 too (slow: emulated bf16 matmuls)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_config(args)), flush=True)
        return
    configs = args.configs.split(",")
    if "trainer-bf16" in configs and not args.emulated_bf16 and not native_bf16(args.device):
        configs.remove("trainer-bf16")
        print("trainer-bf16 left out: this device has no native bf16, so a careful user keeps the fp32 weights "
              "(the trainer arm); --emulated-bf16 runs it anyway", file=sys.stderr)
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for config in configs:
            if config == "peak" and seed:
                continue
            passed = {k: v for k, v in vars(args).items()
                      if k not in ("one", "configs", "json", "seeds", "seed", "emulated_bf16") and v is not None}
            cmd = [sys.executable, __file__, "--one", config, "--seed", str(seed)]
            for key, value in passed.items():
                cmd += [f"--{key.replace('_', '-')}", str(value)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
            results.setdefault(config, []).append(json.loads(line[0][7:]))
            print(f"  {config} seed {seed}: done", file=sys.stderr)
    report(results, args)


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = _mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f}±{std:.{digits}f}"


def report(results: dict, args) -> None:
    """Means (± sample std over seeds) per config (RSS and device MB: means), then ratios of means
    against each trainer arm."""
    peak = results.get("peak", [{}])[0]
    rows = [c for c in results if c != "peak"]
    print(f"\n{args.model} on {args.benchmark} (first {args.tasks} tasks), {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.seeds} seed(s)")
    if peak:
        print(f"matmul peak this run ({peak.get('device_name', args.device)}): fp32 {peak['fp32_peak_gflops']:.0f} "
              f"GFLOP/s, bf16 " + (f"{peak['bf16_peak_gflops']:.0f} GFLOP/s" if "bf16_peak_gflops" in peak
                                    else "not native here"))
    header = (f"{'config':12s} {'train s':>11s} {'cache s':>8s} {'epoch s':>11s} {'samples/s':>11s} {'tokens/s':>9s} "
              f"{'GFLOP/s':>8s} {'%fp32pk':>7s} {'%bf16pk':>7s} {'RSS MB':>7s} {'dev MB':>7s} {'acc %':>11s}")
    print(header)
    print("-" * len(header))

    def col(c, key):
        return [r[key] for r in results[c]]

    for c in rows:
        gf = _mean_std(col(c, "gflops"))[0]
        print(f"{c:12s} {_fmt(col(c, 'train_seconds')):>11s} {_fmt(col(c, 'cache_seconds')):>8s} "
              f"{_fmt(col(c, 'epoch_seconds')):>11s} {_fmt(col(c, 'samples_per_s'), digits=2):>11s} "
              f"{_mean_std(col(c, 'tokens_per_s'))[0]:9.0f} {gf:8.1f} "
              f"{100 * gf / peak.get('fp32_peak_gflops', float('nan')):7.1f} "
              f"{100 * gf / peak.get('bf16_peak_gflops', float('nan')):7.1f} {_mean_std(col(c, 'peak_rss_mb'))[0]:7.0f} "
              f"{_mean_std(col(c, 'peak_device_mb'))[0] if results[c][0].get('peak_device_mb') else float('nan'):7.0f} "
              f"{_fmt(col(c, 'accuracy'), 100, 2):>11s}")
    ratios = ratios_against_trainers(results)
    for base, per_config in ratios.items():
        mark = " (the faster trainer arm: the one to quote)" if base == faster_trainer(results) else ""
        print(f"\nratios against {base}{mark}; each a ratio of means over seeds:")
        for c, r in per_config.items():
            device_mem = f"peak device memory x{r['peak_device_mb']:.2f}  " if r.get("peak_device_mb") else ""
            print(f"  {c:12s} speed x{r['speed']:.2f} (incl. cache build)  per epoch x{r['per_epoch']:.2f}  "
                  f"peak RSS x{r['peak_rss_mb']:.2f}  {device_mem}accuracy {r['accuracy_points']:+.2f} points")
    if args.json:
        from record import write_record

        write_record(args.json, {"args": vars(args), "results": results, "faster_trainer": faster_trainer(results),
                                 "ratios": ratios}, device=args.device)
        print(f"\nresults: {args.json}")


TRAINERS = ("trainer", "trainer-bf16")


def faster_trainer(results: dict) -> str | None:
    """The trainer arm with the higher mean samples/s: the baseline every headline ratio uses."""
    arms = [t for t in TRAINERS if t in results]
    return max(arms, key=lambda t: _mean_std([r["samples_per_s"] for r in results[t]])[0]) if arms else None


def ratios_against_trainers(results: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{trainer arm: {config: ratios}}, every ratio a ratio of means over seeds: ``speed``
    (samples/s, cache build included), ``per_epoch`` (epoch seconds, trainer / config),
    ``peak_rss_mb`` and ``peak_device_mb`` (config / trainer; below 1 = less memory), and
    ``accuracy_points`` (difference of mean accuracies, in points)."""
    def mean(c: str, key: str) -> float:
        return _mean_std([r[key] for r in results[c]])[0]

    out: dict[str, dict[str, dict[str, float]]] = {}
    for base in (t for t in TRAINERS if t in results):
        out[base] = {}
        for c in results:
            if c in ("peak", base):
                continue
            r = {"speed": mean(c, "samples_per_s") / mean(base, "samples_per_s"),
                 "per_epoch": mean(base, "epoch_seconds") / mean(c, "epoch_seconds"),
                 "peak_rss_mb": mean(c, "peak_rss_mb") / mean(base, "peak_rss_mb"),
                 "accuracy_points": 100 * (mean(c, "accuracy") - mean(base, "accuracy"))}
            if results[c][0].get("peak_device_mb") and results[base][0].get("peak_device_mb"):
                r["peak_device_mb"] = mean(c, "peak_device_mb") / mean(base, "peak_device_mb")
            out[base][c] = r
    return out


if __name__ == "__main__":
    main()
