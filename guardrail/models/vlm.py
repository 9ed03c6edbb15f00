"""Adapters for vision-language families (filled in per family)."""

from __future__ import annotations

from typing import Any

from guardrail.errors import ModelError
from guardrail.models.base import ModelAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {}


def load_local(path: Any, config: Any, kwargs: dict[str, Any], name: str) -> ModelAdapter:
    raise ModelError(f"no adapter for model type {config.model_type!r}")
