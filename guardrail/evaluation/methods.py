"""The methods `guardrail eval` compares, each expressed as a policy served by one guard.

    no_defense       plain generation (`Request.unguarded`): no risk, no steering
    safety_prompt    the answer is generated from the safety prompt + visual context + question
                     (the usual always-on prompt defence; reformulator `safety_prompt`)
    fixed:S[:T]      prototype steering at strength S on every request, T tokens (default: the
                     deepest steered band of the policy under test), no risk read (assessor `constant`)
    ras              the policy under test, as configured
    ras:NAME         the policy under test with only the risk assessor NAME (same bands)
    policy:FILE      another policy file, as configured (e.g. policy:policies/paper.yaml)

Every method becomes one policy file in a scratch policies directory, routed by a tenant of the
method's name, so all methods share one guard: one model, one caption cache, one plugin manager.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from guardrail.errors import InputError
from guardrail.policy import Policy, load_policy

DEFAULT_FIXED = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Method:
    name: str  # as given on the command line, the key in report.json
    kind: str  # no_defense | safety_prompt | fixed | ras | policy
    strength: float = 0.0
    tokens: int | None = None
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


def parse_methods(text: str) -> list[Method]:
    out: list[Method] = []
    for raw in [t.strip() for t in text.split(",") if t.strip()]:
        head, _, rest = raw.partition(":")
        if raw in ("no_defense", "safety_prompt", "ras"):
            out.append(Method(raw, raw))
        elif head == "fixed" and rest:
            parts = rest.split(":")
            try:
                strength = float(parts[0])
                tokens = int(parts[1]) if len(parts) > 1 else None
            except ValueError:
                raise InputError(f"method {raw!r}: expected fixed:STRENGTH or fixed:STRENGTH:TOKENS") from None
            if not 0.0 <= strength <= 1.0 or len(parts) > 2 or (tokens is not None and tokens < 1):
                raise InputError(f"method {raw!r}: strength must be in [0, 1] and tokens at least 1")
            out.append(Method(raw, "fixed", strength=strength, tokens=tokens))
        elif head == "ras" and rest:
            out.append(Method(raw, "ras", assessor=rest))
        elif head == "policy" and rest:
            path = Path(rest)
            if not path.is_file():
                raise InputError(f"method {raw!r}: policy file {path} not found")
            out.append(Method(f"policy:{path.stem}", "policy", policy_file=path))
        else:
            raise InputError(
                f"unknown method {raw!r}: use no_defense, safety_prompt, fixed:S[:T], ras, ras:ASSESSOR or policy:FILE"
            )
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise InputError(f"methods repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    if not out:
        raise InputError("no methods given")
    return out


def default_methods(policy: Policy, calibrated: Sequence[str], known: set[str]) -> str:
    """no_defense, safety_prompt, the fixed strengths, ras, and ras:NAME for every calibrated
    assessor the installed plugins provide."""
    names = ["no_defense", "safety_prompt", *(f"fixed:{s}" for s in DEFAULT_FIXED), "ras"]
    names += [f"ras:{a}" for a in calibrated if a in known]
    return ",".join(names)


def _band_tokens(policy: Policy) -> int:
    steered = [b.tokens for b in policy.bands if b.action == "steer" and b.strength != 0.0]
    return max(steered, default=3)


def policy_document(method: Method, base: Policy) -> dict[str, Any]:
    """The policy (as a YAML-ready mapping) that implements one method."""
    if method.kind == "policy":
        doc = load_policy(method.policy_file).canonical()
    else:
        doc = copy.deepcopy(base.canonical())
    doc["name"] = method.policy_name
    doc["mode"] = "enforce"
    if method.kind in ("safety_prompt", "fixed"):
        doc["risk"] = {"combine": "max", "assessors": [{"use": "constant", "with": {"risk": 0.0}}]}
        if method.kind == "safety_prompt":
            doc["reformulator"] = {"use": "safety_prompt", "with": doc["reformulator"].get("with", {})}
            doc["bands"] = [{"name": "all", "upto": 1.0, "action": "steer", "strength": 0.0}]
        else:
            tokens = method.tokens or _band_tokens(base)
            doc["bands"] = [{"name": "fixed", "upto": 1.0, "action": "steer", "strength": method.strength, "tokens": tokens}]
    elif method.kind == "ras" and method.assessor:
        doc["risk"] = {"combine": "max", "assessors": [{"use": method.assessor}]}
    return doc


def write_policies(methods: Sequence[Method], base_file: Path, folder: Path) -> Path:
    """One policy file per method plus a tenants map routing tenant `<method>` to it."""
    base = load_policy(base_file)
    folder.mkdir(parents=True, exist_ok=True)
    tenants: dict[str, str] = {}
    for method in methods:
        doc = policy_document(method, base)
        (folder / f"{method.policy_name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        tenants[method.name] = method.policy_name
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"default_policy": None, "tenants": tenants}), encoding="utf-8")
    return folder
