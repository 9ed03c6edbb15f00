"""Band edges from a target benign false-positive rate (conformal quantile), per input format."""

from __future__ import annotations

import math
import random

import pytest

from guardrail.method.edges import conformal_rank, fpr_edge, fpr_edges, observed_fpr


def test_rank_is_the_conformal_quantile():
    assert conformal_rank(99, 0.05) == 95  # ⌈100 · 0.95⌉
    assert conformal_rank(9, 0.1) == 9  # exact product, not rounded up to 10
    assert conformal_rank(10, 0.1) == 10  # ⌈9.9⌉
    with pytest.raises(ValueError):
        conformal_rank(10, 0.0)
    with pytest.raises(ValueError):
        conformal_rank(10, 1.0)


def test_edge_is_the_kth_smallest_and_too_few_scores_give_inf():
    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8]  # 9 scores
    assert fpr_edge(scores, 0.1) == 0.9  # k = 9
    assert fpr_edge(scores, 0.3) == 0.7  # k = ⌈10 · 0.7⌉ = 7
    assert fpr_edge(scores[:5], 0.1) == math.inf  # k = 6 > 5: no observed score guarantees 10 %
    with pytest.raises(ValueError, match="NaN"):
        fpr_edge([0.1, float("nan")], 0.5)


def test_edge_holds_the_rate_on_new_benign_scores():
    rng = random.Random(0)
    misses = []
    for _ in range(300):
        calib = [rng.random() for _ in range(99)]
        edge = fpr_edge(calib, 0.05)
        fresh = [rng.random() for _ in range(200)]
        misses.append(observed_fpr(fresh, edge))
    mean = sum(misses) / len(misses)
    assert 0.02 < mean <= 0.05 + 0.01  # the guarantee is on average over calibration draws


def test_edges_per_format_use_only_that_formats_scores():
    scores = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]
    formats = ["text"] * 4 + ["typographic"] * 4
    edges = fpr_edges(scores, formats, 0.2)  # k = ⌈5 · 0.8⌉ = 4 of 4
    assert edges == {"text": 0.4, "typographic": 0.9}
    assert fpr_edges(scores, formats, {"text": 0.2, "typographic": 0.5}) == {"text": 0.4, "typographic": 0.8}  # k = 3
    with pytest.raises(KeyError):
        fpr_edges(scores, formats, {"text": 0.2})
    with pytest.raises(ValueError, match="formats"):
        fpr_edges(scores, formats[:3], 0.2)
    assert observed_fpr([0.1, 0.5, 0.9], 0.5) == pytest.approx(1 / 3)
