"""Assessor `pooled_probe`: the logistic probe read from states averaged over the request's own tokens.

`linear_probe` reads each middle layer at the *last* token of the reformulated query; this one
reads the same layers (every other layer from 40 % to 80 % of the depth) averaged over the
request's own tokens: the visual context and question after the safety prompt, and the
template's closing tokens (the backend's `pooled` risk-pass input, guardrail/engine/request_span.py).
The last token sees the request only through attention and is dominated by how the prompt ends
(its length, its phrasing, a format constraint); the average keeps what each token of the request
says. The chat template's opening and the safety prompt are left out: a causal model gives them
the same states in every row, so with them in, the average is mostly a constant diluted by the
request's length. Each layer's average is centred on the calibration's mean text prompt and
scaled to unit length before the probe reads it: what the probe sees is the *direction* in which
a request moves the average away from a typical one, not how far (lengths differ by source and by
input format). Statistic: the probe's logit; risk = σ(α (t − S_base)) as for the other
hidden-state assessors (S_base = calibration mean, the harmful mean maps to 0.99).

Why it ships (docs/results/crossval/): leave one source out over thirteen calibration sources on
SmolLM2-135M it ranks held-out requests best of every assessor compared, text and typographic
(calibrated on both formats). The unit-length scaling and the own-token span were both chosen on
those same folds.

Needs the backend's pooled states: on a backend that cannot give them a policy using it is refused
when it loads. On transformers the pass runs over the whole prompt, so an image prefix shared with
the caption pass is recomputed for the risk pass.

Block `pooled_probe` v3: tensors `centre` [k, d], `weight`, `mean`, `scale` [k·d], `bias` [1];
meta: `layers`, `pool: "own tokens"`, `features: "direction"`, s_base, s_ref, alpha,
`calibration_auroc` (in sample). Blocks v1 and v2 (before 2026-12-02 evening) were fitted on
averages over the whole prompt, which no backend gives any more: they are refused with a message
to recalibrate.
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


def pooled_features(pooled: dict[int, Any], layers: Sequence[int], centre: torch.Tensor) -> torch.Tensor:
    """The chosen layers' pooled states side by side, [n, len(layers)·d] float32: each layer's state
    minus its centre ([len(layers), d]), scaled to unit length."""
    missing = [l for l in layers if l not in pooled]
    if missing:
        raise ArtifactError(f"assessor {NAME}: the risk pass gave no pooled states for layers {missing}")
    per_layer = [torch.as_tensor(pooled[l], dtype=torch.float32) for l in layers]
    per_layer = [direction(x - c) for x, c in zip(per_layer, centre.float())]
    return torch.cat(per_layer, dim=-1)


def direction(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def text_centre(data: Any, layers: Sequence[int]) -> torch.Tensor:
    """[len(layers), d]: the mean pooled state of the calibration's text rows (of every row when
    there are none), harmful and benign alike."""
    text = torch.tensor([getattr(r, "format", "text") == "text" for r in data.rows], dtype=torch.bool)
    pick = text if bool(text.any()) else torch.ones_like(text)
    return torch.stack([torch.as_tensor(data.pooled[l], dtype=torch.float32)[pick].mean(0) for l in layers])


class PooledProbeCalibrator:
    name = NAME
    version = 3
    requires: tuple[str, ...] = ()

    def needs(self, ctx: Any) -> RiskNeeds:
        return RiskNeeds(pooled=frozenset(probe_span(ctx.num_layers)))

    def fit(self, data: Any, ctx: Any) -> Block:
        labels, layers = data.labels, probe_span(ctx.num_layers)
        centre = text_centre(data, layers)
        x = pooled_features(data.pooled, layers, centre)
        # One fit, no layer search: the span is fixed, so nothing needs cross-validating here (the
        # calibration's held-out folds and `guardrail crossval` measure it on rows it never saw).
        probe = fit_logistic(x[labels], x[~labels])
        meta = sigmoid_meta(probe.logit(x), labels, layers[0], {layers[0]: float("nan")})
        meta = {k: v for k, v in meta.items() if k not in ("layer", "cv_auroc", "cv_auroc_by_layer")}
        meta.update(layers=layers, pool="own tokens", features="direction")
        tensors = {"centre": centre, "weight": probe.weight, "bias": probe.bias.reshape(1), "mean": probe.mean,
                   "scale": probe.scale}
        dims = {k: (None,) for k in tensors} | {"centre": (None, "hidden")}  # the loader checks hidden_size
        return Block(self.version, meta, tensors, dims)


def block_centre(view: Any, layers: Sequence[int], hidden: int) -> torch.Tensor:
    """Block v3's `centre`, checked against the model."""
    if view.version in (1, 2):
        raise ArtifactError(f"artifact block {NAME!r} is version {view.version}, fitted on averages over the whole "
                            f"prompt; this assessor reads version 3 (averages over the request's own tokens): "
                            f"recalibrate")
    if view.version != 3:
        raise ArtifactError(f"artifact block {NAME!r} is version {view.version}; this assessor reads version 3 "
                            f"(recalibrate, or upgrade guardrail)")
    centre = view.tensor("centre")
    if tuple(centre.shape) != (len(layers), hidden):
        raise ArtifactError(f"artifact tensor '{NAME}/centre' has shape {list(centre.shape)}, the model needs "
                            f"{[len(layers), hidden]} ({len(layers)} layers × hidden {hidden})")
    return centre


class PooledProbeAssessor:
    def __init__(self) -> None:
        self.params: ProbeParams | None = None
        self.centre: torch.Tensor | None = None  # set by check()

    def check(self, env: Any, policy: Any) -> None:
        hidden = env.engine.fingerprint()["hidden_size"]
        view = require_block(env, NAME, f"assessor {NAME}")
        params = ProbeParams.of(view, hidden)
        centre = block_centre(view, params.layers, hidden)
        _check_layers(NAME, params.layers, env)
        self.params, self.centre = params, centre

    def _bound(self) -> ProbeParams:
        if self.params is None:
            raise ArtifactError(f"{NAME} used before its policy was checked against an artifact")
        return self.params

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(pooled=frozenset(self._bound().layers))

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        p = self._bound()
        t = p.probe.logit(pooled_features(risk_pass.pooled, p.layers, self.centre))
        return [Score(risk=float(r), raw=float(x)) for r, x in zip(p.sigmoid.risk(t), t)]

