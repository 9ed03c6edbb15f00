"""`guardrail eval` as a function: load inputs, serve every method from one guard, judge, measure,
plot and write the reports."""

from __future__ import annotations

import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from guardrail.errors import InputError
from guardrail.evaluation import methods as methods_mod
from guardrail.evaluation import plots
from guardrail.evaluation.datasets import subsample
from guardrail.evaluation.judge import agreement, load_judge
from guardrail.evaluation.metrics import method_metrics, roc_points
from guardrail.evaluation.report import report_json, write_all
from guardrail.evaluation.runner import EvalItem, items_from, run_method, warm_captions
from guardrail.prompt_files import read_prompt_items


@dataclass
class EvalConfig:
    model: str
    artifacts: Path
    policy: Path
    out: Path
    harmful: Sequence[Path] = ()
    benign: Sequence[Path] = ()
    edgy: Sequence[Path] = ()
    matched: Sequence[Path] = ()  # harmful prompts matched to the benign ones: risk only
    methods: str | None = None
    limit: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    judge: str | None = None  # None: the installed plugins' default judge
    device: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    backend: str = "transformers"  # or "vllm": a managed `vllm serve`, or the one at vllm_url
    vllm_url: str | None = None
    vllm_states_url: str | None = None


def load_items(cfg: EvalConfig) -> list[EvalItem]:
    if not cfg.harmful or not cfg.benign:
        raise InputError("eval needs at least one --harmful and one --benign file")
    items: list[EvalItem] = []
    used: set[str] = set()
    for role, files in (("harmful", cfg.harmful), ("benign", cfg.benign), ("edgy", cfg.edgy), ("matched", cfg.matched)):
        for path in files:
            source = Path(path).stem
            while source in used:  # two files with one name stay apart
                source += "'"
            used.add(source)
            items += items_from(role, source, subsample(read_prompt_items(path), cfg.limit))
    return items


def machine() -> str:
    import torch

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def run_eval(cfg: EvalConfig, adapter: Any = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method and write report.json, details.json, answers.jsonl, report.md and plots to
    cfg.out. Returns report.json's content. `adapter` reuses an already loaded model (transformers)."""
    from guardrail.method.artifacts import load_artifacts
    from guardrail.models import load_model
    from guardrail.plugin.manager import PluginManager
    from guardrail.policy import load_policy
    from guardrail.engine.transformers import TransformersBackend

    items = load_items(cfg)
    base_policy = load_policy(cfg.policy)
    plugins = PluginManager()
    if cfg.backend == "vllm":
        from guardrail.engine.vllm import build

        engine: Any = build(cfg.model, cfg.artifacts, url=cfg.vllm_url, states_url=cfg.vllm_states_url)
        adapter, art = engine.adapter, engine.artifacts
    elif cfg.backend == "transformers":
        adapter = adapter or load_model(cfg.model, device=cfg.device)
        art = load_artifacts(cfg.artifacts, adapter.fingerprint())
        engine = TransformersBackend(adapter, art, batch_size=cfg.batch_size)
    else:
        raise InputError(f"unknown backend {cfg.backend!r} (transformers or vllm)")
    try:
        return _run(cfg, items, base_policy, plugins, engine, adapter, art, log)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()  # a managed vLLM server stops with the evaluation


def _run(cfg: EvalConfig, items: list[EvalItem], base_policy: Any, plugins: Any, engine: Any, adapter: Any, art: Any,
         log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from guardrail.pipeline import Guardrail

    known = plugins.known_stages()["risk_assessors"]
    baselines = methods_mod.load_baselines(plugins)
    # By default every calibrated assessor is compared, except those this backend cannot serve
    # (vLLM gives no layer states): their policies would be refused when the guard loads.
    servable = methods_mod.servable_assessors(engine, plugins, [a for a in art.blocks() if a in known])
    method_text = cfg.methods or methods_mod.default_methods(base_policy, servable, known, baselines)
    methods = methods_mod.parse_methods(method_text, baselines)
    judge_name = cfg.judge or plugins.default_stage("judges")
    judge = load_judge(judge_name, plugins)
    judge_check = {"name": judge_name, **agreement(judge)}
    log(f"judge {judge_name}: {judge_check['agreement']:.1%} agreement on {judge_check['n']} hand-labelled answers")

    cfg.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guardrail-eval-") as tmp:
        policy_dir = methods_mod.write_policies(methods, Path(cfg.policy), Path(tmp), baselines)
        guard = Guardrail(engine, policy_dir, plugins=plugins)
    try:
        warm = items[:2]
        guard.generate_batch([it.request(methods[0].name, True, 4) for it in warm])  # first-call costs, untimed
        caption_s = warm_captions(guard, items, methods[0].name, cfg.batch_size, cfg.progress)
        runs, summaries, method_details, all_rows = {}, {}, {}, {}
        for method in tqdm(methods, desc="methods", disable=not cfg.progress):
            run = run_method(guard, method, items, cfg.batch_size, cfg.max_new_tokens, cfg.progress)
            for row in run.rows:
                if row.answer is not None:
                    verdict = judge.verdict(row.answer) if hasattr(judge, "verdict") else None
                    row.refusal = verdict.refusal if verdict else bool(judge.is_refusal(row.answer))
                    row.judge_reason = verdict.reason if verdict else ""
            metrics = method_metrics(run.rows, method.reads_risk, run.wall_s, run.answered, run.stage_ms)
            runs[method.name], summaries[method.name] = run, metrics["summary"]
            method_details[method.name] = metrics["details"]
            all_rows[method.name] = run.rows
            s = metrics["summary"]
            log(f"{method.name}: ASR {_fmt(s['asr'])}, benign refusal {_fmt(s['benign_refusal'])}, "
                f"edgy refusal {_fmt(s['edgy_refusal'])}, AUROC {_fmt(s['auroc'], pct=False)}, "
                f"{_fmt(s['latency_ms'], pct=False, fmt='{:.0f}')} ms/request")
    finally:
        guard.close()

    report = report_json(adapter.name, summaries)
    details = {
        "config": {"policy": str(cfg.policy), "artifacts": str(cfg.artifacts), "methods": method_text,
                   "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "limit": cfg.limit, **cfg.extra},
        "judge": judge_check,
        "inputs": _inputs(items),
        "images": sum(1 for it in items if it.image is not None),
        "caption_warmup_s": round(caption_s, 3),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "artifact_blocks": _artifact_summary(art),
        "methods": method_details,
    }
    write_all(cfg.out, report, details, all_rows)
    make_plots(cfg.out, methods, runs, summaries, art, base_policy)
    log(f"wrote {cfg.out / 'report.json'}, report.md, details.json, answers.jsonl and plots")
    return report


def _fmt(x: float | None, pct: bool = True, fmt: str = "{:.3f}") -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f} %" if pct else fmt.format(x)


def _inputs(items: Sequence[EvalItem]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        entry = out.setdefault(it.source, {"role": it.role, "n": 0, "images": 0})
        entry["n"] += 1
        entry["images"] += int(it.image is not None)
    return out


def _inverse_sigmoid(r: float, s_base: float, alpha: float) -> float:
    r = min(max(r, 1e-9), 1 - 1e-9)
    return s_base + math.log(r / (1 - r)) / alpha


def make_plots(out: Path, methods: Sequence[Any], runs: dict[str, Any], summaries: dict[str, Any], art: Any,
               base_policy: Any) -> None:
    from guardrail.policy import load_policy

    panels, curves = [], []
    for method in methods:
        if not method.reads_risk:
            continue
        rows = runs[method.name].rows
        harmful = [r for r in rows if r.item.role == "harmful" and r.risk is not None]
        benign = [r for r in rows if r.item.role == "benign" and r.risk is not None]
        if not harmful or not benign:
            continue
        policy = load_policy(method.policy_file) if method.policy_file else base_policy
        edges = [b.upto for b in policy.bands]
        first = next(iter(harmful[0].scores), None)
        sigmoid = None
        block = art.block(first).meta if first and art.has(first) else None
        if block:
            s_base, alpha = float(block["s_base"]), float(block["alpha"])
            sigmoid = {"name": first, "s_base": s_base, "alpha": alpha,
                       "raw_harmful": [_inverse_sigmoid(r.scores[first], s_base, alpha) for r in harmful],
                       "raw_benign": [_inverse_sigmoid(r.scores[first], s_base, alpha) for r in benign]}
        panels.append({"title": method.name, "harmful": [r.risk for r in harmful], "benign": [r.risk for r in benign],
                       "edges": edges, "sigmoid": sigmoid})
        fpr, tpr = roc_points([r.risk for r in harmful], [r.risk for r in benign])
        curves.append((method.name, fpr, tpr, summaries[method.name]["auroc"]))
    plots.risk_histograms(out / "risk_histograms.png", panels)
    plots.roc(out / "roc.png", curves)
    fixed = sorted(((m.name, summaries[m.name]["benign_refusal"], summaries[m.name]["asr"]) for m in methods
                    if m.sweep and summaries[m.name]["asr"] is not None and summaries[m.name]["benign_refusal"] is not None),
                   key=lambda t: t[1])
    points = [(m.name, summaries[m.name]["benign_refusal"], summaries[m.name]["asr"]) for m in methods
              if not m.sweep and summaries[m.name]["asr"] is not None and summaries[m.name]["benign_refusal"] is not None]
    points.sort(key=lambda p: 0 if p[0] == "ras" else 1)
    plots.tradeoff(out / "tradeoff.png", fixed, points)


def _artifact_summary(art: Any) -> dict[str, Any]:
    """Each calibrated block's version and short scalar facts (what was fitted on what)."""
    out = {}
    for name in art.blocks():
        block = art.block(name)
        facts = {k: v for k, v in block.meta.items() if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200}
        out[name] = {"version": getattr(block, "version", None), **facts}
    return out
