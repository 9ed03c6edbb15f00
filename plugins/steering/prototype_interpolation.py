"""Controller `prototype_interpolation`: the paper's steering.

At response positions 1..k the final post-norm state becomes (1 − s)·h + s·μ_n, applied as the
exactly equivalent logit interpolation (1 − s)·z + s·P_n when the head is affine (a final-norm hook
otherwise). s comes from the policy's band; k is the band's `tokens` (the paper's N = 3).
"""

from __future__ import annotations

from typing import Any

from guardrail import hookimpl
from guardrail.errors import ArtifactError
from guardrail.types import NO_STEERING, SteeringPlan


class PrototypeInterpolation:
    def check(self, env: Any, policy: Any) -> None:
        art = env.engine.artifacts
        steered = [b for b in policy.bands if b.action == "steer" and b.strength != 0.0]
        if not steered:
            return
        if art is None:
            raise ArtifactError("steering prototype_interpolation needs calibration artifacts (guardrail calibrate)")
        available = art.prototypes.shape[0]
        for band in steered:
            if band.tokens > available:
                raise ArtifactError(
                    f"band {band.name!r} steers {band.tokens} tokens but the artifact has prototypes for "
                    f"{available} steps (recalibrate with --steer-steps {band.tokens})"
                )

    def plan(self, strength: float, tokens: int) -> SteeringPlan:
        if strength <= 0.0:
            return NO_STEERING
        return SteeringPlan(mode="prototype_interpolation", strength=float(strength), tokens=int(tokens))


@hookimpl
def guardrail_register_steering_controllers(register):
    register("prototype_interpolation", PrototypeInterpolation)
