"""The OpenAI chat-completions wire format: request bodies in, completions and stream chunks out.

Parsing is strict about types (a wrong type is a 400 naming the field, e.g. `messages[1].content`)
and explicit about what guardrail does not do: sampling knobs (`temperature`, `top_p`, `seed`, ...)
are accepted and ignored, because the method is defined for greedy decoding; features that would
change the answer's shape (`tools`, `stop`, `n` > 1, `logprobs`, JSON `response_format`) are refused
rather than silently dropped.

Conversations: the model's chat template gets one user turn, so earlier turns (system, developer,
user, assistant) are flattened into the text of that turn, under a header, before the last user
message (see `flatten`). A single user message passes through unchanged, so the server and the
Python API give identical answers and audit hashes for the same prompt.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any, Sequence

from guardrail.types import Result

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
_NUMBER = ((int, float), "a number")
IGNORED_FIELDS = {  # accepted for compatibility, no effect on a greedy, guarded answer
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "seed": (int, "an integer"),
    "user": (str, "a string"),
    "metadata": (dict, "an object"),
    "store": (bool, "a boolean"),
    "parallel_tool_calls": (bool, "a boolean"),
}
REFUSED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "audio", "prediction", "logit_bias")
HISTORY_HEADER = "[Earlier conversation]"
CURRENT_HEADER = "[Current message]"


class BadRequest(Exception):
    """A request the server refuses; `param` names the offending field (OpenAI's error format)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class RemoteImage:
    url: str
    field: str  # where it came from, for error messages


@dataclass(frozen=True)
class ChatRequest:
    text: str
    images: tuple[bytes | RemoteImage, ...]
    max_new_tokens: int | None
    stream: bool
    include_usage: bool
    image_fields: tuple[str, ...] = ()  # where each image came from (`messages[0].content[1].image_url.url`)
    max_tokens_field: str = "max_tokens"  # which of max_completion_tokens / max_tokens set max_new_tokens


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def _expect(value: Any, types: Any, field: str, what: str) -> None:
    # bool is an int in Python, never in JSON
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    if not ok:
        raise BadRequest(f"{field} must be {what}, got {_type_name(value)}", field)


def _as_tuple(types: Any) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _int_field(body: dict, name: str, minimum: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    _expect(value, int, name, "an integer")
    if value < minimum:
        raise BadRequest(f"{name} must be at least {minimum}, got {value}", name)
    return value


def parse_chat(body: Any) -> ChatRequest:
    """A chat-completions body -> what the guard needs. Raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_type_name(body)}")
    for name in REFUSED_FIELDS:
        if body.get(name) not in (None, [], {}):
            raise BadRequest(f"{name} is not supported by the guardrail server", name)
    if body.get("stop") not in (None, [], ""):
        raise BadRequest("stop sequences are not supported by the guardrail server", "stop")
    if body.get("logprobs"):
        raise BadRequest("logprobs are not supported by the guardrail server", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None:
        _expect(fmt, dict, "response_format", "an object")
        if fmt.get("type", "text") != "text":
            raise BadRequest("only response_format {\"type\": \"text\"} is supported", "response_format")
    for name, (types, what) in IGNORED_FIELDS.items():
        if body.get(name) is not None:
            _expect(body[name], types, name, what)
    if "model" in body and body["model"] is not None:
        _expect(body["model"], str, "model", "a string")
    n = _int_field(body, "n")
    if n not in (None, 1):
        raise BadRequest("n must be 1: guardrail decodes greedily, so every choice would be the same", "n")
    max_new, max_field = _int_field(body, "max_completion_tokens"), "max_completion_tokens"
    if max_new is None:
        max_new, max_field = _int_field(body, "max_tokens"), "max_tokens"
    stream = body.get("stream")
    if stream is not None:
        _expect(stream, bool, "stream", "a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        _expect(options, dict, "stream_options", "an object")
        include_usage = options.get("include_usage", False)
        _expect(include_usage, bool, "stream_options.include_usage", "a boolean")
    text, images, fields = parse_messages(body.get("messages"))
    return ChatRequest(text=text, images=images, max_new_tokens=max_new, stream=bool(stream),
                       include_usage=include_usage, image_fields=fields, max_tokens_field=max_field)


def parse_messages(messages: Any) -> tuple[str, tuple[bytes | RemoteImage, ...], tuple[str, ...]]:
    """(flattened text, images, the field each image came from)."""
    if messages is None:
        raise BadRequest("messages is required", "messages")
    _expect(messages, list, "messages", "an array of messages")
    if not messages:
        raise BadRequest("messages must not be empty", "messages")
    turns: list[tuple[str, str]] = []
    images: list[tuple[bytes | RemoteImage, str]] = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        _expect(message, dict, field, "an object")
        role = message.get("role")
        _expect(role, str, f"{field}.role", "a string")
        if role not in ROLES:
            raise BadRequest(f"{field}.role {role!r} is not supported (use one of: {', '.join(ROLES)})", f"{field}.role")
        text, found = _parse_content(message.get("content"), f"{field}.content", role)
        images.extend(found)
        turns.append((role, text))
    if turns[-1][0] != "user":
        field = f"messages[{len(turns) - 1}].role"
        raise BadRequest(f"{field} must be 'user': the last message is the one answered, got {turns[-1][0]!r}", field)
    return flatten(turns), tuple(img for img, _ in images), tuple(f for _, f in images)


def _parse_content(content: Any, field: str, role: str) -> tuple[str, list[tuple[bytes | RemoteImage, str]]]:
    if content is None:
        if role == "assistant":
            return "", []
        raise BadRequest(f"{field} is required", field)
    if isinstance(content, str):
        return content, []
    _expect(content, list, field, "a string or an array of content parts")
    texts: list[str] = []
    images: list[tuple[bytes | RemoteImage, str]] = []
    for j, part in enumerate(content):
        pfield = f"{field}[{j}]"
        _expect(part, dict, pfield, "an object")
        kind = part.get("type")
        _expect(kind, str, f"{pfield}.type", "a string")
        if kind == "text":
            _expect(part.get("text"), str, f"{pfield}.text", "a string")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise BadRequest(f"{pfield}: images are accepted only in user messages", pfield)
            value = part.get("image_url")
            url_field = f"{pfield}.image_url" + (".url" if isinstance(value, dict) else "")
            images.append((parse_image_url(value, f"{pfield}.image_url"), url_field))
        else:
            raise BadRequest(f"{pfield}.type {kind!r} is not supported (use 'text' or 'image_url')", f"{pfield}.type")
    return "\n".join(texts), images


def parse_image_url(value: Any, field: str) -> bytes | RemoteImage:
    """A `data:image/...;base64,...` URL -> its bytes; an http(s) URL -> a RemoteImage for the
    caller to fetch or refuse. Never a local path: any other scheme is refused."""
    if isinstance(value, dict):
        url = value.get("url")
        field = f"{field}.url"
    else:
        url = value
    _expect(url, str, field, "a string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, sep, payload = url[5:].partition(",")
        params = header.split(";")
        if not sep or not params[0].lower().startswith("image/"):
            raise BadRequest(f"{field}: a data URL must look like data:image/png;base64,...", field)
        if "base64" not in (p.lower() for p in params[1:]):
            raise BadRequest(f"{field}: only base64 data URLs are supported", field)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field}: the data URL's base64 payload is invalid", field) from None
        if not data:
            raise BadRequest(f"{field}: the data URL carries no image data", field)
        return data
    if scheme in ("http", "https"):
        return RemoteImage(url, field)
    raise BadRequest(f"{field}: unsupported URL scheme {scheme or '(none)'!r}; send the image as a data: URL", field)


def flatten(turns: Sequence[tuple[str, str]]) -> str:
    """Earlier turns as a transcript above the last user message; a lone user message unchanged.

    The risk pass then sees the whole conversation (a request split over turns is assessed as a
    whole), and the answer is generated from the same text."""
    *earlier, (_, last) = turns
    if not earlier:
        return last
    lines = [HISTORY_HEADER] + [f"{ROLES[role]}: {text}" for role, text in earlier if text]
    return "\n".join(lines) + f"\n{CURRENT_HEADER}\n{last}"


# ----- responses ---------------------------------------------------------------------------------
def verdict(result: Result) -> dict[str, Any]:
    """The guard's decision as it appears under `guardrail` in every response."""
    return {
        "request_id": result.request_id,
        "tenant": result.tenant,
        "policy": result.policy,
        "policy_hash": result.policy_hash,
        "risk": result.risk,
        "band": result.band,
        "strength": result.strength,
        "action": result.action,
        "scores": result.scores,
        "visual_context": result.visual_context,
        "degraded": result.degraded,
        "error": result.error,
    }


def finish_reason(result: Result) -> str:
    if result.finish_reason in ("stop", "length"):
        return result.finish_reason
    return "content_filter"  # the guard refused, or failed closed with the policy's refusal


def usage(prompt_tokens: int, result: Result) -> dict[str, int]:
    completion = len(result.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion(result: Result, model: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": finish_reason(result),
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, result),
        "guardrail": verdict(result),
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` gives the usage chunk (no choices)."""
    out: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    out.update(extra)
    return out


def model_card(model: str) -> dict[str, Any]:
    """One entry of `GET /v1/models`."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "guardrail"}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
