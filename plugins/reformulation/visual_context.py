"""Reformulators: `visual_context` (the paper's vision-aware query reformulation) and `plain`.

visual_context: each image gets a one-sentence visual context from a captioner (the model itself by
default, or `ocr` for text-only backbones); the risk prompt is SAFETY + visual context + " " +
question with the images; the answer prompt is the original question with the images. A model that
cannot see pixels gets the visual context in its answer prompt too, or it would answer blind.
Visual contexts are cached by (image sha256, model fingerprint, captioner).
"""

from __future__ import annotations

from typing import Any, Sequence

from guardrail.plugin.sdk import ChatRow, PolicyError, Reformulation, RequestView, hookimpl, risk_row


class VisualContextReformulator:
    def __init__(self, captioner: str = "auto", captioner_params: dict[str, Any] | None = None):
        self.captioner = captioner
        self.captioner_params = dict(captioner_params or {})

    def check(self, env: Any, policy: Any) -> None:
        if self.captioner == "model" and not env.engine.supports_images:
            raise PolicyError([(f"policy {policy.name}", 1,
                                f"reformulator visual_context with captioner 'model' needs a vision-language model; "
                                f"{env.engine.name} is text-only: use `captioner: ocr`")])
        # Build the captioner now, so a missing dependency fails when the policy loads.
        captioner = env.captioner(self.captioner, self.captioner_params)
        check = getattr(captioner, "check", None)
        if check is not None:
            check(env, policy)

    def visual_contexts(self, contexts: Sequence[RequestView], env: Any) -> tuple[list[str], list[int], list[str]]:
        """One visual context per request (captions of its images joined), its cache hits, and its
        input format."""
        fingerprint = env.engine.fingerprint()
        fp = f"{fingerprint.get('architecture')}:{fingerprint.get('weights_sha256')}"
        key_of = lambda sha: (sha, fp, self.captioner, repr(sorted(self.captioner_params.items())))  # noqa: E731
        pending: dict[tuple, Any] = {}
        hits_per_ctx = []
        captions: dict[tuple, str] = {}
        for ctx in contexts:
            hits = 0
            for img in ctx.images:
                key = key_of(img.sha256)
                cached = env.captions.get(key) if key not in pending and key not in captions else None
                if cached is not None:
                    captions[key] = cached
                    hits += 1
                elif key not in captions:
                    pending[key] = img.image
            hits_per_ctx.append(hits)
        if pending:
            captioner = env.captioner(self.captioner, self.captioner_params)
            keys = list(pending)
            texts = captioner.caption([pending[k] for k in keys], env)
            for key, text in zip(keys, texts):
                captions[key] = text
                env.captions.put(key, text)
        out = [" ".join(captions[key_of(img.sha256)] for img in ctx.images) for ctx in contexts]
        formats = [self._format([captions[key_of(img.sha256)] for img in ctx.images], env) for ctx in contexts]
        return out, hits_per_ctx, formats

    def _format(self, captions: list[str], env: Any) -> str:
        """The request's input format: text, or what the captioner says its images were (an image
        with readable text is `typographic`); any typographic image makes the request typographic."""
        if not captions:
            return "text"
        of = getattr(env.captioner(self.captioner, self.captioner_params), "input_format", None)
        formats = {of(c) for c in captions} if of is not None else {"image"}
        return "typographic" if "typographic" in formats else "image"

    def reformulate(self, contexts: Sequence[RequestView], env: Any) -> list[Reformulation]:
        visual, hits, formats = self.visual_contexts(contexts, env)
        sees = env.engine.supports_images
        out = []
        for ctx, vc, hit, fmt in zip(contexts, visual, hits, formats):
            images = tuple(d.image for d in ctx.images) if sees else ()
            question = ctx.request.text
            answer_text = question if (sees or not vc) else f"{vc} {question}"
            out.append(
                Reformulation(
                    visual_context=vc,
                    risk_prompt=risk_row(question, vc, images),
                    answer_prompt=ChatRow(answer_text, images),
                    cache_hits=hit,
                    cache_misses=len(ctx.images) - hit,
                    format=fmt,
                )
            )
        return out


class PlainReformulator(VisualContextReformulator):
    """No safety prompt: the risk prompt is the answer prompt (for diagnostics and baselines)."""

    def reformulate(self, contexts: Sequence[RequestView], env: Any) -> list[Reformulation]:
        base = super().reformulate(contexts, env)
        return [Reformulation(r.visual_context, r.answer_prompt, r.answer_prompt, r.cache_hits, r.cache_misses, r.format)
                for r in base]


@hookimpl
def guardrail_register_reformulators(register):
    register("visual_context", VisualContextReformulator, default=True)
    register("plain", PlainReformulator)
