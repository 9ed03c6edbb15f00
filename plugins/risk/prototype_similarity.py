"""Assessor `prototype_similarity`: the paper's risk signal.

Run the reformulated query N greedy steps; q = Σ γ^(n−1) softmax(z_n); p = the same over the
prototype logits; S = cos(q, p); r = σ(α (S − S_base)), with N, γ, S_base and α from calibration.
"""

from __future__ import annotations

from typing import Any, Sequence

from guardrail import hookimpl
from guardrail.errors import ArtifactError
from guardrail.method.risk_math import calibrated_risk, prototype_similarity
from guardrail.plugin.protocols import RiskNeeds, Score


class PrototypeSimilarity:
    name = "prototype_similarity"

    def __init__(self, s_base: float | None = None, alpha: float | None = None):
        # Overrides for experiments; normally both come from the calibration artifact.
        self.s_base_override = s_base
        self.alpha_override = alpha

    def _block(self, env: Any) -> dict[str, Any]:
        art = env.engine.artifacts
        if art is None:
            raise ArtifactError("assessor prototype_similarity needs calibration artifacts (guardrail calibrate)")
        return art.assessor(self.name)

    def check(self, env: Any, policy: Any) -> None:
        block = self._block(env)
        if block["steps"] > env.engine.artifacts.prototype_logits.shape[0]:
            raise ArtifactError("the artifact has fewer prototype steps than its risk pass needs")

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(steps=int(self._block(env)["steps"]))

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        block = self._block(env)
        steps = int(block["steps"])
        proto = env.engine.artifacts.prototype_logits[:steps]
        s = prototype_similarity(risk_pass.step_logits[:, :steps], proto, float(block["gamma"]))
        s_base = self.s_base_override if self.s_base_override is not None else float(block["s_base"])
        alpha = self.alpha_override if self.alpha_override is not None else float(block["alpha"])
        r = calibrated_risk(s, s_base, alpha)
        return [Score(risk=float(ri), raw=float(si)) for ri, si in zip(r, s)]


@hookimpl
def guardrail_register_risk_assessors(register):
    register("prototype_similarity", PrototypeSimilarity)
