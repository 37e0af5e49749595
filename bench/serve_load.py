"""Load test: ``conpet serve`` against the server a user would write today, in the same run.

    python bench/serve_load.py --run RUN_DIR [--clients 8] [--requests 96] [--max-tokens 16]

RUN_DIR is a generative run with a module per task (Dynamic ConPET). Prompts are its stream's
test prompts, the tasks interleaved. N concurrent clients (the ``openai`` package's async client,
127.0.0.1 only) send them, bounded by ``--requests`` and ``--max-seconds`` per arm. Arms, one
server at a time on the same cores:

- ``conpet-auto``: ``conpet serve RUN_DIR``, ``model: auto`` (the selector routes every prompt);
- ``conpet-named``: the same server, ``model: <the prompt's task>`` (no routing: its cost is the
  difference with ``conpet-auto``);
- ``naive``: one peft model holding every task's adapter (the run's modules as ``conpet export
  --to vllm`` writes them, plain peft folders for the causal LM), ``set_adapter`` + ``generate``
  per request under a lock (``set_adapter`` is global), no batching, the same FastAPI; it is
  told each prompt's task (it has no router). Its weights are in the dtype conpet serves in.

Reports requests/s, output tokens/s and p50/p95/p99 latency per arm and the ratios to
``naive``; writes a record under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from record import write_record

ROOT = Path(__file__).resolve().parent.parent


# -- the naive server ----------------------------------------------------------------------------------
def naive_server(run_dir: Path, port: int) -> None:
    """A FastAPI server as a user writes it with transformers + peft: one model, every task's
    adapter loaded by name, ``set_adapter`` and greedy ``generate`` per request."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conpet.backbone import resolve_model
    from conpet.build import compute_of
    from conpet.runs import run_config
    from conpet.vllm_export import export_vllm

    cfg = run_config(run_dir)
    exported = Path(tempfile.mkdtemp()) / "vllm"  # peft folders for the causal LM (conpet's own wrap the bare base)
    done = export_vllm(run_dir, exported)
    folder = resolve_model(cfg.model)
    dtype = compute_of(cfg).dtype
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tasks = list(done["tasks"])
    model = PeftModel.from_pretrained(base, exported / done["tasks"][tasks[0]], adapter_name=tasks[0])
    for task in tasks[1:]:
        model.load_adapter(exported / done["tasks"][task], adapter_name=task)
    model.eval()
    ends = base.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends]) | {tok.eos_token_id}
    lock = threading.Lock()
    app = FastAPI()

    def answer(body: dict) -> dict:
        prompt = body["messages"][0]["content"]
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(**ids, max_new_tokens=body.get("max_tokens", 16), do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        new = new[[int(x) not in ends for x in new]]
        return {"id": "naive", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": tok.decode(new, skip_special_tokens=True).strip()},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": len(new),
                          "total_tokens": ids["input_ids"].shape[1] + len(new)}}

    @app.post("/v1/chat/completions")
    def chat(body: dict):  # a plain def: FastAPI runs it in its thread pool, as users write it
        return answer(body)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    async def main() -> None:
        running = asyncio.create_task(server.serve())
        while not server.started and not running.done():
            await asyncio.sleep(0.05)
        print(f"listening on http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}",
              file=sys.stderr, flush=True)
        await running

    asyncio.run(main())


# -- driving a server ----------------------------------------------------------------------------------
def start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seen = []
    while True:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("server did not start:\n" + "".join(seen))
        seen.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, found.group(1)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def load(url: str, work: list[tuple[str, str]], clients: int, max_tokens: int, max_seconds: float,
               named: bool) -> dict:
    """``clients`` concurrent clients send ``work`` ((prompt, task) pairs) until it or the time ends."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    queue = list(reversed(work))
    latencies, tokens, errors, answers = [], 0, [], {}
    began = time.perf_counter()

    async def worker() -> None:
        nonlocal tokens
        while queue and time.perf_counter() - began < max_seconds:
            k = len(queue) - 1
            prompt, task = queue.pop()
            start = time.perf_counter()
            try:
                r = await client.chat.completions.create(model=task if named else "auto", max_tokens=max_tokens,
                                                         messages=[{"role": "user", "content": prompt}])
            except Exception as error:  # noqa: BLE001 - counted and reported
                errors.append(repr(error))
                continue
            latencies.append(time.perf_counter() - start)
            tokens += r.usage.completion_tokens
            answers[len(work) - 1 - k] = r.choices[0].message.content

    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - began
    await client.close()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3], "seconds": seconds,
            "requests_per_s": len(latencies) / seconds, "output_tokens_per_s": tokens / seconds,
            "output_tokens": tokens, "p50_s": q[49], "p95_s": q[94], "p99_s": q[98],
            "answers": [answers.get(k) for k in range(len(work))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a generative run with a module per task (Dynamic ConPET)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=96, help="requests per arm (the test prompts, interleaved)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=600, help="most seconds per arm")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--out", help="record path (default bench/results/serve-load-<run name>.json)")
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    run_dir = Path(args.run)
    if args.naive_server:
        naive_server(run_dir, args.port)
        return

    from conpet.data import load_stream
    from conpet.runs import run_config, run_learner

    if not run_learner(run_dir)["module_per_task"]:
        raise SystemExit(f"{run_dir}: the naive arm needs a module per task (e.g. learner dynamic)")
    stream = load_stream(run_config(run_dir).data)
    per_task = [[(stream.rows[i].text, task.name) for i in task.test] for task in stream.tasks]
    work = [pair for group in zip(*per_task) for pair in group][:args.requests]
    arms = {}
    proc, url = start([sys.executable, "-m", "conpet.cli", "serve", str(run_dir), "--port", "0", "--max-batch",
                       str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--watch-s", "0"])
    try:
        for named, name in ((False, "conpet-auto"), (True, "conpet-named")):
            asyncio.run(load(url, work[:2], 2, args.max_tokens, 120, named))  # warm-up
            arms[name] = asyncio.run(load(url, work, args.clients, args.max_tokens, args.max_seconds, named))
            print(f"{name}: {json.dumps({k: v for k, v in arms[name].items() if k != 'answers'})}", flush=True)
    finally:
        stop(proc)
    proc, url = start([sys.executable, __file__, "--run", str(run_dir), "--naive-server"])
    try:
        asyncio.run(load(url, work[:2], 1, args.max_tokens, 120, True))
        arms["naive"] = asyncio.run(load(url, work, args.clients, args.max_tokens, args.max_seconds, True))
        print(f"naive: {json.dumps({k: v for k, v in arms['naive'].items() if k != 'answers'})}", flush=True)
    finally:
        stop(proc)
    naive = arms["naive"]
    ratios = {name: {"requests_per_s": a["requests_per_s"] / naive["requests_per_s"],
                     "output_tokens_per_s": a["output_tokens_per_s"] / naive["output_tokens_per_s"],
                     "p99": a["p99_s"] / naive["p99_s"]} for name, a in arms.items() if name != "naive"}
    same = sum(a == b for a, b in zip(arms["conpet-named"]["answers"], naive["answers"]))
    print(f"\n{'arm':14s} {'req/s':>7s} {'tok/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'p99 s':>7s}  vs naive")
    for name, a in arms.items():
        r = ratios.get(name)
        vs = f"x{r['requests_per_s']:.2f} req/s, p99 x{r['p99']:.2f}" if r else "baseline"
        print(f"{name:14s} {a['requests_per_s']:7.2f} {a['output_tokens_per_s']:7.1f} {a['p50_s']:7.2f} "
              f"{a['p95_s']:7.2f} {a['p99_s']:7.2f}  {vs}")
    print(f"named-task answers equal to the naive server's: {same}/{len(work)}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve-load-{run_dir.name}.json"
    write_record(out, {"args": vars(args), "clients": args.clients, "arms": arms, "ratios_to_naive": ratios,
                       "named_answers_equal_to_naive": same, "prompts": len(work)})
    print(f"record: {out}")


if __name__ == "__main__":
    main()
