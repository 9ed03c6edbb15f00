"""Streaming: text chunks as tokens are generated, through the same pipeline as `generate`.

The pipeline runs in a worker thread and pushes token ids into a queue; the iterator decodes the
ids seen so far and yields only the new, complete text (a trailing partial UTF-8 character is held
back). When generation ends, whatever the final text has beyond what was yielded is yielded too, so
the chunks always join to exactly `Result.text` (a refusal arrives as one chunk).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterator

from guardrail.types import Request, Result

if TYPE_CHECKING:  # pragma: no cover
    from guardrail.pipeline import Guardrail

_DONE = object()


class TextStream:
    def __init__(self, guard: "Guardrail", request: Request):
        guard.validate(request)  # bad input raises here, in the caller's thread
        self._guard = guard
        self._request = request
        self._queue: "queue.Queue[object]" = queue.Queue()
        self.result: Result | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="guardrail-stream", daemon=True)
        self._started = False

    def _work(self) -> None:
        try:
            self.result = self._guard.generate_batch([self._request], on_tokens=lambda _row, tok: self._queue.put(tok))[0]
        except BaseException as exc:  # handed to the consumer, raised there
            self._error = exc
        finally:
            self._queue.put(_DONE)

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a TextStream can be iterated once")
        self._started = True
        self._thread.start()
        ids: list[int] = []
        emitted = ""
        decode = self._guard.engine.decode
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            ids.append(int(item))  # type: ignore[arg-type]
            text = decode(ids)
            if text.endswith("\ufffd") or not text.startswith(emitted):
                continue  # incomplete character, or decoding not yet stable: wait for more
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self.result is not None
        final = self.result.text
        if final.startswith(emitted):
            if len(final) > len(emitted):
                yield final[len(emitted):]
        else:
            # The pipeline replaced the streamed text (e.g. a failed audit under fail_closed);
            # say so rather than let the joined chunks disagree silently with the result.
            raise RuntimeError(f"stream ended with a different final text (action {self.result.action!r}, error {self.result.error!r})")

    def text(self) -> str:
        return "".join(self)
