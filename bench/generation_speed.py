"""Generation throughput: conpet's batched greedy decoding against Hugging Face ``generate`` with
the same peft adapter on the same prompts, in one run.

    python bench/generation_speed.py [--model smollm2] [--benchmark freedict-translation]
        [--prompts 256] [--batch-size 32] [--max-new-tokens 16] [--repeats 3] [--device cpu]

Both arms answer the same prompts (the first test rows of the stream's tasks, chat template
applied), in the same prompt-length-sorted batches, left-padded, greedy, with a KV cache, up to
``--max-new-tokens`` or the end-of-sequence token, with one LoRA module (r=8 on conpet's default
targets, its B factor drawn at random so that the adapter changes the answers):

- ``conpet``: :func:`conpet.generation.greedy_generate` on the backbone with its frozen linear
  weights in the run's precision (bf16 where the CPU has it) under conpet's autocast;
- ``hf``: ``AutoModelForCausalLM.from_pretrained(dtype=bf16 where conpet uses it)`` whose decoder
  is the same peft-injected model (the saved adapter loaded with ``PeftModel.from_pretrained``),
  ``model.generate(do_sample=False, num_beams=1)``.

Prints prompts/s and generated tokens/s (median of ``--repeats``), the ratio conpet / HF, the
memory each arm needs to generate (one more, untimed pass per arm: the rise of the process's
resident memory above what it held before the pass, and on a GPU the peak of allocated device
memory above it; both arms share the process, so the models each holds are listed apart: conpet
answers with the run's one backbone, the HF arm needs a second, causal-LM copy), the
share of prompts whose answers are token-identical and each arm's exact match (with a random
adapter: a sanity check of the answers, not a result). In fp32 the two arms compute the same
model; in bf16 conpet keeps HF Trainer-style mixed precision (fp32 residual stream and norms,
bf16 matmuls) while the HF arm is the model loaded in bf16, so answers can differ.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from record import write_record
from rss import Sampler, rss_mb

warnings.filterwarnings("ignore")


def main() -> None:
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    from conpet import text_metrics
    from conpet.build import build_learner, prepare
    from conpet.config import DataConfig, PETConfig, RunConfig, TrainConfig
    from conpet.generation import greedy_generate
    from conpet.inputs import end_token_id, sorted_batches

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--benchmark", default="freedict-translation")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="auto (bf16 where the device has it) or fp32, both arms")
    p.add_argument("--json", type=Path, default=None, help="write the figures as a record (bench/record.py)")
    args = p.parse_args()

    cfg = RunConfig(model=args.model, data=DataConfig(benchmark=args.benchmark),
                    train=TrainConfig(device=args.device, top_layers=None, precision=args.precision), pet=PETConfig("lora", {"r": 8}))
    prepared = prepare(cfg)
    stream, engine = prepared
    learner = build_learner(cfg, prepared, seed=0)
    ctx = learner.ctx
    torch.manual_seed(0)
    learner.new_module()
    with torch.no_grad():
        for name, param in learner.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.004)
    per_task = max(1, args.prompts // len(stream.tasks))
    rows = [i for t in stream.tasks for i in t.test[:per_task]][: args.prompts]
    prompts = {i: ctx.encoded.prompt(i) for i in rows}
    batches = sorted_batches(rows, np.asarray([len(prompts[i]) for i in rows]), args.batch_size)
    tok = ctx.backbone.tokenizer
    eos = end_token_id(tok)
    pad = ctx.backbone.pad_id
    dtype = engine.compute.dtype if engine.precision != "fp32" else torch.float32

    def conpet_arm() -> dict[int, list[int]]:
        out = {}
        for batch in batches:
            out.update(zip(batch, greedy_generate(learner.model, ctx.lm_head, [prompts[i] for i in batch], pad, [eos],
                                                  args.max_new_tokens, engine.compute)))
        return out

    def model_mb(model) -> float:
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20

    before_hf_mb = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        ctx.pet.save(learner.model, learner.module_name, Path(tmp))
        causal = AutoModelForCausalLM.from_pretrained(str(ctx.backbone.path), dtype=dtype).to(args.device).eval()
        decoder = PeftModel.from_pretrained(AutoModel.from_pretrained(str(ctx.backbone.path), dtype=dtype), tmp)
        causal.model = decoder.base_model.model.to(args.device).eval()
    hf_load_mb = rss_mb() - before_hf_mb

    @torch.no_grad()
    def hf_arm() -> dict[int, list[int]]:
        out = {}
        for batch in batches:
            width = max(len(prompts[i]) for i in batch)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in batch], device=args.device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch],
                                device=args.device)
            gen = causal.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                  do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
            out.update(zip(batch, [g[: g.index(eos)] if eos in g else g for g in gen]))
        return out

    def timed(arm):
        seconds, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = arm()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), result

    hf_s, hf_out = timed(hf_arm)
    ours_s, ours_out = timed(conpet_arm)

    def memory(arm) -> dict:
        """One untimed pass: resident (and device) memory above what the process held before it."""
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_dev = torch.cuda.memory_allocated()
        sampler = Sampler().start()
        with sampler.phase("generate"):
            arm()
        sampler.stop()
        span = sampler.spans[-1]
        out = {"rss_rise_mb": span["peak_mb"] - span["entry_mb"], "rss_peak_mb": span["peak_mb"]}
        if cuda:
            out["device_rise_mb"] = (torch.cuda.max_memory_allocated() - base_dev) / 2**20
        return out

    mem = {"hf": memory(hf_arm), "conpet": memory(conpet_arm)}
    held = {"conpet": model_mb(learner.model), "hf": model_mb(causal)}
    tokens = sum(len(v) for v in ours_out.values())
    hf_tokens = sum(len(v) for v in hf_out.values())
    same = sum(ours_out[i] == hf_out[i] for i in rows) / len(rows)

    def exact_match(out: dict[int, list[int]]) -> float:  # the adapter is random: a check, not a result
        answers = [tok.decode(out[i], skip_special_tokens=True).strip() for i in rows]
        return text_metrics.score("exact_match", answers, [stream.rows[i].references for i in rows])

    print(f"\n{args.model} on {args.benchmark}: {len(rows)} prompts, batch {args.batch_size}, up to "
          f"{args.max_new_tokens} new tokens, precision {engine.precision}, {args.device}, median of {args.repeats}")
    print(f"{'arm':8s} {'seconds':>8s} {'prompts/s':>10s} {'tokens/s':>9s}")
    print(f"{'hf':8s} {hf_s:8.2f} {len(rows) / hf_s:10.1f} {hf_tokens / hf_s:9.1f}")
    print(f"{'conpet':8s} {ours_s:8.2f} {len(rows) / ours_s:10.1f} {tokens / ours_s:9.1f}")
    print(f"\nconpet / hf: prompts/s x{hf_s / ours_s:.2f}; identical answers {100 * same:.1f}% of prompts; "
          f"exact match hf {100 * exact_match(hf_out):.1f}%, conpet {100 * exact_match(ours_out):.1f}%")
    print("\nmemory (MB): the model each arm holds (weights + buffers), the rise of resident memory while it generates"
          + (", the rise of allocated device memory" if args.device.startswith("cuda") else ""))
    for arm in ("hf", "conpet"):
        device = f", device +{mem[arm]['device_rise_mb']:.0f}" if "device_rise_mb" in mem[arm] else ""
        print(f"{arm:8s} model {held[arm]:7.0f}  generation RSS +{mem[arm]['rss_rise_mb']:.0f}{device}")
    print(f"loading the HF arm's causal-LM copy and its adapter raised resident memory by {hf_load_mb:.0f} MB")
    if args.json:
        write_record(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "precision": engine.precision,
                                 "prompts": len(rows), "seconds": {"hf": hf_s, "conpet": ours_s},
                                 "tokens": {"hf": hf_tokens, "conpet": tokens}, "identical_answers": same,
                                 "model_mb": held, "memory": mem, "hf_load_rss_mb": hf_load_mb},
                     device=args.device)
    learner.close()


if __name__ == "__main__":
    main()
