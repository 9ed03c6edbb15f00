"""Model adapters: one per family, the tiny-random factory, and the embedded default loader."""

from guardrail.models.base import ModelAdapter
from guardrail.models.loading import adapter_for, load_model

__all__ = ["ModelAdapter", "adapter_for", "load_model"]
