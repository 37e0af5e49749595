"""Dynamic batching: requests that arrive together are answered by one forward pass.

Every model call runs on one worker thread (the model is not re-entrant, and one thread keeps
torch's threads for the forward pass). The batcher takes the first waiting request, gathers
others that arrive within ``max_wait_ms`` until ``max_batch`` rows, and runs each group of
requests that ask the same thing (classify or generate, the same ``model`` and stop strings) as
one call: rows of different tasks share the pass, each routed to its own module. A failing group
is retried request by request, so one bad request never fails the others.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from conpet.model import ContinualModel


@dataclass
class Job:
    """One request's work: ``kind`` is ``classify``, ``generate`` or ``route``; ``task`` the model it named."""

    kind: str
    task: str | None
    inputs: list[Any]
    limits: list[int] | None = None
    stop: tuple[str, ...] = ()
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]

    @property
    def key(self) -> tuple:
        return self.kind, self.task, self.stop


BatchObserver = Callable[[str, int, float], None]
"""Called after every model call with its kind, its rows and its seconds (metrics)."""


class Batcher:
    def __init__(self, model: ContinualModel, max_batch: int, max_wait_ms: float,
                 observe: BatchObserver | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.observe = observe
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conpet-model")
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        await self.queue.put(None)
        if self.task is not None:
            await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, job: Job) -> list[Any]:
        job.future = asyncio.get_running_loop().create_future()
        await self.queue.put(job)
        return await job.future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model's thread, between batches (a reload)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self.queue.get()
            if first is None:
                break
            jobs, rows = [first], len(first.inputs)
            deadline = loop.time() + self.max_wait
            while rows < self.max_batch:
                try:
                    job = self.queue.get_nowait() if loop.time() >= deadline else \
                        await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                rows += len(job.inputs)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                if not job.future.done():  # a request that timed out or went away is not answered
                    groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                await self._run(group)

    async def _run(self, group: list[Job]) -> None:
        try:
            results = await self.call(lambda: self._answer(group))
        except Exception as error:  # noqa: BLE001 - handed to the request(s) that caused it
            if len(group) > 1:
                for job in group:
                    await self._run([job])
                return
            if not group[0].future.done():
                group[0].future.set_exception(error)
            return
        start = 0
        for job in group:
            part = results[start:start + len(job.inputs)]
            start += len(job.inputs)
            if not job.future.done():
                job.future.set_result(part)

    def _answer(self, group: list[Job]) -> list[Any]:
        """The model call of a group (on the worker thread)."""
        first = group[0]
        inputs = [x for job in group for x in job.inputs]
        began = time.perf_counter()
        if first.kind == "classify":
            out = self.model.predict(inputs, task=first.task)
        elif first.kind == "route":
            out = self.model.route(inputs)
        else:
            limits = [m for job in group for m in job.limits]
            out = self.model.generate(inputs, max_new_tokens=limits, task=first.task, stop=list(first.stop))
        if self.observe is not None:
            self.observe(first.kind, len(inputs), time.perf_counter() - began)
        return out
