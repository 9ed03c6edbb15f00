"""A policy's stages, built by the plugins and checked against the engine before any request.

`prepare` builds every policy of a set, checks each stage against its Protocol, checks that the
engine can apply every intervention the policy's controller may plan, and calls each stage's
`check(env, policy)` (where it binds its calibration block). Any failure rejects the whole set
with a PolicyError naming the policy and the problem; the registry then keeps the previous set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guardrail.errors import GuardrailError, PluginError, PolicyError
from guardrail.plugin.protocols import RiskAssessor, StageEnv, protocol_problems
from guardrail.method.edges import conformal_rank, fpr_edge
from guardrail.policy import AssessorSpec, Band, FprTarget, Policy


def min_rows(rate: float) -> int:
    """The fewest benign rows for which a conformal edge can promise `rate` (k ≤ n)."""
    n = 1
    while conformal_rank(n, rate) > n:
        n += 1
    return n


@dataclass(frozen=True)
class PolicyRuntime:
    """A policy with its stage objects built; made once per policy load, shared by requests."""

    policy: Policy
    reformulator: Any
    assessors: tuple[tuple[AssessorSpec, RiskAssessor], ...]
    controller: Any
    # Bands with numeric edges per input format; "*" for any format (error-rate edges resolved)
    bands: dict[str, tuple[Band, ...]] = field(default_factory=dict)

    def bands_for(self, fmt: str) -> tuple[Band, ...]:
        return self.bands.get(fmt) or self.bands.get("*") or tuple(self.policy.bands)


def resolve_bands(policy: Policy, artifacts: Any) -> dict[str, tuple[Band, ...]]:
    """Numeric band edges per input format. An `upto: {benign_fpr: r}` edge becomes, for each
    format, the conformal edge over the held-out benign risks of that format (the policy's
    assessors combined by its rule, row by row); formats the artifact has no benign rows of get
    the lowest edge of those resolved (the strictest: more steering, never less)."""
    if not policy.error_rate_edges:
        return {"*": tuple(policy.bands)}
    held = (artifacts.meta.get("held_out_benign") if artifacts is not None else None) or {}
    risk = held.get("risk", {})
    names = [spec.use for spec in policy.risk.assessors]
    missing = [n for n in names if n not in risk]
    if missing:
        raise PolicyError([("bands", 1, f"error-rate band edges need held-out benign risks for {', '.join(missing)}; "
                                        f"the artifact has them for: {', '.join(sorted(risk)) or 'none'} "
                                        "(recalibrate with held-out folds)")])
    formats = sorted(set.intersection(*(set(risk[n]) for n in names)))
    out: dict[str, tuple[Band, ...]] = {}
    for fmt in formats:
        rows = list(zip(*(risk[n][fmt] for n in names)))
        combined = [_combine(row, policy) for row in rows]
        try:
            out[fmt] = numeric_bands(policy, combined)
        except PolicyError as exc:
            raise PolicyError([(f, line, f"format {fmt}: {m}") for f, line, m in exc.problems]) from None
    if not out:
        raise PolicyError([("bands", 1, "error-rate band edges: the artifact has no held-out benign rows")])
    out["*"] = tuple(b.model_copy(update={"upto": min(out[f][i].upto for f in formats)}) for i, b in enumerate(policy.bands))
    return out


def _combine(values: tuple[float, ...], policy: Policy) -> float:
    rule, specs = policy.risk.combine, policy.risk.assessors
    if rule == "max":
        return max(values)
    if rule == "mean":
        return sum(values) / len(values)
    return sum(s.weight * v for s, v in zip(specs, values)) / sum(s.weight for s in specs)


def numeric_bands(policy: Policy, benign: list[float]) -> tuple[Band, ...]:
    """The policy's bands with every error-rate edge resolved over these benign risks, kept
    ascending (an edge never below the one before it) and inside (0, 1]."""
    out, previous = [], 0.0
    for band in policy.bands:
        edge = fpr_edge(benign, band.upto.benign_fpr) if isinstance(band.upto, FprTarget) else float(band.upto)
        if edge == float("inf"):  # too few benign rows to promise that rate: refuse, never loosen
            rate = band.upto.benign_fpr
            raise PolicyError([("bands", 1, f"band {band.name!r}: benign_fpr {rate} needs at least "
                                            f"{min_rows(rate)} held-out benign rows of a format; "
                                            f"the artifact has {len(benign)} (calibrate on more benign rows)")])
        edge = min(1.0, max(edge, previous, 1e-9))
        out.append(band.model_copy(update={"upto": edge}))
        previous = edge
    return tuple(out)


def _conforming(kind: str, name: str, stage: Any) -> Any:
    missing = protocol_problems(kind, stage)
    if missing:
        what = kind[:-1].replace("_", " ")
        raise PolicyError([("plugins", 1, f"{what} {name!r} ({type(stage).__name__}) lacks {', '.join(missing)}")])
    return stage


def lacking_inputs(need: Any, inputs: Any) -> list[str]:
    """The risk-pass outputs an assessor's needs ask for that a backend's `risk_inputs` lacks."""
    wants = (("layer_states", need.layers), ("pooled_states", need.pooled), ("step_logits", need.steps),
             ("readouts", need.readouts))
    return [name for name, wanted in wants if wanted and name not in inputs]


def build(policy: Policy, env: StageEnv) -> PolicyRuntime:
    plugins = env.plugins
    try:
        policy = policy.with_default_stages(plugins.default_stage)
    except PluginError as exc:
        raise PolicyError([(policy.name, 1, str(exc))]) from None
    runtime = PolicyRuntime(
        policy=policy,
        reformulator=_conforming("reformulators", policy.reformulator.use,
                                 plugins.create("reformulators", policy.reformulator.use, policy.reformulator.params)),
        assessors=tuple(
            (spec, _conforming("risk_assessors", spec.use, plugins.create("risk_assessors", spec.use, spec.params)))
            for spec in policy.risk.assessors
        ),
        controller=_conforming("steering_controllers", policy.steering.use,
                               plugins.create("steering_controllers", policy.steering.use, policy.steering.params)),
    )
    supported = frozenset(getattr(env.engine, "interventions", frozenset()))
    needed = [k for k in getattr(runtime.controller, "interventions", ()) if k not in supported]
    if needed:
        names = ", ".join(k.__name__ for k in needed)
        backend = type(env.engine).__name__
        raise PolicyError([("steering", 1, f"steering {policy.steering.use!r} needs {names}, which the "
                                             f"{backend} backend cannot apply (it applies: "
                                             f"{', '.join(sorted(k.__name__ for k in supported)) or 'none'})")])
    for stage in [runtime.reformulator, runtime.controller] + [a for _, a in runtime.assessors]:
        check = getattr(stage, "check", None)
        if check is not None:
            check(env, policy)
    # A backend may declare the risk-pass outputs it can give (`risk_inputs`: "step_logits",
    # "layer_states", "pooled_states", "readouts"; undeclared = all). An assessor needing another
    # is refused here, at load.
    inputs = getattr(env.engine, "risk_inputs", None)
    if inputs is not None:
        for spec, assessor in runtime.assessors:
            need = assessor.needs(env)
            lacking = lacking_inputs(need, inputs)
            if lacking:
                raise PolicyError([("risk", 1, f"assessor {spec.use!r} needs {', '.join(lacking)}, which the "
                                               f"{type(env.engine).__name__} backend cannot give (it gives: "
                                               f"{', '.join(sorted(inputs)) or 'none'})")])
    return PolicyRuntime(runtime.policy, runtime.reformulator, runtime.assessors, runtime.controller,
                         resolve_bands(policy, env.artifacts))


def prepare(policies: dict[str, Policy], env: StageEnv) -> dict[str, PolicyRuntime]:
    runtimes: dict[str, PolicyRuntime] = {}
    for name, policy in policies.items():
        try:
            runtimes[name] = build(policy, env)
        except PolicyError as exc:
            raise PolicyError([(f"policy {name}", line, message) for _, line, message in exc.problems]) from exc
        except GuardrailError as exc:
            raise PolicyError([(f"policy {name}", 1, str(exc))]) from exc
        except Exception as exc:  # a plugin's factory or check() can raise anything
            raise PolicyError([(f"policy {name}", 1, f"a stage failed to build: {type(exc).__name__}: {exc}")]) from exc
    return runtimes
