"""Controller `refusal_direction`: additive steering with the calibrated diff-in-means direction.

Adds s · coefficient · (μ_harmful − μ_benign) to the output of the chosen decoder layers at every
position, through removable forward hooks; rows with strength 0 are untouched. At coefficient 1 and
s = 1 this moves a benign prompt's state by the full distance between the class means.

Measured on SmolLM2-135M it is weak: 0–18 % refusals before the text breaks down. It is shipped for
models where it works and for comparison, not as the recommended default.
"""

from __future__ import annotations

from typing import Any, Sequence

from guardrail import hookimpl
from guardrail.errors import ArtifactError
from guardrail.types import NO_STEERING, SteeringPlan


class RefusalDirection:
    def __init__(self, layers: Sequence[int] | None = None, coefficient: float = 1.0):
        # None = the layer calibration chose for mean_difference (known once the artifact is seen).
        self.layers = tuple(int(l) for l in layers) if layers is not None else None
        self.coefficient = float(coefficient)

    def check(self, env: Any, policy: Any) -> None:
        art = env.engine.artifacts
        if art is None:
            raise ArtifactError("steering refusal_direction needs calibration artifacts (guardrail calibrate)")
        n_layers = art.directions.shape[0]
        if self.layers is None:
            # Resolved once, when the policy loads; never changed by a request.
            self.layers = (int(art.assessor("mean_difference")["layer"]),)
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise ArtifactError(f"refusal_direction layers {bad} are outside the model's {n_layers} layers")

    def plan(self, strength: float, tokens: int) -> SteeringPlan:
        if strength <= 0.0:
            return NO_STEERING
        if self.layers is None:
            raise ArtifactError("refusal_direction used before its policy was checked against an artifact")
        return SteeringPlan(
            mode="refusal_direction",
            strength=float(strength),
            tokens=int(tokens),
            params={"layers": list(self.layers), "coefficient": self.coefficient},
        )


@hookimpl
def guardrail_register_steering_controllers(register):
    register("refusal_direction", RefusalDirection)
