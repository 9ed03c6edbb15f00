"""The methods `guardrail eval` compares, each expressed as a policy served by one guard.

    no_defense       plain generation (`Request.unguarded`): no risk, no steering
    NAME[:ARGS]      a baseline a plugin registers (hook `guardrail_register_baselines`); the
                     built-ins are `safety_prompt` (the always-on prompt defence) and `fixed:S[:T]`
                     (the policy's steering at strength S on every request, T tokens, no risk read)
    ras              the policy under test, as configured
    ras:NAME         the policy under test with only the risk assessor NAME (same bands)
    policy:FILE      another policy file, as configured (e.g. policy:policies/paper.yaml)

Every method becomes one policy file in a scratch policies directory, routed by a tenant of the
method's name, so all methods share one guard: one model, one caption cache, one plugin manager.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from guardrail.errors import InputError
from guardrail.policy import Policy, load_policy


@dataclass(frozen=True)
class Method:
    name: str  # as given on the command line, the key in report.json
    kind: str  # no_defense | baseline | ras | policy
    baseline: str | None = None
    args: tuple[str, ...] = ()
    sweep: bool = False  # a baseline whose variants trace a strength curve
    assessor: str | None = None
    policy_file: Path | None = None

    @property
    def unguarded(self) -> bool:
        return self.kind == "no_defense"

    @property
    def reads_risk(self) -> bool:
        """Whether the method's risk is a real assessment (so its AUROC means something)."""
        return self.kind in ("ras", "policy")

    @property
    def policy_name(self) -> str:
        return "m_" + re.sub(r"[^a-zA-Z0-9]+", "_", self.name).strip("_")


def parse_methods(text: str, baselines: Mapping[str, Any]) -> list[Method]:
    """`baselines`: name -> baseline object (a plugin manager's `baselines` stages, built)."""
    out: list[Method] = []
    for raw in [t.strip() for t in text.split(",") if t.strip()]:
        head, _, rest = raw.partition(":")
        if raw in ("no_defense", "ras"):
            out.append(Method(raw, raw))
        elif head == "ras" and rest:
            out.append(Method(raw, "ras", assessor=rest))
        elif head == "policy" and rest:
            path = Path(rest)
            if not path.is_file():
                raise InputError(f"method {raw!r}: policy file {path} not found")
            out.append(Method(f"policy:{path.stem}", "policy", policy_file=path))
        elif head in baselines:
            args = tuple(rest.split(":")) if rest else ()
            try:
                baselines[head].check(args)
            except ValueError as exc:
                raise InputError(f"method {raw!r}: {exc}") from None
            out.append(Method(raw, "baseline", baseline=head, args=args, sweep=bool(baselines[head].sweep)))
        else:
            names = ", ".join(sorted(baselines)) or "none installed"
            raise InputError(f"unknown method {raw!r}: use no_defense, ras, ras:ASSESSOR, policy:FILE or a "
                             f"baseline ({names})")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise InputError(f"methods repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    if not out:
        raise InputError("no methods given")
    return out


def default_methods(policy: Policy, calibrated: Sequence[str], known: set[str], baselines: Mapping[str, Any]) -> str:
    """no_defense, every baseline's variants, ras, and ras:NAME for every calibrated assessor the
    installed plugins provide."""
    names = ["no_defense", *(v for b in baselines.values() for v in b.variants), "ras"]
    names += [f"ras:{a}" for a in calibrated if a in known]
    return ",".join(names)


def servable_assessors(engine: Any, plugins: Any, names: Sequence[str]) -> list[str]:
    """The calibrated assessors among `names` whose risk-pass needs the engine can give (a backend
    declares `risk_inputs`; undeclared = everything), checked as a policy load checks them."""
    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.pipeline.runtime import lacking_inputs
    from guardrail.plugin.protocols import StageEnv

    inputs = getattr(engine, "risk_inputs", None)
    if inputs is None:
        return list(names)
    env = StageEnv(engine=engine, captions=CaptionCache(1), plugins=plugins)
    out = []
    for name in names:
        assessor = plugins.create("risk_assessors", name)
        check = getattr(assessor, "check", None)
        if check is not None:
            check(env, None)
        if not lacking_inputs(assessor.needs(env), inputs):
            out.append(name)
    return out


def _band_tokens(policy: Policy) -> int:
    steered = [b.tokens for b in policy.bands if b.action == "steer" and b.strength != 0.0]
    return max(steered, default=3)


def policy_document(method: Method, base: Policy, baselines: Mapping[str, Any]) -> dict[str, Any]:
    """The policy (as a YAML-ready mapping) that implements one method."""
    if method.kind == "policy":
        doc = load_policy(method.policy_file).canonical()
    elif method.kind == "baseline":
        doc = baselines[method.baseline].document(base.canonical(), method.args, _band_tokens(base))
    else:
        doc = base.canonical()
    doc["name"] = method.policy_name
    doc["mode"] = "enforce"
    if method.kind == "ras" and method.assessor:
        doc["risk"] = {"combine": "max", "assessors": [{"use": method.assessor}]}
    return doc


def write_policies(methods: Sequence[Method], base_file: Path, folder: Path, baselines: Mapping[str, Any]) -> Path:
    """One policy file per method plus a tenants map routing tenant `<method>` to it."""
    base = load_policy(base_file)
    folder.mkdir(parents=True, exist_ok=True)
    tenants: dict[str, str] = {}
    for method in methods:
        doc = policy_document(method, base, baselines)
        (folder / f"{method.policy_name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        tenants[method.name] = method.policy_name
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"default_policy": None, "tenants": tenants}), encoding="utf-8")
    return folder


def load_baselines(plugins: Any) -> dict[str, Any]:
    """Every installed baseline, built (they take no parameters), in registration order."""
    return {name: plugins.create("baselines", name) for name in plugins.stages().get("baselines", {})}
