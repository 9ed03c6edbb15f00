"""The pipeline room: the `Guardrail` façade, the stage runner, the stages as plain functions,
intake, the audit trail, and the streaming, asyncio and micro-batching wrappers."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so `guardrail.pipeline.streaming` and friends import without building the façade first.
    if name in ("Guardrail", "PolicyRuntime"):
        from guardrail.pipeline import guard

        return getattr(guard, name)
    raise AttributeError(f"module 'guardrail.pipeline' has no attribute {name!r}")
