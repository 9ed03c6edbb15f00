"""Every error guardrail raises on purpose derives from GuardrailError, so callers can catch one type."""

from __future__ import annotations


class GuardrailError(Exception):
    """Base class of guardrail's own errors."""


class PolicyError(GuardrailError):
    """A policy or tenants file is invalid. `problems` holds (file, line, message) triples."""

    def __init__(self, problems: list[tuple[str, int, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{f}:{line}: {msg}" for f, line, msg in self.problems))


class PluginError(GuardrailError):
    """A plugin failed to load, or a policy names a stage that no plugin provides."""


class InputError(GuardrailError):
    """A request is malformed: empty prompt, corrupt image, too many pixels, prompt too long..."""


class ArtifactError(GuardrailError):
    """A calibration artifact is missing, tampered with, or belongs to another model."""


class ModelError(GuardrailError):
    """A model could not be found, loaded, or does not support what a policy asks of it."""


class StageError(GuardrailError):
    """A stage raised or timed out while serving a request."""

    def __init__(self, stage: str, error: BaseException | str):
        self.stage = stage
        self.error = error
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"stage {stage!r} failed: {detail}")


class OverloadedError(GuardrailError):
    """The request queue is full; retry later."""
