"""Band edges stated as benign false-positive rates: resolved per input format from held-out
benign risks that calibration records, shown by `policy check`, used per request's format."""

from __future__ import annotations

import pytest
import torch

from fake_backend import FakeBackend
from guardrail import hookimpl
from guardrail.calibration import CalibrationConfig, CalibrationRow, calibrate_rows
from guardrail.errors import PolicyError
from guardrail.method.artifacts import Block
from guardrail.method.edges import fpr_edge
from guardrail.pipeline import Guardrail
from guardrail.pipeline.runtime import resolve_bands
from guardrail.plugin.manager import PluginManager
from guardrail.plugin.protocols import RiskNeeds, Score
from guardrail.policy import Policy

FPR_POLICY = {
    "name": "fpr", "reformulator": {"use": "plain"}, "risk": {"assessors": [{"use": "spy"}]},
    "steering": {"use": "spy_no"},
    "bands": [{"name": "low", "upto": {"benign_fpr": 0.1}, "strength": 0.0},
              {"name": "high", "upto": 1.0, "strength": 1.0}],
}


class Spy:
    """Calibrator + assessor 'spy': risk = a row's word count / 100; the calibrator records which
    rows every fit saw."""

    def __init__(self, seen):
        self.seen = seen

    @hookimpl
    def guardrail_register_calibrators(self, register):
        seen = self.seen

        class SpyCalibrator:
            name, version, requires = "spy", 1, ()

            def needs(self, ctx):
                return RiskNeeds(layers=frozenset([0]))

            def fit(self, data, ctx):
                seen.append({r.text for r in data.rows})
                return Block(1, {"rows": len(data)})

        register("spy", SpyCalibrator)

    @hookimpl
    def guardrail_register_risk_assessors(self, register):
        class SpyAssessor:
            def check(self, env, policy):
                env.artifacts.block("spy")

            def needs(self, env):
                return RiskNeeds(layers=frozenset([0]))

            def score(self, risk_pass, contexts, env):
                return [Score(risk=min(1.0, float(x[0]) / 100), raw=float(x[0])) for x in risk_pass.states[0]]

        register("spy", SpyAssessor)

    @hookimpl
    def guardrail_register_steering_controllers(self, register):
        from guardrail.engine.interventions import NO_STEERING, ForcedPrefix, SteeringPlan

        class SpyNo:
            interventions = (ForcedPrefix,)

            def plan(self, strength, tokens):
                return SteeringPlan((ForcedPrefix((1,)),), strength, 1, "spy_no") if strength > 0 else NO_STEERING

        register("spy_no", SpyNo)


def _rows():
    rows = []
    for source in ("alpha", "beta", "gamma"):
        for i in range(6):
            rows.append(CalibrationRow(f"how to hurt {source} " + "x " * i, True, source))
            rows.append(CalibrationRow(f"benign {source} question " + "y " * i, False, source, "text"))
            rows.append(CalibrationRow(f"sign {source}", False, source, "typographic", visual_context="w " * (10 + 3 * i)))
    return rows


@pytest.fixture
def calibrated():
    seen: list[set[str]] = []
    plugins = PluginManager(entry_points=False, plugins=[Spy(seen)])
    cfg = CalibrationConfig(progress=False, calibrators=["spy"])
    art = calibrate_rows(FakeBackend(), _rows(), cfg, plugins=plugins)
    return art, seen, plugins


def test_held_out_risks_come_from_fits_that_never_saw_their_source(calibrated):
    art, seen, _ = calibrated
    held = art.meta["held_out_benign"]
    assert held["split"] == "source" and held["folds"] == 3 and held["rows"] == {"text": 18, "typographic": 18}
    full, *folds = seen
    assert len(folds) == 3
    for fold, source in zip(folds, ("alpha", "beta", "gamma")):
        assert not any(source in text for text in fold), f"a row of {source} reached the fit that scores it"
        assert len(fold) == len(full) * 2 // 3


def test_edges_are_resolved_per_format_from_the_held_out_benign_risks(calibrated):
    art, _, _ = calibrated
    policy = Policy.model_validate(FPR_POLICY)
    bands = resolve_bands(policy, art)
    risk = art.meta["held_out_benign"]["risk"]["spy"]
    assert bands["text"][0].upto == pytest.approx(fpr_edge(risk["text"], 0.1))
    assert bands["typographic"][0].upto == pytest.approx(fpr_edge(risk["typographic"], 0.1))
    # typographic benign rows score higher here, so their edge sits higher; unknown formats get the lowest
    assert bands["typographic"][0].upto > bands["text"][0].upto == bands["*"][0].upto
    assert all(b[-1].upto == 1.0 for b in bands.values())


def test_the_request_format_picks_its_edge(calibrated, tmp_path):
    import yaml

    art, _, plugins = calibrated
    engine = FakeBackend()
    engine.artifacts = art
    (tmp_path / "fpr.yaml").write_text(yaml.safe_dump(FPR_POLICY))
    guard = Guardrail(engine, tmp_path / "fpr.yaml", plugins=plugins)
    _, runtimes = guard.registry.snapshot()
    text_edge = runtimes["fpr"].bands_for("text")[0].upto
    words = int(text_edge * 100) + 1  # just above the text edge
    result = guard.assess(" ".join(["word"] * words))
    assert result.band == "high"


def test_too_few_benign_rows_for_the_rate_refuse_the_policy(calibrated):
    art, _, _ = calibrated
    strict = {**FPR_POLICY, "bands": [{"name": "low", "upto": {"benign_fpr": 0.01}, "strength": 0.0},
                                       {"name": "high", "upto": 1.0, "strength": 1.0}]}
    with pytest.raises(PolicyError, match="format text: band 'low': benign_fpr 0.01 needs at least 99 held-out benign rows of a format; the artifact has 18"):
        resolve_bands(Policy.model_validate(strict), art)


def test_an_artifact_without_held_out_risks_refuses_error_rate_edges():
    from guardrail.method.artifacts import Artifacts

    with pytest.raises(PolicyError, match="need held-out benign risks for spy; the artifact has them for: none"):
        resolve_bands(Policy.model_validate(FPR_POLICY), Artifacts(meta={}))


def test_error_rate_edges_must_fall_as_bands_ascend():
    bad = {**FPR_POLICY, "bands": [{"name": "a", "upto": {"benign_fpr": 0.05}}, {"name": "b", "upto": {"benign_fpr": 0.1}},
                                    {"name": "c", "upto": 1.0}]}
    with pytest.raises(Exception, match="has benign_fpr 0.1, not below 0.05"):
        Policy.model_validate(bad)
    with pytest.raises(Exception, match="must reach 1.0"):
        Policy.model_validate({**FPR_POLICY, "bands": [{"name": "a", "upto": {"benign_fpr": 0.05}}]})
