"""Typed interventions: what a steering plan is made of, each with its maths in one place.

A steering controller (a plugin) answers `plan(strength, tokens)` with a `SteeringPlan` holding
interventions; a backend applies the kinds it declares in `Backend.interventions` and refuses any
other. A controller declares the kinds it may return (`interventions` on the controller), so a
policy whose controller needs a kind the backend lacks is rejected when the policy loads, naming
both. No backend knows a plugin's name, and no plugin reaches into a backend.

Response step n (1-based) is predicted by the n-th forward pass of a generation: the prefill's last
position for n = 1, then one decode step each. "The first k tokens" means steps 1..k.

Rows whose plan is empty are never indexed by any intervention: their output is byte-identical to
an unguarded generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch


def interpolate(z: "torch.Tensor", target: "torch.Tensor", s: "torch.Tensor | float") -> "torch.Tensor":
    """(1 − s)·z + s·target, per row. At s = 1 this is exactly `target`; at s = 0 exactly z."""
    return (1.0 - s) * z + s * target


def add_direction(h: "torch.Tensor", vector: "torch.Tensor", coefficient: "torch.Tensor | float") -> "torch.Tensor":
    """h + c·v: additive steering of a layer's output."""
    return h + coefficient * vector


def force_token(scores: "torch.Tensor", token: int) -> "torch.Tensor":
    """Scores under which `token` is the only possible next token (greedy or sampled)."""
    import torch

    forced = torch.full_like(scores, float("-inf"))
    forced[..., token] = 0.0
    return forced


@dataclass(frozen=True, eq=False)
class LogitInterpolation:
    """At response steps 1..tokens the step's logits become (1 − s)·z_n + s·targets[n − 1].

    This is RAS's edit: moving the final post-norm state to (1 − s)·h + s·μ_n equals it exactly
    when the head is affine (targets = W_U μ_n; affine maps keep convex combinations). For heads
    that are not affine (soft-capped logits) a backend applies the state form instead, which needs
    `states` (μ_n, [K, d]); without them such a backend refuses the plan.

    targets: [K, V] float logits with K ≥ tokens; strength s in (0, 1]."""

    strength: float
    tokens: int
    targets: "torch.Tensor"
    states: "torch.Tensor | None" = None
    touches_prompt = False  # only the last position of each forward pass changes, never the KV cache

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"LogitInterpolation strength must be in (0, 1], got {self.strength}")
        if self.tokens < 1:
            raise ValueError(f"LogitInterpolation needs at least one token, got {self.tokens}")
        if self.targets.dim() != 2 or self.targets.shape[0] < self.tokens:
            raise ValueError(
                f"LogitInterpolation steers {self.tokens} tokens but its targets have shape {list(self.targets.shape)} "
                f"(need [≥{self.tokens}, vocab])"
            )
        if self.states is not None and self.states.shape[0] < self.tokens:
            raise ValueError(f"LogitInterpolation states cover {self.states.shape[0]} steps, fewer than {self.tokens}")


@dataclass(frozen=True, eq=False)
class AdditiveDirection:
    """h_l ← h_l + coefficient·v_l on the output of each named decoder layer, at every position
    of the row (prompt included, so its KV cache changes too).

    layers: decoder-layer indices; vectors: [len(layers), d], row i for layers[i]."""

    layers: tuple[int, ...]
    vectors: "torch.Tensor"
    coefficient: float
    touches_prompt = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        if not self.layers:
            raise ValueError("AdditiveDirection needs at least one layer")
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.layers):
            raise ValueError(f"AdditiveDirection has {len(self.layers)} layers but vectors of shape {list(self.vectors.shape)}")


@dataclass(frozen=True)
class ForcedPrefix:
    """The first len(ids) response tokens are exactly `ids` (teacher forcing inside generation)."""

    ids: tuple[int, ...]
    touches_prompt = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(int(t) for t in self.ids))
        if not self.ids:
            raise ValueError("ForcedPrefix needs at least one token id")


Intervention = Union[LogitInterpolation, AdditiveDirection, ForcedPrefix]
KINDS: tuple[type, ...] = (LogitInterpolation, AdditiveDirection, ForcedPrefix)


@dataclass(frozen=True)
class SteeringPlan:
    """How to generate one row: the interventions to apply, and what the audit record says about
    them. An empty plan means: do not touch the model."""

    interventions: tuple[Intervention, ...] = ()
    strength: float = 0.0  # the band's strength, as audited
    tokens: int = 0  # response positions the plan steers, as audited
    method: str = "none"  # the controller that made it, as audited

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))
        for iv in self.interventions:
            if not isinstance(iv, KINDS):
                raise TypeError(f"a steering plan holds interventions, not {type(iv).__name__}")

    @property
    def active(self) -> bool:
        return bool(self.interventions)

    def of(self, kind: type) -> list[Intervention]:
        return [iv for iv in self.interventions if isinstance(iv, kind)]

    @property
    def touches_prompt(self) -> bool:
        return any(iv.touches_prompt for iv in self.interventions)


NO_STEERING = SteeringPlan()


def leading_tokens(plan: SteeringPlan) -> list[int] | None:
    """The token ids a plan makes the answer open with, when its maths says so without running the
    model: a forced prefix's ids, or the argmax of a full-strength interpolation's targets (at s = 1
    a step's logits are the target). None when no intervention of the plan determines them."""
    for iv in plan.interventions:
        if isinstance(iv, ForcedPrefix):
            return list(iv.ids)
        if isinstance(iv, LogitInterpolation) and iv.strength >= 1.0:
            return [int(t) for t in iv.targets[: iv.tokens].argmax(dim=-1).tolist()]
    return None


def unsupported(plan: SteeringPlan, supported: frozenset[type] | set[type]) -> list[str]:
    """Names of the plan's intervention kinds a backend does not support."""
    return sorted({type(iv).__name__ for iv in plan.interventions if type(iv) not in supported})


@dataclass(frozen=True)
class RowGroups:
    """Rows of a batch that carry one kind of intervention, for a backend applying it at once."""

    rows: list[int] = field(default_factory=list)
    items: list[Intervention] = field(default_factory=list)


def rows_with(plans: "list[SteeringPlan] | tuple[SteeringPlan, ...]", kind: type) -> RowGroups:
    """Which rows carry an intervention of `kind` (at most one of a kind per row is allowed)."""
    out = RowGroups()
    for row, plan in enumerate(plans):
        found = plan.of(kind)
        if len(found) > 1:
            raise ValueError(f"row {row}: a plan may hold at most one {kind.__name__}")
        if found:
            out.rows.append(row)
            out.items.append(found[0])
    return out
