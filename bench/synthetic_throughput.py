"""Training throughput of conpet on Llama-family models too big to ship: random weights built from
the published configs of a 1B and an 8B model (weights do not change the time of a step).

    python bench/synthetic_throughput.py --device cuda [--sizes llama-1b,llama-8b] [--steps 20]
        [--batch-size 16] [--json bench/results/synthetic-h200.json]
    python bench/synthetic_throughput.py --device cpu --sizes llama-1b --layers 2 --steps 2   # smoke test

Rows are real (the first task of ``wordnet-typing``, tokenized with SmolLM2's tokenizer, whose ids
all fall in Llama 3's vocabulary). For each size it times conpet's loop with LoRA (r 8) on q/v of
every layer (what a plain peft loop trains) and the fast path (``train.top_layers`` 4, LoRA on every
linear layer of those layers, lower layers cached; the cache build is timed too), after ``--warmup``
steps, and prints tokens/s and peak device memory. Precision ``auto`` (bf16 on a GPU that has it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SIZES = {
    # Llama 3.2 1B and Llama 3.1 8B (config.json of the published checkpoints)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                     tie_word_embeddings=True, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                     tie_word_embeddings=False, head_dim=128),
}


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_arm(size: str, top_layers: int | None, args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from conpet.backbone import backbone_from_model, resolve_model
    from conpet.build import build_learner, compute_of, prepare
    from conpet.config import from_dict

    cfg = from_dict({"model": size, "learner": "sequential",
                     "data": {"benchmark": "wordnet-typing"},
                     "train": {"device": args.device, "batch_size": args.batch_size, "epochs": 1,
                               "top_layers": top_layers, "max_length": 64, "checkpoint_seconds": 1e9}})
    compute = compute_of(cfg)
    fields = dict(SIZES[size])
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    config = LlamaConfig(**fields, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(compute.device):
        model = LlamaModel(config).to(torch.bfloat16 if compute.precision != "fp32" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model("smollm2")))
    backbone = backbone_from_model(model, tokenizer, size)
    from conpet.data import load_stream
    from conpet.data.stream import Stream

    full = load_stream(cfg.data)
    stream = Stream(name=full.name, kind=full.kind, rows=full.rows, tasks=full.tasks[:1])
    prepared = prepare(cfg, stream, backbone=backbone, cast_frozen=False)
    learner = build_learner(cfg, prepared, seed=0)
    learner.new_module()
    learner.head.grow(list(stream.tasks[0].labels), learner.ctx.torch_gen)
    rows = list(stream.tasks[0].train)
    batches = learner.ctx.epoch_batches(rows, epochs=max(1, -(-(args.warmup + args.steps) * args.batch_size // len(rows))))
    batches = batches[: args.warmup + args.steps]
    engine = prepared.engine
    synchronize(compute.device)
    start = time.perf_counter()
    engine.warm([i for b in batches for i in b])
    synchronize(compute.device)
    cache_seconds = time.perf_counter() - start
    learner.train(learner.fit_on(0, batches[: args.warmup], desc="warmup"))
    if compute.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(compute.device)
    start = time.perf_counter()
    learner.train(learner.fit_on(0, batches[args.warmup:], desc="timed"))
    synchronize(compute.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(engine.encoded.ids[i]) for b in batches[args.warmup:] for i in b)
    out = {"size": size, "layers": config.num_hidden_layers, "params": sum(p.numel() for p in model.parameters()),
           "top_layers": top_layers, "precision": compute.precision, "device": str(compute.device),
           "steps": args.steps, "batch_size": args.batch_size, "seconds": seconds, "cache_seconds": cache_seconds,
           "tokens_per_s": tokens / seconds, "steps_per_s": args.steps / seconds,
           "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if compute.device.type == "cuda" else None,
           "pet_params": learner.tunable_params()["pet_params"]}
    if compute.device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
    learner.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="llama-1b,llama-8b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    for size in args.sizes.split(","):
        for top in (None, 4):
            r = time_arm(size, top, args)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"\n{'size':9s} {'params':>8s} {'arm':16s} {'tokens/s':>10s} {'steps/s':>8s} {'cache s':>8s} {'peak MB':>8s}")
    for r in results:
        arm = "all layers, q/v" if r["top_layers"] is None else f"top {r['top_layers']}, all-linear"
        peak = f"{r['peak_device_mb']:8.0f}" if r["peak_device_mb"] else f"{'-':>8s}"
        print(f"{r['size']:9s} {r['params'] / 1e9:7.2f}B {arm:16s} {r['tokens_per_s']:10.0f} {r['steps_per_s']:8.2f} "
              f"{r['cache_seconds']:8.1f} {peak}")
    for size in dict.fromkeys(r["size"] for r in results):
        full, fast = (next(r for r in results if r["size"] == size and r["top_layers"] == t) for t in (None, 4))
        print(f"{size}: fast path x{fast['tokens_per_s'] / full['tokens_per_s']:.2f} tokens/s against all layers")
    if args.json:
        from record import write_record

        write_record(args.json, {"args": vars(args), "results": results}, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
