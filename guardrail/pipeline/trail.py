"""The audit trail: a request's Result and its one audit record, written to every sink and to the
`guardrail_audit` hook, with a failure handled per the request's policy (never swallowed)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

from guardrail.audit import sha256_text
from guardrail.types import RequestContext, Result


class AuditTrail:
    """The guard's sinks and hooks; holds no per-request state."""

    def __init__(self, sinks: Sequence[Any], plugins: Any, model: str, tracer: Any = None):
        self.sinks = list(sinks)
        self.plugins = plugins
        self.model = model
        self.tracer = tracer

    def finish(self, ctx: RequestContext) -> Result:
        """The request's Result, after its record reached every sink (or its policy handled the failure)."""
        t0 = time.perf_counter()
        result = self.result(ctx)
        record = self.record(ctx, result)
        try:
            self.write(record)
        except Exception as exc:  # never swallowed: the request fails per its policy
            detail = f"{type(exc).__name__}: {exc}"
            if ctx.policy.on_error == "fail_closed":
                ctx.done, ctx.action, ctx.error = True, "error", ("audit", detail)
                result = self.result(ctx)
            else:
                result = replace(result, error=f"audit: {detail}", degraded=True)
            self.failure(record, result)
        ctx.timings_ms["audit"] = (time.perf_counter() - t0) * 1000
        if self.tracer is not None:
            self.tracer.stage("audit", [ctx], t0, ctx.timings_ms["audit"], None)
        total = sum(v for k, v in ctx.timings_ms.items() if k != "total")
        ctx.timings_ms["total"] = total
        return replace(result, timings_ms={k: round(v, 3) for k, v in ctx.timings_ms.items()})

    def result(self, ctx: RequestContext) -> Result:
        policy = ctx.policy
        gen = ctx.generation if not ctx.done else None
        if gen is None:
            if ctx.assess_only and ctx.action != "error":
                text, ids, reason = "", (), "assessed"
            else:
                text, ids, reason = policy.refusal_text, (), "refused"
        else:
            text, ids, reason = gen.text, gen.token_ids, gen.finish_reason
        action = ctx.action
        if ctx.degraded:
            action = "fail_open"
        return Result(
            text=text,
            token_ids=tuple(ids),
            risk=ctx.assessment.risk if ctx.assessment else None,
            band=ctx.band.name if ctx.band else None,
            strength=ctx.plan.strength if ctx.plan.active else 0.0,
            action=action,
            tenant=ctx.tenant,
            policy=policy.name,
            policy_hash=policy.hash,
            visual_context=ctx.reformulation.visual_context if ctx.reformulation else "",
            scores=dict(ctx.assessment.scores) if ctx.assessment else {},
            timings_ms=dict(ctx.timings_ms),
            request_id=ctx.request.request_id,
            finish_reason=reason,
            error=f"{ctx.error[0]}: {ctx.error[1]}" if ctx.error else None,
            degraded=ctx.degraded,
        )

    def record(self, ctx: RequestContext, result: Result) -> dict[str, Any]:
        req, policy = ctx.request, ctx.policy
        ref = ctx.reformulation
        record: dict[str, Any] = {
            "event": "request",
            "request_id": req.request_id,
            "tenant": ctx.tenant,
            "default_policy": ctx.by_default,
            "policy": policy.name,
            "policy_hash": policy.hash,
            "mode": policy.mode,
            "action": result.action,
            "risk": result.risk,
            "band": result.band,
            "input_format": ref.format if ref else None,
            "strength": result.strength,
            "steering": ctx.plan.method if ctx.plan.active else "none",
            "steered_tokens": ctx.plan.tokens if ctx.plan.active else 0,
            "scores": result.scores,
            "raw_scores": dict(ctx.assessment.raw) if ctx.assessment else {},
            "timings_ms": {k: round(v, 3) for k, v in ctx.timings_ms.items()},
            "prompt_sha256": sha256_text(req.text),
            "image_sha256": [img.sha256 for img in ctx.images],
            "output_sha256": sha256_text(result.text),
            "output_tokens": len(result.token_ids),
            "finish_reason": result.finish_reason,
            "caption_cache": {"hits": ref.cache_hits, "misses": ref.cache_misses} if ref else None,
            "error": result.error,
            "degraded": result.degraded,
            "model": self.model,
        }
        if policy.mode == "observe" and ctx.band is not None:
            record["would_strength"] = ctx.band.strength_for(result.risk or 0.0)
            record["would_action"] = ctx.band.action
        if policy.audit.capture_content:
            record["prompt"] = req.text
            record["visual_context"] = result.visual_context
            record["output"] = result.text
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Every sink and the audit hooks get the record even when one of them fails (a broken
        remote sink must not cost the local log its record); then the first failure is raised."""
        errors: list[Exception] = []
        for sink in self.sinks:
            try:
                sink.write(record)
            except Exception as exc:  # collected and raised below
                errors.append(exc)
        try:
            self.plugins.hook.guardrail_audit(record=record)
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def failure(self, record: dict[str, Any], result: Result) -> None:
        """Tell the sinks that still work what became of a request whose record could not be
        written everywhere: the sinks that took it saw an outcome the caller never got. Best
        effort: the request has already failed (or been flagged) because of the first error, so
        a sink failing again here is not raised a second time."""
        event = {
            "event": "audit_error",
            "request_id": record.get("request_id"),
            "tenant": record.get("tenant"),
            "policy": record.get("policy"),
            "action": result.action,
            "error": result.error,
            "output_sha256": sha256_text(result.text),
        }
        for sink in self.sinks:
            try:
                sink.write(event)
            except Exception:  # see the docstring
                pass
        try:
            self.plugins.hook.guardrail_audit(record=event)
        except Exception:  # see the docstring
            pass

    def event(self, record: dict[str, Any]) -> None:
        """Audit a non-request event (a policy reload). A failing sink raises to the caller."""
        self.write(record)
