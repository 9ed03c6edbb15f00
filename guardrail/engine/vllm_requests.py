"""What a vLLM request carries for one row: token ids, or for a row with images the chat messages
(images inline as PNG data URLs) for vLLM's chat endpoint; and the two endpoints' log-probability
shapes read back as one."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Sequence

from guardrail.errors import ModelError


@dataclass(frozen=True)
class EnginePrompt:
    """One row as the engine gets it: token ids, and for a row with images the chat messages."""

    ids: tuple[int, ...]
    messages: list[dict[str, Any]] | None = None


def chat_messages(messages: list[dict[str, Any]], images: Sequence[Any]) -> list[dict[str, Any]]:
    """An adapter's chat messages ({"type": "image"} parts, in order) in the OpenAI form vLLM's chat
    endpoint takes: each image part becomes an image_url part carrying that image as a PNG data
    URL (lossless, so the engine's processor sees the same pixels)."""
    images = list(images)
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    if not images:
                        raise ModelError("a chat message has more image parts than the row has images")
                    parts.append({"type": "image_url", "image_url": {"url": png_data_url(images.pop(0))}})
                else:
                    parts.append(dict(part))
            content = parts
        out.append({**message, "content": content})
    if images:
        raise ModelError(f"{len(images)} image(s) of the row have no place in its chat messages")
    return out


def png_data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def step_logprobs(logprobs: dict[str, Any]) -> list[dict[int, float]]:
    """Per greedy step, token id -> log-probability, from either endpoint's answer (tokens as
    `token_id:N`): completions give `top_logprobs` [{token: logprob}], chat gives `content`
    [{top_logprobs: [{token, logprob}]}]."""
    if "content" in logprobs:
        return [{_token_id(e["token"]): float(e["logprob"]) for e in step["top_logprobs"]}
                for step in logprobs["content"] or []]
    return [{_token_id(key): float(value) for key, value in entries.items()} for entries in logprobs["top_logprobs"]]


def _token_id(token: str) -> int:
    return int(token.rsplit(":", 1)[1])
