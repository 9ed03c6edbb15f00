"""Captioner `model`: the served vision-language model writes the visual context itself (greedy,
at most 40 new tokens, image first, the user's question not shown), as in the paper."""

from __future__ import annotations

from typing import Any, Sequence

from guardrail.plugin.sdk import CAPTION_PROMPT, ChatRow, hookimpl


class ModelCaptioner:
    def __init__(self, max_new_tokens: int = 40, prompt: str = CAPTION_PROMPT):
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    def caption(self, images: Sequence[Any], env: Any) -> list[str]:
        return env.engine.caption([ChatRow(self.prompt, (img,)) for img in images], self.max_new_tokens)


class AutoCaptioner:
    """`model` when the served model sees images, `ocr` when it is text-only."""

    def __init__(self, **params: Any):
        self.params = params

    def _delegate(self, env: Any) -> Any:
        return env.captioner("model" if env.engine.supports_images else "ocr", self.params)

    def check(self, env: Any, policy: Any) -> None:
        check = getattr(self._delegate(env), "check", None)
        if check is not None:
            check(env, policy)

    def caption(self, images: Sequence[Any], env: Any) -> list[str]:
        return self._delegate(env).caption(images, env)


@hookimpl
def guardrail_register_captioners(register):
    register("model", ModelCaptioner)
    register("auto", AutoCaptioner)
