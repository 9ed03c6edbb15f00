"""Risk statistics meant to generalise to requests unlike the calibration set (issue 11, point 3).

Pure torch functions over hidden states (rows = requests, columns = features, e.g. several decoder
layers' states at the last token of the reformulated query, side by side). Each `fit_*` returns a
params dict of tensors and floats; each `score_*(params, x)` returns the raw statistic per row,
higher = more likely harmful. Mapping a statistic to [0, 1] (the sigmoid) is the caller's.

(a) two-class contrastive scores: distance to the benign reference minus distance to the unsafe one,
    so a novel benign request far from both is not called unsafe merely for being novel (a one-class
    detector's failure): `mahalanobis` (shared Ledoit-Wolf shrinkage covariance after PCA; with a
    shared covariance the difference of squared distances is linear in x, i.e. a shrinkage LDA) and
    `knn` (mean cosine distance to the k nearest benign minus to the k nearest unsafe rows).
(b) re-centring: subtract the benign mean of the row's own input format (text, typographic) before
    fitting and scoring, so a format whose benign requests sit elsewhere in state space is not
    flagged for its format: `fit_recentre` / `recentre`.
(c) a layer ensemble: one logistic probe per layer, each logit standardised on the training rows,
    averaged: `fit_layer_ensemble` / `score_layer_ensemble`.

Every fit is deterministic (no random initialisation; PCA by SVD with a fixed sign convention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Sequence


from guardrail.lazy import lazy_module
from guardrail.method.probes import fit_logistic

if TYPE_CHECKING:
    import torch
else:  # imported when a tensor is first made, so registering and routing need no torch
    torch = lazy_module("torch")

Params = dict[str, Any]


def _check(pos: torch.Tensor, neg: torch.Tensor) -> None:
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"need two [n, d] tensors with the same d, got {tuple(pos.shape)} and {tuple(neg.shape)}")
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError("need at least 2 rows of each class")


# ----- PCA and shrinkage covariance ---------------------------------------------------------------
def fit_pca(x: torch.Tensor, k: int) -> Params:
    """Mean and the top-k principal directions ([k, d], unit rows, sign fixed so each direction's
    largest-magnitude entry is positive)."""
    x = x.double()
    mean = x.mean(0)
    k = max(1, min(k, x.shape[0] - 1, x.shape[1]))
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1.0
    return {"mean": mean, "components": comps * signs.unsqueeze(1)}


def pca_project(params: Params, x: torch.Tensor) -> torch.Tensor:
    return (x.double() - params["mean"]) @ params["components"].T


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrinkage covariance of already centred rows: (1 − s) S + s μ I with
    S = XᵀX / n, μ = tr(S) / d and s = min(1, b² / d²) (Ledoit & Wolf 2004)."""
    x = x.double()
    n, d = x.shape
    s = x.T @ x / n
    mu = float(torch.trace(s)) / d
    target = mu * torch.eye(d, dtype=torch.float64)
    d2 = float(((s - target) ** 2).sum())
    sq_norms = (x * x).sum(1)
    b2_bar = (float((sq_norms**2).sum()) / n - float((s * s).sum())) / n
    b2 = min(d2, max(b2_bar, 0.0))
    shrink = 1.0 if d2 <= 0 else b2 / d2
    return (1.0 - shrink) * s + shrink * target, shrink


# ----- (a) two-class contrastive scores -----------------------------------------------------------
def fit_mahalanobis(pos: torch.Tensor, neg: torch.Tensor, k: int = 64) -> Params:
    """PCA to k dimensions on all rows, class means, and the Ledoit-Wolf precision of the pooled
    within-class residuals."""
    _check(pos, neg)
    pca = fit_pca(torch.cat([pos, neg]), k)
    zp, zn = pca_project(pca, pos), pca_project(pca, neg)
    mu_u, mu_b = zp.mean(0), zn.mean(0)
    cov, shrink = ledoit_wolf(torch.cat([zp - mu_u, zn - mu_b]))
    return {**pca, "mu_unsafe": mu_u, "mu_benign": mu_b, "precision": torch.linalg.inv(cov), "shrinkage": shrink}


def score_mahalanobis(params: Params, x: torch.Tensor) -> torch.Tensor:
    """d²(x, benign) − d²(x, unsafe): positive when x is closer to the unsafe reference."""
    z = pca_project(params, x)
    p = params["precision"]

    def d2(mu: torch.Tensor) -> torch.Tensor:
        r = z - mu
        return ((r @ p) * r).sum(1)

    return (d2(params["mu_benign"]) - d2(params["mu_unsafe"])).float()


def fit_knn(pos: torch.Tensor, neg: torch.Tensor, k: int = 10, pca_k: int = 64) -> Params:
    """Reference rows of both classes, centred on the training mean and projected by PCA (cosine on
    raw states is dominated by their common mean direction), unit-normalised."""
    _check(pos, neg)
    pca = fit_pca(torch.cat([pos, neg]), pca_k)
    unit = lambda z: z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return {**pca, "unsafe": unit(pca_project(pca, pos)), "benign": unit(pca_project(pca, neg)), "k": int(k)}


def score_knn(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance to the k nearest benign references minus to the k nearest unsafe ones."""
    z = pca_project(params, x)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def mean_knn_distance(ref: torch.Tensor) -> torch.Tensor:
        dist = 1.0 - z @ ref.T
        k = min(params["k"], ref.shape[0])
        return dist.topk(k, dim=1, largest=False).values.mean(1)

    return (mean_knn_distance(params["benign"]) - mean_knn_distance(params["unsafe"])).float()


# ----- (b) re-centring on benign inputs of the same format ------------------------------------------
def fit_recentre(x: torch.Tensor, benign: torch.Tensor, formats: Sequence[Hashable]) -> Params:
    """The benign mean of each input format: {"means": {format: [d]}}."""
    if len(formats) != x.shape[0] or benign.shape[0] != x.shape[0]:
        raise ValueError("x, benign and formats must have one entry per row")
    means = {}
    for f in sorted(set(formats), key=str):
        rows = torch.tensor([fi == f for fi in formats]) & benign.bool()
        if not bool(rows.any()):
            raise ValueError(f"no benign row of format {f!r} to re-centre on")
        means[f] = x[rows].double().mean(0)
    return {"means": means}


def recentre(params: Params, x: torch.Tensor, formats: Sequence[Hashable]) -> torch.Tensor:
    """x minus the benign mean of each row's format (a format never seen in the fit is an error)."""
    missing = sorted({str(f) for f in formats if f not in params["means"]})
    if missing:
        raise ValueError(f"no benign mean for format(s) {', '.join(missing)}")
    shift = torch.stack([params["means"][f] for f in formats]) if len(formats) else x.new_zeros(x.shape)
    return (x.double() - shift).float()


# ----- (c) layer ensemble -----------------------------------------------------------------------
def fit_layer_ensemble(pos: Sequence[torch.Tensor], neg: Sequence[torch.Tensor], l2: float = 1e-2) -> Params:
    """One logistic probe per layer (pos[i], neg[i] are layer i's states); each probe's logit is
    standardised by its mean and standard deviation over the training rows."""
    if len(pos) != len(neg) or not pos:
        raise ValueError("need the same, non-zero number of layers for both classes")
    probes = []
    for p, n in zip(pos, neg):
        _check(p, n)
        probe = fit_logistic(p, n, l2=l2)
        t = probe.logit(torch.cat([p, n]))
        probes.append({"weight": probe.weight, "bias": probe.bias, "mean": probe.mean, "scale": probe.scale,
                       "logit_mean": float(t.mean()), "logit_std": max(float(t.std()), 1e-6)})
    return {"probes": probes}


def score_layer_ensemble(params: Params, layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the standardised probe logits."""
    if len(layers) != len(params["probes"]):
        raise ValueError(f"{len(layers)} layers given, the ensemble has {len(params['probes'])}")
    total = None
    for x, p in zip(layers, params["probes"]):
        z = (x.float() - p["mean"]) / p["scale"]
        t = ((z @ p["weight"] + p["bias"]) - p["logit_mean"]) / p["logit_std"]
        total = t if total is None else total + t
    return total / len(layers)
