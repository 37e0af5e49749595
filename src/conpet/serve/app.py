"""The HTTP face of a :class:`~conpet.model.ContinualModel`: OpenAI-compatible endpoints on FastAPI.

- ``GET /v1/models``: ``auto`` (the run's own routing) and every loaded task;
- ``POST /v1/chat/completions``, ``POST /v1/completions`` (generative runs; ``stream: true`` as
  server-sent events), ``POST /v1/classify`` (classification runs);
- ``GET /health``, ``GET /metrics`` (Prometheus), ``POST /admin/reload``.

Every answer says which task answered (``conpet.task`` in the body, ``X-Conpet-Task`` for one
input). Every error is a JSON body in OpenAI's shape with its status, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError

from conpet.errors import ConpetError
from conpet.model import ContinualModel, Generation
from conpet.serve.batcher import Batcher, Job
from conpet.serve.settings import ServeSettings, read_api_key

log = logging.getLogger("conpet.serve")
AUTO = "auto"
OPEN = ("/health",)
"""Paths answered without the API key (a load balancer's probe)."""


class APIError(Exception):
    """An error a client gets as ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             502: "server_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request bodies ------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI parameters conpet does not read are accepted

    model: str
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = False


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = AUTO
    input: str | dict[str, Any] | list[str | dict[str, Any]]


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("conpet_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("conpet_request_seconds", "Time to answer a request", ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_rows = Histogram("conpet_batch_rows", "Rows one model call served", ["kind"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("conpet_batch_seconds", "Seconds of one model call", ["kind"], registry=r)
        self.task_rows = Counter("conpet_task_rows", "Rows answered, by the task that answered", ["task"], registry=r)
        self.confidence = Histogram("conpet_router_confidence", "The router's probability of the task it chose",
                                    registry=r, buckets=(.1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .99, 1))
        self.tokens = Counter("conpet_tokens", "Tokens read and written", ["kind"], registry=r)
        self.tasks = Gauge("conpet_tasks_loaded", "Tasks the server answers", registry=r)
        self.in_flight = Gauge("conpet_requests_in_flight", "Requests being answered", registry=r)
        self.reloads = Counter("conpet_reloads", "Reloads of the run's finished tasks", ["result"], registry=r)

    def observe_batch(self, kind: str, rows: int, seconds: float) -> None:
        self.batch_rows.labels(kind).observe(rows)
        self.batch_seconds.labels(kind).observe(seconds)

    def answered(self, results: list[Any]) -> None:
        for x in results:
            self.task_rows.labels(x.task or "shared").inc()
            if x.confidence is not None:
                self.confidence.observe(x.confidence)


def create_app(model: ContinualModel, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``model`` under ``settings`` (checked)."""
    settings.check()
    key = read_api_key(settings.api_key_file) if settings.api_key_file else None
    upstream_key = read_api_key(settings.upstream_key_file) if settings.upstream_key_file else None
    metrics = Metrics()
    batcher = Batcher(model, settings.max_batch, settings.max_wait_ms, metrics.observe_batch)
    prompt_limit = settings.max_prompt_tokens or model.cfg.train.max_length
    state: dict[str, Any] = {"in_flight": 0, "stamp": None, "watcher": None}

    def tasks_changed_stamp() -> tuple:
        """What changes when the run finishes a task (cheap: file times, no hashing)."""
        paths = [model.run_dir / "manifest.json", model.run_dir / f"seed-{model.seed}" / "state.json"]
        return tuple(p.stat().st_mtime_ns if p.is_file() else 0 for p in paths)

    async def reload() -> list[str]:
        try:
            added = await batcher.call(model.refresh)
        except Exception as error:  # noqa: BLE001 - reported, the loaded tasks keep answering
            metrics.reloads.labels("failed").inc()
            log.error("reload failed: %s", error)
            raise APIError(503, f"reload failed: {error}", code="reload_failed") from error
        metrics.tasks.set(len(model.tasks))
        for problem in model.problems:
            log.warning("refused: %s", problem)
        metrics.reloads.labels("added" if added else "unchanged").inc()
        if added:
            log.warning("loaded task(s) %s", ", ".join(added))
        return added

    async def watch() -> None:
        while True:
            await asyncio.sleep(settings.watch_s)
            stamp = await asyncio.to_thread(tasks_changed_stamp)
            if stamp != state["stamp"]:
                state["stamp"] = stamp
                try:
                    await reload()
                except APIError:
                    pass

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        metrics.tasks.set(len(model.tasks))
        state["stamp"] = tasks_changed_stamp()
        if settings.watch_s > 0:
            state["watcher"] = asyncio.get_running_loop().create_task(watch())
        try:
            yield
        finally:
            if state["watcher"] is not None:
                state["watcher"].cancel()
            await batcher.stop()

    app = FastAPI(title="conpet serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.model, app.state.settings, app.state.metrics = model, settings, metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Key, requests in flight, body size; the status and latency of every request."""
        path = request.url.path
        began = time.perf_counter()
        counted = path.startswith(("/v1/", "/admin/"))
        try:
            if key is not None and path not in OPEN:
                sent = request.headers.get("authorization", "")
                token = sent[7:].strip() if sent.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), key.encode()):
                    raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                   code="invalid_api_key")
            if counted and state["in_flight"] >= settings.max_in_flight:
                raise APIError(429, f"the server answers at most {settings.max_in_flight} request(s) at once; "
                                        f"retry shortly",
                               code="too_many_requests", headers={"Retry-After": "1"})
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
                raise APIError(413, f"the body is {length} bytes; at most {settings.max_body_bytes} are accepted",
                               code="request_too_large")
            if counted:
                state["in_flight"] += 1
                metrics.in_flight.inc()
            try:
                response = await call_next(request)
            finally:
                if counted:
                    state["in_flight"] -= 1
                    metrics.in_flight.dec()
        except APIError as error:
            response = error.response()
        except Exception:  # noqa: BLE001 - logged here; the client gets a JSON 500, never a traceback
            log.exception("internal error on %s", path)
            response = APIError(500, "internal error (see the server's log)").response()
        endpoint = path if request.scope.get("route") is not None or path in ENDPOINTS else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - began)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(404)
    async def not_found(request: Request, error):
        return APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def not_allowed(request: Request, error):
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    async def body_of(request: Request, kind: type[BaseModel]) -> Any:
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise APIError(413, f"the body is {len(raw)} bytes; at most {settings.max_body_bytes} are accepted",
                           code="request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
        try:
            return kind.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise APIError(422, f"{where}: {first['msg']}", param=where, code="invalid_value") from None

    def task_of(name: str) -> str | None:
        if name == AUTO:
            return None
        if name not in model.tasks:
            raise APIError(404, f"the model '{name}' does not exist; models: {', '.join([AUTO, *model.tasks])}",
                           param="model", code="model_not_found")
        return name

    async def answer(job: Job) -> list[Any]:
        try:
            return await asyncio.wait_for(batcher.submit(job), settings.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"not answered within {settings.timeout_s:g} s", code="timeout",
                           headers={"Retry-After": "1"}) from None
        except ConpetError as error:
            raise APIError(400, str(error)) from None

    async def generated(task: str | None, prompts: list[str], limits: list[int], stop: tuple[str, ...]
                        ) -> list[Generation]:
        """The answers, made here or (``--upstream``) routed here and made by the upstream server."""
        if settings.upstream is None:
            return await answer(Job("generate", task, prompts, limits, stop))
        if task is None and model.routes is not None:
            routes = await answer(Job("route", None, prompts))
            targets = [(r.task, r.confidence) for r in routes]
        else:  # a named task, or one module that answers every task (exported under every task's name)
            targets = [(task or model.tasks[0], None)] * len(prompts)
        answers = await asyncio.gather(*(asyncio.to_thread(upstream_call, p, t, m, stop)
                                         for p, (t, _), m in zip(prompts, targets, limits)))
        return [Generation(p, text, t if task or model.routes else None, c, used, made, reason)
                for p, (t, c), (text, used, made, reason) in zip(prompts, targets, answers)]

    def upstream_call(prompt: str, target: str, limit: int, stop: tuple[str, ...]) -> tuple[str, int, int, str]:
        """One greedy answer from the upstream server with ``model=target``, the prompt formatted as
        the run formats it (a chat turn when it trained with the chat template)."""
        body: dict[str, Any] = {"model": target, "max_tokens": limit, "temperature": 0}
        if stop:
            body["stop"] = list(stop)
        if model.chat_template:
            path, body["messages"] = "/chat/completions", [{"role": "user", "content": prompt}]
        else:
            path, body["prompt"] = "/completions", prompt + "\n"
        headers = {"Content-Type": "application/json"}
        if upstream_key:
            headers["Authorization"] = f"Bearer {upstream_key}"
        request = urllib.request.Request(settings.upstream.rstrip("/") + path, data=json.dumps(body).encode(),
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=settings.timeout_s) as r:
                data = json.loads(r.read())
        except urllib.error.HTTPError as error:
            raise APIError(502, f"the upstream server answered {error.code}: {error.read()[:300]!r}",
                           code="upstream_error") from None
        except (OSError, ValueError) as error:
            raise APIError(502, f"the upstream server at {settings.upstream} failed: {error}",
                           code="upstream_error") from None
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = data.get("usage") or {}
        return (text.strip(), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                choice.get("finish_reason") or "stop")

    def check_prompt(text: str, param: str) -> None:
        n = model.count_tokens(text)
        if n > prompt_limit:
            raise APIError(400, f"{param} is {n} tokens; at most {prompt_limit} are accepted", param=param,
                           code="context_length_exceeded")

    def generation_limits(body: _Body, count: int, default: int) -> list[int]:
        if not model.generative:
            raise APIError(400, "this run classifies: use POST /v1/classify", code="wrong_endpoint")
        if body.temperature not in (None, 0):
            raise APIError(400, "conpet answers greedily: temperature must be 0 (or left out)", param="temperature")
        if body.top_p not in (None, 1):
            raise APIError(400, "conpet answers greedily: top_p must be 1 (or left out)", param="top_p")
        if body.n != 1:
            raise APIError(400, "n must be 1 (greedy decoding gives one answer)", param="n")
        if count > settings.max_rows:
            raise APIError(400, f"{count} prompts; at most {settings.max_rows} per request", param="prompt")
        wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens or default
        if not 1 <= wanted <= settings.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {settings.max_tokens}, got {wanted}",
                           param="max_tokens")
        return [wanted] * count

    def stops(body: _Body) -> tuple[str, ...]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop strings", param="stop")
        return tuple(stop)

    def conpet_field(x: Any) -> dict[str, Any]:
        return {"task": x.task, "confidence": x.confidence}

    def task_header(results: list[Any]) -> dict[str, str]:
        return {"X-Conpet-Task": results[0].task or "shared"} if len(results) == 1 else {}

    def usage(results: list[Any]) -> dict[str, int]:
        p, c = sum(g.prompt_tokens for g in results), sum(g.completion_tokens for g in results)
        metrics.tokens.labels("prompt").inc(p)
        metrics.tokens.labels("completion").inc(c)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # -- endpoints ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "degraded" if model.problems else "ok", "run": str(model.run_dir), "seed": model.seed,
                "kind": "generate" if model.generative else "classify", "routes": model.routes,
                "tasks": model.tasks, "problems": model.problems}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(model.run_dir.stat().st_mtime)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "conpet"}
                                          for name in [AUTO, *model.tasks]]}

    @app.post("/admin/reload")
    async def admin_reload():
        added = await reload()
        return {"added": added, "tasks": model.tasks, "problems": model.problems}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await body_of(request, ClassifyBody)
        if model.generative:
            raise APIError(400, "this run is generative: use POST /v1/chat/completions or /v1/completions",
                           code="wrong_endpoint")
        task = task_of(body.model)
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if not inputs or len(inputs) > settings.max_rows:
            raise APIError(400, f"input: give 1 to {settings.max_rows} inputs, got {len(inputs)}", param="input")
        for k, x in enumerate(inputs):
            check_prompt(x if isinstance(x, str) else str(x.get("text", "")), f"input[{k}]")
        results = await answer(Job("classify", task, list(inputs)))
        metrics.answered(results)
        return JSONResponse({"object": "list", "model": body.model,
                             "data": [{"index": k, **p.to_dict()} for k, p in enumerate(results)]},
                            headers=task_header(results))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request, CompletionBody)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        limits = generation_limits(body, len(prompts), 16)
        task = task_of(body.model)
        for k, p in enumerate(prompts):
            check_prompt(p, "prompt" if len(prompts) == 1 else f"prompt[{k}]")
        results = await generated(task, prompts, limits, stops(body))
        metrics.answered(results)
        made, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        choices = [{"index": k, "text": (p if body.echo else "") + g.text, "logprobs": None,
                    "finish_reason": g.finish_reason, "conpet": conpet_field(g)}
                   for k, (p, g) in enumerate(zip(prompts, results))]
        if body.stream:
            chunks = [{"id": ident, "object": "text_completion", "created": made, "model": body.model,
                       "choices": [c]} for c in choices]
            return sse(chunks, usage(results) if (body.stream_options or {}).get("include_usage") else None,
                       {"id": ident, "object": "text_completion", "created": made, "model": body.model},
                       task_header(results))
        return JSONResponse({"id": ident, "object": "text_completion", "created": made, "model": body.model,
                             "choices": choices, "usage": usage(results)}, headers=task_header(results))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request, ChatBody)
        limits = generation_limits(body, 1, model.cfg_data_max_new_tokens)
        task = task_of(body.model)
        prompt = single_turn(body.messages)
        check_prompt(prompt, "messages")
        results = await generated(task, [prompt], limits, stops(body))
        metrics.answered(results)
        g = results[0]
        made, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion.chunk", "created": made, "model": body.model}
        if body.stream:
            chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]},
                      {**head, "choices": [{"index": 0, "delta": {"content": g.text}, "finish_reason": None}]},
                      {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": g.finish_reason}],
                       "conpet": conpet_field(g)}]
            return sse(chunks, usage(results) if (body.stream_options or {}).get("include_usage") else None,
                       head, task_header(results))
        return JSONResponse({"id": ident, "object": "chat.completion", "created": made, "model": body.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                                          "finish_reason": g.finish_reason}],
                             "usage": usage(results), "conpet": conpet_field(g)}, headers=task_header(results))

    return app


ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/classify", "/v1/completions", "/v1/chat/completions",
             "/admin/reload")


def single_turn(messages: list[Message]) -> str:
    """The prompt of a chat: one user message (a run learns single-turn prompts; its chat template,
    if it trained with one, is applied as in training)."""
    users = [m for m in messages if m.role == "user"]
    if len(messages) != 1 or len(users) != 1:
        raise APIError(400, "messages: conpet runs answer single-turn prompts, the form they learned: send one "
                            "user message", param="messages")
    content = users[0].content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if p.get("type") == "text"]
        if len(parts) != len(content):
            raise APIError(400, "messages: only text content is understood", param="messages")
        content = "".join(parts)
    if not content or not content.strip():
        raise APIError(400, "messages: the user message is empty", param="messages")
    return content


def sse(chunks: list[dict[str, Any]], usage: dict[str, int] | None, head: dict[str, Any],
        headers: dict[str, str]) -> StreamingResponse:
    """Server-sent events: the chunks, the usage chunk when asked for, then ``[DONE]``."""

    def events():
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        if usage is not None:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
