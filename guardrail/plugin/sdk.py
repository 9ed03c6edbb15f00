"""What a plugin may import: the whole extension surface in one module.

    from guardrail.plugin.sdk import hookimpl, RiskNeeds, Score, Block, LogitInterpolation, ...

Everything else in guardrail is internal and may change between releases. Importing this module
imports torch (interventions and blocks carry tensors); `from guardrail import hookimpl` alone
imports nothing heavy, for plugins that only audit.
"""

from __future__ import annotations

from guardrail.calibration import (
    CalibrationConfig,
    CalibrationContext,
    CalibrationError,
    CalibrationRow,
    GatheredStates,
    chunked,
)
from guardrail.engine.backend import RiskPass
from guardrail.engine.interventions import (
    NO_STEERING,
    AdditiveDirection,
    ForcedPrefix,
    LogitInterpolation,
    SteeringPlan,
    add_direction,
    force_token,
    interpolate,
)
from guardrail.audit import JsonlSink, JsonlWriter, structlog_writer
from guardrail.errors import ArtifactError, GuardrailError, InputError, ModelError, PluginError, PolicyError
from guardrail.method.artifacts import Artifacts, Block, BlockView
from guardrail.method.probes import (
    LogisticProbe,
    MeanDifference,
    choose_layer,
    cross_validated_auroc,
    fit_logistic,
    fit_mean_difference,
    logistic_scorer,
    mean_difference_scorer,
)
from guardrail.method.prompts import CAPTION_PROMPT, FIXED_REFUSAL, risk_query
from guardrail.method.refusal import opens_refusal
from guardrail.method.risk_math import LN99, alpha_for, auroc, calibrated_risk, prototype_similarity
from guardrail.plugin.hookspecs import hookimpl
from guardrail.plugin.protocols import RiskNeeds, Score, StageEnv
from guardrail.types import ChatRow, Reformulation, RequestView


def require_block(env: StageEnv, name: str, who: str) -> BlockView:
    """The artifact block `name`, or an ArtifactError saying `who` needs it and how to get it."""
    art = env.artifacts
    if art is None:
        raise ArtifactError(f"{who} needs calibration artifacts (guardrail calibrate, then --artifacts)")
    return art.block(name)


__all__ = [
    "AdditiveDirection", "ArtifactError", "Artifacts", "Block", "BlockView", "CalibrationConfig",
    "CalibrationContext", "CalibrationError", "CalibrationRow", "ChatRow", "FIXED_REFUSAL", "ForcedPrefix",
    "GatheredStates", "GuardrailError", "InputError", "LN99", "LogitInterpolation", "ModelError",
    "NO_STEERING", "PluginError", "Reformulation", "RequestView", "RiskNeeds", "RiskPass", "Score",
    "StageEnv", "SteeringPlan", "add_direction", "alpha_for", "auroc", "calibrated_risk", "chunked",
    "force_token", "hookimpl", "interpolate", "opens_refusal", "prototype_similarity", "require_block",
    "risk_query", "LogisticProbe", "MeanDifference", "choose_layer", "cross_validated_auroc", "fit_logistic",
    "fit_mean_difference", "logistic_scorer", "mean_difference_scorer", "CAPTION_PROMPT", "JsonlSink", "JsonlWriter",
    "PolicyError", "structlog_writer",
]
