"""The values that flow through one request: Request in, Result and AuditRecord out.

Everything here is a plain dataclass. Mutable per-request state lives in `RequestContext`, which the
pipeline creates for each request and throws away afterwards; nothing is kept on classes or modules.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from guardrail.engine.interventions import NO_STEERING, SteeringPlan  # noqa: F401  (part of the request values)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from guardrail.policy import Band, Policy

ImageSource = Union[bytes, str, "Image.Image"]
"""An image as raw encoded bytes (PNG, JPEG, ...), a file path, or a PIL image."""


@dataclass(frozen=True)
class Request:
    """What an app hands guardrail."""

    text: str
    images: tuple[ImageSource, ...] = ()
    tenant: str | None = None
    max_new_tokens: int | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Debugging and evaluation knobs; an app normally leaves them alone.
    force_strength: float | None = None
    unguarded: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.images, list):
            object.__setattr__(self, "images", tuple(self.images))


@dataclass(frozen=True)
class DecodedImage:
    """An image that passed validation, with the hash the audit log and the caption cache use."""

    image: "Image.Image"
    sha256: str


@dataclass(frozen=True)
class ChatRow:
    """One prompt for the model: a user turn with optional images (shown before the text)."""

    text: str
    images: tuple["Image.Image", ...] = ()
    system: str | None = None
    # Where the request's own words start in `text`, after a fixed instruction such as the safety
    # prompt (a character offset; 0: all of it). A risk pass's `pooled` states average the tokens
    # from there on (guardrail/engine/request_span.py).
    own_from: int = 0


@dataclass(frozen=True)
class Reformulation:
    """The reformulator's output for one request."""

    visual_context: str
    risk_prompt: ChatRow  # safety prompt + visual context + question, used only for risk
    answer_prompt: ChatRow  # what the answer is generated from
    cache_hits: int = 0
    cache_misses: int = 0
    format: str = "text"  # the input format (text, typographic, image): error-rate band edges are per format


@dataclass(frozen=True)
class RiskAssessment:
    risk: float
    scores: dict[str, float]  # each assessor's calibrated score, by assessor name
    raw: dict[str, float] = field(default_factory=dict)  # each assessor's uncalibrated statistic




@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str = "stop"  # "stop" (end of sequence) or "length"


@dataclass(frozen=True)
class Result:
    """What guardrail hands back for one request."""

    text: str
    token_ids: tuple[int, ...]
    risk: float | None
    band: str | None
    strength: float
    action: str  # "steer", "refuse", "observe", "unguarded", "error"
    tenant: str
    policy: str
    policy_hash: str
    visual_context: str
    scores: dict[str, float]
    timings_ms: dict[str, float]
    request_id: str
    finish_reason: str = "stop"
    error: str | None = None
    degraded: bool = False  # fail_open let the request through after a stage failed

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self)
        out["token_ids"] = list(self.token_ids)
        return out


@dataclass(frozen=True)
class RequestView:
    """What a stage sees of one request: read-only (the pipeline's working state stays its own)."""

    request: Request
    tenant: str
    policy: "Policy"
    images: tuple[DecodedImage, ...]
    reformulation: Reformulation | None = None


@dataclass
class RequestContext:
    """Per-request working state; created by the pipeline, never shared between requests."""

    request: Request
    tenant: str
    policy: "Policy"
    runtime: Any = None  # the policy's built stages (pipeline.PolicyRuntime)
    max_new_tokens: int = 0
    images: list[DecodedImage] = field(default_factory=list)
    reformulation: Reformulation | None = None
    assessment: RiskAssessment | None = None
    band: "Band | None" = None
    plan: SteeringPlan = NO_STEERING
    action: str = "steer"
    generation: Generation | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (stage, message)
    degraded: bool = False
    done: bool = False  # a refusal or an error already produced the final text
    assess_only: bool = False
    by_default: bool = False  # the tenant is not listed: its policy is the tenants map's default_policy
    spans: list[tuple[str, int, int, str | None]] = field(default_factory=list)  # (stage, start, end ns, error)

    def view(self) -> RequestView:
        return RequestView(self.request, self.tenant, self.policy, tuple(self.images), self.reformulation)
