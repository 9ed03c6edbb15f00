"""Pure functions of the method's maths, each testable on its own.

Notation follows shared/ras-method.md: z_n are next-token logits at response step n, P_n the
prototype logits, q = Σ γ^(n−1) softmax(z_n), p = Σ γ^(n−1) softmax(P_n), S = cos(q, p),
r = σ(α (S − S_base)) with α = ln(0.99/0.01) / (S_ref − S_base) (S_ref = 1 for the paper's
similarity, so S = 1 maps to r = 0.99).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from guardrail.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:  # imported when a tensor is first made, so registering and routing need no torch
    torch = lazy_module("torch")


LN99 = math.log(99.0)


def decayed_distribution(logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Σ_n γ^(n−1) softmax(z_n) over the step axis: [..., N, V] -> [..., V] (not renormalised)."""
    probs = torch.softmax(logits.double(), dim=-1)
    weights = gamma ** torch.arange(logits.shape[-2], dtype=torch.float64)
    return (probs * weights.unsqueeze(-1)).sum(dim=-2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, in float64."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def prototype_similarity(step_logits: torch.Tensor, proto_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """S for each row: step_logits [B, N, V], proto_logits [N, V] -> [B]."""
    q = decayed_distribution(step_logits, gamma)
    p = decayed_distribution(proto_logits.unsqueeze(0), gamma)
    return cosine(q, p)


def alpha_for(s_base: float, s_ref: float = 1.0) -> float:
    """The sigmoid slope that maps S = s_ref to r = 0.99."""
    gap = s_ref - s_base
    if not gap > 0:
        raise ValueError(f"cannot calibrate: reference {s_ref} is not above the base {s_base}")
    return LN99 / gap


def calibrated_risk(s: torch.Tensor | float, s_base: float, alpha: float) -> torch.Tensor:
    """r = σ(α (S − S_base))."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return torch.sigmoid(alpha * (s - s_base))


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve (Mann–Whitney U), ties counted half."""
    pos, neg = list(map(float, positive)), list(map(float, negative))
    if not pos or not neg:
        return float("nan")
    values = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    # average ranks, handling ties
    ranks = [0.0] * len(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1][0] == values[i][0]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            ranks[k] = avg
        i = j + 1
    rank_sum = sum(r for r, (_, label) in zip(ranks, values) if label == 1)
    u = rank_sum - len(pos) * (len(pos) + 1) / 2.0
    return u / (len(pos) * len(neg))


def fisher_ratio(safe: torch.Tensor, unsafe: torch.Tensor, ridge: float | None = None) -> float:
    """(μ_s − μ_u)ᵀ (Σ_s + Σ_u + εI)⁻¹ (μ_s − μ_u), with ε ≈ 1e-6·trace/d by default."""
    safe, unsafe = safe.double(), unsafe.double()
    diff = safe.mean(0) - unsafe.mean(0)
    cov = torch.cov(safe.T).reshape(safe.shape[1], -1) + torch.cov(unsafe.T).reshape(unsafe.shape[1], -1)
    d = cov.shape[0]
    eps = ridge if ridge is not None else max(1e-6 * float(torch.trace(cov)) / d, 1e-12)
    cov = cov + eps * torch.eye(d, dtype=torch.float64)
    return float(diff @ torch.linalg.solve(cov, diff))
