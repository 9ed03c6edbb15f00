"""Controller `refusal_direction`: additive steering with the calibrated diff-in-means direction.

Plans one `AdditiveDirection`: s · coefficient · (μ_harmful − μ_benign) added to the output of the
chosen decoder layers at every position; rows with strength 0 are untouched. At coefficient 1 and
s = 1 this moves a benign prompt's state by the full distance between the class means. The
directions are the `mean_difference` block's (plugins/risk/hidden_state.py).

Measured on SmolLM2-135M it is weak: 0–18 % refusals before the text breaks down. It is shipped for
models where it works and for comparison, not as the recommended default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence


from guardrail.lazy import lazy_module
from guardrail.plugin.sdk import NO_STEERING, AdditiveDirection, ArtifactError, SteeringPlan, hookimpl, require_block

if TYPE_CHECKING:
    import torch
else:  # the plugin registers without torch; a stage imports it when it first computes
    torch = lazy_module("torch")


class RefusalDirection:
    interventions = (AdditiveDirection,)

    def __init__(self, layers: Sequence[int] | None = None, coefficient: float = 1.0):
        # None = the layer calibration chose for mean_difference (known once the artifact is seen).
        self.layers = tuple(int(l) for l in layers) if layers is not None else None
        self.coefficient = float(coefficient)
        self.vectors: torch.Tensor | None = None  # bound once, when the policy loads

    def check(self, env: Any, policy: Any) -> None:
        view = require_block(env, "mean_difference", "steering refusal_direction")
        directions = view.tensor("directions")
        n_layers = directions.shape[0]
        if self.layers is None:
            self.layers = (int(view.field("layer", int)),)
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise ArtifactError(f"refusal_direction layers {bad} are outside the model's {n_layers} layers")
        self.vectors = directions[list(self.layers)]

    def plan(self, strength: float, tokens: int) -> SteeringPlan:
        if strength <= 0.0:
            return NO_STEERING
        if self.layers is None or self.vectors is None:
            raise ArtifactError("refusal_direction used before its policy was checked against an artifact")
        step = AdditiveDirection(self.layers, self.vectors, float(strength) * self.coefficient)
        return SteeringPlan((step,), strength=float(strength), tokens=int(tokens), method="refusal_direction")


@hookimpl
def guardrail_register_steering_controllers(register):
    register("refusal_direction", RefusalDirection)
