"""What a plugin may import: the whole extension surface in one module.

    from guardrail.plugin.sdk import hookimpl, RiskNeeds, Score, Block, LogitInterpolation, ...

Everything else in guardrail is internal and may change between releases. Each name is imported
from its module when first read, and the modules behind it load torch only when a tensor is made,
so plugins register (and a pipeline on a fake backend runs) without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from guardrail.errors import ArtifactError

if TYPE_CHECKING:
    from guardrail.plugin.protocols import StageEnv
    from guardrail.method.artifacts import BlockView

# name -> the module that defines it; imported when a plugin first reads the name (PEP 562).
_WHERE = {
    **dict.fromkeys(("CalibrationConfig", "CalibrationContext", "CalibrationError", "CalibrationRow", "GatheredStates", "chunked"), "guardrail.calibration"),
    **dict.fromkeys(("RiskPass",), "guardrail.engine.backend"),
    **dict.fromkeys(("SimilarityReadout",), "guardrail.engine.readouts"),
    **dict.fromkeys(("NO_STEERING", "AdditiveDirection", "ForcedPrefix", "LogitInterpolation", "SteeringPlan", "add_direction", "force_token", "interpolate"), "guardrail.engine.interventions"),
    **dict.fromkeys(("JsonlSink", "JsonlWriter", "structlog_writer"), "guardrail.audit"),
    **dict.fromkeys(("ArtifactError", "GuardrailError", "InputError", "ModelError", "PluginError", "PolicyError"), "guardrail.errors"),
    **dict.fromkeys(("Artifacts", "Block", "BlockView"), "guardrail.method.artifacts"),
    **dict.fromkeys(("LogisticProbe", "MeanDifference", "choose_layer", "cross_validated_auroc", "fit_logistic", "fit_mean_difference", "logistic_scorer", "mean_difference_scorer"), "guardrail.method.probes"),
    **dict.fromkeys(("fit_mahalanobis", "score_mahalanobis"), "guardrail.method.contrastive"),
    **dict.fromkeys(("CAPTION_PROMPT", "FIXED_REFUSAL", "risk_query", "risk_row"), "guardrail.method.prompts"),
    **dict.fromkeys(("opens_refusal",), "guardrail.method.refusal"),
    **dict.fromkeys(("LN99", "alpha_for", "auroc", "calibrated_risk", "prototype_similarity"), "guardrail.method.risk_math"),
    **dict.fromkeys(("hookimpl",), "guardrail.plugin.hookspecs"),
    **dict.fromkeys(("RiskNeeds", "Score", "StageEnv"), "guardrail.plugin.protocols"),
    **dict.fromkeys(("ChatRow", "Reformulation", "RequestView"), "guardrail.types"),
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"guardrail.plugin.sdk has no {name!r} (what plugins may import: see __all__)")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def require_block(env: "StageEnv", name: str, who: str) -> "BlockView":
    """The artifact block `name`, or an ArtifactError saying `who` needs it and how to get it."""
    art = env.artifacts
    if art is None:
        raise ArtifactError(f"{who} needs calibration artifacts (guardrail calibrate, then --artifacts)")
    return art.block(name)


__all__ = [
    "AdditiveDirection", "ArtifactError", "Artifacts", "Block", "BlockView", "CalibrationConfig",
    "CalibrationContext", "CalibrationError", "CalibrationRow", "ChatRow", "FIXED_REFUSAL", "ForcedPrefix",
    "GatheredStates", "GuardrailError", "InputError", "LN99", "LogitInterpolation", "ModelError",
    "NO_STEERING", "PluginError", "Reformulation", "RequestView", "RiskNeeds", "RiskPass", "Score", "SimilarityReadout",
    "StageEnv", "SteeringPlan", "add_direction", "alpha_for", "auroc", "calibrated_risk", "chunked",
    "force_token", "hookimpl", "interpolate", "opens_refusal", "prototype_similarity", "require_block",
    "risk_query", "risk_row", "LogisticProbe", "MeanDifference", "choose_layer", "cross_validated_auroc", "fit_logistic",
    "fit_mean_difference", "fit_mahalanobis", "score_mahalanobis", "logistic_scorer", "mean_difference_scorer", "CAPTION_PROMPT", "JsonlSink", "JsonlWriter",
    "PolicyError", "structlog_writer",
]
