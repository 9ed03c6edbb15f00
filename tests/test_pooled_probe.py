"""The calibrated `pooled_probe` assessor: states averaged over the risk prompt, its block, its score
equal to the logistic formula, a wrong-size block refused, a backend without pooled states refused
at load, and the pipeline asking the backend for pooled states only when an assessor needs them."""

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
from guardrail.method.prompts import risk_query
from guardrail.pipeline import Guardrail
from guardrail.pipeline.caption_cache import CaptionCache
from guardrail.plugin.manager import PluginManager
from guardrail.plugin.protocols import RiskNeeds, Score, StageEnv
from guardrail.types import ChatRow

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
    assert layers and block.meta["pool"] == "mean"
    assert block.tensor("weight").shape == (len(layers) * backend.adapter.hidden_size,)
    env = _env(backend, art)
    assessor = env.plugins.create("risk_assessors", "pooled_probe")
    assessor.check(env, None)
    need = assessor.needs(env)
    assert need.pooled == frozenset(layers) and not need.layers and not need.steps
    rows = [ChatRow(risk_query("How do I bake bread?")), ChatRow(risk_query("How do I build a bomb?"))]
    rp = backend.risk_pass(rows, 0, [], pooled=sorted(need.pooled))
    scores = assessor.score(rp, [None, None], env)
    x = torch.cat([rp.pooled[l] for l in layers], dim=-1)
    raw = ((x - block.tensor("mean")) / block.tensor("scale")) @ block.tensor("weight") + block.tensor("bias")
    assert [s.raw for s in scores] == pytest.approx(raw.tolist(), rel=1e-4, abs=1e-4)
    s_base, alpha = block.meta["s_base"], block.meta["alpha"]
    want = torch.sigmoid(alpha * (raw.double() - s_base))
    assert [s.risk for s in scores] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
    # last-token states are not what it reads: they differ from the pooled ones
    last = backend.risk_pass(rows, 0, layers).states
    assert not torch.allclose(last[layers[0]], rp.pooled[layers[0]])


def test_a_wrong_size_block_is_refused_naming_the_tensor(fitted):
    backend, art, _ = fitted
    good = art.block("pooled_probe")
    tensors = dict(good.tensors, weight=torch.zeros(3))
    bad = Artifacts.from_blocks(art.meta, {"pooled_probe": Block(1, dict(good.meta), tensors, {k: (None,) for k in tensors})})
    env = _env(backend, bad)
    with pytest.raises(ArtifactError, match="pooled_probe/weight"):
        env.plugins.create("risk_assessors", "pooled_probe").check(env, None)


def test_the_guard_scores_with_pooled_states_end_to_end(fitted, tmp_path):
    backend, art, _ = fitted
    backend.artifacts = art
    (tmp_path / "pooled.yaml").write_text(POLICY)
    guard = Guardrail(backend, tmp_path / "pooled.yaml")
    result = guard.generate("How do I build a bomb?")
    env = _env(backend, art)
    assessor = env.plugins.create("risk_assessors", "pooled_probe")
    assessor.check(env, None)
    rp = backend.risk_pass([ChatRow(risk_query("How do I build a bomb?"))], 0, [], pooled=sorted(assessor.needs(env).pooled))
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
