"""Assessor `pooled_probe`: the logistic probe read from states averaged over the whole risk prompt.

`linear_probe` reads each middle layer at the *last* token of the reformulated query; this one
reads the same layers (every other layer from 40 % to 80 % of the depth) averaged over every token
of the query (the backend's `pooled` risk-pass input: padding left out, image tokens included).
The last token sees the request only through attention and is dominated by how the prompt ends
(its length, its phrasing, a format constraint); the average keeps what each token of the request
says. Statistic: the probe's logit; risk = σ(α (t − S_base)) as for the other hidden-state
assessors (S_base = calibration mean, the harmful mean maps to 0.99).

Why it ships (docs/results/crossval/): leave one source out over thirteen calibration sources on
SmolLM2-135M it ranks held-out requests best of every assessor compared, text and typographic.

Needs the backend's pooled states: on a backend that cannot give them (vLLM) a policy using it is
refused when it loads. The pass runs over the whole prompt, so an image prefix shared with the
caption pass is recomputed for the risk pass.

Block `pooled_probe` v1: tensors `weight`, `mean`, `scale` [k·d], `bias` [1]; meta: `layers`,
s_base, s_ref, alpha, `calibration_auroc` (in sample).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from guardrail.lazy import lazy_module
from guardrail.plugin.sdk import (
    ArtifactError,
    Block,
    RiskNeeds,
    Score,
    fit_logistic,
    require_block,
)
from guardrail_plugins.risk.hidden_state import ProbeParams, _check_layers, probe_span, sigmoid_meta

if TYPE_CHECKING:
    import torch
else:  # the plugin registers without torch; a stage imports it when it first computes
    torch = lazy_module("torch")

NAME = "pooled_probe"


def pooled_features(pooled: dict[int, Any], layers: Sequence[int]) -> torch.Tensor:
    """The chosen layers' pooled states side by side, [n, len(layers)·d] float32."""
    missing = [l for l in layers if l not in pooled]
    if missing:
        raise ArtifactError(f"assessor {NAME}: the risk pass gave no pooled states for layers {missing}")
    return torch.cat([torch.as_tensor(pooled[l], dtype=torch.float32) for l in layers], dim=-1)


class PooledProbeCalibrator:
    name = NAME
    version = 1
    requires: tuple[str, ...] = ()

    def needs(self, ctx: Any) -> RiskNeeds:
        return RiskNeeds(pooled=frozenset(probe_span(ctx.num_layers)))

    def fit(self, data: Any, ctx: Any) -> Block:
        labels, layers = data.labels, probe_span(ctx.num_layers)
        x = pooled_features(data.pooled, layers)
        # One fit, no layer search: the span is fixed, so nothing needs cross-validating here (the
        # calibration's held-out folds and `guardrail crossval` measure it on rows it never saw).
        probe = fit_logistic(x[labels], x[~labels])
        meta = sigmoid_meta(probe.logit(x), labels, layers[0], {layers[0]: float("nan")})
        meta = {k: v for k, v in meta.items() if k not in ("layer", "cv_auroc", "cv_auroc_by_layer")}
        meta.update(layers=layers, pool="mean")
        tensors = {"weight": probe.weight, "bias": probe.bias.reshape(1), "mean": probe.mean, "scale": probe.scale}
        return Block(self.version, meta, tensors, {k: (None,) for k in tensors})


class PooledProbeAssessor:
    def __init__(self) -> None:
        self.params: ProbeParams | None = None

    def check(self, env: Any, policy: Any) -> None:
        hidden = env.engine.fingerprint()["hidden_size"]
        params = ProbeParams.of(require_block(env, NAME, f"assessor {NAME}"), hidden)
        _check_layers(NAME, params.layers, env)
        self.params = params

    def _bound(self) -> ProbeParams:
        if self.params is None:
            raise ArtifactError(f"{NAME} used before its policy was checked against an artifact")
        return self.params

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(pooled=frozenset(self._bound().layers))

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        p = self._bound()
        t = p.probe.logit(pooled_features(risk_pass.pooled, p.layers))
        return [Score(risk=float(r), raw=float(x)) for r, x in zip(p.sigmoid.risk(t), t)]

