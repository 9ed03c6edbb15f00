"""The HTTP app: an OpenAI-compatible chat endpoint in front of one `Guardrail`.

    POST /v1/chat/completions          answer (or stream, `"stream": true`) through the guard
    POST /v1/guardrail/assess          risk only: the verdict, no answer
    POST /v1/guardrail/admin/reload    re-read the policies (admin token)
    GET  /v1/models, /v1/models/{id}   the one served model, as OpenAI lists models
    GET  /healthz                      liveness and the loaded policy set
    GET  /metrics                      Prometheus text format

Unknown paths and methods answer 404 and 405 in OpenAI's error format, like every other error.

All requests of all tenants go through one `MicroBatcher`, so concurrent requests share batches.
The app's state (batcher, metrics, config) is one `ServerState` in `app.state.guardrail`; nothing is
kept in module globals, so several apps can live in one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guardrail.pipeline.batching import MicroBatcher
from guardrail.errors import GuardrailError, InputError, OverloadedError
from guardrail.images import shape_limits_for
from guardrail.serve import openai_format as fmt
from guardrail.serve.intake import Fetcher, request_images
from guardrail.serve.metrics import Metrics
from guardrail.serve.openai_format import BadRequest
from guardrail.serve.streams import sse
from guardrail.serve.tenancy import check_admin, check_probe, tenant_for
from guardrail.tenants import UnknownTenantError
from guardrail.types import Request, Result

log = logging.getLogger("guardrail.serve")


@dataclass(frozen=True)
class ServeConfig:
    allow_remote_images: bool = False  # fetch http(s) image URLs (the server then makes outbound requests)
    admin_token: str | None = None  # enables POST /v1/guardrail/admin/reload
    require_api_key: bool = False  # refuse requests whose tenant is not given by a listed API key
    max_batch: int = 32
    batch_window_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 32 * 1024 * 1024
    remote_image_max_bytes: int = 20 * 1024 * 1024
    remote_image_timeout_s: float = 10.0  # per connect / read
    remote_image_deadline_s: float = 20.0  # for all of one request's fetches together, slot waits included
    remote_fetch_concurrency: int = 8  # fetches in flight across the whole app
    retry_after_s: int = 1
    model_name: str | None = None  # reported as `model`; default: the served model's name
    # /healthz and /metrics: None follows require_api_key (a listed key or the admin token is needed
    # when requests need a key); True keeps them open anyway (probes that cannot send a header).
    open_probes: bool | None = None

    @property
    def probes_protected(self) -> bool:
        return self.require_api_key and not self.open_probes


class ServerState:
    """Everything one app holds: the guard it serves, its batcher and its metrics."""

    def __init__(self, guard: Any, config: ServeConfig):
        self.guard = guard
        self.config = config
        self.model_name = config.model_name or guard.engine.name
        self.batcher: MicroBatcher | None = None
        self.metrics = Metrics(
            waiting=lambda: self.batcher.waiting if self.batcher else 0,
            listed=lambda tenant: self.guard.policies.is_listed(tenant),
        )
        self.fetcher = Fetcher(config)
        self.shape = shape_limits_for(guard.engine)  # what the model family's processor can take
        self._tasks: set[asyncio.Task] = set()  # background work (stream drains) kept alive until done
        self.batcher = MicroBatcher(
            guard,
            max_batch=config.max_batch,
            window_ms=config.batch_window_ms,
            max_queue=config.max_queue,
            on_batch=self.metrics.observe_batch,
        )

    def reload(self) -> dict[str, Any]:
        """Re-read the policies (the old set stays when the new one is invalid); blocking."""
        record = self.guard.reload_policies()
        self.metrics.reload(bool(record.get("ok")))
        return record

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` on the loop with a strong reference, so the task is not collected mid-way."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def audit_event(self, record: dict[str, Any]) -> None:
        """A non-request event into the guard's audit trail (sinks and hooks); blocking. (The guard
        has no public method for it yet; its trail's `event` is what policy reloads use.)"""
        write = getattr(self.guard, "audit_event", None) or self.guard.trail.event
        write(record)

    def verdict(self, result: Result) -> dict[str, Any]:
        """The verdict, plus whether the tenant was unlisted and so got the default policy."""
        return {**fmt.verdict(result), "default_policy": not self.guard.policies.is_listed(result.tenant)}


Handler = Callable[[HTTPRequest, ServerState], Awaitable[Response]]


def endpoint(name: str) -> Callable[[Handler], Callable[[HTTPRequest], Awaitable[Response]]]:
    """Maps guardrail's errors to HTTP answers in OpenAI's error format, and counts them."""

    def wrap(handler: Handler) -> Callable[[HTTPRequest], Awaitable[Response]]:
        async def run(request: HTTPRequest) -> Response:
            state: ServerState = request.app.state.guardrail
            headers: dict[str, str] = {}
            try:
                return await handler(request, state)
            except BadRequest as exc:
                status, body = exc.status, fmt.error_body(exc.message, exc.kind, exc.param)
            except UnknownTenantError as exc:
                status, body = 403, fmt.error_body(str(exc), "permission_error")
            except InputError as exc:
                status, body = 400, fmt.error_body(str(exc))
            except OverloadedError as exc:
                status, body = 429, fmt.error_body(str(exc), "overloaded_error", code="overloaded")
                headers["Retry-After"] = str(state.config.retry_after_s)
            except GuardrailError as exc:
                log.exception("guardrail error on %s", name)
                status, body = 500, fmt.error_body(str(exc), "server_error")
            except Exception as exc:  # a bug: answer 500 rather than drop the connection
                log.exception("unexpected error on %s", name)
                status, body = 500, fmt.error_body(f"internal error: {type(exc).__name__}", "server_error")
            state.metrics.error(name, status)
            return JSONResponse(body, status_code=status, headers=headers)

        return run

    return wrap


async def read_json(request: HTTPRequest, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is larger than {limit} bytes", status=413)
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise BadRequest(f"the request body is larger than {limit} bytes", status=413)
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack: a hostile body, not a bug
        raise BadRequest("the request body is not valid JSON: nested too deeply") from None


async def guarded_request(request: HTTPRequest, state: ServerState) -> tuple[fmt.ChatRequest, Request]:
    """Who asks, what they ask and its images, all checked before the request may queue."""
    tenant = tenant_for(request.headers, state.guard.policies, state.config.require_api_key)
    body = await read_json(request, state.config.max_body_bytes)
    chat = fmt.parse_chat(body)
    limits = state.guard.policies.resolve(tenant).policy.limits  # an unknown tenant is a 403 here
    check_max_tokens(chat, limits)
    images = await request_images(chat, limits, state.fetcher, state.shape)
    return chat, Request(text=chat.text, images=images, tenant=tenant, max_new_tokens=chat.max_new_tokens)


def check_max_tokens(chat: fmt.ChatRequest, limits: Any) -> None:
    """Above the policy's limit is a 400 naming the field, not a silently shorter answer (OpenAI
    answers a too-large `max_tokens` with a 400 too)."""
    if chat.max_new_tokens is not None and chat.max_new_tokens > limits.max_new_tokens:
        field = chat.max_tokens_field
        raise BadRequest(
            f"{field} must be between 1 and {limits.max_new_tokens} (the policy's limits.max_new_tokens), "
            f"got {chat.max_new_tokens}", field,
        )


# ----- endpoints -----------------------------------------------------------------------------------
@endpoint("chat")
async def chat_completions(request: HTTPRequest, state: ServerState) -> Response:
    chat, req = await guarded_request(request, state)
    assert state.batcher is not None
    if chat.stream:
        stream = state.batcher.astream(req)
        await stream.start()  # InputError / OverloadedError become 400 / 429 before any header goes out
        return StreamingResponse(
            sse(state, chat, req, stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Guardrail-Request-Id": req.request_id},
        )
    result = await state.batcher.agenerate(req)
    state.metrics.observe("chat", result)
    prompt_tokens = await asyncio.to_thread(state.guard.engine.count_tokens, req.text)
    body = fmt.completion(result, state.model_name, prompt_tokens)
    body["guardrail"] = state.verdict(result)
    return JSONResponse(body, headers={"X-Guardrail-Request-Id": req.request_id})


@endpoint("assess")
async def assess(request: HTTPRequest, state: ServerState) -> Response:
    _, req = await guarded_request(request, state)
    assert state.batcher is not None
    result = await state.batcher.aassess(req)
    state.metrics.observe("assess", result)
    return JSONResponse({"id": f"assess-{req.request_id}", "object": "guardrail.assessment", "guardrail": state.verdict(result)})


@endpoint("reload")
async def admin_reload(request: HTTPRequest, state: ServerState) -> Response:
    check_admin(request.headers, state.config.admin_token)
    record = await asyncio.to_thread(state.reload)
    return JSONResponse(record, status_code=200 if record.get("ok") else 422)


@endpoint("models")
async def list_models(request: HTTPRequest, state: ServerState) -> Response:
    return JSONResponse({"object": "list", "data": [fmt.model_card(state.model_name)]})


@endpoint("models")
async def retrieve_model(request: HTTPRequest, state: ServerState) -> Response:
    wanted = request.path_params["model"]
    if wanted != state.model_name:
        raise BadRequest(f"no model {wanted!r}: this server serves {state.model_name!r}", "model", status=404,
                         kind="not_found_error")
    return JSONResponse(fmt.model_card(state.model_name))


@endpoint("healthz")
async def healthz(request: HTTPRequest, state: ServerState) -> Response:
    if state.config.probes_protected:
        check_probe(request.headers, state.guard.policies, state.config.admin_token)
    policies = state.guard.policies
    return JSONResponse(
        {
            "status": "ok",
            "model": state.model_name,
            "policies": sorted(policies.policies),
            "policy_set_hash": policies.hash,
            "queue_waiting": state.batcher.waiting if state.batcher else 0,
        }
    )


@endpoint("metrics")
async def metrics(request: HTTPRequest, state: ServerState) -> Response:
    if state.config.probes_protected:
        check_probe(request.headers, state.guard.policies, state.config.admin_token)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


def create_app(guard: Any, config: ServeConfig | None = None) -> Starlette:
    """The app for one guard. The caller owns the guard (and closes it); the app closes its batcher
    when the server shuts down."""
    state = ServerState(guard, config or ServeConfig())

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/guardrail/assess", assess, methods=["POST"]),
            Route("/v1/guardrail/admin/reload", admin_reload, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=_as_context(lifespan),
    )
    app.state.guardrail = state
    return app


async def http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    """Starlette's own 404 and 405 (no such route, wrong method) in OpenAI's error format."""
    if exc.status_code == 404:
        body = fmt.error_body(f"no endpoint {request.method} {request.url.path}", "not_found_error")
    else:
        body = fmt.error_body(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")
    return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))


def _as_context(fn: Callable[[Starlette], AsyncIterator[None]]) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(fn)
