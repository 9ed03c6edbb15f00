"""The contrastive, re-centred and layer-ensemble statistics on small synthetic states."""

from __future__ import annotations

import torch

from guardrail.method import contrastive as c
from guardrail.method.risk_math import auroc


def _blobs(seed: int, n: int = 60, d: int = 20, shift: float = 2.5):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[0] = shift
    benign = torch.randn(n, d, generator=g)
    harmful = torch.randn(n, d, generator=g) + direction
    return harmful, benign


def test_ledoit_wolf_shrinks_toward_scaled_identity_and_is_invertible():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 50, generator=g, dtype=torch.float64)  # d ≫ n: the sample covariance is singular
    x = x - x.mean(0)
    cov, shrink = c.ledoit_wolf(x)
    assert 0.0 < shrink <= 1.0
    assert torch.linalg.matrix_rank(cov) == 50
    # many rows of an anisotropic distribution: little shrinkage, close to the true covariance
    scales = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    big = torch.randn(5000, 5, generator=g, dtype=torch.float64) * scales
    cov_big, shrink_big = c.ledoit_wolf(big - big.mean(0))
    assert shrink_big < 0.05 and torch.allclose(cov_big, torch.diag(scales**2), rtol=0.1, atol=0.5)
    # isotropic rows: the scaled identity is the truth, so it shrinks (almost) fully
    iso = torch.randn(5000, 5, generator=g, dtype=torch.float64)
    assert c.ledoit_wolf(iso - iso.mean(0))[1] > 0.5


def test_pca_is_deterministic_and_sign_fixed():
    h, b = _blobs(1)
    x = torch.cat([h, b])
    a, a2 = c.fit_pca(x, 5), c.fit_pca(x.clone(), 5)
    assert torch.equal(a["components"], a2["components"])
    flipped = c.fit_pca(-x, 5)
    assert torch.allclose(flipped["components"], a["components"], atol=1e-8)  # same directions, same signs


def test_two_class_scores_separate_held_out_rows():
    h, b = _blobs(2)
    th, tb = _blobs(3)
    m = c.fit_mahalanobis(h, b, k=10)
    assert auroc(c.score_mahalanobis(m, th).tolist(), c.score_mahalanobis(m, tb).tolist()) > 0.8
    k = c.fit_knn(h, b, k=5, pca_k=10)
    assert auroc(c.score_knn(k, th).tolist(), c.score_knn(k, tb).tolist()) > 0.7
    # swapping the classes flips the statistic's sign
    assert torch.allclose(c.score_mahalanobis(c.fit_mahalanobis(b, h, k=10), th), -c.score_mahalanobis(m, th), atol=1e-3)


def test_knn_does_not_call_a_novel_benign_cluster_unsafe_for_being_far_from_benign():
    h, b = _blobs(4)
    novel_benign = torch.randn(30, 20, generator=torch.Generator().manual_seed(5))
    novel_benign[:, 1] += 6.0  # far from both references, on an axis unrelated to harm
    k = c.fit_knn(h, b, k=5, pca_k=10)
    assert auroc(c.score_knn(k, h).tolist(), c.score_knn(k, novel_benign).tolist()) > 0.7


def test_recentring_removes_a_format_offset():
    h, b = _blobs(6)
    offset = torch.zeros(20)
    offset[2] = 8.0
    x = torch.cat([h, b, h[:30] + offset, b[:30] + offset])
    benign = torch.tensor([False] * 60 + [True] * 60 + [False] * 30 + [True] * 30)
    formats = ["text"] * 120 + ["typographic"] * 60
    params = c.fit_recentre(x, benign, formats)
    assert set(params["means"]) == {"text", "typographic"}
    y = c.recentre(params, x, formats)
    text_b, typo_b = y[60:120].mean(0), y[150:].mean(0)
    assert torch.allclose(text_b, torch.zeros(20), atol=1e-5) and torch.allclose(typo_b, torch.zeros(20), atol=1e-5)
    try:
        c.recentre(params, x[:1], ["image"])
    except ValueError as exc:
        assert "image" in str(exc)
    else:
        raise AssertionError("an unseen format must be refused")


def test_layer_ensemble_averages_standardised_logits():
    layers_h, layers_b = zip(*[_blobs(10 + i, shift=1.0 + i) for i in range(3)])
    params = c.fit_layer_ensemble(list(layers_h), list(layers_b))
    s = c.score_layer_ensemble(params, [torch.cat([lh, lb]) for lh, lb in zip(layers_h, layers_b)])
    assert abs(float(s.mean())) < 1e-4  # each logit standardised on the training rows, so the mean is 0
    assert auroc(s[:60].tolist(), s[60:].tolist()) > 0.9
    try:
        c.score_layer_ensemble(params, [layers_h[0]])
    except ValueError:
        pass
    else:
        raise AssertionError("a wrong number of layers must be refused")
