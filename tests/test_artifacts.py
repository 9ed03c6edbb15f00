"""Calibration artifacts: round trip, model mismatch, tampering, shapes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import mechanics_blocks, tiny_adapter, tiny_artifacts
from guardrail.method.artifacts import SIDECAR, TENSORS, load_artifacts, save_artifacts
from guardrail.errors import ArtifactError


def test_round_trip_keeps_blocks_tensors_and_meta(tmp_path):
    states, logits = torch.randn(3, 8), torch.randn(3, 20)
    save_artifacts(tmp_path, mechanics_blocks(prototypes=states, logits=logits), {"fingerprint": {"hidden_size": 8}})
    art = load_artifacts(tmp_path)
    block = art.block("prototypes")
    assert torch.equal(block.tensor("states"), states) and torch.equal(block.tensor("logits"), logits)
    assert block.version == 1 and block.meta == {"method": "test"}
    assert art.meta["fingerprint"] == {"hidden_size": 8}
    assert len(art.meta["tensors_sha256"]) == 64


def test_calibration_artifact_loads_for_its_model(art_root):
    adapter = tiny_adapter("llama")
    art = load_artifacts(tiny_artifacts("llama", art_root), adapter.fingerprint())
    meta = art.meta
    for key in ("fingerprint", "steps", "gamma", "blocks", "data", "library_version", "tensors_sha256"):
        assert key in meta
    assert meta["steps"] == 3 and meta["gamma"] == 0.3
    # one block per registered calibrator, each written by the plugin that reads it
    assert set(art.blocks()) == {"prototypes", "prototype_similarity", "mean_difference", "linear_probe", "mahalanobis",
                                 "pooled_probe"}
    protos = art.block("prototypes")
    assert protos.tensor("states").shape == (16, adapter.hidden_size)
    assert protos.tensor("logits").shape == (16, adapter.vocab_size)
    assert len(protos.meta["tokens"]) == 16


def test_artifact_of_another_model_is_refused(art_root):
    llava = tiny_adapter("llava")
    with pytest.raises(ArtifactError, match="calibrated for another model.*architecture"):
        load_artifacts(tiny_artifacts("llama", art_root), llava.fingerprint())


def test_same_architecture_other_weights_is_refused(art_root):
    from guardrail.models import load_model

    other_seed = load_model("tiny-random:llama:7")
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_artifacts(tiny_artifacts("llama", art_root), other_seed.fingerprint())


def test_flipped_byte_and_truncation_are_refused(art_root, tmp_path):
    src = tiny_artifacts("llama", art_root)
    for damage in ("flip", "truncate"):
        dst = tmp_path / damage
        shutil.copytree(src, dst)
        data = bytearray((dst / TENSORS).read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        else:
            data = data[: len(data) - 100]
        (dst / TENSORS).write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="does not match its sidecar"):
            load_artifacts(dst, tiny_adapter("llama").fingerprint())


def test_edited_sidecar_is_refused(art_root, tmp_path):
    dst = tmp_path / "edited"
    shutil.copytree(tiny_artifacts("llama", art_root), dst)
    meta = json.loads((dst / SIDECAR).read_text())
    meta["blocks"]["prototype_similarity"]["meta"]["s_base"] = 0.0
    (dst / SIDECAR).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="modified after calibration"):
        load_artifacts(dst)


def test_wrong_size_steering_tensor_is_refused(tmp_path):
    adapter = tiny_adapter("llama")
    fp = adapter.fingerprint()
    blocks = mechanics_blocks(prototypes=torch.randn(3, fp["hidden_size"] + 1), logits=torch.randn(3, fp["vocab_size"]))
    save_artifacts(tmp_path, blocks, {"fingerprint": fp})
    with pytest.raises(ArtifactError, match="'prototypes/states' has shape"):
        load_artifacts(tmp_path, fp)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        load_artifacts(tmp_path / "nope")
