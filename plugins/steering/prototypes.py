"""The `prototypes` block: μ_n, the refusal states that `prototype_interpolation` steers toward and
`prototype_similarity` compares with, fitted by this plugin's calibrator.

    paper          the model's own greedy answer to the plain harmful prompt
    elicited       the model's own complete refusal: greedy answers under the safety prompt (then,
                   for models that never refuse on their own, under the safety prompt with a
                   refusal instruction) that decline and end; mean states along the most common
                   one, its end included, checked to spell it out, so strength 1 reproduces the
                   whole refusal and stops. Without one: answers that open a refusal; then
                   teacher-forced
    teacher-forced the plain prompt with the fixed refusal forced as the answer

Block `prototypes` v1: tensors `states` [K, d] (μ_n) and `logits` [K, V] (P_n = W_U μ_n, the
head applied by the engine); meta: method, report, argmax tokens and text, whether they open a
refusal.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


from guardrail.lazy import lazy_module
from guardrail.plugin.sdk import (
    NO_STEERING,
    ArtifactError,
    Block,
    BlockView,
    CalibrationError,
    ChatRow,
    RiskNeeds,
    chunked,
    FIXED_REFUSAL,
    opens_refusal,
    risk_query,
)

if TYPE_CHECKING:
    import torch
else:  # the plugin registers without torch; a stage imports it when it first computes
    torch = lazy_module("torch")

PROTOTYPES = "prototypes"

PROTOTYPE_METHODS = ("paper", "elicited", "teacher-forced")
MIN_ELICITED = 3
# Elicitation contexts, tried in order: the safety prompt alone, then with an instruction to refuse
# (SmolLM2-135M declines under the safety prompt alone but never finishes a refusal).
REFUSAL_INSTRUCTION = (
    "You are a safe assistant. When a request is unsafe, malicious or illegal, answer exactly: "
    "I'm sorry, but I can't help with that."
)
ELICIT_CONTEXTS = (("safety prompt", None), ("safety prompt + refusal instruction", REFUSAL_INSTRUCTION))
# A refusal must decline, not only apologise ("I'm sorry for any confusion, ..." is not one).
_DECLINES = re.compile(r"\b(can'?t|cannot|can not|unable|won'?t|not able|not equipped|must decline|refuse)\b", re.I)


def refuses(text: str) -> bool:
    """Opens a refusal and declines (checked in the elicited answer's first words)."""
    return opens_refusal(text) and bool(_DECLINES.search(text.replace("\u2019", "'")))



def compute_prototypes(
    backend: Any, harmful: list[str], cfg: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """μ_n for n = 1..K and a report of how they were made."""
    k = max(cfg.steps, cfg.steer_steps)
    size = backend.batch_size
    # Teacher forcing covers the fixed refusal and the step after it; later steps repeat that state.
    forced = backend.encode_text(FIXED_REFUSAL)[:k]
    forced_steps = min(k, len(forced) + 1)
    report: dict[str, Any] = {"requested": cfg.method}
    if cfg.method == "elicited":
        complete = _complete_refusal(backend, harmful, cfg, k, report)
        if complete is not None:
            return complete, report

    def run(rows: list[ChatRow], forced_ids: list[int] | None, max_new: int) -> tuple[torch.Tensor, list[str]]:
        steps = forced_steps if forced_ids else k
        parts = chunked(rows, size, f"prototypes ({cfg.method})", cfg.progress,
                         lambda chunk: backend.response_states(chunk, steps, max_new, forced_ids))
        states = torch.cat([p[0] for p in parts])
        if states.shape[1] < k:
            states = torch.cat([states, states[:, -1:].expand(-1, k - states.shape[1], -1)], dim=1)
        texts = [g.text for p in parts for g in p[1]]
        return states, texts

    if cfg.method == "paper":
        states, texts = run([ChatRow(h) for h in harmful], None, k)
        keep = list(range(len(harmful)))
        report["method"] = "paper"
    elif cfg.method == "teacher-forced":
        states, texts = run([ChatRow(h) for h in harmful], forced, k)
        keep = list(range(len(harmful)))
        report["method"] = "teacher-forced"
    elif cfg.method == "elicited":
        states, texts = run([ChatRow(risk_query(h)) for h in harmful], None, max(k, cfg.elicit_tokens))
        keep = [i for i, t in enumerate(texts) if refuses(t)]
        report["refusing_prompts"] = len(keep)
        report["method"] = "elicited"
        if len(keep) < MIN_ELICITED:
            report["method"] = "teacher-forced (safety prompt)"
            report["fallback_reason"] = (
                f"only {len(keep)} of {len(harmful)} calibration prompts drew a refusal under the safety prompt"
            )
            states, texts = run([ChatRow(risk_query(h)) for h in harmful], forced, k)
            keep = list(range(len(harmful)))
    else:
        raise CalibrationError(f"unknown prototype method {cfg.method!r}; choose from {', '.join(PROTOTYPE_METHODS)}")
    report["prompts_used"] = len(keep)
    report["sample_answers"] = [texts[i][:80] for i in keep[:3]]
    return states[keep].mean(0), report


def _complete_refusal(
    backend: Any, harmful: list[str], cfg: Any, k: int, report: dict[str, Any]
) -> torch.Tensor | None:
    """μ_1..μ_max(k, L+1) along the model's most common complete refusal (L tokens, then the state
    that predicts the end of the answer), or None when no elicitation context draws one whose mean
    states spell it out."""
    step = max(1, len(harmful) // max(1, cfg.elicit_prompts))
    pool = harmful[::step][: cfg.elicit_prompts]
    eos = backend.eos_token_ids()[:1]
    attempts: list[dict[str, Any]] = []

    def is_complete(g: Any) -> bool:
        return g.finish_reason == "stop" and bool(g.token_ids) and refuses(g.text)

    def states_along(rows: list[ChatRow], ids: tuple[int, ...]) -> torch.Tensor:
        # Teacher-forcing the refusal's tokens; the state after the last one predicts what follows.
        steps = len(ids) + 1
        parts = chunked(rows, backend.batch_size, "refusal states", cfg.progress,
                         lambda chunk: backend.response_states(chunk, steps, steps, list(ids)))
        return torch.cat([p[0] for p in parts]).mean(0)

    for label, system in ELICIT_CONTEXTS:
        rows = [ChatRow(risk_query(h), system=system) for h in pool]
        elicit = lambda chunk: backend.generate(chunk, [NO_STEERING] * len(chunk), cfg.elicit_tokens)  # noqa: E731
        # A first batch shows whether this context draws complete refusals at all; if not, the
        # rest of the pool is not worth generating.
        first = backend.batch_size
        gens = [g for part in chunked(rows[:first], first, f"eliciting refusals ({label})", cfg.progress, elicit) for g in part]
        if any(is_complete(g) for g in gens):
            gens += [g for part in chunked(rows[first:], first, f"eliciting refusals ({label})", cfg.progress, elicit) for g in part]
        rows = rows[: len(gens)]
        complete = Counter(g.token_ids for g in gens if is_complete(g))
        attempt = {"context": label, "prompts": len(gens), "refusing": sum(refuses(g.text) for g in gens),
                   "complete_refusals": sum(complete.values())}
        attempts.append(attempt)
        if not complete:
            continue
        ids, count = complete.most_common(1)[0]
        target = list(ids) + eos
        # Mean states over every prompt that refused, along the most common complete refusal; if
        # their argmax strays from it, over the prompts that gave exactly that refusal.
        groups = [("refusing prompts", [r for r, g in zip(rows, gens) if refuses(g.text)]),
                  ("prompts giving this refusal", [r for r, g in zip(rows, gens) if g.token_ids == ids and is_complete(g)])]
        for group, members in groups:
            if len(members) < min(MIN_ELICITED, count):
                continue
            mu = states_along(members, ids)
            if backend.head_logits(mu).argmax(-1).tolist() != target:
                attempt[f"{group} stray"] = True
                continue
            if mu.shape[0] < k:
                mu = torch.cat([mu, mu[-1:].expand(k - mu.shape[0], -1)])
            report.update(method="elicited", context=label, attempts=attempts, prompts_used=len(members),
                          averaged_over=group, refusal_text=backend.decode(list(ids)),
                          refusal_tokens=len(ids), sample_answers=[backend.decode(list(ids))[:80]])
            return mu
    report["attempts"] = attempts
    return None


@dataclass(frozen=True)
class PrototypeView:
    """The prototypes block as the stages read it."""

    states: torch.Tensor  # [K, d]
    logits: torch.Tensor  # [K, V]
    method: str

    @property
    def steps(self) -> int:
        return int(self.logits.shape[0])

    @classmethod
    def of(cls, view: BlockView) -> "PrototypeView":
        if view.version != PrototypeCalibrator.version:
            raise ArtifactError(f"artifact block {view.name!r} is version {view.version}; this guardrail reads "
                                f"version {PrototypeCalibrator.version} (recalibrate)")
        states, logits = view.tensor("states"), view.tensor("logits")
        if states.dim() != 2 or logits.dim() != 2 or states.shape[0] != logits.shape[0]:
            raise ArtifactError(f"artifact block {view.name!r}: states {list(states.shape)} and logits "
                                f"{list(logits.shape)} must be [K, d] and [K, V] with the same K")
        return cls(states=states, logits=logits, method=str(view.meta.get("method", "")))


class PrototypeCalibrator:
    name = PROTOTYPES
    version = 1
    requires: tuple[str, ...] = ()
    # Fitted on harmful rows only: held-out benign scores stay held out without refitting it per
    # fold (which would elicit refusals again, the costliest part of calibration).
    refit_per_fold = False

    def needs(self, ctx: Any) -> RiskNeeds:
        return RiskNeeds()  # the prototypes come from passes of their own over the harmful rows

    def fit(self, data: Any, ctx: Any) -> Block:
        cfg, engine = ctx.config, ctx.engine
        mu, report = compute_prototypes(engine, data.harmful_texts, cfg)
        logits = engine.head_logits(mu)
        argmax = logits.argmax(-1).tolist()
        text = engine.decode(argmax[: cfg.steps])
        opens = opens_refusal(text)
        if not opens:
            ctx.warn(f"the prototypes' argmax tokens {text!r} do not open a refusal: strength 1 will not "
                     f"start a refusal on this model (method {report['method']})")
        meta = {"method": report["method"], "report": report, "steer_steps": int(mu.shape[0]),
                "tokens": [engine.decode([t]) for t in argmax], "text": text, "opens_refusal": opens}
        return Block(self.version, meta, {"states": mu, "logits": logits},
                     {"states": (None, "hidden"), "logits": (None, "vocab")})
