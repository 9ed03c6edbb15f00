"""Hidden-state risk readers: diff-in-means projection and a logistic probe, with layer choice by
cross-validation. Pure functions of tensors; `(positive, negative) -> parameters`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable


from guardrail.lazy import lazy_module
from guardrail.method.risk_math import auroc

if TYPE_CHECKING:
    import torch
else:  # imported when a tensor is first made, so registering and routing need no torch
    torch = lazy_module("torch")


@dataclass(frozen=True)
class MeanDifference:
    direction: torch.Tensor  # μ_harmful − μ_benign, [d]
    midpoint: torch.Tensor  # (μ_harmful + μ_benign) / 2, [d]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        unit = self.direction / self.direction.norm().clamp_min(1e-12)
        return (x.float() - self.midpoint) @ unit


def fit_mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> MeanDifference:
    mu_p, mu_n = positive.float().mean(0), negative.float().mean(0)
    return MeanDifference(direction=mu_p - mu_n, midpoint=(mu_p + mu_n) / 2)


@dataclass(frozen=True)
class LogisticProbe:
    weight: torch.Tensor  # [d], on standardised features
    bias: torch.Tensor  # [1]
    mean: torch.Tensor  # [d]
    scale: torch.Tensor  # [d]

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) / self.scale
        return z @ self.weight + self.bias


def fit_logistic(positive: torch.Tensor, negative: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> LogisticProbe:
    """L2-regularised logistic regression by L-BFGS on standardised features (deterministic)."""
    x = torch.cat([positive, negative]).float()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    mean = x.mean(0)
    scale = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(weight=w.detach(), bias=b.detach(), mean=mean, scale=scale)


Scorer = Callable[["torch.Tensor", "torch.Tensor"], Callable[["torch.Tensor"], "torch.Tensor"]]


def mean_difference_scorer(pos: torch.Tensor, neg: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return fit_mean_difference(pos, neg).project


def logistic_scorer(pos: torch.Tensor, neg: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return fit_logistic(pos, neg).logit


def folds(n_pos: int, n_neg: int, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stratified, deterministic k-fold split: [(test_pos_index, test_neg_index)] per fold."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randperm(n_pos, generator=g), torch.randperm(n_neg, generator=g)
    return [(pos[i::k], neg[i::k]) for i in range(k)]


def cross_validated_auroc(positive: torch.Tensor, negative: torch.Tensor, scorer: Scorer, k: int = 5, seed: int = 0) -> float:
    """Mean held-out AUROC of a scorer fitted on the other folds."""
    k = max(2, min(k, len(positive), len(negative)))
    results = []
    for test_p, test_n in folds(len(positive), len(negative), k, seed):
        keep_p = torch.ones(len(positive), dtype=torch.bool)
        keep_p[test_p] = False
        keep_n = torch.ones(len(negative), dtype=torch.bool)
        keep_n[test_n] = False
        score = scorer(positive[keep_p], negative[keep_n])
        results.append(auroc(score(positive[test_p]).tolist(), score(negative[test_n]).tolist()))
    return float(sum(results) / len(results))


def choose_layer(aurocs: dict[int, float], num_layers: int) -> int:
    """The layer with the best cross-validated AUROC; ties go to the one nearest the middle."""
    middle = (num_layers - 1) / 2
    return max(aurocs, key=lambda layer: (round(aurocs[layer], 6), -abs(layer - middle)))
