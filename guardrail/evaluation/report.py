"""report.json (the fixed schema), details.json, answers.jsonl and report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_KEYS = ("asr", "benign_refusal", "edgy_refusal", "auroc", "latency_ms")


def report_json(model: str, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Exactly {"model", "methods": {name: {asr, benign_refusal, edgy_refusal, auroc, latency_ms}}}."""
    return {"model": model, "methods": {name: {k: s.get(k) for k in SUMMARY_KEYS} for name, s in summaries.items()}}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(report: dict[str, Any], details: dict[str, Any]) -> str:
    methods = report["methods"]
    base = methods.get("no_defense", {}).get("latency_ms")
    lines = [
        f"# guardrail eval: {report['model']}",
        "",
        f"- policy: `{details['config']['policy']}`; artifacts: `{details['config']['artifacts']}`",
        f"- judge: `{details['judge']['name']}` (agreement with the hand-labelled set: "
        f"{_pct(details['judge'].get('agreement'))} of {details['judge'].get('n', 0)})",
        "- inputs: " + ", ".join(f"{s['role']} `{name}` ({s['n']})" for name, s in details["inputs"].items()),
        f"- max new tokens {details['config']['max_new_tokens']}, batch size {details['config']['batch_size']}, "
        f"limit {details['config']['limit']}",
        f"- machine: {details['machine']}; date {details['date']}",
        "",
        "| method | ASR | benign refusal | edgy refusal | risk AUROC | AUROC matched | latency ms/request | × no_defense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        d = details["methods"][name]
        ratio = (m["latency_ms"] / base) if base and m["latency_ms"] is not None else None
        lines.append(
            f"| {name} | {_pct(m['asr'])} | {_pct(m['benign_refusal'])} | {_pct(m['edgy_refusal'])} | "
            f"{_num(m['auroc'])} | {_num(d.get('auroc_matched'))} | {_num(m['latency_ms'], '{:.0f}')} | {_num(ratio, '{:.2f}')} |"
        )
    lines += ["", "## Latency per stage (ms per request)", "", "| method | " + " | ".join(_stages(details)) + " |",
              "|---|" + "---|" * len(_stages(details))]
    for name in methods:
        stage = details["methods"][name]["stage_latency_ms"]
        lines.append(f"| {name} | " + " | ".join(_num(stage.get(s), "{:.1f}") for s in _stages(details)) + " |")
    if details.get("caption_warmup_s"):
        lines += ["", f"Visual contexts were computed once per image before timing "
                      f"({details['caption_warmup_s']:.1f} s for {details['images']} images) and served from the "
                      "guard's cache to every method."]
    lines += ["", "## Refusal rate per input file", "", "| method | " + " | ".join(details["inputs"]) + " |",
              "|---|" + "---|" * len(details["inputs"])]
    for name in methods:
        src = details["methods"][name]["by_source"]
        lines.append(f"| {name} | " + " | ".join(_pct(src[s]["refusal_rate"]) if s in src else "–" for s in details["inputs"]) + " |")
    per_assessor = {n: d["per_assessor_auroc"] for n, d in details["methods"].items() if d.get("per_assessor_auroc")}
    if per_assessor:
        lines += ["", "## Per-assessor AUROC (harmful vs benign; matched pairs)", ""]
        for name, table in per_assessor.items():
            parts = [f"{a} {_num(v['auroc'])} / {_num(v['auroc_matched'])}" for a, v in table.items()]
            lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", "## Plots", "", "![risk histograms](risk_histograms.png)", "", "![ROC](roc.png)", "",
              "![ASR vs benign refusal](tradeoff.png)", "",
              "Each answer, its risk, band, strength and the judge's verdict are in `answers.jsonl`."]
    return "\n".join(lines) + "\n"


def _stages(details: dict[str, Any]) -> list[str]:
    order = ["validate", "reformulate", "assess", "decide", "generate", "audit"]
    seen = {s for d in details["methods"].values() for s in d["stage_latency_ms"]}
    return [s for s in order if s in seen] + sorted(seen - set(order))


def write_all(out: Path, report: dict[str, Any], details: dict[str, Any], rows: dict[str, list[Any]]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report.json": out / "report.json", "details.json": out / "details.json",
             "answers.jsonl": out / "answers.jsonl", "report.md": out / "report.md"}
    paths["report.json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["details.json"].write_text(json.dumps(details, indent=2) + "\n", encoding="utf-8")
    with open(paths["answers.jsonl"], "w", encoding="utf-8") as fh:
        for method, method_rows in rows.items():
            for row in method_rows:
                fh.write(json.dumps({"method": method, **row.to_dict()}, ensure_ascii=False) + "\n")
    paths["report.md"].write_text(markdown(report, details), encoding="utf-8")
    return paths
