"""Stages for `guardrail eval`: the `rules` refusal judge, and what the baselines are built from.

* judge `rules`: guardrail.evaluation.judge.RuleJudge (reads the whole answer). A model-based judge
  is another plugin registering a name here; `guardrail eval --judge NAME` picks it.
* reformulator `safety_prompt`: the always-on prompt defence. The answer itself is generated from
  the safety prompt + visual context + question (what RAS uses only to read risk).
* risk assessor `constant`: a fixed risk that needs no model pass, for baselines whose strength does
  not depend on risk (`fixed:S`, `safety_prompt`), so they pay nothing for a risk they ignore.
* baselines `safety_prompt` (the prompt defence alone: no steering) and `fixed:S[:T]` (the policy's
  steering at strength S on every request for T tokens, default the policy's deepest steered band),
  the methods `guardrail eval` compares RAS with, each a policy made from the policy under test.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from guardrail.plugin.sdk import ChatRow, Reformulation, RiskNeeds, Score, hookimpl


class SafetyPromptReformulator:
    """The answer prompt is the reformulated query: safety prompt + visual context + question."""

    def __init__(self, **params: Any):
        from guardrail_plugins.reformulation.visual_context import VisualContextReformulator

        self.inner = VisualContextReformulator(**params)

    def check(self, env: Any, policy: Any) -> None:
        self.inner.check(env, policy)

    def reformulate(self, contexts: Sequence[Any], env: Any) -> list[Reformulation]:
        out = []
        for ref in self.inner.reformulate(contexts, env):
            guarded = ChatRow(ref.risk_prompt.text, ref.answer_prompt.images, ref.answer_prompt.system)
            out.append(Reformulation(ref.visual_context, ref.risk_prompt, guarded, ref.cache_hits, ref.cache_misses))
        return out


class ConstantRisk:
    def __init__(self, risk: float = 0.0):
        if not 0.0 <= float(risk) <= 1.0:
            raise ValueError(f"risk must be in [0, 1], got {risk}")
        self.risk = float(risk)

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds()

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        return [Score(risk=self.risk, raw=self.risk) for _ in contexts]


def rule_judge(**params: Any) -> Any:
    from guardrail.evaluation.judge import RuleJudge

    return RuleJudge(**params)


@hookimpl
def guardrail_register_judges(register):
    register("rules", rule_judge, default=True)


@hookimpl
def guardrail_register_reformulators(register):
    register("safety_prompt", SafetyPromptReformulator)


@hookimpl
def guardrail_register_risk_assessors(register):
    register("constant", ConstantRisk)


NO_RISK = {"combine": "max", "assessors": [{"use": "constant", "with": {"risk": 0.0}}]}


class SafetyPromptBaseline:
    """The answer is generated from the safety prompt + visual context + question; never steered."""

    variants = ("safety_prompt",)
    sweep = False

    def check(self, args: Sequence[str]) -> None:
        if args:
            raise ValueError("safety_prompt takes no arguments")

    def document(self, base: dict[str, Any], args: Sequence[str], tokens: int) -> dict[str, Any]:
        doc = copy.deepcopy(base)
        doc["risk"] = copy.deepcopy(NO_RISK)
        doc["reformulator"] = {"use": "safety_prompt", "with": (doc.get("reformulator") or {}).get("with", {})}
        doc["bands"] = [{"name": "all", "upto": 1.0, "action": "steer", "strength": 0.0}]
        return doc


class FixedStrengthBaseline:
    """`fixed:S[:T]`: the policy's own steering at strength S on every request, no risk read."""

    variants = ("fixed:0.25", "fixed:0.5", "fixed:0.75", "fixed:1.0")
    sweep = True

    def check(self, args: Sequence[str]) -> None:
        self._parse(args)

    @staticmethod
    def _parse(args: Sequence[str]) -> tuple[float, int | None]:
        if not 1 <= len(args) <= 2:
            raise ValueError("expected fixed:STRENGTH or fixed:STRENGTH:TOKENS")
        try:
            strength, tokens = float(args[0]), (int(args[1]) if len(args) > 1 else None)
        except ValueError:
            raise ValueError("expected fixed:STRENGTH or fixed:STRENGTH:TOKENS") from None
        if not 0.0 <= strength <= 1.0 or (tokens is not None and tokens < 1):
            raise ValueError("strength must be in [0, 1] and tokens at least 1")
        return strength, tokens

    def document(self, base: dict[str, Any], args: Sequence[str], tokens: int) -> dict[str, Any]:
        strength, own_tokens = self._parse(args)
        doc = copy.deepcopy(base)
        doc["risk"] = copy.deepcopy(NO_RISK)
        doc["bands"] = [{"name": "fixed", "upto": 1.0, "action": "steer", "strength": strength,
                         "tokens": own_tokens or tokens}]
        return doc


@hookimpl
def guardrail_register_baselines(register):
    register("safety_prompt", SafetyPromptBaseline)
    register("fixed", FixedStrengthBaseline)
