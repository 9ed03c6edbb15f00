"""The HTTP app: an OpenAI-compatible chat endpoint in front of one `Guardrail`.

    POST /v1/chat/completions          answer (or stream, `"stream": true`) through the guard
    POST /v1/guardrail/assess          risk only: the verdict, no answer
    POST /v1/guardrail/admin/reload    re-read the policies (admin token)
    GET  /healthz                      liveness and the loaded policy set
    GET  /metrics                      Prometheus text format

All requests of all tenants go through one `MicroBatcher`, so concurrent requests share batches.
The app's state (batcher, metrics, config) is one `ServerState` in `app.state.guardrail`; nothing is
kept in module globals, so several apps can live in one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from guardrail.pipeline.batching import MicroBatcher
from guardrail.errors import GuardrailError, InputError, OverloadedError
from guardrail.serve import openai_format as fmt
from guardrail.serve.metrics import Metrics
from guardrail.serve.openai_format import BadRequest, RemoteImage
from guardrail.serve.tenancy import check_admin, tenant_for
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
    remote_image_timeout_s: float = 10.0
    retry_after_s: int = 1
    model_name: str | None = None  # reported as `model`; default: the served model's name


class ServerState:
    """Everything one app holds: the guard it serves, its batcher and its metrics."""

    def __init__(self, guard: Any, config: ServeConfig):
        self.guard = guard
        self.config = config
        self.model_name = config.model_name or guard.engine.name
        self.batcher: MicroBatcher | None = None
        self.metrics = Metrics(waiting=lambda: self.batcher.waiting if self.batcher else 0)
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


async def fetch_images(images: tuple[bytes | RemoteImage, ...], config: ServeConfig) -> tuple[bytes, ...]:
    """Bytes pass through; remote URLs are fetched only when the server allows it."""
    remote = [img for img in images if isinstance(img, RemoteImage)]
    if not remote:
        return tuple(images)  # type: ignore[arg-type]
    if not config.allow_remote_images:
        first = remote[0]
        raise BadRequest(
            f"{first.field}: remote image URLs are refused; send the image as a data: URL "
            "(or start the server with --allow-remote-images)", first.field,
        )
    import httpx

    out: list[bytes] = []
    async with httpx.AsyncClient(timeout=config.remote_image_timeout_s, follow_redirects=False) as client:
        for img in images:
            out.append(await _fetch(client, img, config.remote_image_max_bytes) if isinstance(img, RemoteImage) else img)
    return tuple(out)


async def _fetch(client: Any, img: RemoteImage, limit: int) -> bytes:
    import httpx

    try:
        async with client.stream("GET", img.url) as response:
            if response.status_code != 200:
                raise BadRequest(f"{img.field}: fetching the image returned HTTP {response.status_code}", img.field)
            data = bytearray()
            async for part in response.aiter_bytes():
                data.extend(part)
                if len(data) > limit:
                    raise BadRequest(f"{img.field}: the image is larger than {limit} bytes", img.field)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise BadRequest(f"{img.field}: could not fetch the image: {type(exc).__name__}", img.field) from None


async def guarded_request(request: HTTPRequest, state: ServerState) -> tuple[fmt.ChatRequest, Request]:
    tenant = tenant_for(request.headers, state.guard.policies, state.config.require_api_key)
    body = await read_json(request, state.config.max_body_bytes)
    chat = fmt.parse_chat(body)
    images = await fetch_images(chat.images, state.config)
    return chat, Request(text=chat.text, images=images, tenant=tenant, max_new_tokens=chat.max_new_tokens)


# ----- endpoints -----------------------------------------------------------------------------------
@endpoint("chat")
async def chat_completions(request: HTTPRequest, state: ServerState) -> Response:
    chat, req = await guarded_request(request, state)
    assert state.batcher is not None
    if chat.stream:
        stream = state.batcher.astream(req)
        await stream.start()  # InputError / OverloadedError become 400 / 429 before any header goes out
        return StreamingResponse(
            _sse(state, chat, req, stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Guardrail-Request-Id": req.request_id},
        )
    result = await state.batcher.agenerate(req)
    state.metrics.observe("chat", result)
    prompt_tokens = await asyncio.to_thread(state.guard.engine.count_tokens, req.text)
    return JSONResponse(
        fmt.completion(result, state.model_name, prompt_tokens), headers={"X-Guardrail-Request-Id": req.request_id}
    )


async def _sse(state: ServerState, chat: fmt.ChatRequest, req: Request, stream: Any) -> AsyncIterator[str]:
    created = int(time.time())

    def event(payload: Any) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    yield event(fmt.chunk(req.request_id, state.model_name, created, {"role": "assistant", "content": ""}))
    try:
        async for text in stream:
            yield event(fmt.chunk(req.request_id, state.model_name, created, {"content": text}))
    except Exception as exc:  # headers are gone: report in-band, as OpenAI's API does
        log.exception("stream failed")
        state.metrics.error("chat", 500)
        yield event(fmt.error_body(f"the stream failed: {exc}", "server_error"))
        yield "data: [DONE]\n\n"
        return
    result: Result = stream.result
    state.metrics.observe("chat", result)
    yield event(
        fmt.chunk(req.request_id, state.model_name, created, {}, fmt.finish_reason(result), guardrail=fmt.verdict(result))
    )
    if chat.include_usage:
        prompt_tokens = await asyncio.to_thread(state.guard.engine.count_tokens, req.text)
        yield event(fmt.chunk(req.request_id, state.model_name, created, None, usage=fmt.usage(prompt_tokens, result)))
    yield "data: [DONE]\n\n"


@endpoint("assess")
async def assess(request: HTTPRequest, state: ServerState) -> Response:
    _, req = await guarded_request(request, state)
    assert state.batcher is not None
    result = await state.batcher.aassess(req)
    state.metrics.observe("assess", result)
    return JSONResponse({"id": f"assess-{req.request_id}", "object": "guardrail.assessment", "guardrail": fmt.verdict(result)})


@endpoint("reload")
async def admin_reload(request: HTTPRequest, state: ServerState) -> Response:
    check_admin(request.headers, state.config.admin_token)
    record = await asyncio.to_thread(state.reload)
    return JSONResponse(record, status_code=200 if record.get("ok") else 422)


@endpoint("healthz")
async def healthz(request: HTTPRequest, state: ServerState) -> Response:
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
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=_as_context(lifespan),
    )
    app.state.guardrail = state
    return app


def _as_context(fn: Callable[[Starlette], AsyncIterator[None]]) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(fn)
