"""The stage runner: times a stage, enforces the policies' timeout, and turns any failure into
each request's outcome according to its own policy (fail closed, or fail open unsteered).

A stage function computes over a group of request contexts and returns a *commit* that writes
its results into them. The commit runs here, in the caller's thread and only on success: a stage
that timed out keeps running in its thread, and whatever it returns later must not change a
request that has already failed.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Optional

from guardrail.errors import StageError
from guardrail.engine.interventions import NO_STEERING
from guardrail.types import ChatRow, Reformulation, RequestContext

Commit = Optional[Callable[[], None]]
StageFn = Callable[[list[RequestContext]], Commit]


class StageRunner:
    """Runs stage functions for one guard; holds no per-request state."""

    def __init__(self, supports_images: bool, tracer: Any = None):
        self.supports_images = supports_images
        self.tracer = tracer  # guardrail.pipeline.spans.Spans, or None

    def run(self, stage: str, ctxs: list[RequestContext], fn: StageFn,
            may_retry: Callable[[list[RequestContext]], bool] = lambda group: True) -> None:
        """Run `fn` over a group. When a group that mixes policies fails, each policy's requests
        run the stage again on their own (those `may_retry` allows), so one tenant's faulty or
        hanging plugin, or its short timeout, does not fail the other tenants' requests that
        happen to share the batch."""
        if not ctxs:
            return
        t0 = time.perf_counter()
        err: StageError | None = None
        try:
            commit = self.call(stage, ctxs, fn)
            if commit is not None:
                commit()
        except Exception as exc:  # a stage may raise anything; the policy decides what follows
            err = exc if isinstance(exc, StageError) else StageError(stage, exc)
        elapsed = (time.perf_counter() - t0) * 1000
        for ctx in ctxs:
            ctx.timings_ms[stage] = ctx.timings_ms.get(stage, 0.0) + elapsed
        if self.tracer is not None:
            self.tracer.stage(stage, ctxs, t0, elapsed, err)
        if err is None:
            return
        by_policy: dict[int, list[RequestContext]] = {}
        for ctx in ctxs:
            by_policy.setdefault(id(ctx.runtime), []).append(ctx)
        for group in by_policy.values():
            if len(by_policy) > 1 and may_retry(group):
                self.run(stage, group, fn, may_retry)
            else:
                for ctx in group:
                    self.fail(ctx, stage, err)

    def call(self, stage: str, ctxs: list[RequestContext], fn: StageFn) -> Commit:
        timeouts = [c.policy.limits.stage_timeout_s for c in ctxs if c.policy.limits.stage_timeout_s]
        if not timeouts:
            return fn(ctxs)
        # A thread per timed call, not a pool: a stage that hangs keeps its thread forever, and a
        # few hung threads in a shared pool would leave every later timed stage queued until it,
        # too, timed out (one tenant's hanging plugin refusing everyone's requests).
        future: concurrent.futures.Future = concurrent.futures.Future()

        def work() -> None:
            try:
                future.set_result(fn(ctxs))
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)

        threading.Thread(target=work, name=f"guardrail-{stage}", daemon=True).start()
        try:
            return future.result(timeout=min(timeouts))
        except concurrent.futures.TimeoutError:
            raise StageError(stage, f"timed out after {min(timeouts)} s") from None

    def fail(self, ctx: RequestContext, stage: str, err: StageError) -> None:
        detail = err.error if isinstance(err.error, str) else f"{type(err.error).__name__}: {err.error}"
        ctx.error = (stage, detail)
        ctx.plan = NO_STEERING
        if ctx.policy.on_error == "fail_closed":
            ctx.done = True
            ctx.action = "error"
        else:
            ctx.degraded = True
            if ctx.reformulation is None:
                ctx.reformulation = fallback_reformulation(ctx, self.supports_images)


def fallback_reformulation(ctx: RequestContext, supports_images: bool) -> Reformulation:
    """fail_open after a failed reformulation: the request's own text (and images), unchanged."""
    images = tuple(d.image for d in ctx.images) if supports_images else ()
    row = ChatRow(ctx.request.text, images)
    return Reformulation(visual_context="", risk_prompt=row, answer_prompt=row, format="image" if ctx.images else "text")
