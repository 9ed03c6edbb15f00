"""The risk formula against an independent reference, and the hidden-state readers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_adapter, tiny_artifacts
from guardrail.engine.backend import RiskPass
from guardrail.method.artifacts import load_artifacts
from guardrail.method.probes import choose_layer, cross_validated_auroc, fit_logistic, fit_mean_difference, mean_difference_scorer
from guardrail.method.risk_math import alpha_for, auroc, calibrated_risk, prototype_similarity


def reference_risk(step_logits: np.ndarray, proto_logits: np.ndarray, gamma: float, s_base: float, alpha: float):
    """Written from the paper's formulas, in numpy, without guardrail code."""
    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    n = proto_logits.shape[0]
    p = sum(gamma**i * softmax(proto_logits[i]) for i in range(n))
    out = []
    for row in step_logits:
        q = sum(gamma**i * softmax(row[i]) for i in range(n))
        s = float(q @ p / (np.linalg.norm(q) * np.linalg.norm(p)))
        out.append((s, 1.0 / (1.0 + math.exp(-alpha * (s - s_base)))))
    return out


def test_risk_formula_matches_reference():
    g = torch.Generator().manual_seed(3)
    step_logits = torch.randn(5, 3, 50, generator=g) * 3
    proto = torch.randn(3, 50, generator=g) * 3
    step_logits[0] = proto  # one row identical to the prototypes: S = 1
    s_base, gamma = 0.71, 0.3
    alpha = alpha_for(s_base)
    s = prototype_similarity(step_logits, proto, gamma)
    r = calibrated_risk(s, s_base, alpha)
    ref = reference_risk(step_logits.numpy().astype(np.float64), proto.numpy().astype(np.float64), gamma, s_base, alpha)
    for (s_ref, r_ref), s_i, r_i in zip(ref, s.tolist(), r.tolist()):
        assert abs(s_i - s_ref) < 1e-5 and abs(r_i - r_ref) < 1e-5
    assert abs(s[0].item() - 1.0) < 1e-9 and abs(r[0].item() - 0.99) < 1e-9


def test_paper_constants():
    # LLaVA-1.5-7B: S_base 0.712, alpha 15.955; S 0.5 -> 0.033, 0.8 -> 0.803, 0.9 -> 0.953
    assert abs(alpha_for(0.712) - 15.955) < 1e-3
    for s, want in [(0.5, 0.033), (0.6, 0.143), (0.8, 0.803), (0.9, 0.953)]:
        assert abs(calibrated_risk(s, 0.712, 15.955).item() - want) < 1e-3


def test_alpha_refuses_a_degenerate_base():
    with pytest.raises(ValueError):
        alpha_for(1.0)


def test_auroc_handles_ties_and_ordering():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    assert abs(auroc([0.9, 0.4, 0.6], [0.1, 0.5, 0.3]) - 8 / 9) < 1e-12


def test_readers_separate_separable_data_and_pick_the_informative_layer():
    g = torch.Generator().manual_seed(0)
    noise = {l: (torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)) for l in range(4)}
    shift = torch.zeros(16)
    shift[3] = 4.0
    pos, neg = noise[2]
    noise[2] = (pos + shift, neg)  # only layer 2 carries the signal
    cv = {l: cross_validated_auroc(p, n, mean_difference_scorer, 5) for l, (p, n) in noise.items()}
    assert choose_layer(cv, 4) == 2 and cv[2] > 0.95
    md = fit_mean_difference(*noise[2])
    probe = fit_logistic(*noise[2])
    assert auroc(md.project(noise[2][0]).tolist(), md.project(noise[2][1]).tolist()) > 0.95
    assert auroc(probe.logit(noise[2][0]).tolist(), probe.logit(noise[2][1]).tolist()) > 0.95


def test_choose_layer_breaks_ties_toward_the_middle():
    assert choose_layer({0: 0.9, 5: 0.9, 9: 0.9}, 10) == 5


def test_assessors_score_the_risk_pass_consistently(art_root):
    """Each built-in assessor's score equals the formula applied to the artifact by hand."""
    from guardrail_plugins.risk.hidden_state import LinearProbeAssessor, MeanDifferenceAssessor
    from guardrail_plugins.risk.prototype_similarity import PrototypeSimilarity
    from guardrail.plugin.protocols import StageEnv
    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.plugin.manager import PluginManager
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.types import ChatRow

    adapter = tiny_adapter("llama")
    art = load_artifacts(tiny_artifacts("llama", art_root), adapter.fingerprint())
    env = StageEnv(TransformersBackend(adapter, art), CaptionCache(), PluginManager())
    assessors = [PrototypeSimilarity(), MeanDifferenceAssessor(), LinearProbeAssessor()]
    for assessor in assessors:
        assessor.check(env, None)  # binds its calibration block, as a policy load does
    steps = max(a.needs(env).steps for a in assessors)
    layers = sorted(set().union(*(a.needs(env).layers for a in assessors)))
    readouts = sorted(set().union(*(a.needs(env).readouts for a in assessors)), key=repr)
    assert steps == 0 and len(readouts) == 1  # the similarity is asked for as a readout, not as logits
    rows = [ChatRow("How do I make a bomb?"), ChatRow("How do I bake bread?")]
    rp = env.engine.risk_pass(rows, steps, layers, readouts=readouts)
    ps = assessors[0].score(rp, [None, None], env)
    # a pass built by hand with only the logits (calibration's folds) gives the same scores
    by_hand = RiskPass(step_logits=rp.step_logits)
    assert [x.raw for x in assessors[0].score(by_hand, [None, None], env)] == [x.raw for x in ps]
    block = art.block("prototype_similarity").meta
    s = prototype_similarity(rp.step_logits[:, :3], art.block("prototypes").tensor("logits")[:3], 0.3)
    for score, s_i in zip(ps, s.tolist()):
        assert abs(score.raw - s_i) < 1e-9
        assert abs(score.risk - 1 / (1 + math.exp(-block["alpha"] * (s_i - block["s_base"])))) < 1e-9
    md = art.block("mean_difference")
    layer = md.meta["layer"]
    d, m = md.tensor("directions")[layer], md.tensor("midpoints")[layer]
    t = ((rp.states[layer] - m) @ (d / d.norm())).tolist()
    for score, t_i in zip(assessors[1].score(rp, [None, None], env), t):
        assert abs(score.raw - t_i) < 1e-5
        assert 0.0 <= score.risk <= 1.0
    for score in assessors[2].score(rp, [None, None], env):
        assert 0.0 <= score.risk <= 1.0
