"""The small Protocols a stage implementation follows; together with the hooks, the whole contract.

Stage objects are built per policy from the policy's parameters and must be stateless between
requests (anything per-request travels in the arguments). The `env` argument carries the guard's
services: `env.engine` is the generation backend (`guardrail.engine.backend.Backend`), the only thing that
touches the model; `env.captions` the visual-context cache; `env.captioner(name, params)` builds a
registered captioner.

A stage may also define `check(env) -> None`, called when its policy is loaded or reloaded, to
refuse a policy it cannot serve (e.g. captioning images on a text-only model) before any request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from guardrail.engine.backend import Backend, RiskPass
    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.plugin.manager import PluginManager
    from guardrail.types import Reformulation, RequestContext, SteeringPlan


@dataclass
class StageEnv:
    """Per-guard services handed to stages (one per Guardrail, shared by its requests)."""

    engine: "Backend"
    captions: "CaptionCache"
    plugins: "PluginManager"
    _captioners: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def captioner(self, name: str, params: dict[str, Any] | None = None) -> "Captioner":
        key = f"{name}:{sorted((params or {}).items())!r}"
        with self._lock:
            if key not in self._captioners:
                self._captioners[key] = self.plugins.create("captioners", name, params)
            return self._captioners[key]


@runtime_checkable
class Captioner(Protocol):
    def caption(self, images: Sequence["Image.Image"], env: "StageEnv") -> list[str]:
        """One visual-context sentence per image, beginning "The image shows"."""


@runtime_checkable
class Reformulator(Protocol):
    def reformulate(self, contexts: Sequence["RequestContext"], env: "StageEnv") -> list["Reformulation"]:
        """The risk prompt and the answer prompt for each request of a batch."""


@dataclass(frozen=True)
class RiskNeeds:
    """What an assessor needs from the shared risk pass over the reformulated prompts."""

    steps: int = 0  # greedy next-token distributions at response steps 1..steps
    layers: frozenset[int] = field(default_factory=frozenset)  # decoder-layer states, last prompt token


@dataclass(frozen=True)
class Score:
    risk: float  # calibrated, in [0, 1]
    raw: float  # the uncalibrated statistic (similarity, projection, probe logit)


@runtime_checkable
class RiskAssessor(Protocol):
    def needs(self, env: "StageEnv") -> RiskNeeds:
        """Declare what the shared risk pass must compute for this assessor."""

    def score(self, risk_pass: "RiskPass", contexts: Sequence["RequestContext"], env: "StageEnv") -> list[Score]:
        """One score per row of the risk pass (row i belongs to contexts[i])."""


@runtime_checkable
class SteeringController(Protocol):
    def plan(self, strength: float, tokens: int) -> "SteeringPlan":
        """How to steer one answer at the band's strength (0 means untouched)."""


@runtime_checkable
class Judge(Protocol):
    def is_refusal(self, answer: str) -> bool:
        """Whether an answer refuses (reads the whole answer, not only its opening)."""
