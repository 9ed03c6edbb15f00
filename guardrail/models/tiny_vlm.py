"""Tiny random vision-language models (filled in per family)."""

from __future__ import annotations

from typing import Any, Callable

BUILDERS: dict[str, Callable[[int], tuple[Any, Any, Any]]] = {}
