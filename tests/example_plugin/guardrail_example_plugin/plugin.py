"""Two stages a third party adds without touching guardrail:

* assessor `centroid_distance`, with its own calibrator: at one decoder layer, the distance of the
  reformulated query's state to the benign centroid minus its distance to the harmful centroid,
  t = ‖x − μ_benign‖ − ‖x − μ_harmful‖, mapped to risk σ(t / scale). The calibrator fits μ_benign,
  μ_harmful and scale (the spread of t) into its block `centroid_distance`.
* steering `forced_opening`: at a strength of at least `min_strength`, the answer's first tokens
  are exactly the tokens of `opening` (a ForcedPrefix); below it, the answer is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardrail.plugin.sdk import (
    NO_STEERING,
    ArtifactError,
    Block,
    BlockView,
    ForcedPrefix,
    RiskNeeds,
    Score,
    SteeringPlan,
    hookimpl,
    require_block,
)

BLOCK = "centroid_distance"


def statistic(x: torch.Tensor, benign: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """‖x − μ_benign‖ − ‖x − μ_harmful‖ per row: positive nearer the harmful centroid."""
    return (x - benign).norm(dim=-1) - (x - harmful).norm(dim=-1)


@dataclass(frozen=True)
class Centroids:
    layer: int
    scale: float
    benign: torch.Tensor
    harmful: torch.Tensor

    @classmethod
    def of(cls, view: BlockView) -> "Centroids":
        scale = float(view.field("scale"))
        if scale <= 0:
            raise ArtifactError(f"block {view.name!r}: scale must be positive, got {scale}")
        return cls(int(view.field("layer", int)), scale, view.tensor("benign"), view.tensor("harmful"))


class CentroidCalibrator:
    name = BLOCK
    version = 1
    requires: tuple[str, ...] = ()

    def __init__(self, layer: int | None = None):
        self.layer = layer

    def needs(self, ctx) -> RiskNeeds:
        return RiskNeeds(layers=frozenset([self._layer(ctx)]))

    def _layer(self, ctx) -> int:
        return self.layer if self.layer is not None else ctx.num_layers // 2

    def fit(self, data, ctx) -> Block:
        layer = self._layer(ctx)
        x, labels = data.states[layer], data.labels
        benign, harmful = x[~labels].mean(0), x[labels].mean(0)
        t = statistic(x, benign, harmful)
        scale = float(t.std()) or 1.0
        return Block(self.version, {"layer": layer, "scale": scale, "rows": len(data)},
                     {"benign": benign, "harmful": harmful}, {"benign": ("hidden",), "harmful": ("hidden",)})


class CentroidDistance:
    def __init__(self) -> None:
        self.params: Centroids | None = None

    def check(self, env, policy) -> None:
        self.params = Centroids.of(require_block(env, BLOCK, "assessor centroid_distance"))

    def needs(self, env) -> RiskNeeds:
        return RiskNeeds(layers=frozenset([self.params.layer]))

    def score(self, risk_pass, contexts, env) -> list[Score]:
        p = self.params
        t = statistic(risk_pass.states[p.layer], p.benign, p.harmful)
        risk = torch.sigmoid(t / p.scale)
        return [Score(risk=float(r), raw=float(v)) for r, v in zip(risk, t)]


class ForcedOpening:
    interventions = (ForcedPrefix,)

    def __init__(self, opening: str = "I won't help with that.", min_strength: float = 0.5):
        self.opening = opening
        self.min_strength = float(min_strength)
        self.ids: tuple[int, ...] = ()

    def check(self, env, policy) -> None:
        self.ids = tuple(env.engine.encode_text(self.opening))
        if not self.ids:
            raise ArtifactError(f"forced_opening: {self.opening!r} encodes to no tokens")

    def plan(self, strength: float, tokens: int) -> SteeringPlan:
        if strength < self.min_strength or strength <= 0.0:
            return NO_STEERING
        return SteeringPlan((ForcedPrefix(self.ids),), strength=strength, tokens=len(self.ids), method="forced_opening")


@hookimpl
def guardrail_register_risk_assessors(register):
    register("centroid_distance", CentroidDistance)


@hookimpl
def guardrail_register_calibrators(register):
    register(BLOCK, CentroidCalibrator)


@hookimpl
def guardrail_register_steering_controllers(register):
    register("forced_opening", ForcedOpening)
