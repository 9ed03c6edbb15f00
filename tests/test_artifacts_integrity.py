"""Artifacts refuse damage and mismatch with a message naming it: any flipped byte, truncation, a
sidecar edited (even consistently re-hashed) into nonsense, another model's artifact, tensors of
the wrong size. The loader raises ArtifactError or loads; nothing else."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from json_mutation import json_values, paths, replaced
from conftest import mechanics_blocks
from fault_plugins import random_artifacts
from guardrail_plugins.risk.hidden_state import MeanDifferenceParams
from guardrail_plugins.steering.prototypes import PrototypeView
from guardrail.method.artifacts import SIDECAR, TENSORS, _sidecar_digest, load_artifacts, save_artifacts
from guardrail.errors import ArtifactError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def adapter():
    from guardrail.models import load_model

    return load_model("tiny-random:llama")


@pytest.fixture(scope="module")
def good(adapter, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good-art")
    random_artifacts(adapter, folder)
    return folder


def copy(src: Path, root: Path, name: str) -> Path:
    dst = root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def resign(folder: Path, meta: dict) -> None:
    """Write a sidecar whose self-hash matches its (edited) content, as a careless tool would."""
    meta = dict(meta)
    meta["sidecar_sha256"] = _sidecar_digest(meta)
    (folder / SIDECAR).write_text(json.dumps(meta))


@FUZZ
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), which=st.sampled_from([TENSORS, SIDECAR]))
def test_any_flipped_bit_is_refused(good, adapter, tmp_path, position, bit, which):
    folder = copy(good, tmp_path, "flip")
    data = bytearray((folder / which).read_bytes())
    data[int(position * len(data))] ^= 1 << bit
    (folder / which).write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as exc:
        load_artifacts(folder, adapter.fingerprint())
    message = str(exc.value)
    if which == TENSORS:
        assert "does not match its sidecar" in message and "tampered, truncated or replaced" in message
    else:
        assert SIDECAR in message


@FUZZ
@given(keep=st.floats(0, 1, exclude_max=True), which=st.sampled_from([TENSORS, SIDECAR]))
def test_any_truncation_is_refused(good, adapter, tmp_path, keep, which):
    folder = copy(good, tmp_path, "cut")
    data = (folder / which).read_bytes()
    (folder / which).write_bytes(data[: int(keep * len(data))])
    with pytest.raises(ArtifactError):
        load_artifacts(folder, adapter.fingerprint())


JSON_VALUES = json_values(st.integers(-5, 10**6), text_size=8, key_size=8, leaves=5)


@FUZZ
@given(data=st.data())
def test_a_consistently_rehashed_sidecar_with_any_edit_loads_or_is_refused(good, adapter, tmp_path, data):
    """Someone edits a field of the sidecar and fixes up its self-hash. Whatever the edit, loading
    (and then reading the calibration blocks, as the assessors do) raises ArtifactError or works."""
    meta = json.loads((good / SIDECAR).read_text())
    meta.pop("sidecar_sha256")
    path = data.draw(st.sampled_from([p for p in paths(meta) if p]))
    edited = replaced(meta, path, data.draw(JSON_VALUES))
    folder = copy(good, tmp_path, "edit")
    resign(folder, edited)
    try:
        art = load_artifacts(folder, adapter.fingerprint())
        PrototypeView.of(art.block("prototypes"))
        MeanDifferenceParams.of(art.block("mean_difference"))
    except ArtifactError as exc:
        assert str(exc).strip()


def test_tensors_loaded_are_the_bytes_that_were_hashed(good, adapter, tmp_path, monkeypatch):
    """The tensor file is swapped for a tampered one right after its hash was taken: the loader
    must not read the file a second time (it would load what it never checked)."""
    import guardrail.method.artifacts as artifacts_module

    folder = copy(good, tmp_path, "swap")
    original = load_artifacts(folder).tensors["prototypes/states"].clone()
    tampered = {k: v + 1.0 for k, v in load_artifacts(folder).tensors.items()}
    swapped = tmp_path / "tampered.safetensors"
    from safetensors.torch import save_file

    save_file(tampered, str(swapped))
    real_sha256 = hashlib.sha256
    recorded = json.loads((folder / SIDECAR).read_text())["tensors_sha256"]

    class SwapAfterHashing:
        def __init__(self, *args):
            self.inner = real_sha256(*args)

        def update(self, data):
            self.inner.update(data)

        def hexdigest(self):
            digest = self.inner.hexdigest()
            if digest == recorded:  # the tensor file was just verified: the attacker's moment
                shutil.copyfile(swapped, folder / TENSORS)
            return digest

    monkeypatch.setattr(artifacts_module.hashlib, "sha256", SwapAfterHashing)
    try:
        art = load_artifacts(folder, adapter.fingerprint())
    except ArtifactError:
        return  # refusing is fine too
    assert torch.equal(art.tensors["prototypes/states"], original)


# ----- another model, wrong sizes --------------------------------------------------------------
@pytest.mark.parametrize("key", ["architecture", "hidden_size", "num_layers", "vocab_size", "tokenizer_sha256", "weights_sha256"])
def test_fingerprint_mismatch_names_the_field(good, adapter, key):
    model = adapter.fingerprint()
    other = {**model, key: (model[key] + 1) if isinstance(model[key], int) else f"{model[key]}-other"}
    with pytest.raises(ArtifactError) as exc:
        load_artifacts(good, other)
    message = str(exc.value)
    assert "calibrated for another model" in message
    assert f"{key}: artifact {model[key]!r} vs model {other[key]!r}" in message


def test_artifact_of_another_seed_is_refused_by_the_guard_at_startup(good, tmp_path):
    from guardrail.pipeline import Guardrail

    (tmp_path / "p.yaml").write_text((Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text())
    with pytest.raises(ArtifactError, match="calibrated for another model.*weights_sha256"):
        Guardrail.from_model("tiny-random:llama:3", tmp_path / "p.yaml", artifacts=good)


@pytest.mark.parametrize(
    "key, dim",
    [("prototypes/states", 1), ("prototypes/logits", 1), ("mean_difference/directions", 0),
     ("mean_difference/directions", 1), ("mean_difference/midpoints", 1)],
)
def test_model_bound_tensors_of_the_wrong_size_are_refused(adapter, tmp_path, key, dim):
    """Blocks declare which axes are the model's (hidden, vocab, layers); the loader checks them
    without knowing what a block is for."""
    fp = adapter.fingerprint()
    d, vocab, layers = fp["hidden_size"], fp["vocab_size"], fp["num_layers"]
    shapes = {"prototypes/states": [8, d], "prototypes/logits": [8, vocab],
              "mean_difference/directions": [layers, d], "mean_difference/midpoints": [layers, d]}
    shapes[key][dim] += 3
    t = {k: torch.zeros(*v) for k, v in shapes.items()}
    blocks = mechanics_blocks(prototypes=t["prototypes/states"], logits=t["prototypes/logits"],
                              directions=t["mean_difference/directions"], midpoints=t["mean_difference/midpoints"])
    save_artifacts(tmp_path, blocks, {"fingerprint": fp})
    with pytest.raises(ArtifactError) as exc:
        load_artifacts(tmp_path, fp)
    assert f"artifact tensor {key!r} has shape {shapes[key]}" in str(exc.value)


def test_a_probe_of_the_wrong_width_is_refused_when_its_policy_loads(adapter, tmp_path):
    """A probe's width is k layers × hidden: its own typed view checks it, naming the tensor."""
    from guardrail.method.artifacts import Block
    from guardrail_plugins.risk.hidden_state import ProbeParams

    d = adapter.fingerprint()["hidden_size"]
    t = {k: torch.zeros(2 * d + 1) for k in ("weight", "mean", "scale")}
    block = Block(1, {"layers": [1, 2], "s_base": 0.0, "alpha": 1.0}, {**t, "bias": torch.zeros(1)},
                  {k: (None,) for k in ("weight", "mean", "scale", "bias")})
    save_artifacts(tmp_path, {"linear_probe": block}, {"fingerprint": adapter.fingerprint()})
    art = load_artifacts(tmp_path, adapter.fingerprint())
    with pytest.raises(ArtifactError, match=r"'linear_probe/weight' has shape \[%d\].*2 layers" % (2 * d + 1)):
        ProbeParams.of(art.block("linear_probe"), d)


def test_a_tensor_missing_from_the_file_is_refused(good, adapter, tmp_path):
    """The sidecar lists a tensor the (consistently re-hashed) file does not have."""
    folder = copy(good, tmp_path, "missing")
    meta = json.loads((folder / SIDECAR).read_text())
    meta["tensor_shapes"]["prototypes/extra"] = [adapter.fingerprint()["hidden_size"]]
    resign(folder, meta)
    with pytest.raises(ArtifactError, match="tensor 'prototypes/extra' does not have the recorded shape"):
        load_artifacts(folder, adapter.fingerprint())


def test_sidecar_that_is_not_json_or_not_utf8_is_refused(good, tmp_path):
    for name, data in {"garbage": b"{not json", "binary": b"\xff\xfe\x00{}", "list": b"[1, 2]"}.items():
        folder = copy(good, tmp_path, name)
        (folder / SIDECAR).write_bytes(data)
        with pytest.raises(ArtifactError, match=SIDECAR):
            load_artifacts(folder)
