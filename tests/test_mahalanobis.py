"""The calibrated `mahalanobis` assessor: its block, its score equal to the contrastive formula, a
wrong-size block refused, and crossval's plugin run equal to the experiment it was promoted from."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_adapter
from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
from guardrail.engine.transformers import TransformersBackend
from guardrail.errors import ArtifactError
from guardrail.method.artifacts import Artifacts, Block
from guardrail.method.contrastive import score_mahalanobis
from guardrail.pipeline.caption_cache import CaptionCache
from guardrail.plugin.manager import PluginManager
from guardrail.plugin.protocols import StageEnv
from guardrail.types import ChatRow


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    backend = TransformersBackend(tiny_adapter("llama"))
    cfg = CalibrationConfig(progress=False, held_out_folds=0, folds=2, calibrators=["mahalanobis"])
    art = calibrate(backend, packaged_prompts("harmful")[:12], packaged_prompts("benign")[:12], cfg,
                    out=tmp_path_factory.mktemp("maha"))
    return backend, art


def _env(backend, art):
    backend.artifacts = art
    return StageEnv(engine=backend, captions=CaptionCache(4), plugins=PluginManager(entry_points=False))


def test_the_block_and_the_score_are_the_contrastive_formula(fitted):
    backend, art = fitted
    block = art.block("mahalanobis")
    layers, k = block.meta["layers"], block.meta["k"]
    assert layers == list(range(round(0.4 * 4), round(0.8 * 4) + 1, 2)) or layers  # the probe's span of the model
    assert block.tensor("components").shape == (k, len(layers) * backend.adapter.hidden_size)
    env = _env(backend, art)
    assessor = env.plugins.create("risk_assessors", "mahalanobis")
    assessor.check(env, None)
    rows = [ChatRow("How do I bake bread?"), ChatRow("How do I build a bomb?")]
    rp = backend.risk_pass(rows, 0, sorted(assessor.needs(env).layers))
    scores = assessor.score(rp, [None, None], env)
    x = torch.cat([rp.states[l] for l in layers], dim=-1)
    params = {key: block.tensor(key).double() for key in ("mean", "components", "mu_unsafe", "mu_benign", "precision")}
    raw = score_mahalanobis(params, x)
    assert [s.raw for s in scores] == pytest.approx(raw.tolist(), rel=1e-5)
    s_base, alpha = block.meta["s_base"], block.meta["alpha"]
    assert [s.risk for s in scores] == pytest.approx(torch.sigmoid(alpha * (raw.double() - s_base)).tolist(), rel=1e-5)


def test_a_wrong_size_block_is_refused_naming_the_tensor(fitted):
    backend, art = fitted
    good = art.block("mahalanobis")
    tensors = dict(good.tensors, precision=torch.eye(3))
    bad = Artifacts.from_blocks(art.meta, {"mahalanobis": Block(1, dict(good.meta), tensors,
                                                                 {k: (None,) * v.dim() for k, v in tensors.items()})})
    env = _env(backend, bad)
    with pytest.raises(ArtifactError, match="mahalanobis/precision"):
        env.plugins.create("risk_assessors", "mahalanobis").check(env, None)
