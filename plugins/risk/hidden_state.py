"""Assessors `mean_difference` and `linear_probe`: risk read from a middle layer's hidden state.

Both read the decoder-layer output at the last token of the reformulated query, captured during the
risk pass the guard already runs (no extra forward pass). The layer is the one calibration chose by
cross-validation. The statistic (projection on the diff-in-means direction, or the probe's logit) is
mapped to [0, 1] with the paper's sigmoid: S_base = its calibration mean, and the harmful mean maps
to 0.99.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import torch

from guardrail import hookimpl
from guardrail.errors import ArtifactError
from guardrail.method.probes import LogisticProbe, MeanDifference
from guardrail.method.risk_math import calibrated_risk
from guardrail.plugin.protocols import RiskNeeds, Score


class _HiddenStateAssessor(abc.ABC):
    name = ""

    def __init__(self, layer: int | None = None):
        self.layer_override = layer

    def _block(self, env: Any) -> dict[str, Any]:
        art = env.engine.artifacts
        if art is None:
            raise ArtifactError(f"assessor {self.name} needs calibration artifacts (guardrail calibrate)")
        return art.assessor(self.name)

    def layer(self, env: Any) -> int:
        return int(self.layer_override if self.layer_override is not None else self._block(env)["layer"])

    def layers(self, env: Any) -> list[int]:
        return [self.layer(env)]

    def check(self, env: Any, policy: Any) -> None:
        self._block(env)
        n_layers = env.engine.fingerprint()["num_layers"]
        for layer in self.layers(env):
            if not 0 <= layer < n_layers:
                raise ArtifactError(f"assessor {self.name}: layer {layer} is not among the model's {n_layers}")
        if self.layer_override is not None and self.layer_override != self._block(env)["layer"]:
            # The sigmoid was calibrated on the chosen layer's statistic; another layer needs its own.
            raise ArtifactError(f"assessor {self.name}: layer {self.layer_override} was not calibrated (recalibrate)")

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(layers=frozenset(self.layers(env)))

    @abc.abstractmethod
    def statistic(self, states: torch.Tensor, env: Any) -> torch.Tensor:
        """The uncalibrated statistic for each row of `states` ([B, k·d], the layers' states side
        by side -> [B])."""

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        block = self._block(env)
        t = self.statistic(torch.cat([risk_pass.states[l] for l in self.layers(env)], dim=-1), env)
        r = calibrated_risk(t, float(block["s_base"]), float(block["alpha"]))
        return [Score(risk=float(ri), raw=float(ti)) for ri, ti in zip(r, t)]


class MeanDifferenceAssessor(_HiddenStateAssessor):
    name = "mean_difference"

    def statistic(self, states: torch.Tensor, env: Any) -> torch.Tensor:
        art, layer = env.engine.artifacts, self.layer(env)
        return MeanDifference(art.tensors["directions"][layer], art.tensors["midpoints"][layer]).project(states)


class LinearProbeAssessor(_HiddenStateAssessor):
    """A logistic probe on one layer's state, or on several layers' states side by side when
    calibration found that validates better (the block's `layers`)."""

    name = "linear_probe"

    def layers(self, env: Any) -> list[int]:
        calibrated = [int(l) for l in self._block(env).get("layers", [self._block(env)["layer"]])]
        if self.layer_override is not None and calibrated != [self.layer_override]:
            raise ArtifactError(f"assessor {self.name}: layer {self.layer_override} was not calibrated (recalibrate)")
        return calibrated

    def statistic(self, states: torch.Tensor, env: Any) -> torch.Tensor:
        t = env.engine.artifacts.tensors
        probe = LogisticProbe(t["probe.weight"], t["probe.bias"], t["probe.mean"], t["probe.scale"])
        return probe.logit(states)


@hookimpl
def guardrail_register_risk_assessors(register):
    register("mean_difference", MeanDifferenceAssessor)
    register("linear_probe", LinearProbeAssessor)
