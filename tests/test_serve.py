"""``conpet serve`` tested as users run it: a live server on a free loopback port, in its own
process, talked to with the real ``openai`` client (and raw HTTP for what the client cannot send):
chat, completions, streaming, classification, learned routing, a task added while clients send
requests, every bad request's status and JSON error, a tampered adapter refused."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conpet.cli import main
from test_learner_matrix import kill_inside_task, split_rows

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "conpet-test-key-0123456789"


@contextlib.contextmanager
def live_server(run_dir: Path, *flags: str, timeout: float = 120):
    """``conpet serve RUN_DIR --port 0 FLAGS`` in its own process; yields (base URL, its stderr
    lines so far); SIGTERM at the end must stop it cleanly (exit 0)."""
    proc = subprocess.Popen([sys.executable, "-m", "conpet.cli", "serve", str(run_dir), "--port", "0", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CONPET_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"})
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + timeout
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        url = found.group(1) if found else None
    if url is None:
        proc.kill()
        raise AssertionError("the server did not start:\n" + "".join(lines) + (proc.stderr.read() or ""))
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        yield url, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, "the server did not stop cleanly on SIGTERM:\n" + "".join(lines)


def client(url: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def raw(url: str, path: str, body: bytes | dict | None = None, key: str | None = None,
        method: str | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request, whatever its status."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def error_of(status: int, body: dict) -> tuple[int, str]:
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return status, body["error"]["message"]


# -- runs to serve ---------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, lively_decoder) -> Path:
    """Dynamic ConPET on two generative tasks whose prompts differ clearly (plural, capitals), on
    the lively decoder given a chat template (as instruction-tuned models have)."""
    from test_generation import write_generative_data

    root = tmp_path_factory.mktemp("serve-gen")
    model = root / "chat-llama"
    shutil.copytree(lively_decoder, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    data, out = write_generative_data(root / "data"), root / "run"
    assert main(["run", "--model", str(model), "--data", str(data), "--learner", "dynamic", "--epochs", "3",
                 "--batch-size", "8", "--precision", "fp32", "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    from conftest import write_typing_data

    return write_typing_data(tmp_path_factory.mktemp("serve-cls") / "data")


def _cls_args(model: Path, data, out: Path) -> list[str]:
    return ["run", "--model", str(model), "--data", str(data[0]), "--tasks", str(data[1]), "--learner", "dynamic",
            "--epochs", "3", "--batch-size", "4", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tiny_encoder, cls_data) -> Path:
    out = tmp_path_factory.mktemp("serve-cls-run") / "run"
    assert main(_cls_args(tiny_encoder, cls_data, out)) == 0
    return out


# -- the endpoints -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_server(gen_run):
    with live_server(gen_run) as (url, _):
        yield url


def test_chat_completions_streaming_and_routing_with_the_openai_client(gen_run, gen_server):
    from conpet import ContinualModel

    model = ContinualModel.from_run(gen_run)
    per_task = split_rows(gen_run)
    prompts = [r.text for r in per_task[0][:3] + per_task[1][:3]]
    expected = model.generate(prompts, max_new_tokens=8)
    model.close()
    url = gen_server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["auto", "plural", "upper"]
    for prompt, want in zip(prompts, expected):  # the server answers as the library does
        r = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}],
                                      max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want.text
        assert r.model_extra["conpet"]["task"] == want.task
        assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.completion_tokens
    r = c.completions.create(model="upper", prompt=prompts[0], max_tokens=4)  # a named task's module
    assert r.choices[0].model_extra["conpet"]["task"] == "upper" and r.usage.completion_tokens <= 4
    assert r.choices[0].finish_reason in ("stop", "length")
    many = c.completions.create(model="auto", prompt=prompts, max_tokens=8)  # one request, several prompts
    assert [ch.text for ch in many.choices] == [g.text for g in expected]
    chunks = list(c.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompts[0]}],
                                            max_tokens=8, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected[0].text and chunks[-1].usage.completion_tokens == expected[0].completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert 'conpet_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "conpet_batch_rows_bucket" in metrics and "conpet_router_confidence_count" in metrics


def test_auto_routing_names_the_task_of_rows_whose_task_is_clear(gen_run, gen_server):
    """Every test prompt of the two tasks (plural questions, capitals instructions): the server
    names the task the run's selector picks, as often right as the run measured it."""
    routing = json.loads((gen_run / "seed-0" / "metrics.json").read_text())["selector_accuracy"][-1]
    assert min(routing) >= 0.75, "the prompts of the two tasks differ in every word; the selector learns that"
    c = client(gen_server)
    for task, rows, accuracy in zip(("plural", "upper"), split_rows(gen_run), routing):
        r = c.completions.create(model="auto", prompt=[row.text for row in rows], max_tokens=2)
        named = [ch.model_extra["conpet"]["task"] for ch in r.choices]
        assert sum(t == task for t in named) == round(accuracy * len(rows))


@pytest.mark.slow
def test_upstream_mode_routes_here_and_answers_there(gen_run, gen_server):
    """``conpet serve --upstream URL`` runs only the router and forwards each request to a server
    holding the adapters by task name (here a second conpet serve, which answers a named task
    with that task's module, as vLLM does with exported adapters; the vLLM test uses the real one)."""
    from conpet import ContinualModel

    model = ContinualModel.from_run(gen_run)
    assert model.chat_template
    prompts = [r.text for task in split_rows(gen_run) for r in task[:3]]
    expected = model.generate(prompts, max_new_tokens=8)
    model.close()
    with live_server(gen_run, "--upstream", gen_server + "/v1") as (url, _):
        c = client(url)
        for prompt, want in zip(prompts, expected):
            r = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=8)
            assert r.choices[0].message.content == want.text and r.model_extra["conpet"]["task"] == want.task
        r = c.completions.create(model="upper", prompt=prompts, max_tokens=8)
        assert all(ch.model_extra["conpet"]["task"] == "upper" for ch in r.choices)
    with live_server(gen_run, "--upstream", "http://127.0.0.1:9/v1") as (url, _):  # nothing listens there
        status, body, _ = raw(url, "/v1/chat/completions", {"model": "auto", "messages": [
            {"role": "user", "content": prompts[0]}]})
        assert error_of(status, body)[0] == 502 and "upstream" in body["error"]["message"]


@pytest.mark.slow
def test_classify_concurrent_requests_are_batched(cls_run):
    from conpet import ContinualModel

    rows = [r for task in split_rows(cls_run) for r in task]
    inputs = [{"text": r.text, "entity": r.entity} for r in rows]
    model = ContinualModel.from_run(cls_run)
    expected = [p.to_dict() for p in model.predict(inputs)]
    model.close()
    with live_server(cls_run, "--max-wait-ms", "50") as (url, _):
        c = client(url)
        out = c.post("/classify", body={"model": "auto", "input": inputs}, cast_to=object)
        assert [{k: v for k, v in d.items() if k != "index"} for d in out["data"]] == expected
        with ThreadPoolExecutor(8) as pool:  # 8 clients at once, one row each
            answers = list(pool.map(lambda x: c.post("/classify", body={"model": "auto", "input": x},
                                                     cast_to=object)["data"][0], inputs[:8]))
        assert [a["label"] for a in answers] == [e["label"] for e in expected[:8]]
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        sizes = re.findall(r'conpet_batch_rows_count\{kind="classify"\} (\S+)', metrics)
        assert float(sizes[0]) < 9, "8 concurrent requests are answered in fewer model calls than requests"
        status, body, _ = raw(url, "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
        assert error_of(status, body)[0] == 400 and "classifies" in body["error"]["message"]


def test_every_bad_request_gets_its_status_and_a_json_error(cls_run, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    row = {"text": "Yesterday we talked about the wolf for a while.", "entity": "wolf"}
    with live_server(cls_run, "--api-key-file", str(keyfile), "--max-body-bytes", "4000", "--max-prompt-tokens",
                     "40", "--max-rows", "4", "--max-in-flight", "1", "--max-wait-ms", "400") as (url, _):
        ok = {"model": "auto", "input": [row]}
        assert raw(url, "/v1/classify", ok, KEY)[0] == 200
        assert raw(url, "/health")[0] == 200  # the probe needs no key
        cases = [
            (raw(url, "/v1/classify", ok), 401),  # missing key
            (raw(url, "/v1/classify", ok, "wrong-key-0123456789"), 401),
            (raw(url, "/v1/classify", b"{not json", KEY), 400),
            (raw(url, "/v1/classify", {"model": "task-09", "input": [row]}, KEY), 404),
            (raw(url, "/v1/classify", {"model": "auto", "input": [{**row, "text": "word " * 60}]}, KEY), 400),
            (raw(url, "/v1/classify", {"model": "auto", "input": [row] * 5}, KEY), 400),  # too many rows
            (raw(url, "/v1/classify", {"model": "auto", "input": [{**row, "text": "x" * 5000}]}, KEY), 413),
            (raw(url, "/v1/classify", {"model": "auto", "input": 7}, KEY), 422),
            (raw(url, "/v1/classify", {"model": "auto", "input": [{"text": "no entity here"}]}, KEY), 400),
            (raw(url, "/v1/nothing", ok, KEY), 404),
        ]
        for (status, body, _), want in cases:
            assert error_of(status, body)[0] == want, (want, body)
        with ThreadPoolExecutor(6) as pool:  # one request in flight at most: the others get 429
            results = list(pool.map(lambda _: raw(url, "/v1/classify", ok, KEY), range(6)))
        refused = [(s, b, h) for s, b, h in results if s == 429]
        assert refused and all(h.get("retry-after") == "1" and error_of(s, b) for s, b, h in refused)
        assert any(s == 200 for s, _, _ in results)


def test_binding_beyond_loopback_needs_a_key(cls_run, capsys):
    assert main(["serve", str(cls_run), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conpet: error: --host 0.0.0.0") and err.count("\n") == 1


# -- tasks added live, tampering -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_task_finished_by_another_process_is_served_without_failing_a_request(tiny_encoder, cls_data, tmp_path):
    out = tmp_path / "run"
    args = _cls_args(tiny_encoder, cls_data, out) + ["--set", "train.checkpoint_seconds=0", "--epochs", "8"]
    kill_inside_task(args, out, task=1, min_step=1)  # task 1 finished, task 2 not
    row = {"text": "Yesterday we talked about the wolf for a while.", "entity": "wolf"}
    with live_server(out, "--watch-s", "0.2") as (url, _):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["auto", "task-01"]
        failures, answered, stop = [], [], threading.Event()

        def send() -> None:
            while not stop.is_set():
                try:
                    answered.append(c.post("/classify", body={"model": "auto", "input": [row]}, cast_to=object))
                except Exception as error:  # noqa: BLE001 - collected: no request may fail
                    failures.append(repr(error))

        senders = [threading.Thread(target=send) for _ in range(2)]
        for s in senders:
            s.start()
        try:
            resumed = subprocess.run([sys.executable, "-m", "conpet.cli", "run", "--resume", str(out), "--no-progress"],
                                     capture_output=True, text=True, timeout=300)
            assert resumed.returncode == 0, resumed.stderr
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(c.models.list().data) < 3:
                time.sleep(0.1)
            during = len(answered)
            time.sleep(0.5)
        finally:
            stop.set()
            for s in senders:
                s.join()
        assert [m.id for m in c.models.list().data] == ["auto", "task-01", "task-02"]
        assert not failures and during > 0 and len(answered) > during
        assert {a["data"][0]["task"] for a in answered[during:]} <= {"task-01", "task-02"}
        labels = c.post("/classify", body={"model": "task-02", "input": [row]}, cast_to=object)["data"][0]["label"]
        assert labels in ("tool", "place")


def test_a_tampered_adapter_is_refused_and_reported(cls_run, tmp_path, capsys):
    from conpet import ContinualModel

    copy = tmp_path / "run"
    shutil.copytree(cls_run, copy)
    weights = copy / "seed-0" / "adapters" / "task-02" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    model = ContinualModel.from_run(copy)  # the verified tasks before it still load
    assert model.tasks == ["task-01"] and "changed: seed-0/adapters/task-02/adapter_model.safetensors" in \
        model.problems[0]
    model.close()
    with live_server(copy) as (url, lines):
        status, health, _ = raw(url, "/health")
        assert status == 200 and health["status"] == "degraded" and health["tasks"] == ["task-01"]
        assert "task-02" in health["problems"][0]
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["auto", "task-01"]
        rows = [{"text": f"Yesterday we talked about the {w} for a while.", "entity": w} for w in ("wolf", "soup")]
        out = c.post("/classify", body={"model": "auto", "input": rows}, cast_to=object)
        assert [d["task"] for d in out["data"]] == ["task-01", "task-01"]  # the only task it holds
        assert {d["label"] for d in out["data"]} <= {"animal", "food"} and out["model"] == "auto"
    first = copy / "seed-0" / "adapters" / "task-01" / "adapter_model.safetensors"
    first.write_bytes(first.read_bytes()[:-1] + b"\0")
    capsys.readouterr()
    assert main(["serve", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conpet: error: ") and "changed: seed-0/adapters/task-01" in err and err.count("\n") == 1
