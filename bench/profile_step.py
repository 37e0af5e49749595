"""Where a training step's time goes: torch.profiler over conpet training steps.

    python bench/profile_step.py [--model smollm2] [--top-layers 4] [--steps 40] [--target-modules q_proj v_proj]

Loads the backbone, builds the lower-layer cache for the first 2 tasks of wordnet-typing (not
profiled), then profiles ``--steps`` training steps of the sequential learner and prints: wall
seconds per step, the share of CPU time in matrix multiplications, attention, element-wise ops,
the optimizer and everything else, the GFLOP/s achieved *inside* the matmul kernels, and the top
operators by self CPU time. This explains how far a step is from the matmul peak.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn",
               "mkldnn", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "_flash_attention", "aten::_efficient_attention", "softmax"),
    "optimizer": ("Optimizer", "adamw", "_foreach", "clip_grad"),
}


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from conpet.build import build_learner, prepare
    from conpet.config import PETConfig, RunConfig, TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--top-layers", type=int, default=4)
    p.add_argument("--target-modules", nargs="+", help="LoRA targets (default: conpet's, every linear layer of the "
                   "top layers)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fp32-weights", action="store_true", help="keep frozen weights fp32 (autocast casts each step)")
    p.add_argument("--peft-input-casts", action="store_true", help="keep peft's LoRA input casts")
    args = p.parse_args()

    options = {"r": 8, "lora_alpha": 16, **({"target_modules": args.target_modules} if args.target_modules else {})}
    cfg = RunConfig(model=args.model, pet=PETConfig("lora", options),
                    train=TrainConfig(epochs=1, batch_size=args.batch_size, top_layers=args.top_layers))
    prepared = prepare(cfg, cast_frozen=not args.fp32_weights)
    stream, engine = prepared
    enc, precision = engine.encoded, engine.precision
    train = [i for t in stream.tasks[:2] for i in t.train]
    engine.warm(train)
    learner = build_learner(cfg, prepared, seed=0, pet_precision="fp32" if args.peft_input_casts else None)
    ctx = learner.ctx
    learner.new_module()
    learner.head.grow(stream.seen_labels(1), ctx.torch_gen)
    batches = ctx.epoch_batches(train, epochs=3)[: args.steps + 5]
    learner.train(learner.fit_on(0, batches[:5], desc="warm-up"))
    tokens = sum(len(enc.ids[i]) for b in batches[5:] for i in b)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        start = time.perf_counter()
        learner.train(learner.fit_on(0, batches[5:], desc="profiled"))
        wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    shares = {g: 0.0 for g in GROUPS}
    mm_flops = mm_time = 0.0
    for e in events:
        name = e.key
        for g, keys in GROUPS.items():
            if any(k.lower() in name.lower() for k in keys):
                shares[g] += e.self_cpu_time_total / 1e6
                if g == "matmul" and e.flops:
                    mm_flops += e.flops
                    mm_time += e.self_cpu_time_total / 1e6
                break
    n = len(batches) - 5
    print(f"\n{args.model}, top {args.top_layers} layers, LoRA on {' '.join(args.target_modules) if args.target_modules else 'every linear layer'}, "
          f"batch {args.batch_size}, {n} steps, {tokens / n:.0f} real tokens per step, {precision}")
    print(f"wall {wall:.2f} s ({1000 * wall / n:.1f} ms/step); profiled op self time {total:.2f} s "
          f"(the rest, {max(0.0, wall - total):.2f} s, is Python and framework overhead between ops)")
    other = total - sum(shares.values())
    for g, s in [*shares.items(), ("other ops (element-wise, copies, norms...)", other)]:
        print(f"  {g:45s} {s:7.2f} s  {100 * s / wall:5.1f}% of wall")
    if mm_time:
        print(f"GFLOP/s inside matmul kernels (profiler FLOP count): {mm_flops / mm_time / 1e9:.0f}")
    print("\ntop operators by self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
