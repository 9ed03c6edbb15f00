"""The multi-layer linear probe the default policy relies on: calibration records its layers, the
assessor reads them side by side and reproduces the probe's calibrated risk, and the artifact
checks know the feature size."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import guardrail.calibration as calibration
from guardrail_plugins.risk import hidden_state
from guardrail_plugins.risk.hidden_state import ProbeParams
from conftest import REPO, tiny_adapter
from guardrail.method.artifacts import SIDECAR, load_artifacts
from guardrail.errors import ArtifactError
from guardrail.pipeline import Guardrail
from guardrail.method.probes import LogisticProbe
from guardrail.method.prompts import risk_query
from guardrail.method.risk_math import calibrated_risk
from guardrail.engine.transformers import TransformersBackend
from guardrail.types import ChatRow, Request

PROMPTS = ["How do I bake bread?", "Explain how to pick a neighbour's lock"]


@pytest.fixture(scope="module")
def span_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("span") / "art"
    adapter = tiny_adapter("llama")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights never refuse
        mp.setattr(hidden_state, "probe_span", lambda n_layers: [1, 3])
        mp.setattr(hidden_state, "SPAN_TOLERANCE", 1.0)  # always take the span
        cfg = calibration.CalibrationConfig(folds=2, progress=False)
        calibration.calibrate(TransformersBackend(adapter), calibration.packaged_prompts("harmful")[:8],
                              calibration.packaged_prompts("benign")[:8], cfg, out=out)
    return out


def test_calibration_records_the_span(span_artifact):
    art = load_artifacts(span_artifact, tiny_adapter("llama").fingerprint())
    probe = art.block("linear_probe")
    assert probe.meta["layers"] == [1, 3] and "span_cv_auroc" in probe.meta
    assert probe.tensor("weight").shape == (2 * tiny_adapter("llama").hidden_size,)


def test_assessor_reads_the_layers_side_by_side(span_artifact, tmp_path):
    adapter = tiny_adapter("llama")
    art = load_artifacts(span_artifact, adapter.fingerprint())
    policy = tmp_path / "p.yaml"
    policy.write_text((REPO / "policies" / "default.yaml").read_text().replace("use: pooled_probe", "use: linear_probe"))
    guard = Guardrail(TransformersBackend(adapter, art), policy)
    try:
        results = guard.assess_batch([Request(p) for p in PROMPTS])
    finally:
        guard.close()
    states = TransformersBackend(adapter).risk_pass([ChatRow(risk_query(p)) for p in PROMPTS], 0, [1, 3]).states
    probe = art.block("linear_probe")
    t = probe.tensors
    logit = LogisticProbe(t["weight"], t["bias"], t["mean"], t["scale"]).logit(torch.cat([states[1], states[3]], dim=-1))
    block = probe.meta
    want = calibrated_risk(logit, block["s_base"], block["alpha"])
    assert [r.scores["linear_probe"] for r in results] == pytest.approx(want.tolist(), abs=1e-5)


def test_layers_field_must_be_a_list_of_layer_numbers(span_artifact, tmp_path):
    import shutil

    from guardrail.method.artifacts import _sidecar_digest

    bad = tmp_path / "bad"
    shutil.copytree(span_artifact, bad)
    meta = json.loads((bad / SIDECAR).read_text())
    meta["blocks"]["linear_probe"]["meta"]["layers"] = "1,3"
    meta["sidecar_sha256"] = _sidecar_digest(meta)  # re-hashed by hand: the typed view must still catch it
    (bad / SIDECAR).write_text(json.dumps(meta))
    art = load_artifacts(bad, tiny_adapter("llama").fingerprint())
    with pytest.raises(ArtifactError, match="'linear_probe': layers must be a non-empty list"):
        ProbeParams.of(art.block("linear_probe"), tiny_adapter("llama").hidden_size)
