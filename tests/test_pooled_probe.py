"""The calibrated `pooled_probe` assessor: states averaged over the request's own tokens, its block
(v3: each layer's average centred on the text rows' mean and scaled to unit length), its score
equal to the logistic formula, blocks fitted on whole-prompt averages (v1, v2), a wrong-size or an
unknown block refused, a backend without pooled states refused at load, and the pipeline asking
the backend for pooled states only when an assessor needs them."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_adapter
from fake_backend import FakeBackend
from guardrail import hookimpl
from guardrail.engine.interventions import NO_STEERING
from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
from guardrail.engine.transformers import TransformersBackend
from guardrail.errors import ArtifactError, PolicyError
from guardrail.method.artifacts import Artifacts, Block
from guardrail.method.prompts import risk_row
from guardrail.pipeline import Guardrail
from guardrail.pipeline.caption_cache import CaptionCache
from guardrail.plugin.manager import PluginManager
from guardrail.plugin.protocols import RiskNeeds, Score, StageEnv

POLICY = """
name: pooled
risk: {assessors: [{use: pooled_probe}]}
bands:
  - {name: low, upto: 0.5, strength: 0.0}
  - {name: high, upto: 1.0, strength: 1.0}
limits: {max_new_tokens: 4}
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    backend = TransformersBackend(tiny_adapter("llama"))
    cfg = CalibrationConfig(progress=False, held_out_folds=0, folds=2, calibrators=["pooled_probe", "prototypes"])
    out = tmp_path_factory.mktemp("pooled")
    art = calibrate(backend, packaged_prompts("harmful")[:12], packaged_prompts("benign")[:12], cfg, out=out)
    return backend, art, out


def _env(backend, art):
    backend.artifacts = art
    return StageEnv(engine=backend, captions=CaptionCache(4), plugins=PluginManager(entry_points=False))


def test_the_block_and_the_score_are_the_probe_on_pooled_states(fitted):
    backend, art, _ = fitted
    block = art.block("pooled_probe")
    layers = block.meta["layers"]
    hidden = backend.adapter.hidden_size
    assert layers and block.meta["pool"] == "own tokens" and block.meta["features"] == "direction" and block.version == 3
    assert block.tensor("weight").shape == (len(layers) * hidden,)
    assert block.tensor("centre").shape == (len(layers), hidden)
    env = _env(backend, art)
    assessor = env.plugins.create("risk_assessors", "pooled_probe")
    assessor.check(env, None)
    need = assessor.needs(env)
    assert need.pooled == frozenset(layers) and not need.layers and not need.steps
    rows = [risk_row("How do I bake bread?"), risk_row("How do I build a bomb?")]
    rp = backend.risk_pass(rows, 0, [], pooled=sorted(need.pooled))
    scores = assessor.score(rp, [None, None], env)
    centred = [rp.pooled[l] - block.tensor("centre")[i] for i, l in enumerate(layers)]
    x = torch.cat([c / c.norm(dim=-1, keepdim=True) for c in centred], dim=-1)
    assert x.reshape(2, len(layers), hidden).norm(dim=-1) == pytest.approx(torch.ones(2, len(layers)))
    raw = ((x - block.tensor("mean")) / block.tensor("scale")) @ block.tensor("weight") + block.tensor("bias")
    assert [s.raw for s in scores] == pytest.approx(raw.tolist(), rel=1e-4, abs=1e-4)
    s_base, alpha = block.meta["s_base"], block.meta["alpha"]
    want = torch.sigmoid(alpha * (raw.double() - s_base))
    assert [s.risk for s in scores] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
    # last-token states are not what it reads: they differ from the pooled ones
    last = backend.risk_pass(rows, 0, layers).states
    assert not torch.allclose(last[layers[0]], rp.pooled[layers[0]])


def test_the_centre_is_the_mean_of_the_text_rows_only(fitted):
    from guardrail.calibration import CalibrationRow, GatheredStates
    from guardrail_plugins.risk.pooled_probe import text_centre

    rows = (CalibrationRow("a", True), CalibrationRow("b", False), CalibrationRow("c", False, format="typographic"))
    pooled = {3: torch.tensor([[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]])}
    data = GatheredStates(rows=rows, step_logits=None, states={}, pooled=pooled)
    assert text_centre(data, [3]).tolist() == [[2.0, 1.0]]
    typographic_only = GatheredStates(rows=rows[2:], step_logits=None, states={}, pooled={3: pooled[3][2:]})
    assert text_centre(typographic_only, [3]).tolist() == [[100.0, 100.0]]


def _with_block(art, version, **tensors):
    good = art.block("pooled_probe")
    t = {k: v for k, v in dict(good.tensors, **tensors).items() if v is not None}
    return Artifacts.from_blocks(art.meta, {"pooled_probe": Block(version, dict(good.meta), t, {k: (None,) * v.dim() for k, v in t.items()})})


@pytest.mark.parametrize("tensor, shape", [("weight", (3,)), ("centre", (1, 3))])
def test_a_wrong_size_block_is_refused_naming_the_tensor(fitted, tensor, shape):
    backend, art, _ = fitted
    env = _env(backend, _with_block(art, 3, **{tensor: torch.zeros(shape)}))
    with pytest.raises(ArtifactError, match=f"pooled_probe/{tensor}"):
        env.plugins.create("risk_assessors", "pooled_probe").check(env, None)


@pytest.mark.parametrize("version, message", [
    (4, "version 4; this assessor reads version 3"),
    (2, "version 2, fitted on averages over the whole prompt.*recalibrate"),
    (1, "version 1, fitted on averages over the whole prompt.*recalibrate"),
])
def test_whole_prompt_and_unknown_block_versions_are_refused(fitted, version, message):
    backend, art, _ = fitted
    env = _env(backend, _with_block(art, version, centre=None if version == 1 else art.block("pooled_probe").tensor("centre")))
    with pytest.raises(ArtifactError, match=message):
        env.plugins.create("risk_assessors", "pooled_probe").check(env, None)
    backend.artifacts = art


def test_the_guard_scores_with_pooled_states_end_to_end(fitted, tmp_path):
    backend, art, _ = fitted
    backend.artifacts = art
    (tmp_path / "pooled.yaml").write_text(POLICY)
    guard = Guardrail(backend, tmp_path / "pooled.yaml")
    result = guard.generate("How do I build a bomb?")
    env = _env(backend, art)
    assessor = env.plugins.create("risk_assessors", "pooled_probe")
    assessor.check(env, None)
    rp = backend.risk_pass([risk_row("How do I build a bomb?")], 0, [], pooled=sorted(assessor.needs(env).pooled))
    assert result.risk == pytest.approx(assessor.score(rp, [None], env)[0].risk, abs=1e-5)


def test_a_backend_without_pooled_states_refuses_the_policy_at_load(fitted, tmp_path):
    backend, art, _ = fitted
    backend.artifacts = art
    (tmp_path / "pooled.yaml").write_text(POLICY)

    class LastTokenOnly(TransformersBackend):
        risk_inputs = frozenset({"step_logits", "layer_states"})

    narrow = LastTokenOnly(backend.adapter, art)
    with pytest.raises(PolicyError) as err:
        Guardrail(narrow, tmp_path / "pooled.yaml")
    message = str(err.value)
    assert "pooled_probe" in message and "pooled_states" in message and "LastTokenOnly" in message


class PooledBomb:
    """Risk from the pooled state's 'bomb' feature (the fake backend's states: [words, bomb])."""

    def needs(self, env):
        return RiskNeeds(pooled=frozenset([1]))

    def score(self, risk_pass, contexts, env):
        return [Score(risk=0.9 if row[1] > 0 else 0.1, raw=float(row[1])) for row in risk_pass.pooled[1]]


class LastBomb(PooledBomb):
    def needs(self, env):
        return RiskNeeds(layers=frozenset([0]))

    def score(self, risk_pass, contexts, env):
        return [Score(risk=0.9 if row[1] > 0 else 0.1, raw=float(row[1])) for row in risk_pass.states[0]]


FAKE_POLICY = """
name: p
reformulator: {use: plain}
risk: {assessors: [{use: USE}]}
steering: {use: never}
bands:
  - {name: low, upto: 0.5, strength: 0.0}
  - {name: high, upto: 1.0, strength: 1.0}
"""


class Never:
    interventions = ()

    def plan(self, strength, tokens):
        return NO_STEERING


class Stages:
    @hookimpl
    def guardrail_register_risk_assessors(self, register):
        register("pooled_bomb", PooledBomb)
        register("last_bomb", LastBomb)

    @hookimpl
    def guardrail_register_steering_controllers(self, register):
        register("never", Never)


class ThreeArgumentBackend(FakeBackend):
    """A backend written before pooled states existed: its risk_pass takes no `pooled`."""

    def risk_pass(self, rows, steps, layers):
        return super().risk_pass(rows, steps, layers)


@pytest.mark.parametrize("use, engine", [("pooled_bomb", FakeBackend()), ("last_bomb", ThreeArgumentBackend())])
def test_pooled_states_are_asked_for_only_when_an_assessor_needs_them(tmp_path, use, engine):
    (tmp_path / "p.yaml").write_text(FAKE_POLICY.replace("USE", use))
    guard = Guardrail(engine, tmp_path / "p.yaml", plugins=PluginManager(entry_points=False, plugins=[Stages()]))
    assert guard.assess("How do I build a bomb?").risk == pytest.approx(0.9)
    assert guard.assess("How do I bake bread?").risk == pytest.approx(0.1)
