"""Stages for `guardrail eval`: the `rules` refusal judge, and what the baselines are built from.

* judge `rules`: guardrail.evaluation.judge.RuleJudge (reads the whole answer). A model-based judge
  is another plugin registering a name here; `guardrail eval --judge NAME` picks it.
* reformulator `safety_prompt`: the always-on prompt defence. The answer itself is generated from
  the safety prompt + visual context + question (what RAS uses only to read risk).
* risk assessor `constant`: a fixed risk that needs no model pass, for baselines whose strength does
  not depend on risk (`fixed:S`, `safety_prompt`), so they pay nothing for a risk they ignore.
"""

from __future__ import annotations

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
    register("rules", rule_judge)


@hookimpl
def guardrail_register_reformulators(register):
    register("safety_prompt", SafetyPromptReformulator)


@hookimpl
def guardrail_register_risk_assessors(register):
    register("constant", ConstantRisk)
