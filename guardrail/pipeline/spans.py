"""OpenTelemetry spans: one per request, with one child per stage (reformulate, assess, decide,
generate, audit), through the OpenTelemetry *API* only.

The app owns the SDK: with none installed (or no tracer provider set) every span is a no-op, and
without the `opentelemetry-api` package at all nothing here runs. Stages of a batch run once for
many requests, so the runner records each stage's interval on every request it served and the
spans are emitted when the request finishes, with those intervals as explicit start and end
times: the same tree whether the request came alone, in a batch, a stream or through asyncio.
Content (prompt, visual context, answer) is attached only when the policy captures content.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Sequence

from guardrail.types import RequestContext, Result

STAGES = ("reformulate", "assess", "decide", "generate", "audit")


def _default_tracer() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:  # the API is optional: no spans at all
        return None
    return trace.get_tracer("guardrail")


class Spans:
    def __init__(self, tracer: Any = None):
        self.tracer = tracer if tracer is not None else _default_tracer()

    @contextlib.contextmanager
    def batch(self, kind: str, requests: Sequence[Any]) -> Iterator[dict[str, Any]]:
        """The batch's start time; a batch refused at intake gets one error span."""
        info = {"kind": kind, "start_ns": time.time_ns()}
        try:
            yield info
        except Exception as exc:
            if self.tracer is not None:
                span = self.tracer.start_span(f"guardrail.{kind}", start_time=info["start_ns"],
                                              attributes={"guardrail.requests": len(requests)})
                _error(span, exc)
                span.end()
            raise

    def stage(self, stage: str, ctxs: Sequence[RequestContext], t0: float, elapsed_ms: float, err: Exception | None) -> None:
        """Called by the runner after each stage run: remember the interval on every request."""
        if self.tracer is None:
            return
        end_ns = time.time_ns()
        start_ns = end_ns - int(elapsed_ms * 1e6)
        for ctx in ctxs:
            ctx.spans.append((stage, start_ns, end_ns, None if err is None else str(err)))

    def request(self, info: dict[str, Any], ctx: RequestContext, result: Result) -> None:
        if self.tracer is None:
            return
        from opentelemetry import trace

        span = self.tracer.start_span(f"guardrail.{info['kind']}", start_time=info["start_ns"], attributes=_attributes(ctx, result))
        parent = trace.set_span_in_context(span)
        for stage, start_ns, end_ns, error in ctx.spans:
            child = self.tracer.start_span(f"guardrail.{stage}", context=parent, start_time=start_ns,
                                           attributes={"guardrail.stage": stage, "guardrail.request_id": result.request_id})
            if error is not None:
                _error(child, error)
            child.end(end_time=end_ns)
        if result.error:
            _error(span, result.error)
        span.end()


def _attributes(ctx: RequestContext, result: Result) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "guardrail.request_id": result.request_id,
        "guardrail.tenant": result.tenant,
        "guardrail.policy": result.policy,
        "guardrail.policy_hash": result.policy_hash,
        "guardrail.action": result.action,
        "guardrail.strength": float(result.strength),
        "guardrail.finish_reason": result.finish_reason,
        "guardrail.output_tokens": len(result.token_ids),
    }
    if result.band is not None:
        attrs["guardrail.band"] = result.band
    if result.risk is not None:
        attrs["guardrail.risk"] = float(result.risk)
    for stage, ms in result.timings_ms.items():
        attrs[f"guardrail.timing_ms.{stage}"] = float(ms)
    if ctx.policy.audit.capture_content:
        attrs["guardrail.prompt"] = ctx.request.text
        attrs["guardrail.visual_context"] = result.visual_context
        attrs["guardrail.output"] = result.text
    return attrs


def _error(span: Any, error: Any) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
