"""`Guardrail`: the façade an app builds once and calls per request or per batch.

    tenant -> policy -> reformulate -> assess risk -> band and strength -> generate -> audit

The rooms behind it: `intake` (validation), `steps` (the four stages as plain functions),
`runner` (timeouts, fail-closed/open), `trail` (results and audit), `runtime` (a policy's built
and checked stages), `spans` (OpenTelemetry). All per-request state lives in a `RequestContext`;
the guard holds only services (engine, plugins, caches, the tenant registry), so concurrent calls
from threads are safe.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from guardrail.audit import JsonlSink
from guardrail.engine.backend import Backend
from guardrail.errors import InputError
from guardrail.pipeline import intake, steps
from guardrail.pipeline.caption_cache import CaptionCache
from guardrail.pipeline.runner import StageRunner
from guardrail.pipeline.runtime import PolicyRuntime, prepare
from guardrail.pipeline.spans import Spans
from guardrail.pipeline.trail import AuditTrail
from guardrail.plugin.manager import PluginManager
from guardrail.plugin.protocols import StageEnv
from guardrail.tenants import PolicySet, TenantRegistry
from guardrail.types import Request, RequestContext, Result

__all__ = ["Guardrail", "PolicyRuntime"]


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
        tracer: Any = None,
    ):
        self.engine = engine
        self.plugins = (plugins or PluginManager()).load()
        self.env = StageEnv(engine=engine, captions=CaptionCache(caption_cache_size), plugins=self.plugins)
        self.spans = Spans(tracer)
        self.runner = StageRunner(engine.supports_images, self.spans)
        sinks = list(audit_sinks)
        if audit_log is not None:
            sinks.append(JsonlSink(str(audit_log)))
        self.trail = AuditTrail(sinks, self.plugins, engine.name, self.spans)
        self.registry = TenantRegistry(
            policies, known_stages=self.plugins.known_stages(), on_reload=self.trail.event, prepare=self._prepare,
            default_stage=self.plugins.default_stage,
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
        """Build a guard from a model spec (`smollm2`, `tiny-random:ARCH`, a local folder).
        `backend="vllm"` serves it through vLLM instead (guardrail.engine.vllm; `vllm_url=` and
        `vllm_states_url=` for running servers, else they are started on loopback)."""
        backend, vllm_url = kwargs.pop("backend", "transformers"), kwargs.pop("vllm_url", None)
        vllm_states_url = kwargs.pop("vllm_states_url", None)
        if backend != "vllm" and (vllm_url or vllm_states_url):
            raise InputError("vllm_url / vllm_states_url (--vllm-url, --vllm-states-url) need the vLLM backend "
                             "(backend='vllm', --backend vllm)")
        if backend == "vllm":
            from guardrail.engine.vllm import build

            engine = build(model, artifacts, url=vllm_url, states_url=vllm_states_url)
            try:
                return cls(engine, policies, **kwargs)
            except BaseException:
                engine.close()  # a policy refused at load must not leave a vLLM server behind
                raise
        if backend != "transformers":
            raise ValueError(f"unknown backend {backend!r} (transformers or vllm)")
        from guardrail.engine.transformers import TransformersBackend
        from guardrail.method.artifacts import load_artifacts
        from guardrail.models import load_model

        adapter = load_model(model, device=device)
        art = load_artifacts(artifacts, adapter.fingerprint()) if artifacts is not None else None
        return cls(TransformersBackend(adapter, art), policies, **kwargs)

    # ----- policies -----------------------------------------------------------------------------
    def _prepare(self, policy_set: PolicySet) -> dict[str, PolicyRuntime]:
        return prepare(policy_set.policies, self.env)

    def reload_policies(self) -> dict[str, Any]:
        """Re-read the policies; keeps the last good set when anything is invalid."""
        return self.registry.reload()

    @property
    def policies(self) -> PolicySet:
        return self.registry.current

    def plan_for(self, tenant: str | None, strength: float, tokens: int | None = None) -> Any:
        """The steering plan the tenant's policy would make at `strength` for `tokens` response
        positions (default: its deepest steered band's), without a request: what steering does."""
        policy_set, runtimes = self.registry.snapshot()
        runtime = runtimes[policy_set.resolve(tenant).policy.name]
        steered = [b.tokens for b in runtime.policy.bands if b.action == "steer" and b.strength != 0.0]
        return runtime.controller.plan(strength, tokens or max(steered, default=3))

    # ----- public entry points ------------------------------------------------------------------
    def generate(self, request: Request | str, **fields: Any) -> Result:
        req = request if isinstance(request, Request) else Request(text=request, **fields)
        return self.generate_batch([req])[0]

    def generate_batch(
        self, requests: Sequence[Request], on_tokens: Callable[[int, int], None] | None = None
    ) -> list[Result]:
        """Guarded answers for a batch. Bad input anywhere raises InputError before anything runs.
        `on_tokens(request_index, token_id)` receives response tokens as they are generated."""
        with self.spans.batch("generate", requests) as span:
            ctxs = intake.start(requests, self.registry, self.engine)
            with self._prefix_scope():
                steps.reformulate(ctxs, self.env, self.runner)
                steps.assess(ctxs, self.env, self.runner)
                steps.decide(ctxs, self.engine, self.runner)
                steps.generate(ctxs, self.engine, self.runner, on_tokens)
            return [self._finish(ctx, span) for ctx in ctxs]

    def assess(self, request: Request | str, **fields: Any) -> Result:
        """Risk only: reformulate and assess, audit, and answer nothing."""
        req = request if isinstance(request, Request) else Request(text=request, **fields)
        return self.assess_batch([req])[0]

    def assess_batch(self, requests: Sequence[Request]) -> list[Result]:
        with self.spans.batch("assess", requests) as span:
            ctxs = intake.start(requests, self.registry, self.engine)
            for ctx in ctxs:
                ctx.assess_only = True
            with self._prefix_scope():
                steps.reformulate(ctxs, self.env, self.runner)
                steps.assess(ctxs, self.env, self.runner)
                steps.decide(ctxs, self.engine, self.runner)
            return [self._finish(ctx, span) for ctx in ctxs]

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
        intake.start([request], self.registry, self.engine)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    def _finish(self, ctx: RequestContext, span: Any) -> Result:
        result = self.trail.finish(ctx)
        self.spans.request(span, ctx, result)
        return result

    def audit_event(self, record: dict[str, Any]) -> None:
        """Write a non-request audit record (e.g. the server's client_disconnected) to every sink."""
        self.trail.event(record)

    @property
    def sinks(self) -> list[Any]:
        return self.trail.sinks
