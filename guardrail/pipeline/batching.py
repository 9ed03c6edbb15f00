"""Micro-batching: concurrent requests gathered for a short window and run as one batch.

    batcher = MicroBatcher(guard, max_batch=32, window_ms=10, max_queue=256)
    result = batcher.generate(Request("...", tenant="acme"))          # from any thread
    result = await batcher.agenerate(Request("...", tenant="acme"))   # from asyncio
    for chunk in batcher.stream(Request("...")): ...
    async for chunk in batcher.astream(Request("...")): ...

Every request is validated on its own (`Guardrail.validate`) before it is queued, so bad input is
raised to its own caller and never fails the batch it would have joined. One worker thread takes the
first waiting request, gathers whatever else arrives within `window_ms` (up to `max_batch`), and runs
them as one `generate_batch` / `assess_batch`: tenants with different policies share the batch, each
row with its own steering plan. The queue is bounded; when it is full `submit` raises
`OverloadedError` at once instead of letting latency grow without limit.

All state of one request lives in its `_Job`; the batcher holds only the queue and its worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from guardrail.pipeline.aio import AsyncTextStream
from guardrail.errors import OverloadedError
from guardrail.pipeline.streaming import _DONE, TextStream
from guardrail.types import Request, Result

if TYPE_CHECKING:  # pragma: no cover
    from guardrail.pipeline import Guardrail

_STOP = object()


@dataclass
class _Job:
    request: Request
    kind: str  # "generate" or "assess"
    future: "concurrent.futures.Future[Result]" = field(default_factory=concurrent.futures.Future)
    on_token: Callable[[int], None] | None = None
    streamed: bool = False  # a token already went out: this job cannot be retried on its own


class MicroBatcher:
    """Gathers concurrent requests into batches for one `Guardrail`; safe from threads and asyncio."""

    def __init__(
        self,
        guard: "Guardrail",
        *,
        max_batch: int = 32,
        window_ms: float = 10.0,
        max_queue: int = 256,
        on_batch: Callable[[Sequence[Request]], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if window_ms < 0:
            raise ValueError(f"window_ms must be non-negative, got {window_ms}")
        self.guard = guard
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # observes each batch as it starts (metrics, tests)
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max_queue)
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="guardrail-batcher", daemon=True)
        self._worker.start()

    # ----- submitting ---------------------------------------------------------------------------
    def submit(
        self, request: Request, *, kind: str = "generate", on_token: Callable[[int], None] | None = None
    ) -> "concurrent.futures.Future[Result]":
        """Validate and queue one request; returns a future of its Result. Raises InputError for
        bad input and OverloadedError when the queue is full, both before anything is queued."""
        if kind not in ("generate", "assess"):
            raise ValueError(f"kind must be 'generate' or 'assess', got {kind!r}")
        if self._closed.is_set():
            raise OverloadedError("the micro-batcher is shut down and accepts no more requests")
        self.guard.validate(request)
        job = _Job(request=request, kind=kind, on_token=on_token)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise OverloadedError(
                f"overloaded: {self.max_queue} requests are already waiting for the model; retry later"
            ) from None
        return job.future

    def generate(self, request: Request, timeout: float | None = None) -> Result:
        return self.submit(request).result(timeout)

    def assess(self, request: Request, timeout: float | None = None) -> Result:
        return self.submit(request, kind="assess").result(timeout)

    def stream(self, request: Request) -> "BatchedTextStream":
        """Text chunks as the batch generates them; queued (and so validated and admitted) now."""
        return BatchedTextStream(self, request)

    async def agenerate(self, request: Request) -> Result:
        return await self._await(request, "generate")

    async def aassess(self, request: Request) -> Result:
        return await self._await(request, "assess")

    def astream(self, request: Request) -> AsyncTextStream:
        """`async for` the chunks; `await .start()` first to get InputError or OverloadedError
        before the first chunk is awaited."""
        return AsyncTextStream(lambda: self.stream(request))

    async def _await(self, request: Request, kind: str) -> Result:
        # Validation decodes images and counts tokens: keep it off the event loop.
        future = await asyncio.to_thread(self.submit, request, kind=kind)
        # Cancelling the awaiting task cancels the future; a job not yet started is then skipped.
        return await asyncio.wrap_future(future)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop accepting requests, finish those already queued, and stop the worker."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(_STOP)  # blocks only while the queue is full, i.e. until the worker drains it
        self._worker.join(timeout)

    # ----- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs = [first]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                jobs.append(item)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            for kind in ("assess", "generate"):
                group = [j for j in live if j.kind == kind]
                if group:
                    self._run(group)

    def _run(self, jobs: list[_Job]) -> None:
        requests = [j.request for j in jobs]
        if self.on_batch is not None:
            try:
                self.on_batch(requests)
            except Exception:  # an observer must not fail the requests it observes
                pass
        try:
            results = self._call(jobs)
        except BaseException as exc:  # the whole batch failed: find out whose fault it was
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for job in jobs:
                if job.streamed:  # its tokens already went out; a rerun would repeat them
                    job.future.set_exception(exc)
                    continue
                try:
                    job.future.set_result(self._call([job])[0])
                except BaseException as own:
                    job.future.set_exception(own)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _call(self, jobs: list[_Job]) -> list[Result]:
        requests = [j.request for j in jobs]
        if jobs[0].kind == "assess":
            return self.guard.assess_batch(requests)
        if not any(j.on_token for j in jobs):
            return self.guard.generate_batch(requests)

        def dispatch(row: int, token: int) -> None:
            job = jobs[row]
            if job.on_token is not None:
                job.streamed = True
                job.on_token(token)

        return self.guard.generate_batch(requests, on_tokens=dispatch)


class BatchedTextStream(TextStream):
    """A `TextStream` whose tokens come from the micro-batcher instead of a private generation.

    The request is submitted when the stream is made, so InputError and OverloadedError are raised
    to the caller before the first chunk (an HTTP server can still answer 400 or 429)."""

    def __init__(self, batcher: MicroBatcher, request: Request):
        super().__init__(batcher.guard, request)
        self._future = batcher.submit(request, on_token=self._queue.put)

    def _work(self) -> None:
        try:
            self.result = self._future.result()
        except BaseException as exc:  # handed to the consumer, raised there
            self._error = exc
        finally:
            self._queue.put(_DONE)
