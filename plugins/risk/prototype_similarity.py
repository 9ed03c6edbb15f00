"""Assessor `prototype_similarity`: the paper's risk signal, with its calibrator.

Run the reformulated query N greedy steps; q = Σ γ^(n−1) softmax(z_n); p = the same over the
prototype logits; S = cos(q, p); r = σ(α (S − S_base)). The assessor asks the backend for S as a
readout (`SimilarityReadout`), so the vLLM backend computes it inside the engine instead of
shipping N vocabulary-sized distributions per request; the transformers backend computes it from
its step logits, with the same maths. Block `prototype_similarity` v1 holds N, γ,
S_base (the mean S over the calibration rows) and α = ln 99 / (1 − S_base); the prototype logits
are the `prototypes` block's (plugins/steering/prototypes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from guardrail.plugin.sdk import (
    ArtifactError,
    Block,
    BlockView,
    RiskNeeds,
    Score,
    alpha_for,
    auroc,
    calibrated_risk,
    hookimpl,
    prototype_similarity,
    require_block,
    SimilarityReadout,
)
from guardrail_plugins.steering.prototypes import PROTOTYPES, PrototypeView

NAME = "prototype_similarity"


@dataclass(frozen=True)
class SimilarityParams:
    steps: int
    gamma: float
    s_base: float
    alpha: float

    @classmethod
    def of(cls, view: BlockView) -> "SimilarityParams":
        steps = view.field("steps", int)
        if steps < 1:
            raise ArtifactError(f"artifact block {view.name!r}: steps must be at least 1, got {steps}")
        return cls(steps, float(view.field("gamma")), float(view.field("s_base")), float(view.field("alpha")))


class SimilarityCalibrator:
    name = NAME
    version = 1
    requires = (PROTOTYPES,)

    def needs(self, ctx: Any) -> RiskNeeds:
        return RiskNeeds(steps=ctx.config.steps)

    def fit(self, data: Any, ctx: Any) -> Block:
        cfg = ctx.config
        proto = PrototypeView.of(ctx.block(PROTOTYPES))
        s = prototype_similarity(data.step_logits[:, : cfg.steps], proto.logits[: cfg.steps], cfg.gamma)
        s_base = float(s.mean())
        labels = data.labels
        meta = {"s_base": s_base, "alpha": alpha_for(s_base, 1.0), "s_ref": 1.0, "steps": cfg.steps,
                "gamma": cfg.gamma, "calibration_auroc": auroc(s[labels].tolist(), s[~labels].tolist())}
        return Block(self.version, meta)


class PrototypeSimilarity:
    def __init__(self, s_base: float | None = None, alpha: float | None = None):
        # Overrides for experiments; normally both come from the calibration artifact.
        self.s_base_override = s_base
        self.alpha_override = alpha
        self.params: SimilarityParams | None = None  # bound when the policy loads
        self.proto: PrototypeView | None = None

    def check(self, env: Any, policy: Any) -> None:
        self.params = SimilarityParams.of(require_block(env, NAME, "assessor prototype_similarity"))
        self.proto = PrototypeView.of(require_block(env, PROTOTYPES, "assessor prototype_similarity"))
        if self.params.steps > self.proto.steps:
            raise ArtifactError("the artifact has fewer prototype steps than its risk pass needs")

    def _bound(self) -> tuple[SimilarityParams, PrototypeView]:
        if self.params is None or self.proto is None:
            raise ArtifactError("prototype_similarity used before its policy was checked against an artifact")
        return self.params, self.proto

    def readout(self) -> SimilarityReadout:
        params = self._bound()[0]
        return SimilarityReadout(f"{PROTOTYPES}/logits", params.steps, params.gamma)

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(readouts=frozenset([self.readout()]))

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        params, proto = self._bound()
        s = risk_pass.readout(self.readout(), env.artifacts)
        s_base = self.s_base_override if self.s_base_override is not None else params.s_base
        alpha = self.alpha_override if self.alpha_override is not None else params.alpha
        r = calibrated_risk(s, s_base, alpha)
        return [Score(risk=float(ri), raw=float(si)) for ri, si in zip(r, s)]


@hookimpl
def guardrail_register_risk_assessors(register):
    register(NAME, PrototypeSimilarity)


@hookimpl
def guardrail_register_calibrators(register):
    register(NAME, SimilarityCalibrator)
