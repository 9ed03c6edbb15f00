"""Band edges stated as error rates: an edge resolved from a target benign false-positive rate.

A request is flagged when its risk is above the edge (a band covers risks up to and including its
`upto`). Given n benign scores the assessor was *not* fitted on, the conformal edge is the
k-th smallest of them with k = ⌈(n + 1)(1 − fpr)⌉: for a new benign request exchangeable with
those n, P(score > edge) ≤ fpr. When k > n (too few benign scores for the rate asked) no observed
score guarantees it and the edge is +inf (nothing is flagged); callers should say so.

Pure functions; resolved per input format (text, typographic, image), since one edge does not
serve formats whose benign scores sit at different heights.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence


def conformal_rank(n: int, fpr: float) -> int:
    """k = ⌈(n + 1)(1 − fpr)⌉, the 1-based rank of the edge among n sorted scores."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"target false-positive rate must be in (0, 1), got {fpr}")
    if n < 0:
        raise ValueError("n must be non-negative")
    # The small tolerance keeps exact products (n + 1)(1 − fpr) = integer from rounding up.
    return int(math.ceil((n + 1) * (1.0 - fpr) - 1e-9))


def fpr_edge(benign_scores: Sequence[float], fpr: float) -> float:
    """The conformal edge for a target benign false-positive rate (see the module docstring)."""
    scores = sorted(float(s) for s in benign_scores)
    if any(math.isnan(s) for s in scores):
        raise ValueError("benign scores contain NaN")
    k = conformal_rank(len(scores), fpr)
    if k > len(scores):
        return math.inf
    return scores[max(k, 1) - 1]


def fpr_edges(scores: Sequence[float], formats: Sequence[Hashable],
              fpr: float | Mapping[Hashable, float]) -> dict[Hashable, float]:
    """One edge per input format, each from the benign scores of that format only. `fpr` is one
    rate for every format or a rate per format (a format missing from the mapping is an error)."""
    if len(scores) != len(formats):
        raise ValueError(f"{len(scores)} scores but {len(formats)} formats")
    by_format: dict[Hashable, list[float]] = {}
    for s, f in zip(scores, formats):
        by_format.setdefault(f, []).append(float(s))
    out = {}
    for f in sorted(by_format, key=str):
        rate = fpr[f] if isinstance(fpr, Mapping) else fpr
        out[f] = fpr_edge(by_format[f], rate)
    return out


def observed_fpr(benign_scores: Sequence[float], edge: float) -> float:
    """Share of benign scores above the edge (what the edge flags)."""
    scores = list(benign_scores)
    return sum(float(s) > edge for s in scores) / len(scores) if scores else float("nan")
