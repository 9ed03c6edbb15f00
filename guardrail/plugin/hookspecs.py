"""The stage contracts: pluggy hook specifications of the project `guardrail`.

A plugin is a module (or object) with functions marked `@guardrail.hookimpl`. It is found through
the entry-point group `guardrail`, exactly like the built-in stages in `plugins/`.

Stages are *named implementations*: a policy says `reformulator: {use: visual_context}` and the
plugin that registered `visual_context` builds it. The `guardrail_register_*` hooks are how a
plugin adds names; each gets a `register(name, factory, default=False)` callable. A factory is
called with the stage's `with:` parameters from the policy (as keyword arguments) and returns an
object following the stage's Protocol in `guardrail.plugin.protocols`. `default=True` makes the
stage the one a policy gets when it names none of that kind (the built-ins declare the paper's
reformulator and steering, and the rules judge); when two installed plugins both declare one, a
policy relying on the default is refused, naming both.

`guardrail_audit(record)` is different: it is a broadcast. Every implementation is called for every
request, so an installed plugin can ship records wherever it likes.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "guardrail"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]  # register(name, factory, default=False)


@hookspec
def guardrail_register_reformulators(register: Register) -> None:
    """Register reformulators: objects with `reformulate(contexts, env) -> list[Reformulation]`,
    which write the visual context and build the risk and answer prompts."""


@hookspec
def guardrail_register_captioners(register: Register) -> None:
    """Register captioners, used by reformulators to describe one image: objects with
    `caption(images, env) -> list[str]`."""


@hookspec
def guardrail_register_risk_assessors(register: Register) -> None:
    """Register risk assessors: objects with `needs(env) -> RiskNeeds` and
    `score(risk_pass, contexts, env) -> list[Score]`, mapping a batch to calibrated scores in [0, 1]."""


@hookspec
def guardrail_register_steering_controllers(register: Register) -> None:
    """Register steering controllers: objects with `interventions` (the intervention kinds their
    plans may hold, from guardrail.engine.interventions) and `plan(strength, tokens) ->
    SteeringPlan`, which says how generation is steered for a given strength."""


@hookspec
def guardrail_register_calibrators(register: Register) -> None:
    """Register calibrators: objects with `name`, `version`, `requires` (names of blocks to fit
    first), `needs(ctx) -> RiskNeeds` (what the shared calibration risk pass must compute) and
    `fit(data, ctx) -> Block` (guardrail.calibration: GatheredStates, CalibrationContext). A
    stage that needs fitted parameters registers one under the block name it reads back."""


@hookspec
def guardrail_register_audit_sinks(register: Register) -> None:
    """Register audit sinks that a deployment can select (e.g. `jsonl`): objects with
    `write(record: dict) -> None` and `close() -> None`. A write failure must raise."""


@hookspec
def guardrail_register_judges(register: Register) -> None:
    """Register refusal judges for evaluation: objects with `is_refusal(answer) -> bool`."""


@hookspec
def guardrail_register_baselines(register: Register) -> None:
    """Register the baselines `guardrail eval` compares RAS with: objects with `variants` (method
    names run when --methods is not given, e.g. "fixed:0.5"), `sweep` (whether its variants trace a
    strength curve in the trade-off plot), `check(args)` (raise ValueError on bad `NAME:ARGS`) and
    `document(base, args, tokens) -> dict` (the policy of method `NAME[:ARGS]`, made from the
    policy under test's document `base`; `tokens` = its deepest steered band's token count)."""


@hookspec
def guardrail_audit(record: dict[str, Any]) -> None:
    """Called on every implementation for every request (and for policy reloads) with the audit
    record as a JSON-ready dict. Raising here fails the request according to its policy."""
