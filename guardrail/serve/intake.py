"""A chat request's images, checked before the request may queue for the model (issue 13).

* The count is checked against the tenant's policy before anything is fetched: twelve URLs
  against a limit of four are a 400, not twelve outbound requests and then a 400.
* Remote URLs (only with `--allow-remote-images`) are fetched one after another under one deadline
  for the whole request (a server dripping a byte at a time cannot hold it past the deadline; the
  per-read timeout alone allowed that), a bound on fetches in flight across the whole app, and a
  size limit checked against the declared `Content-Length` before the body is read.
* Every image's header is checked (readable, an allowed format, the policy's pixel limit and the
  model family's shape limits, `guardrail.images`): a 200000x1 sliver that the processor would
  scale into gigabytes is a 400 naming its field, not seconds of model time under the lock that
  every tenant's requests wait for. Only headers are parsed here, off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from guardrail.errors import InputError
from guardrail.images import ImageShapeLimits, check_image_header
from guardrail.serve.openai_format import BadRequest, ChatRequest, RemoteImage


async def request_images(chat: ChatRequest, limits: Any, fetcher: "Fetcher", shape: ImageShapeLimits | None) -> tuple[bytes, ...]:
    """The request's images as bytes, refused (BadRequest naming the field) before any model work
    when there are too many, a fetch fails or overruns, or a header breaks a limit."""
    if len(chat.images) > limits.max_images:
        raise BadRequest(f"{len(chat.images)} images exceeds the policy's limit of {limits.max_images}", "messages")
    images = await fetcher.fetch_all(chat.images, limits.max_image_bytes)
    await asyncio.to_thread(check_headers, images, chat.image_fields, limits, shape)
    return images


def check_headers(images: Sequence[bytes], fields: Sequence[str], limits: Any, shape: ImageShapeLimits | None) -> None:
    for i, data in enumerate(images):
        field = fields[i] if i < len(fields) else f"image {i}"
        try:
            check_image_header(data, limits.max_image_pixels, limits.max_image_bytes, label=field, shape=shape)
        except InputError as exc:
            raise BadRequest(str(exc), field if i < len(fields) else None) from None


class Fetcher:
    """Remote image fetching for one app: its settings and its bound on fetches in flight (a
    semaphore per app, not per request, so many requests cannot fan out without limit)."""

    def __init__(self, config: Any):
        self.config = config
        self.slots = asyncio.Semaphore(config.remote_fetch_concurrency)

    async def fetch_all(self, images: Sequence[bytes | RemoteImage], max_bytes: int) -> tuple[bytes, ...]:
        remote = [img for img in images if isinstance(img, RemoteImage)]
        if not remote:
            return tuple(images)  # type: ignore[arg-type]
        if not self.config.allow_remote_images:
            first = remote[0]
            raise BadRequest(
                f"{first.field}: remote image URLs are refused; send the image as a data: URL "
                "(or start the server with --allow-remote-images)", first.field,
            )
        limit = min(self.config.remote_image_max_bytes, max_bytes)
        deadline = self.config.remote_image_deadline_s
        progress = _Progress(remote[0])
        try:
            async with asyncio.timeout(deadline):  # waiting for a slot counts too
                return await self._fetch_in_turn(images, limit, progress)
        except TimeoutError:
            field = progress.current.field
            raise BadRequest(f"{field}: fetching the request's images did not finish within the deadline of {deadline:g} s",
                             field) from None

    async def _fetch_in_turn(self, images: Sequence[bytes | RemoteImage], limit: int, progress: "_Progress") -> tuple[bytes, ...]:
        import httpx

        out: list[bytes] = []
        async with httpx.AsyncClient(timeout=self.config.remote_image_timeout_s, follow_redirects=False) as client:
            for img in images:
                if not isinstance(img, RemoteImage):
                    out.append(img)
                    continue
                progress.current = img
                async with self.slots:
                    out.append(await _fetch(client, img, limit))
        return tuple(out)


class _Progress:
    """Which image a request was fetching, for the deadline's error message."""

    def __init__(self, current: RemoteImage):
        self.current = current


async def _fetch(client: Any, img: RemoteImage, limit: int) -> bytes:
    import httpx

    try:
        async with client.stream("GET", img.url) as response:
            if response.status_code != 200:
                raise BadRequest(f"{img.field}: fetching the image returned HTTP {response.status_code}", img.field)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise BadRequest(f"{img.field}: the image server declares {declared} bytes, more than the limit of {limit}",
                                 img.field)
            data = bytearray()
            async for part in response.aiter_bytes():
                data.extend(part)
                if len(data) > limit:
                    raise BadRequest(f"{img.field}: the image is larger than {limit} bytes", img.field)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise BadRequest(f"{img.field}: could not fetch the image: {type(exc).__name__}", img.field) from None
