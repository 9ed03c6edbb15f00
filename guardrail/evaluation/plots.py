"""PNG plots for `guardrail eval` and `guardrail diagnose` (matplotlib, the `eval` extra).

    risk_histograms.png   harmful vs benign risk per risk-reading method, with the sigmoid
                          r = σ(α(S − S_base)) of its first assessor and the policy's band edges
                          (the paper's Fig. 6)
    roc.png               ROC of harmful vs benign risk per risk-reading method
    tradeoff.png          ASR against benign refusal: the fixed strengths as a curve, the other
                          methods as points
    fisher.png            (diagnose) the Fisher discriminant ratio per layer
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from guardrail.errors import GuardrailError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise GuardrailError("plots need matplotlib: pip install 'guardrail[eval]'") from exc
    return plt


def risk_histograms(path: Path, panels: Sequence[dict[str, Any]]) -> Path:
    """panels: [{"title", "harmful": [risk], "benign": [risk], "edges": [band upper edges],
    "sigmoid": {"s_base", "alpha", "raw_harmful", "raw_benign"} or None}]."""
    plt = _pyplot()
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        bins = [i / 25 for i in range(26)]
        ax.hist(panel["harmful"], bins=bins, alpha=0.6, color="tab:red", label=f"harmful (n={len(panel['harmful'])})")
        ax.hist(panel["benign"], bins=bins, alpha=0.6, color="tab:blue", label=f"benign (n={len(panel['benign'])})")
        for edge in panel.get("edges", [])[:-1]:
            ax.axvline(edge, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("risk r")
        ax.set_title(panel["title"], fontsize=9)
        sig = panel.get("sigmoid")
        if sig:
            # The calibration sigmoid, drawn in the statistic's own range on a twin x axis.
            lo = min(sig["raw_harmful"] + sig["raw_benign"])
            hi = max(sig["raw_harmful"] + sig["raw_benign"])
            xs = [lo + (hi - lo) * i / 100 for i in range(101)]
            ys = [1 / (1 + math.exp(-sig["alpha"] * (x - sig["s_base"]))) for x in xs]
            twin = ax.twinx().twiny()
            twin.plot(xs, ys, color="tab:green", linewidth=1.2)
            twin.set_xlabel(f"{sig['name']} statistic (sigmoid)", fontsize=7, color="tab:green")
            twin.tick_params(labelsize=6, colors="tab:green")
        ax.legend(fontsize=7, loc="upper center")
    axes[0][0].set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roc(path: Path, curves: Sequence[tuple[str, list[float], list[float], float | None]]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, fpr, tpr, auc in curves:
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("false-positive rate (benign)")
    ax.set_ylabel("true-positive rate (harmful)")
    ax.set_title("risk: harmful vs benign", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff(path: Path, fixed: Sequence[tuple[str, float, float]], points: Sequence[tuple[str, float, float]]) -> Path:
    """fixed: [(label, benign refusal, ASR)] for the fixed strengths; points: other methods."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    if fixed:
        xs = [f[1] for f in fixed]
        ys = [f[2] for f in fixed]
        ax.plot(xs, ys, marker="o", color="tab:grey", label="fixed strength")
        for label, x, y in fixed:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    markers = "*sD^vP"
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], marker=markers[i % len(markers)], s=80 if i == 0 else 45, label=label, zorder=3)
    ax.set_xlabel("benign refusal rate")
    ax.set_ylabel("attack success rate (harmful not refused)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("ASR vs benign refusal", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fisher(path: Path, series: dict[str, Sequence[float]]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker=".", label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("Fisher discriminant ratio")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("safe vs unsafe separation per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
