"""Test-only fault injection for guardrail (never shipped in plugins/).

`FaultPlugin` is a pluggy plugin object registered through `PluginManager(plugins=[...])`. It adds
stages named `fault_*` whose behaviour a policy chooses with `with: {fault: none|raise|hang}`:

    reformulator: {use: fault_reformulator, with: {fault: raise}}
    risk:         {assessors: [{use: fault_assessor, with: {risk: 0.8, fault: hang}}]}
    steering:     {use: fault_controller, with: {fault: raise}}

plus a captioner (`fault_captioner`) and a `guardrail_audit` hook whose fault the test sets on the
plugin object. `SpyBackend` wraps a real backend, records the steering plans it was asked to
generate with and can fail or hang in `generate`. Hung stages wait on `plugin.release`, which the
tests set when they finish, so no thread outlives its test for long.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from guardrail import hookimpl
from guardrail.method.artifacts import load_artifacts, save_artifacts
from guardrail.plugin.protocols import RiskNeeds, Score
from conftest import mechanics_blocks
from guardrail.engine.interventions import LogitInterpolation
from guardrail.errors import ArtifactError
from guardrail.types import ChatRow, Reformulation, SteeringPlan

FAULTS = ("none", "raise", "hang")
HANG_LIMIT_S = 30.0
REFORMULATED = "(reformulated by fault_reformulator)"  # a hung stage gives up on its own after this, even if a test forgot to release it


class InjectedFault(RuntimeError):
    """What every fault_* stage raises, so a test can tell an injected fault from a real bug."""


def _inject(fault: str, where: str, release: threading.Event, fail_when_released: bool = False) -> None:
    """Raise, or hang until released; a released stage carries on (a late result) unless
    `fail_when_released`."""
    if fault == "raise":
        raise InjectedFault(f"injected fault in {where}")
    if fault == "hang":
        release.wait(HANG_LIMIT_S)
        if fail_when_released:
            raise InjectedFault(f"hung stage {where} released")


def _check_fault(fault: str) -> str:
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    return fault


class FaultReformulator:
    """The question as both prompts (no safety prompt): enough to drive the other stages."""

    def __init__(self, plugin: "FaultPlugin", fault: str = "none"):
        self.plugin, self.fault = plugin, _check_fault(fault)

    def reformulate(self, contexts: Sequence[Any], env: Any) -> list[Reformulation]:
        _inject(self.fault, "reformulate", self.plugin.release)
        out = []
        for ctx in contexts:
            row = ChatRow(ctx.request.text)
            out.append(Reformulation(visual_context=REFORMULATED, risk_prompt=row, answer_prompt=row))
        return out


class FaultCaptioner:
    """Counts its calls; the caption names the image size."""

    def __init__(self, plugin: "FaultPlugin", fault: str = "none"):
        self.plugin, self.fault = plugin, _check_fault(fault)

    def caption(self, images: Sequence[Any], env: Any) -> list[str]:
        self.plugin.count("caption", len(images))
        _inject(self.fault, "caption", self.plugin.release)
        return [f"The image shows a {img.width}x{img.height} picture." for img in images]


class FaultAssessor:
    """A fixed calibrated risk, read after a real one-step risk pass of the engine."""

    def __init__(self, plugin: "FaultPlugin", risk: float = 0.8, fault: str = "none", steps: int = 1):
        self.plugin, self.risk, self.fault, self.steps = plugin, float(risk), _check_fault(fault), int(steps)

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(steps=self.steps)

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        self.plugin.count("assess", len(contexts))
        _inject(self.fault, "assess", self.plugin.release)
        return [Score(risk=self.risk, raw=self.risk) for _ in contexts]


class FaultController:
    """Prototype interpolation, like the built-in controller, with a fault on demand."""

    interventions = (LogitInterpolation,)

    def __init__(self, plugin: "FaultPlugin", fault: str = "none"):
        self.plugin, self.fault = plugin, _check_fault(fault)
        self.targets: Any = None

    def check(self, env: Any, policy: Any) -> None:
        if env.artifacts is not None:
            self.targets = env.artifacts.block("prototypes")

    def plan(self, strength: float, tokens: int) -> SteeringPlan:
        _inject(self.fault, "decide", self.plugin.release)
        if strength <= 0.0:
            return SteeringPlan()
        if self.targets is None:
            raise ArtifactError("fault_controller steers toward the artifact's prototypes; none was given")
        step = LogitInterpolation(float(strength), int(tokens), self.targets.tensor("logits"), self.targets.tensor("states"))
        return SteeringPlan((step,), float(strength), int(tokens), "fault_controller")


@dataclass
class FaultPlugin:
    """One per test: holds the fault switches and what the stages saw."""

    audit_fault: str = "none"
    release: threading.Event = field(default_factory=threading.Event)
    audited: list[dict[str, Any]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.calls[what] = self.calls.get(what, 0) + n

    @hookimpl
    def guardrail_register_reformulators(self, register):
        register("fault_reformulator", lambda **p: FaultReformulator(self, **p))

    @hookimpl
    def guardrail_register_captioners(self, register):
        register("fault_captioner", lambda **p: FaultCaptioner(self, **p))

    @hookimpl
    def guardrail_register_risk_assessors(self, register):
        register("fault_assessor", lambda **p: FaultAssessor(self, **p))

    @hookimpl
    def guardrail_register_steering_controllers(self, register):
        register("fault_controller", lambda **p: FaultController(self, **p))

    @hookimpl
    def guardrail_audit(self, record):
        _inject(self.audit_fault, "audit hook", self.release)
        with self._lock:
            self.audited.append(record)


class RecordingSink:
    """An audit sink that keeps records in memory; can fail like a full disk."""

    def __init__(self, fail: bool = False):
        self.records: list[dict[str, Any]] = []
        self.fail = fail

    def write(self, record: dict[str, Any]) -> None:
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.records.append(dict(record))

    def close(self) -> None:
        pass


class SpyBackend:
    """Wraps a real backend: records every generate call's plans; `fault` breaks generate."""

    def __init__(self, inner: Any, release: threading.Event | None = None):
        self.inner = inner
        self.fault = "none"  # every generate call
        self.fault_steered = "none"  # only calls that steer some row
        self.fail_after_tokens: int | None = None  # a steered call streams this many tokens, then fails
        self.release = release or threading.Event()
        self.generated: list[list[SteeringPlan]] = []
        self.risk_rows = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def risk_pass(self, rows, steps, layers, **extra):
        self.risk_rows += len(rows)
        return self.inner.risk_pass(rows, steps, layers, **extra)

    def generate(self, rows, plans, max_new_tokens, on_tokens=None):
        self.generated.append(list(plans))
        # A released generation must not go on to run the model: its request gave up on it long
        # ago, and later tests share the model (a steering hook from it would leak into theirs).
        _inject(self.fault, "generate", self.release, fail_when_released=True)
        steered = any(plan.active for plan in plans)
        if steered:
            _inject(self.fault_steered, "generate", self.release, fail_when_released=True)
        if steered and self.fail_after_tokens is not None and on_tokens is not None:
            on_tokens = self._failing_after(on_tokens, self.fail_after_tokens)
        return self.inner.generate(rows, plans, max_new_tokens, on_tokens=on_tokens)

    @staticmethod
    def _failing_after(on_tokens: Any, n: int) -> Any:
        sent = [0]

        def callback(row: int, token: int) -> None:
            if sent[0] == n:
                raise InjectedFault(f"injected fault in generate after {n} streamed tokens")
            sent[0] += 1
            on_tokens(row, token)

        return callback


def random_artifacts(adapter: Any, directory: Path, steps: int = 8, seed: int = 0) -> Any:
    """A structurally valid artifact for `adapter` (random prototypes), written and loaded back
    through the real code, so steering has something to interpolate towards. No calibration."""
    fp = adapter.fingerprint()
    d, vocab, layers = fp["hidden_size"], fp["vocab_size"], fp["num_layers"]
    import torch  # here, so the fake-pipeline tests that import this module need no torch

    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(steps, d, generator=gen)
    blocks = mechanics_blocks(prototypes=prototypes, logits=torch.randn(steps, vocab, generator=gen) * 5.0,
                              directions=torch.randn(layers, d, generator=gen), midpoints=torch.randn(layers, d, generator=gen))
    meta = {"model": adapter.name, "fingerprint": fp, "method": "random (test)", "steps": 3}
    save_artifacts(directory, blocks, meta)
    return load_artifacts(directory, fp)


def policy_yaml(
    name: str = "faulty",
    *,
    on_error: str = "fail_closed",
    reformulator: str = "none",
    assessor: str = "none",
    controller: str = "none",
    risk: float = 0.8,
    timeout_s: float | None = None,
    extra: str = "",
) -> str:
    """A policy that uses the fault_* stages; one band steering at strength = risk."""
    limits = f"limits: {{stage_timeout_s: {timeout_s}, max_new_tokens: 8}}\n" if timeout_s else "limits: {max_new_tokens: 8}\n"
    return (
        f"name: {name}\n"
        f"on_error: {on_error}\n"
        f"refusal_text: \"REFUSED by {name}\"\n"
        f"reformulator: {{use: fault_reformulator, with: {{fault: {reformulator}}}}}\n"
        f"risk:\n  assessors:\n    - use: fault_assessor\n      with: {{risk: {risk}, fault: {assessor}}}\n"
        f"steering: {{use: fault_controller, with: {{fault: {controller}}}}}\n"
        "bands:\n  - name: all\n    upto: 1.0\n    strength: risk\n    tokens: 3\n"
        f"{limits}{extra}"
    )
