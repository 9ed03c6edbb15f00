"""A policy's stages, built by the plugins and checked against the engine before any request.

`prepare` builds every policy of a set, checks each stage against its Protocol, checks that the
engine can apply every intervention the policy's controller may plan, and calls each stage's
`check(env, policy)` (where it binds its calibration block). Any failure rejects the whole set
with a PolicyError naming the policy and the problem; the registry then keeps the previous set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardrail.errors import GuardrailError, PolicyError
from guardrail.plugin.protocols import RiskAssessor, StageEnv, protocol_problems
from guardrail.policy import AssessorSpec, Policy


@dataclass(frozen=True)
class PolicyRuntime:
    """A policy with its stage objects built; made once per policy load, shared by requests."""

    policy: Policy
    reformulator: Any
    assessors: tuple[tuple[AssessorSpec, RiskAssessor], ...]
    controller: Any


def _conforming(kind: str, name: str, stage: Any) -> Any:
    missing = protocol_problems(kind, stage)
    if missing:
        what = kind[:-1].replace("_", " ")
        raise PolicyError([("plugins", 1, f"{what} {name!r} ({type(stage).__name__}) lacks {', '.join(missing)}")])
    return stage


def build(policy: Policy, env: StageEnv) -> PolicyRuntime:
    plugins = env.plugins
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
    return runtime


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
