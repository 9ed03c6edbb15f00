"""asyncio bridges: await the guard's blocking calls and iterate its streams from an event loop.

The pipeline is synchronous (one model, serialised by the backend's lock), so the async entry points
run it in worker threads; the event loop is never blocked by a model call or a queue wait.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

_END = object()


class AsyncTextStream:
    """`async for chunk in stream` over a blocking stream of text chunks (a `TextStream` or a
    micro-batched stream), made by `open_stream` in a worker thread.

    The stream is opened on `await stream.start()` or, failing that, on the first iteration; opening
    is where bad input (InputError) or a full queue (OverloadedError) is raised, so a server calls
    `start()` before it sends any response header. `.result` is the Result once iteration has ended.

    Each chunk is fetched with one hop to a worker thread. If the consumer stops early (a client
    disconnect), the generation itself still runs to its end and is audited, as a non-streamed
    request would be."""

    def __init__(self, open_stream: Callable[[], Iterable[str]]):
        self._open = open_stream
        self._stream: Iterable[str] | None = None
        self._iterating = False

    @property
    def result(self) -> Any:
        return getattr(self._stream, "result", None)

    async def start(self) -> "AsyncTextStream":
        if self._stream is None:
            self._stream = await asyncio.to_thread(self._open)
        return self

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterating:
            raise RuntimeError("an AsyncTextStream can be iterated once")
        self._iterating = True
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[str]:
        await self.start()
        assert self._stream is not None
        iterator: Iterator[str] = iter(self._stream)
        while True:
            # next() with a default: a StopIteration must not cross into an asyncio future.
            chunk = await asyncio.to_thread(next, iterator, _END)
            if chunk is _END:
                return
            yield chunk  # type: ignore[misc]

    async def text(self) -> str:
        return "".join([chunk async for chunk in self])
