"""guardrail: risk-adaptive activation steering (RAS) middleware for multimodal LLMs.

    from guardrail import Guardrail, Request
    guard = Guardrail.from_model("smollm2", policies="policies/", artifacts="artifacts/smollm2")
    result = guard.generate(Request("How do I bake bread?", tenant="acme"))

Plugin packages need only `from guardrail import hookimpl`, which imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from guardrail.plugin.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "Guardrail": "guardrail.pipeline",
    "Request": "guardrail.types",
    "Result": "guardrail.types",
    "ChatRow": "guardrail.types",
    "SteeringPlan": "guardrail.types",
    "Reformulation": "guardrail.types",
    "RiskAssessment": "guardrail.types",
    "RiskNeeds": "guardrail.plugin.protocols",
    "Score": "guardrail.plugin.protocols",
    "StageEnv": "guardrail.plugin.protocols",
    "Policy": "guardrail.policy",
    "load_policy": "guardrail.policy",
    "load_policy_set": "guardrail.tenants",
    "TenantRegistry": "guardrail.tenants",
    "PluginManager": "guardrail.plugin.manager",
    "load_model": "guardrail.models",
    "load_artifacts": "guardrail.method.artifacts",
    "TransformersBackend": "guardrail.engine.transformers",
    "configure_logging": "guardrail.audit",
    "GuardrailError": "guardrail.errors",
    "InputError": "guardrail.errors",
    "PolicyError": "guardrail.errors",
    "PluginError": "guardrail.errors",
    "ArtifactError": "guardrail.errors",
    "ModelError": "guardrail.errors",
    "OverloadedError": "guardrail.errors",
}

__all__ = ["hookimpl", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'guardrail' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
