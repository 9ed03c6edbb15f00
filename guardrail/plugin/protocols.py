"""The small Protocols a stage implementation follows; together with the hooks, the whole contract.

Stage objects are built per policy from the policy's parameters and must be stateless between
requests (anything per-request travels in the arguments). The `env` argument carries the guard's
services: `env.engine` is the generation backend (`guardrail.engine.backend.Backend`), the only thing that
touches the model; `env.captions` the visual-context cache; `env.captioner(name, params)` builds a
registered captioner.

A stage may also define `check(env, policy) -> None`, called when its policy is loaded or reloaded
(and by `guardrail policy check --artifacts`), to refuse a policy it cannot serve (captioning images
on a text-only model, a missing calibration block) before any request, and to bind what it reads
from the artifact. Stages are checked against these Protocols when a policy loads: a stage missing
a method is refused then, naming the method, not at the first request.

Plugins import what they need from `guardrail.plugin.sdk`, the one module that lists it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from guardrail.calibration import CalibrationContext, GatheredStates
    from guardrail.engine.backend import Backend, RiskPass
    from guardrail.engine.interventions import SteeringPlan
    from guardrail.method.artifacts import Artifacts, Block
    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.plugin.manager import PluginManager
    from guardrail.types import Reformulation, RequestView


@dataclass
class StageEnv:
    """Per-guard services handed to stages (one per Guardrail, shared by its requests)."""

    engine: "Backend"
    captions: "CaptionCache"
    plugins: "PluginManager"
    _captioners: dict[str, Any] = field(default_factory=dict)

    @property
    def artifacts(self) -> "Artifacts | None":
        """The calibration artifact the engine was built with (None when uncalibrated)."""
        return getattr(self.engine, "artifacts", None)
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
    def reformulate(self, contexts: Sequence["RequestView"], env: "StageEnv") -> list["Reformulation"]:
        """The risk prompt and the answer prompt for each request of a batch."""


@dataclass(frozen=True)
class RiskNeeds:
    """What an assessor needs from the shared risk pass over the reformulated prompts."""

    steps: int = 0  # greedy next-token distributions at response steps 1..steps
    layers: frozenset[int] = field(default_factory=frozenset)  # decoder-layer states, last prompt token
    pooled: frozenset[int] = field(default_factory=frozenset)  # decoder-layer states, mean over the request's own tokens
    # typed statistics of the greedy steps (guardrail.engine.readouts), computed by the backend
    readouts: frozenset[Any] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Score:
    risk: float  # calibrated, in [0, 1]
    raw: float  # the uncalibrated statistic (similarity, projection, probe logit)


@runtime_checkable
class RiskAssessor(Protocol):
    def needs(self, env: "StageEnv") -> RiskNeeds:
        """Declare what the shared risk pass must compute for this assessor."""

    def score(self, risk_pass: "RiskPass", contexts: Sequence["RequestView"], env: "StageEnv") -> list[Score]:
        """One score per row of the risk pass (row i belongs to contexts[i])."""


@runtime_checkable
class SteeringController(Protocol):
    interventions: tuple[type, ...]  # the intervention kinds its plans may hold

    def plan(self, strength: float, tokens: int) -> "SteeringPlan":
        """How to steer one answer at the band's strength (0 means untouched)."""


@runtime_checkable
class Calibrator(Protocol):
    """Fits one named, versioned block of the artifact; the stage that reads it registers it."""

    name: str
    version: int
    requires: tuple[str, ...]  # blocks fitted before this one (read with ctx.block(name))

    def needs(self, ctx: "CalibrationContext") -> RiskNeeds:
        """What the shared risk pass over the calibration rows must compute for this block."""

    def fit(self, data: "GatheredStates", ctx: "CalibrationContext") -> "Block":
        """The block, fitted on `data` only (cross-validation hands it a subset of rows)."""


@runtime_checkable
class AuditSink(Protocol):
    def write(self, record: dict[str, Any]) -> None:
        """Store one JSON-ready record; raise on failure (the request then fails per its policy)."""

    def close(self) -> None: ...


@runtime_checkable
class Judge(Protocol):
    def is_refusal(self, answer: str) -> bool:
        """Whether an answer refuses (reads the whole answer, not only its opening)."""


@runtime_checkable
class Baseline(Protocol):
    variants: tuple[str, ...]
    sweep: bool

    def check(self, args: Sequence[str]) -> None:
        """Raise ValueError naming what is wrong with the method's arguments (`NAME:ARGS`)."""

    def document(self, base: dict[str, Any], args: Sequence[str], tokens: int) -> dict[str, Any]:
        """The policy document of the method, made from the policy under test's document."""


PROTOCOLS = {
    "reformulators": Reformulator,
    "captioners": Captioner,
    "risk_assessors": RiskAssessor,
    "steering_controllers": SteeringController,
    "calibrators": Calibrator,
    "audit_sinks": AuditSink,
    "judges": Judge,
    "baselines": Baseline,
}


def protocol_problems(kind: str, stage: object) -> list[str]:
    """What a built stage lacks of its kind's Protocol (attribute names), empty when it conforms."""
    proto = PROTOCOLS.get(kind)
    if proto is None:
        return []
    members = [m for m in vars(proto) if not m.startswith("_")] + list(getattr(proto, "__annotations__", {}))
    missing = sorted({m for m in members if m not in ("register",) and not hasattr(stage, m)})
    return missing
