"""The four stages as plain functions over a batch of request contexts.

    reformulate -> assess -> decide -> generate

One batch goes through each stage together, whatever the tenants: requests of different policies
share the risk pass and the generation (each row with its own steering plan). Each function groups
the contexts by the stage object that serves them, hands the stage read-only views
(`RequestContext.view()`), and writes results back only through the runner's commit, so a stage
that failed or timed out never changes a request afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from guardrail.engine.backend import RiskPass
from guardrail.engine.interventions import NO_STEERING, SteeringPlan, unsupported
from guardrail.plugin.protocols import RiskAssessor, Score
from guardrail.policy import AssessorSpec
from guardrail.pipeline.runner import Commit, StageRunner
from guardrail.types import RequestContext, RiskAssessment


def combine(scores: dict[str, Score], specs: Sequence[AssessorSpec], rule: str) -> float:
    values = [scores[s.label].risk for s in specs]
    if rule == "max":
        return max(values)
    if rule == "mean":
        return sum(values) / len(values)
    weights = [s.weight for s in specs]
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def _grouped(ctxs: Sequence[RequestContext], key: Callable[[RequestContext], Any]) -> list[list[RequestContext]]:
    groups: dict[Any, list[RequestContext]] = {}
    for ctx in ctxs:
        groups.setdefault(key(ctx), []).append(ctx)
    return list(groups.values())


def reformulate(ctxs: list[RequestContext], env: Any, runner: StageRunner) -> None:
    def run(group: list[RequestContext]) -> Commit:
        out = group[0].runtime.reformulator.reformulate([c.view() for c in group], env)
        if len(out) != len(group):
            raise RuntimeError(f"reformulator returned {len(out)} results for {len(group)} requests")

        def commit() -> None:
            for ctx, ref in zip(group, out):
                ctx.reformulation = ref

        return commit

    for group in _grouped(ctxs, lambda c: id(c.runtime.reformulator)):
        runner.run("reformulate", group, run)


def assess(ctxs: list[RequestContext], env: Any, runner: StageRunner) -> None:
    live = [c for c in ctxs if not c.done and not c.degraded and not c.request.unguarded]

    def run(group: list[RequestContext]) -> Commit:
        needs = [a.needs(env) for c in group for _, a in c.runtime.assessors]
        steps = max((n.steps for n in needs), default=0)
        layers = sorted(set().union(*(n.layers for n in needs))) if needs else []
        pooled = sorted(set().union(*(n.pooled for n in needs))) if needs else []
        readouts = sorted(set().union(*(n.readouts for n in needs)), key=repr) if needs else []
        if steps or layers or pooled or readouts:
            prompts = [c.reformulation.risk_prompt for c in group]
            # `pooled`/`readouts` only when asked for: a backend written before they existed still
            # serves the rest.
            extra: dict[str, Any] = {"pooled": pooled} if pooled else {}
            if readouts:
                extra["readouts"] = readouts
            risk_pass = env.engine.risk_pass(prompts, steps, layers, **extra)
        else:
            risk_pass = RiskPass(step_logits=None)
        per_ctx: list[dict[str, Score]] = [{} for _ in group]
        # Each assessor object scores, in one call, the rows of every policy that uses it.
        by_assessor: dict[int, tuple[RiskAssessor, list[tuple[int, str]]]] = {}
        for i, ctx in enumerate(group):
            for spec, assessor in ctx.runtime.assessors:
                by_assessor.setdefault(id(assessor), (assessor, []))[1].append((i, spec.label))
        for assessor, rows in by_assessor.values():
            index = [i for i, _ in rows]
            scores = assessor.score(risk_pass.select(index), [group[i].view() for i in index], env)
            if len(scores) != len(rows):
                raise RuntimeError(f"assessor {rows[0][1]!r} returned {len(scores)} scores for {len(rows)} rows")
            for (i, label), score in zip(rows, scores):
                if not 0.0 <= score.risk <= 1.0:  # also rejects NaN
                    raise RuntimeError(f"assessor {label!r} returned risk {score.risk} outside [0, 1]")
                per_ctx[i][label] = score
        assessments = [
            RiskAssessment(
                risk=combine(scores, [s for s, _ in ctx.runtime.assessors], ctx.policy.risk.combine),
                scores={k: v.risk for k, v in scores.items()},
                raw={k: v.raw for k, v in scores.items()},
            )
            for ctx, scores in zip(group, per_ctx)
        ]

        def commit() -> None:
            for ctx, assessment in zip(group, assessments):
                ctx.assessment = assessment

        return commit

    runner.run("assess", live, run)


def _plan(controller: Any, strength: float, tokens: int, supported: frozenset[type]) -> SteeringPlan:
    out = controller.plan(strength, tokens)
    if not isinstance(out, SteeringPlan):
        raise TypeError(f"steering controller returned {type(out).__name__}, not a SteeringPlan")
    missing = unsupported(out, supported)
    if missing:  # the policy check should have caught it; a controller may plan beyond its declaration
        raise TypeError(f"steering controller planned {', '.join(missing)}, which the backend cannot apply")
    return out


def _decision(ctx: RequestContext, supported: frozenset[type]) -> tuple[str, SteeringPlan, Any, bool]:
    """(action, plan, band, done) for one request."""
    req, policy = ctx.request, ctx.policy
    if req.unguarded:
        return "unguarded", NO_STEERING, None, ctx.assess_only
    risk = ctx.assessment.risk if ctx.assessment else 0.0
    fmt = ctx.reformulation.format if ctx.reformulation is not None else "text"
    band = policy.band_for(risk, ctx.runtime.bands_for(fmt))
    controller = ctx.runtime.controller
    if req.force_strength is not None:
        return "forced", _plan(controller, req.force_strength, band.tokens, supported), band, ctx.assess_only
    if policy.mode == "observe":
        return "observe", NO_STEERING, band, ctx.assess_only
    if band.action == "refuse":
        return "refuse", NO_STEERING, band, True
    return "steer", _plan(controller, band.strength_for(risk), band.tokens, supported), band, ctx.assess_only


def decide(ctxs: list[RequestContext], engine: Any, runner: StageRunner) -> None:
    """Band, action and steering plan. The controller is a plugin like any other stage: its faults
    and hangs go through the runner, so they fail the request per its policy instead of escaping
    from the whole batch."""
    supported = frozenset(getattr(engine, "interventions", frozenset()))

    def run(group: list[RequestContext]) -> Commit:
        decisions = [_decision(ctx, supported) for ctx in group]

        def commit() -> None:
            for ctx, (action, steering, band, done) in zip(group, decisions):
                ctx.action, ctx.plan, ctx.done = action, steering, done
                if band is not None:
                    ctx.band = band

        return commit

    live = [c for c in ctxs if not c.done and not c.degraded]
    for group in _grouped(live, lambda c: id(c.runtime.controller)):
        runner.run("decide", group, run)


def generate(ctxs: list[RequestContext], engine: Any, runner: StageRunner,
             on_tokens: Callable[[int, int], None] | None) -> None:
    position = {id(c): i for i, c in enumerate(ctxs)}
    streamed: set[int] = set()  # requests whose tokens already went out: never generated twice

    def run(group: list[RequestContext]) -> Commit:
        callback = None
        if on_tokens is not None:
            index = [position[id(c)] for c in group]

            def callback(row: int, token: int) -> None:
                streamed.add(id(group[row]))
                on_tokens(index[row], token)

        gens = engine.generate([c.reformulation.answer_prompt for c in group], [c.plan for c in group],
                               group[0].max_new_tokens, on_tokens=callback)
        if len(gens) != len(group):
            raise RuntimeError(f"the engine returned {len(gens)} generations for {len(group)} prompts")

        def commit() -> None:
            for ctx, gen in zip(group, gens):
                ctx.generation = gen

        return commit

    for group in _grouped([c for c in ctxs if not c.done], lambda c: c.max_new_tokens):
        runner.run("generate", group, run, lambda sub: not any(id(c) in streamed for c in sub))
        # fail_open: a generation that failed with steering is retried once without it.
        # A request whose tokens were already streamed is not generated twice.
        failed = [c for c in group if c.degraded and c.generation is None and not c.done]
        retry = [c for c in failed if id(c) not in streamed]
        if retry:
            for ctx in retry:
                ctx.plan = NO_STEERING
            runner.run("generate", retry, run)
        for ctx in failed:
            if ctx.generation is None:
                ctx.done, ctx.action = True, "error"
