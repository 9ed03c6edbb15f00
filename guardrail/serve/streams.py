"""Server-sent events for a streamed chat completion, and what happens when the client leaves.

The guard's stream is drained by a task of its own (`StreamRun`), not by the response: when the
client hangs up, Starlette cancels the response's generator, but the generation runs to its end
anyway (it is audited as every request is), so the drain still sees the Result and counts it in
`guardrail_requests_total`. The cut itself is counted in `guardrail_streams_disconnected_total`
and written to the audit log as a `client_disconnected` event next to the request's own record,
with how much of the answer went out. (The request record itself is written by the pipeline when
the generation ends, before anyone can know whether the client read the end.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from guardrail.serve import openai_format as fmt
from guardrail.types import Request

log = logging.getLogger("guardrail.serve")
_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class StreamRun:
    """One streamed answer: the drain task, the chunks it queued, and what reached the client."""

    def __init__(self, state: Any, req: Request, stream: Any):
        self.state, self.req, self.stream = state, req, stream
        self.chunks: "asyncio.Queue[Any]" = asyncio.Queue()
        self.chunks_sent = self.chars_sent = 0
        self.client_gone = self.drained = False
        state.spawn(self._drain())

    async def _drain(self) -> None:
        try:
            async for text in self.stream:
                self.chunks.put_nowait(text)
        except Exception as exc:  # reported in-band to a client still there; counted either way
            log.exception("stream failed")
            self.state.metrics.error("chat", 500)
            self.chunks.put_nowait(_Failed(exc))
        else:
            self.state.metrics.observe("chat", self.stream.result)
            self.chunks.put_nowait(_END)
        finally:
            self.drained = True
            if self.client_gone:
                await self._audit_cut()

    def sent(self, text: str) -> None:
        self.chunks_sent += 1
        self.chars_sent += len(text)

    def client_left(self) -> None:
        """The response ended before its last event: count it, and audit it once the drain is done."""
        if self.client_gone:
            return
        self.client_gone = True
        self.state.metrics.disconnected("chat")
        if self.drained:
            self.state.spawn(self._audit_cut())

    async def _audit_cut(self) -> None:
        result = self.stream.result
        record = {
            "event": "client_disconnected",
            "request_id": self.req.request_id,
            "tenant": result.tenant if result is not None else self.req.tenant,
            "endpoint": "chat",
            "chunks_sent": self.chunks_sent,
            "chars_sent": self.chars_sent,
            "output_chars": len(result.text) if result is not None else None,
            "finish_reason": result.finish_reason if result is not None else None,
        }
        try:
            await asyncio.to_thread(self.state.audit_event, record)
        except Exception:  # a failing sink: the request's own record already holds what was answered
            log.exception("could not audit the disconnect of stream %s", self.req.request_id)


def _event(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse(state: Any, chat: fmt.ChatRequest, req: Request, stream: Any) -> AsyncIterator[str]:
    """The OpenAI chunk stream: role, content chunks, the last chunk with the verdict, [DONE]."""
    run = StreamRun(state, req, stream)
    created, model, rid = int(time.time()), state.model_name, req.request_id
    finished = False
    try:
        yield _event(fmt.chunk(rid, model, created, {"role": "assistant", "content": ""}))
        while (item := await run.chunks.get()) is not _END:
            if isinstance(item, _Failed):  # headers are gone: report in-band, as OpenAI's API does
                yield _event(fmt.error_body(f"the stream failed: {item.error}", "server_error"))
                yield "data: [DONE]\n\n"
                finished = True
                return
            yield _event(fmt.chunk(rid, model, created, {"content": item}))
            run.sent(item)
        result = stream.result
        verdict = state.verdict(result)
        yield _event(fmt.chunk(rid, model, created, {}, fmt.finish_reason(result), guardrail=verdict))
        if chat.include_usage:
            prompt_tokens = await asyncio.to_thread(state.guard.engine.count_tokens, req.text)
            yield _event(fmt.chunk(rid, model, created, None, usage=fmt.usage(prompt_tokens, result)))
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:  # cancelled at an await or closed at a yield: the client hung up
            run.client_left()
