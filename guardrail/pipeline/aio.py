"""asyncio bridges: await the guard's blocking calls and iterate its streams from an event loop.

The pipeline is synchronous (one model, serialised by the backend's lock), so the async entry points
run it in worker threads; the event loop is never blocked by a model call or a queue wait.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, Iterable

_END = object()


class AsyncTextStream:
    """`async for chunk in stream` over a blocking stream of text chunks (a `TextStream` or a
    micro-batched stream), made by `open_stream` in a worker thread.

    The stream is opened on `await stream.start()` or, failing that, on the first iteration; opening
    is where bad input (InputError) or a full queue (OverloadedError) is raised, so a server calls
    `start()` before it sends any response header. `.result` is the Result once iteration has ended.

    One thread per stream drains the blocking iterator into an asyncio queue, so a slow stream never
    holds a slot of the loop's default executor (which is small, and shared with every other
    `to_thread`). If the consumer stops early (a client disconnect), the generation itself still runs
    to its end and is audited, as a non-streamed request would be."""

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
        loop = asyncio.get_running_loop()
        chunks: "asyncio.Queue[tuple[Any, BaseException | None]]" = asyncio.Queue()
        threading.Thread(target=_pump, args=(self._stream, loop, chunks), name="guardrail-astream", daemon=True).start()
        while True:
            chunk, error = await chunks.get()
            if chunk is _END:
                if error is not None:
                    raise error
                return
            yield chunk

    async def text(self) -> str:
        return "".join([chunk async for chunk in self])


def _pump(stream: Iterable[str], loop: asyncio.AbstractEventLoop, chunks: "asyncio.Queue[Any]") -> None:
    """Runs in its own thread: every chunk, then the end (with the error, if any), onto the loop."""

    def put(item: tuple[Any, BaseException | None]) -> bool:
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, item)
            return True
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False

    try:
        for chunk in stream:
            if not put((chunk, None)):
                return
    except BaseException as exc:  # raised to the consumer, in the loop
        put((_END, exc))
    else:
        put((_END, None))
