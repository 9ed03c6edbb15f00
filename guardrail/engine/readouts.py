"""Typed risk-pass readouts: a statistic an assessor asks the backend for, instead of raw outputs.

An assessor that needs one number per row from the greedy steps (the paper's similarity) can ask
for it as a readout (`RiskNeeds.readouts`). A backend computes it where that is cheapest: the
transformers backend from the step logits it holds anyway; the vLLM backend inside the engine, in
guardrail's logits processor, so no vocabulary-sized log-probabilities cross the wire (they cost
more server CPU than the whole forward pass on small models; docs/PERFORMANCE.md).

Readouts are frozen and hashable: the pipeline collects the distinct ones of a batch's assessors,
and `RiskPass.readouts` maps each to its [B] values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guardrail.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:  # imported when a tensor is first made, so registering and routing need no torch
    torch = lazy_module("torch")


@dataclass(frozen=True)
class SimilarityReadout:
    """S = cos(Σ_n γ^(n−1) softmax(z_n), Σ_n γ^(n−1) softmax(P_n)) over response steps 1..steps
    of the greedy risk pass, P = the artifact tensor `targets` ("BLOCK/TENSOR", [≥ steps, V])."""

    targets: str
    steps: int
    gamma: float

    def __post_init__(self) -> None:
        if not isinstance(self.targets, str) or "/" not in self.targets:
            raise ValueError(f"SimilarityReadout targets must name an artifact tensor 'BLOCK/TENSOR', got {self.targets!r}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"SimilarityReadout steps must be a whole number >= 1, got {self.steps!r}")
        if not 0.0 < float(self.gamma) <= 1.0:
            raise ValueError(f"SimilarityReadout gamma must be in (0, 1], got {self.gamma!r}")

    def from_logits(self, step_logits: Any, artifacts: Any) -> torch.Tensor:
        """The readout computed from a pass's raw step logits [B, ≥ steps, V] (float64 [B])."""
        from guardrail.method.risk_math import prototype_similarity

        if artifacts is None:
            raise ValueError(f"readout over {self.targets!r} needs the calibration artifact")
        targets = artifacts.tensors.get(self.targets)
        if targets is None:
            raise ValueError(f"readout target {self.targets!r} is not a tensor of the artifact")
        logits = torch.as_tensor(step_logits, dtype=torch.float32)
        if logits.shape[1] < self.steps or targets.shape[0] < self.steps:
            raise ValueError(f"readout needs {self.steps} steps; the pass has {logits.shape[1]}, "
                             f"{self.targets!r} {targets.shape[0]}")
        return prototype_similarity(logits[:, : self.steps], targets[: self.steps], float(self.gamma))
