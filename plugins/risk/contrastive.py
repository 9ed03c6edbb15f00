"""Assessor `mahalanobis`: a two-class contrastive score over middle-layer states, with its calibrator.

Features: the states of the probe's layers (every other layer from 40 % to 80 % of the depth) at
the last token of the reformulated query, side by side. Fit: PCA to at most 64 dimensions, the
harmful and benign class means there, and the Ledoit-Wolf shrinkage precision of the pooled
within-class residuals (guardrail.method.contrastive). Statistic: d²(x, benign) − d²(x, harmful),
positive when a request sits nearer the harmful reference; risk = σ(α (t − S_base)) as for the
other hidden-state assessors. A request far from both references is not called harmful merely for
being novel, the failure of one-class detectors (RCS, arXiv 2512.12069).

Why it ships (docs/results/crossval/): leave one source out over thirteen calibration sources on
SmolLM2-135M, it ranks held-out text requests best of the assessors compared (AUROC 0.945 against
the probe's 0.909). It is not the default: its typographic ranking is weaker (0.846 vs 0.925).

Block `mahalanobis` v1: meta layers, k, shrinkage, s_base, s_ref, alpha; tensors mean [D],
components [k, D], mu_unsafe [k], mu_benign [k], precision [k, k] with D = len(layers) × hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from guardrail.lazy import lazy_module
from guardrail.plugin.sdk import ArtifactError, Block, BlockView, RiskNeeds, Score, require_block
from guardrail_plugins.risk.hidden_state import Sigmoid, _check_layers, probe_span, sigmoid_meta

if TYPE_CHECKING:
    import torch
else:  # the plugin registers without torch; a stage imports it when it first computes
    torch = lazy_module("torch")

NAME = "mahalanobis"
PCA_DIMENSIONS = 64


class MahalanobisCalibrator:
    name = NAME
    version = 1
    requires: tuple[str, ...] = ()

    def needs(self, ctx: Any) -> RiskNeeds:
        return RiskNeeds(layers=frozenset(probe_span(ctx.num_layers)))

    def fit(self, data: Any, ctx: Any) -> Block:
        from guardrail.plugin.sdk import fit_mahalanobis, score_mahalanobis

        labels, layers = data.labels, probe_span(ctx.num_layers)
        x = torch.cat([data.states[l] for l in layers], dim=-1).float()
        params = fit_mahalanobis(x[labels], x[~labels], k=PCA_DIMENSIONS)
        meta = sigmoid_meta(score_mahalanobis(params, x), labels, layers[0], {layers[0]: float("nan")})
        meta = {k: v for k, v in meta.items() if k not in ("layer", "cv_auroc", "cv_auroc_by_layer")}
        meta.update(layers=layers, k=int(params["components"].shape[0]), shrinkage=float(params["shrinkage"]))
        tensors = {key: params[key].float() for key in ("mean", "components", "mu_unsafe", "mu_benign", "precision")}
        return Block(self.version, meta, tensors, {k: (None,) * tensors[k].dim() for k in tensors})


@dataclass(frozen=True)
class MahalanobisParams:
    layers: tuple[int, ...]
    sigmoid: Sigmoid
    tensors: dict[str, Any]

    @classmethod
    def of(cls, view: BlockView, hidden: int) -> "MahalanobisParams":
        layers = view.meta.get("layers")
        if not isinstance(layers, list) or not layers or not all(type(l) is int and l >= 0 for l in layers):
            raise ArtifactError(f"artifact block {view.name!r}: layers must be a non-empty list of layer numbers")
        tensors = {key: view.tensor(key).double() for key in ("mean", "components", "mu_unsafe", "mu_benign", "precision")}
        d, k = len(layers) * hidden, tensors["components"].shape[0]
        want = {"mean": (d,), "components": (k, d), "mu_unsafe": (k,), "mu_benign": (k,), "precision": (k, k)}
        for key, shape in want.items():
            if tuple(tensors[key].shape) != shape:
                raise ArtifactError(f"artifact tensor '{view.name}/{key}' has shape {list(tensors[key].shape)}, the "
                                    f"model needs {list(shape)} ({len(layers)} layers × hidden {hidden}, k {k})")
        return cls(tuple(layers), Sigmoid.of(view), tensors)


class MahalanobisAssessor:
    def __init__(self) -> None:
        self.params: MahalanobisParams | None = None

    def check(self, env: Any, policy: Any) -> None:
        hidden = env.engine.fingerprint()["hidden_size"]
        params = MahalanobisParams.of(require_block(env, NAME, f"assessor {NAME}"), hidden)
        _check_layers(NAME, params.layers, env)
        self.params = params

    def _bound(self) -> MahalanobisParams:
        if self.params is None:
            raise ArtifactError(f"{NAME} used before its policy was checked against an artifact")
        return self.params

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(layers=frozenset(self._bound().layers))

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        from guardrail.plugin.sdk import score_mahalanobis

        p = self._bound()
        x = torch.cat([torch.as_tensor(risk_pass.states[l]) for l in p.layers], dim=-1)
        t = score_mahalanobis(p.tensors, x)
        return [Score(risk=float(r), raw=float(v)) for r, v in zip(p.sigmoid.risk(t), t)]
