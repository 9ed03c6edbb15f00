"""Controller `prototype_interpolation`: the paper's steering.

At response positions 1..k the final post-norm state becomes (1 − s)·h + s·μ_n. The plan is one
`LogitInterpolation` toward the calibrated prototype logits P_n = W_U μ_n (the exact equivalent on
an affine head), carrying μ_n too so a backend can apply the state form on a soft-capped head.
s comes from the policy's band; k is the band's `tokens` (the paper's N = 3). The prototypes are
fitted by this plugin's calibrator (`plugins/steering/prototypes.py`).
"""

from __future__ import annotations

from typing import Any

from guardrail.plugin.sdk import (
    NO_STEERING,
    ArtifactError,
    LogitInterpolation,
    SteeringPlan,
    hookimpl,
    require_block,
)
from guardrail_plugins.steering.prototypes import PROTOTYPES, PrototypeCalibrator, PrototypeView


class PrototypeInterpolation:
    interventions = (LogitInterpolation,)

    def __init__(self) -> None:
        self.view: PrototypeView | None = None  # bound once, when the policy loads

    def check(self, env: Any, policy: Any) -> None:
        steered = [b for b in policy.bands if b.action == "steer" and b.strength != 0.0]
        if not steered and env.artifacts is None:
            return  # nothing to steer with; a forced strength then fails naming the missing artifact
        self.view = PrototypeView.of(require_block(env, PROTOTYPES, "steering prototype_interpolation"))
        available = self.view.steps
        for band in steered:
            if band.tokens > available:
                raise ArtifactError(
                    f"band {band.name!r} steers {band.tokens} tokens but the artifact has prototypes for "
                    f"{available} steps (recalibrate with --steer-steps {band.tokens})"
                )

    def plan(self, strength: float, tokens: int) -> SteeringPlan:
        if strength <= 0.0:
            return NO_STEERING
        if self.view is None:
            raise ArtifactError("prototype_interpolation used before its policy was checked against an artifact")
        step = LogitInterpolation(float(strength), int(tokens), self.view.logits, self.view.states)
        return SteeringPlan((step,), strength=float(strength), tokens=int(tokens), method="prototype_interpolation")


@hookimpl
def guardrail_register_steering_controllers(register):
    register("prototype_interpolation", PrototypeInterpolation, default=True)


@hookimpl
def guardrail_register_calibrators(register):
    register(PROTOTYPES, PrototypeCalibrator)
