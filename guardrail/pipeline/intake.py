"""Intake: a request's fields, its policy's limits, the model's context and its images are checked,
and its context made, before any stage runs. A bad request anywhere in a batch fails the batch
with an InputError naming the request and the problem."""

from __future__ import annotations

import time
from typing import Any, Sequence

from guardrail.errors import InputError
from guardrail.images import decode_image, shape_limits_for
from guardrail.types import Request, RequestContext


def start(requests: Sequence[Request], registry: Any, engine: Any) -> list[RequestContext]:
    """Validate every request of a batch and make its context; InputError before anything runs."""
    policy_set, runtimes = registry.snapshot()
    ctxs = []
    for index, req in enumerate(requests):
        t0 = time.perf_counter()
        try:
            check_fields(req)
            resolved = policy_set.resolve(req.tenant)
            tenant, policy = resolved
            runtime = runtimes[policy.name]  # its policy has the default stages filled in
            ctx = RequestContext(request=req, tenant=tenant, policy=runtime.policy, runtime=runtime,
                                 by_default=bool(getattr(resolved, "by_default", False)))
            validate(ctx, engine)
        except InputError as exc:
            prefix = f"request {index}: " if len(requests) > 1 else ""
            raise type(exc)(f"{prefix}{exc}") from None
        ctx.timings_ms["validate"] = (time.perf_counter() - t0) * 1000
        ctxs.append(ctx)
    return ctxs


def validate(ctx: RequestContext, engine: Any) -> None:
    """The request fits its policy's limits and the model's context; its images decode."""
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
    n_tokens = engine.count_tokens(req.text)
    if n_tokens + max_new > engine.max_context:
        raise InputError(
            f"prompt too long: {n_tokens} tokens plus max_new_tokens {max_new} exceeds the model's "
            f"context of {engine.max_context}"
        )
    ctx.max_new_tokens = max_new
    shape = shape_limits_for(engine)  # the model family's bound on what its processor will build
    ctx.images = [
        decode_image(src, limits.max_image_pixels, limits.max_image_bytes, i, shape=shape)
        for i, src in enumerate(req.images)
    ]


def check_fields(req: Request) -> None:
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
