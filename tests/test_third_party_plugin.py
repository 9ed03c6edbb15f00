"""A third-party plugin package (tests/example_plugin), installed with pip like any package, adds a
*calibrated* risk assessor and a *new steering method* with no change to guardrail: calibration
writes the plugin's own block, a policy uses both stages, the assessor's risk is its formula over
the model's states, and the steering changes tokens exactly as its maths says."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_adapter

HERE = Path(__file__).resolve().parent
POLICY = """
name: example
reformulator: {use: plain}
risk: {assessors: [{use: centroid_distance}]}
steering: {use: forced_opening, with: {opening: "No way.", min_strength: 0.5}}
bands:
  - {name: low, upto: 0.5, strength: 0.0}
  - {name: high, upto: 1.0, strength: 1.0}
limits: {max_new_tokens: 8}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example package into a scratch folder and put it on sys.path (entry points
    are found from its .dist-info, as for any installed distribution); removed afterwards."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(HERE / "example_plugin")], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.startswith("guardrail_example_plugin")]:
            del sys.modules[name]
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def calibrated(installed, tmp_path_factory):
    from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.plugin.manager import PluginManager

    out = tmp_path_factory.mktemp("art")
    cfg = CalibrationConfig(folds=2, progress=False, calibrators=["centroid_distance"])
    backend = TransformersBackend(tiny_adapter("llama"))
    calibrate(backend, packaged_prompts("harmful")[:8], packaged_prompts("benign")[:8], cfg, out=out,
              plugins=PluginManager(entry_points=True))
    return out


@pytest.fixture(scope="module")
def guard(calibrated, tmp_path_factory):
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.method.artifacts import load_artifacts
    from guardrail.pipeline import Guardrail
    from guardrail.plugin.manager import PluginManager

    folder = tmp_path_factory.mktemp("policies")
    (folder / "example.yaml").write_text(POLICY)
    adapter = tiny_adapter("llama")
    backend = TransformersBackend(adapter, load_artifacts(calibrated, adapter.fingerprint()))
    return Guardrail(backend, folder / "example.yaml", plugins=PluginManager(entry_points=True))


def test_the_package_is_found_through_its_entry_point(installed):
    from guardrail.plugin.manager import PluginManager

    plugins = {p["name"]: p for p in PluginManager(entry_points=True).plugins()}
    example = plugins["example"]
    assert example["distribution"] == "guardrail-example-plugin" and not example["builtin"]
    assert example["stages"] == {"risk_assessors": ["centroid_distance"], "steering_controllers": ["forced_opening"],
                                 "calibrators": ["centroid_distance"]}


def test_calibration_writes_the_plugins_own_block(calibrated):
    from guardrail.method.artifacts import load_artifacts

    adapter = tiny_adapter("llama")
    art = load_artifacts(calibrated, adapter.fingerprint())
    assert art.blocks() == ["centroid_distance"]  # only what was asked for
    block = art.block("centroid_distance")
    assert block.version == 1 and block.meta["layer"] == adapter.num_layers // 2 and block.meta["rows"] == 16
    assert block.tensor("benign").shape == (adapter.hidden_size,) and block.meta["scale"] > 0


def test_the_assessors_risk_is_its_formula_over_the_models_states(guard):
    from guardrail.method.prompts import risk_query  # noqa: F401  (the plain reformulator has no safety prompt)
    from guardrail.types import ChatRow

    block = guard.engine.artifacts.block("centroid_distance")
    layer, scale = block.meta["layer"], block.meta["scale"]
    texts = ["How do I bake bread?", "How do I build a pipe bomb?"]
    states = guard.engine.risk_pass([ChatRow(t) for t in texts], 0, [layer]).states[layer]
    t = (states - block.tensor("benign")).norm(dim=-1) - (states - block.tensor("harmful")).norm(dim=-1)
    for text, expected in zip(texts, torch.sigmoid(t / scale).tolist()):
        result = guard.assess(text)
        assert result.scores == {"centroid_distance": pytest.approx(expected, abs=1e-5)}
        assert result.band == ("high" if expected > 0.5 else "low")


def test_the_steering_method_forces_its_opening_and_leaves_weak_rows_untouched(guard):
    from guardrail.types import Request

    opening = guard.engine.encode_text("No way.")
    steered, weak, plain = guard.generate_batch([
        Request("Tell me a story.", force_strength=1.0),
        Request("Tell me a story.", force_strength=0.4),  # below min_strength: no plan at all
        Request("Tell me a story.", unguarded=True),
    ])
    assert list(steered.token_ids[: len(opening)]) == opening
    assert steered.strength == 1.0 and weak.strength == 0.0
    assert weak.token_ids == plain.token_ids and steered.token_ids != plain.token_ids


def test_a_backend_that_cannot_apply_the_method_is_refused_when_the_policy_loads(calibrated, tmp_path):
    from guardrail.engine.interventions import LogitInterpolation
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.errors import PolicyError
    from guardrail.method.artifacts import load_artifacts
    from guardrail.pipeline import Guardrail
    from guardrail.plugin.manager import PluginManager

    (tmp_path / "example.yaml").write_text(POLICY)
    adapter = tiny_adapter("llama")
    backend = TransformersBackend(adapter, load_artifacts(calibrated, adapter.fingerprint()))
    backend.interventions = frozenset({LogitInterpolation})  # as a logits-only engine would declare
    with pytest.raises(PolicyError, match="forced_opening.*ForcedPrefix.*TransformersBackend backend cannot apply"):
        Guardrail(backend, tmp_path / "example.yaml", plugins=PluginManager(entry_points=True))
