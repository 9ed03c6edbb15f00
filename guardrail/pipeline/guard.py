"""`Guardrail`: runs the stages for a request or a batch.

    tenant -> policy -> reformulate -> assess risk -> band and strength -> generate -> audit

One batch goes through each stage together, whatever the tenants: requests of different policies
share the risk pass and the generation (each row with its own steering plan). All per-request state
lives in a `RequestContext`; the guard itself holds only services (engine, plugins, caches, the
tenant registry), so concurrent calls from threads are safe.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from guardrail.audit import AuditError, sha256_text
from guardrail.engine.backend import Backend, RiskPass
from guardrail.pipeline.caption_cache import CaptionCache
from guardrail.errors import GuardrailError, InputError, PolicyError, StageError
from guardrail.images import decode_image
from guardrail.plugin.manager import PluginManager
from guardrail.policy import AssessorSpec, Policy
from guardrail.plugin.protocols import RiskAssessor, Score, StageEnv
from guardrail.tenants import PolicySet, TenantRegistry
from guardrail.types import (
    NO_STEERING,
    ChatRow,
    Generation,
    Reformulation,
    Request,
    RequestContext,
    Result,
    RiskAssessment,
    SteeringPlan,
)


@dataclass(frozen=True)
class PolicyRuntime:
    """A policy with its stage objects built; made once per policy load, shared by requests."""

    policy: Policy
    reformulator: Any
    assessors: tuple[tuple[AssessorSpec, RiskAssessor], ...]
    controller: Any


Commit = Optional[Callable[[], None]]
"""What a stage function returns: how to write its results into the contexts (see Guardrail._run)."""


def combine(scores: dict[str, Score], specs: Sequence[AssessorSpec], rule: str) -> float:
    values = [scores[s.label].risk for s in specs]
    if rule == "max":
        return max(values)
    if rule == "mean":
        return sum(values) / len(values)
    weights = [s.weight for s in specs]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


class Guardrail:
    """The guard an app builds once and calls per request or per batch."""

    def __init__(
        self,
        engine: Backend,
        policies: str | Path,
        *,
        plugins: PluginManager | None = None,
        audit_log: str | Path | None = None,
        audit_sinks: Iterable[Any] = (),
        caption_cache_size: int = 4096,
    ):
        self.engine = engine
        self.plugins = (plugins or PluginManager()).load()
        self.env = StageEnv(engine=engine, captions=CaptionCache(caption_cache_size), plugins=self.plugins)
        self.sinks = list(audit_sinks)
        if audit_log is not None:
            self.sinks.append(self.plugins.create("audit_sinks", "jsonl", {"path": str(audit_log)}))
        self.registry = TenantRegistry(
            policies, known_stages=self.plugins.known_stages(), on_reload=self._audit_event, prepare=self._prepare
        )

    @classmethod
    def from_model(
        cls,
        model: str,
        policies: str | Path,
        artifacts: str | Path | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> "Guardrail":
        """Build a guard from a model spec (`smollm2`, `tiny-random:ARCH`, a local folder)."""
        from guardrail.method.artifacts import load_artifacts
        from guardrail.models import load_model
        from guardrail.engine.transformers import TransformersBackend

        adapter = load_model(model, device=device)
        art = load_artifacts(artifacts, adapter.fingerprint()) if artifacts is not None else None
        return cls(TransformersBackend(adapter, art), policies, **kwargs)

    # ----- policies -----------------------------------------------------------------------------
    def _prepare(self, policy_set: PolicySet) -> dict[str, PolicyRuntime]:
        """Build every policy's stages and let each check it can serve this model; any failure
        rejects the whole set (the registry then keeps the previous one)."""
        runtimes: dict[str, PolicyRuntime] = {}
        for name, policy in policy_set.policies.items():
            try:
                runtime = PolicyRuntime(
                    policy=policy,
                    reformulator=self.plugins.create("reformulators", policy.reformulator.use, policy.reformulator.params),
                    assessors=tuple(
                        (spec, self.plugins.create("risk_assessors", spec.use, spec.params)) for spec in policy.risk.assessors
                    ),
                    controller=self.plugins.create("steering_controllers", policy.steering.use, policy.steering.params),
                )
                stages = [runtime.reformulator, runtime.controller] + [a for _, a in runtime.assessors]
                for stage in stages:
                    check = getattr(stage, "check", None)
                    if check is not None:
                        check(self.env, policy)
            except GuardrailError as exc:
                raise PolicyError([(f"policy {name}", 1, str(exc))]) from exc
            except Exception as exc:  # a plugin's factory or check() can raise anything
                raise PolicyError([(f"policy {name}", 1, f"a stage failed to build: {type(exc).__name__}: {exc}")]) from exc
            runtimes[name] = runtime
        return runtimes

    def reload_policies(self) -> dict[str, Any]:
        """Re-read the policies; keeps the last good set when anything is invalid."""
        return self.registry.reload()

    @property
    def policies(self) -> PolicySet:
        return self.registry.current

    # ----- public entry points ------------------------------------------------------------------
    def generate(self, request: Request | str, **fields: Any) -> Result:
        req = request if isinstance(request, Request) else Request(text=request, **fields)
        return self.generate_batch([req])[0]

    def generate_batch(
        self, requests: Sequence[Request], on_tokens: Callable[[int, int], None] | None = None
    ) -> list[Result]:
        """Guarded answers for a batch. Bad input anywhere raises InputError before anything runs.
        `on_tokens(request_index, token_id)` receives response tokens as they are generated."""
        ctxs = self._start(requests)
        with self._prefix_scope():
            self._reformulate(ctxs)
            self._assess(ctxs)
            self._decide(ctxs)
            self._generate(ctxs, on_tokens)
        return [self._finish(ctx) for ctx in ctxs]

    def assess(self, request: Request | str, **fields: Any) -> Result:
        """Risk only: reformulate and assess, audit, and answer nothing."""
        req = request if isinstance(request, Request) else Request(text=request, **fields)
        return self.assess_batch([req])[0]

    def assess_batch(self, requests: Sequence[Request]) -> list[Result]:
        ctxs = self._start(requests)
        for ctx in ctxs:
            ctx.assess_only = True
        with self._prefix_scope():
            self._reformulate(ctxs)
            self._assess(ctxs)
            self._decide(ctxs)
        return [self._finish(ctx) for ctx in ctxs]

    def _prefix_scope(self) -> Any:
        """Lets the engine reuse one image-prefix KV cache across a batch's caption, risk and answer
        passes (TransformersBackend.prefix_scope); engines without it run each pass in full."""
        scope = getattr(self.engine, "prefix_scope", None)
        return scope() if scope is not None else contextlib.nullcontext()

    def stream(self, request: Request | str, **fields: Any) -> "TextStream":
        """An iterator of text chunks; joined they equal `generate(request).text`. After the
        iteration ends, `.result` holds the Result (with the same audit fields)."""
        from guardrail.pipeline.streaming import TextStream

        req = request if isinstance(request, Request) else Request(text=request, **fields)
        return TextStream(self, req)

    # ----- asyncio: the same pipeline, run in a worker thread so the event loop never blocks -----
    async def agenerate(self, request: Request | str, **fields: Any) -> Result:
        import asyncio

        return await asyncio.to_thread(self.generate, request, **fields)

    async def agenerate_batch(
        self, requests: Sequence[Request], on_tokens: Callable[[int, int], None] | None = None
    ) -> list[Result]:
        """`on_tokens` is called from the worker thread (use loop.call_soon_threadsafe to hop back)."""
        import asyncio

        return await asyncio.to_thread(self.generate_batch, requests, on_tokens)

    async def aassess(self, request: Request | str, **fields: Any) -> Result:
        import asyncio

        return await asyncio.to_thread(self.assess, request, **fields)

    def astream(self, request: Request | str, **fields: Any) -> "AsyncTextStream":
        """`async for chunk in guard.astream(...)`; `.result` after the loop, as with `stream`."""
        from guardrail.pipeline.aio import AsyncTextStream

        return AsyncTextStream(lambda: self.stream(request, **fields))

    def validate(self, request: Request) -> None:
        """Raise InputError if the request would be rejected; runs nothing else."""
        self._start([request])

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    # ----- stages -------------------------------------------------------------------------------
    def _start(self, requests: Sequence[Request]) -> list[RequestContext]:
        policy_set, runtimes = self.registry.snapshot()
        ctxs = []
        for index, req in enumerate(requests):
            t0 = time.perf_counter()
            try:
                _check_fields(req)
                tenant, policy = policy_set.resolve(req.tenant)
                ctx = RequestContext(request=req, tenant=tenant, policy=policy, runtime=runtimes[policy.name])
                self._validate(ctx)
            except InputError as exc:
                prefix = f"request {index}: " if len(requests) > 1 else ""
                raise type(exc)(f"{prefix}{exc}") from None
            ctx.timings_ms["validate"] = (time.perf_counter() - t0) * 1000
            ctxs.append(ctx)
        return ctxs

    def _validate(self, ctx: RequestContext) -> None:
        req, limits = ctx.request, ctx.policy.limits
        if not req.text.strip():
            raise InputError("empty prompt")
        if len(req.images) > limits.max_images:
            raise InputError(f"{len(req.images)} images exceeds the policy's limit of {limits.max_images}")
        max_new = req.max_new_tokens if req.max_new_tokens is not None else limits.max_new_tokens
        if not isinstance(max_new, int) or max_new < 1 or max_new > limits.max_new_tokens:
            raise InputError(f"max_new_tokens must be between 1 and {limits.max_new_tokens}, got {max_new!r}")
        if req.force_strength is not None and not 0.0 <= req.force_strength <= 1.0:
            raise InputError(f"force_strength must be in [0, 1], got {req.force_strength}")
        n_tokens = self.engine.count_tokens(req.text)
        if n_tokens + max_new > self.engine.max_context:
            raise InputError(
                f"prompt too long: {n_tokens} tokens plus max_new_tokens {max_new} exceeds the model's "
                f"context of {self.engine.max_context}"
            )
        ctx.max_new_tokens = max_new
        ctx.images = [
            decode_image(src, limits.max_image_pixels, limits.max_image_bytes, i) for i, src in enumerate(req.images)
        ]

    def _run(
        self,
        stage: str,
        ctxs: list[RequestContext],
        fn: Callable[[list[RequestContext]], Commit],
        may_retry: Callable[[list[RequestContext]], bool] = lambda group: True,
    ) -> None:
        """Run one stage over a group: time it, enforce the policies' timeout, and turn any
        exception into each request's failure according to its own policy.

        `fn` computes the stage and returns a commit that writes its results into the contexts. The
        commit runs here, in the caller's thread and only on success: a stage that timed out keeps
        running in its thread, and whatever it returns later must not change a request that has
        already failed (closed, or open with the fallback prompt).

        When a group that mixes policies fails, each policy's requests run the stage again on their
        own (those `may_retry` allows), so one tenant's faulty or hanging plugin, or its short
        timeout, does not fail the other tenants' requests that happen to share the batch."""
        if not ctxs:
            return
        t0 = time.perf_counter()
        err: StageError | None = None
        try:
            commit = self._call(stage, ctxs, fn)
            if commit is not None:
                commit()
        except Exception as exc:  # a stage may raise anything; the policy decides what follows
            err = exc if isinstance(exc, StageError) else StageError(stage, exc)
        elapsed = (time.perf_counter() - t0) * 1000
        for ctx in ctxs:
            ctx.timings_ms[stage] = ctx.timings_ms.get(stage, 0.0) + elapsed
        if err is None:
            return
        by_policy: dict[int, list[RequestContext]] = {}
        for ctx in ctxs:
            by_policy.setdefault(id(ctx.runtime), []).append(ctx)
        for group in by_policy.values():
            if len(by_policy) > 1 and may_retry(group):
                self._run(stage, group, fn, may_retry)
            else:
                for ctx in group:
                    self._fail(ctx, stage, err)

    def _call(self, stage: str, ctxs: list[RequestContext], fn: Callable[[list[RequestContext]], Commit]) -> Commit:
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

    def _fail(self, ctx: RequestContext, stage: str, err: StageError) -> None:
        detail = err.error if isinstance(err.error, str) else f"{type(err.error).__name__}: {err.error}"
        ctx.error = (stage, detail)
        if ctx.policy.on_error == "fail_closed":
            ctx.done = True
            ctx.action = "error"
            ctx.plan = NO_STEERING
        else:
            ctx.degraded = True
            ctx.plan = NO_STEERING
            if ctx.reformulation is None:
                ctx.reformulation = _fallback_reformulation(ctx, self.engine.supports_images)

    def _reformulate(self, ctxs: list[RequestContext]) -> None:
        groups: dict[int, list[RequestContext]] = {}
        for ctx in ctxs:
            groups.setdefault(id(ctx.runtime.reformulator), []).append(ctx)

        def run(group: list[RequestContext]) -> Commit:
            stage = group[0].runtime.reformulator
            out = stage.reformulate(group, self.env)
            if len(out) != len(group):
                raise RuntimeError(f"reformulator returned {len(out)} results for {len(group)} requests")

            def commit() -> None:
                for ctx, ref in zip(group, out):
                    ctx.reformulation = ref

            return commit

        for group in groups.values():
            self._run("reformulate", group, run)

    def _assess(self, ctxs: list[RequestContext]) -> None:
        live = [c for c in ctxs if not c.done and not c.degraded and not c.request.unguarded]
        if not live:
            return

        def run(group: list[RequestContext]) -> Commit:
            needs = [a.needs(self.env) for c in group for _, a in c.runtime.assessors]
            steps = max((n.steps for n in needs), default=0)
            layers = sorted(set().union(*(n.layers for n in needs))) if needs else []
            if steps or layers:
                risk_pass = self.engine.risk_pass([c.reformulation.risk_prompt for c in group], steps, layers)
            else:
                risk_pass = RiskPass(step_logits=None)
            per_ctx: list[dict[str, Score]] = [{} for _ in group]
            # Each assessor object scores, in one call, the rows of every policy that uses it.
            by_assessor: dict[int, tuple[RiskAssessor, list[tuple[int, str]]]] = {}
            for i, ctx in enumerate(group):
                for spec, assessor in ctx.runtime.assessors:
                    by_assessor.setdefault(id(assessor), (assessor, []))[1].append((i, spec.label))
            for assessor, rows in by_assessor.values():
                index = [i for i, _ in rows]
                scores = assessor.score(risk_pass.select(index), [group[i] for i in index], self.env)
                if len(scores) != len(rows):
                    raise RuntimeError(f"assessor {rows[0][1]!r} returned {len(scores)} scores for {len(rows)} rows")
                for (i, label), score in zip(rows, scores):
                    if not 0.0 <= score.risk <= 1.0:  # also rejects NaN
                        raise RuntimeError(f"assessor {label!r} returned risk {score.risk} outside [0, 1]")
                    per_ctx[i][label] = score
            assessments = [
                RiskAssessment(
                    risk=combine(scores, [s for s, _ in ctx.runtime.assessors], ctx.policy.risk.combine),
                    scores={k: v.risk for k, v in scores.items()},
                    raw={k: v.raw for k, v in scores.items()},
                )
                for ctx, scores in zip(group, per_ctx)
            ]

            def commit() -> None:
                for ctx, assessment in zip(group, assessments):
                    ctx.assessment = assessment

            return commit

        self._run("assess", live, run)

    def _decide(self, ctxs: list[RequestContext]) -> None:
        # The controller is a plugin like any other stage: its faults and hangs go through _run,
        # so they fail the request per its policy instead of escaping from the whole batch.
        groups: dict[int, list[RequestContext]] = {}
        for ctx in ctxs:
            if not ctx.done and not ctx.degraded:
                groups.setdefault(id(ctx.runtime.controller), []).append(ctx)

        def plan(controller: Any, strength: float, tokens: int) -> SteeringPlan:
            out = controller.plan(strength, tokens)
            if not isinstance(out, SteeringPlan):
                raise TypeError(f"steering controller returned {type(out).__name__}, not a SteeringPlan")
            return out

        def decide(ctx: RequestContext) -> tuple[str, SteeringPlan, Any, bool]:
            """(action, plan, band, done) for one request."""
            req, policy = ctx.request, ctx.policy
            if req.unguarded:
                return "unguarded", NO_STEERING, None, ctx.assess_only
            risk = ctx.assessment.risk if ctx.assessment else 0.0
            band = policy.band_for(risk)
            controller = ctx.runtime.controller
            if req.force_strength is not None:
                return "forced", plan(controller, req.force_strength, band.tokens), band, ctx.assess_only
            if policy.mode == "observe":
                return "observe", NO_STEERING, band, ctx.assess_only
            if band.action == "refuse":
                return "refuse", NO_STEERING, band, True
            return "steer", plan(controller, band.strength_for(risk), band.tokens), band, ctx.assess_only

        def run(group: list[RequestContext]) -> Commit:
            decisions = [decide(ctx) for ctx in group]

            def commit() -> None:
                for ctx, (action, steering, band, done) in zip(group, decisions):
                    ctx.action, ctx.plan, ctx.done = action, steering, done
                    if band is not None:
                        ctx.band = band

            return commit

        for group in groups.values():
            self._run("steer", group, run)

    def _generate(self, ctxs: list[RequestContext], on_tokens: Callable[[int, int], None] | None) -> None:
        position = {id(c): i for i, c in enumerate(ctxs)}
        groups: dict[int, list[RequestContext]] = {}
        for ctx in ctxs:
            if not ctx.done:
                groups.setdefault(ctx.max_new_tokens, []).append(ctx)

        streamed: set[int] = set()  # requests whose tokens already went out: never generated twice

        def run(group: list[RequestContext]) -> Commit:
            callback = None
            if on_tokens is not None:
                index = [position[id(c)] for c in group]

                def callback(row: int, token: int) -> None:
                    streamed.add(id(group[row]))
                    on_tokens(index[row], token)
            gens = self.engine.generate(
                [c.reformulation.answer_prompt for c in group],
                [c.plan for c in group],
                group[0].max_new_tokens,
                on_tokens=callback,
            )
            if len(gens) != len(group):
                raise RuntimeError(f"the engine returned {len(gens)} generations for {len(group)} prompts")

            def commit() -> None:
                for ctx, gen in zip(group, gens):
                    ctx.generation = gen

            return commit

        for group in groups.values():
            self._run("generate", group, run, lambda sub: not any(id(c) in streamed for c in sub))
            # fail_open: a generation that failed with steering is retried once without it.
            # A request whose tokens were already streamed is not generated twice.
            failed = [c for c in group if c.degraded and c.generation is None and not c.done]
            retry = [c for c in failed if id(c) not in streamed]
            if retry:
                for ctx in retry:
                    ctx.plan = NO_STEERING
                self._run("generate", retry, run)
            for ctx in failed:
                if ctx.generation is None:
                    ctx.done, ctx.action = True, "error"

    # ----- results and audit --------------------------------------------------------------------
    def _finish(self, ctx: RequestContext) -> Result:
        t0 = time.perf_counter()
        result = self._result(ctx)
        record = self._record(ctx, result)
        try:
            self._write_audit(record)
        except Exception as exc:  # never swallowed: the request fails per its policy
            detail = f"{type(exc).__name__}: {exc}"
            if ctx.policy.on_error == "fail_closed":
                ctx.done, ctx.action, ctx.error = True, "error", ("audit", detail)
                result = self._result(ctx)
            else:
                result = _replace(result, error=f"audit: {detail}", degraded=True)
            self._audit_failure(record, result)
        ctx.timings_ms["audit"] = (time.perf_counter() - t0) * 1000
        total = sum(v for k, v in ctx.timings_ms.items() if k != "total")
        ctx.timings_ms["total"] = total
        return _replace(result, timings_ms={k: round(v, 3) for k, v in ctx.timings_ms.items()})

    def _result(self, ctx: RequestContext) -> Result:
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

    def _record(self, ctx: RequestContext, result: Result) -> dict[str, Any]:
        req, policy = ctx.request, ctx.policy
        ref = ctx.reformulation
        record: dict[str, Any] = {
            "event": "request",
            "request_id": req.request_id,
            "tenant": ctx.tenant,
            "policy": policy.name,
            "policy_hash": policy.hash,
            "mode": policy.mode,
            "action": result.action,
            "risk": result.risk,
            "band": result.band,
            "strength": result.strength,
            "steering": ctx.plan.mode if ctx.plan.active else "none",
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
            "model": self.engine.name,
        }
        if policy.mode == "observe" and ctx.band is not None:
            record["would_strength"] = ctx.band.strength_for(result.risk or 0.0)
            record["would_action"] = ctx.band.action
        if policy.audit.capture_content:
            record["prompt"] = req.text
            record["visual_context"] = result.visual_context
            record["output"] = result.text
        return record

    def _write_audit(self, record: dict[str, Any]) -> None:
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

    def _audit_failure(self, record: dict[str, Any], result: Result) -> None:
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

    def _audit_event(self, record: dict[str, Any]) -> None:
        """Audit a non-request event (a policy reload). A failing sink raises to the caller."""
        self._write_audit(record)


def _check_fields(req: Request) -> None:
    """The request's fields have the types the stages assume. A wrong one (from a caller, or a
    JSON body passed through) is an InputError naming it, not a TypeError from deep inside a stage,
    the tokenizer or the audit hash; a truthy string must not switch `unguarded` on."""

    def text(value: Any, name: str) -> None:
        if not isinstance(value, str):
            raise InputError(f"{name} must be a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"{name} is not valid Unicode: {exc.reason} at position {exc.start}") from None

    def number(value: Any, name: str, types: tuple[type, ...]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise InputError(f"{name} must be a {'whole ' if types == (int,) else ''}number, got {type(value).__name__}")

    text(req.text, "prompt")
    if req.tenant is not None:
        text(req.tenant, "tenant")
    text(req.request_id, "request_id")
    if not isinstance(req.images, (tuple, list)):
        raise InputError(f"images must be a list of images, got {type(req.images).__name__}")
    number(req.max_new_tokens, "max_new_tokens", (int,))
    number(req.force_strength, "force_strength", (int, float))
    if not isinstance(req.unguarded, bool):
        raise InputError(f"unguarded must be true or false, got {type(req.unguarded).__name__}")


def _fallback_reformulation(ctx: RequestContext, supports_images: bool) -> Reformulation:
    images = tuple(d.image for d in ctx.images) if supports_images else ()
    row = ChatRow(ctx.request.text, images)
    return Reformulation(visual_context="", risk_prompt=row, answer_prompt=row)


def _replace(result: Result, **changes: Any) -> Result:
    from dataclasses import replace

    return replace(result, **changes)
