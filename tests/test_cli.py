"""`guardrail calibrate` then `guardrail generate --json`, for every family."""

from __future__ import annotations

import json

import pytest

from conftest import FAMILIES, REPO, red_image
from guardrail.cli import main

JSON_KEYS = {"text", "token_ids", "risk", "band", "strength", "tenant", "policy", "policy_hash", "visual_context", "timings_ms"}


@pytest.fixture(scope="module")
def small_lists(tmp_path_factory):
    from guardrail.calibration import packaged_prompts

    d = tmp_path_factory.mktemp("lists")
    (d / "harmful.txt").write_text("\n".join(packaged_prompts("harmful")[:6]))
    (d / "benign.txt").write_text("\n".join(packaged_prompts("benign")[:6]))
    return d


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrate_then_generate_json(family, tmp_path, small_lists, capsys):
    out = tmp_path / "art"
    # Short prompt lists keep this fast; the packaged lists differ only in length.
    args = ["calibrate", "--model", f"tiny-random:{family}", "--out", str(out), "--no-progress",
            "--harmful", str(small_lists / "harmful.txt"), "--benign", str(small_lists / "benign.txt")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # random weights never refuse: said once, in the summary (not again as a Python warning)
    assert "artifacts written to" in printed and "WARNING: the prototypes' argmax tokens" in printed
    image = tmp_path / "x.png"
    red_image((64, 48)).save(image)
    assert main([
        "generate", "--model", f"tiny-random:{family}", "--artifacts", str(out),
        "--policy", str(REPO / "policies" / "default.yaml"), "--image", str(image),
        "--prompt", "What does this picture show?", "--max-new-tokens", "5", "--json",
    ]) == 0
    result = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(result)
    assert result["policy"] == "default" and 0.0 <= result["risk"] <= 1.0
    assert len(result["token_ids"]) <= 5
    if family == "llama":
        assert result["visual_context"].startswith("The image shows")  # OCR for a text-only model
    # VLMs caption with their own (random) weights, which may say nothing at all.


def test_generate_with_a_tenant_and_forced_strength(tmp_path, small_lists, capsys):
    out = tmp_path / "art"
    main(["calibrate", "--model", "tiny-random:llama", "--out", str(out), "--no-progress",
          "--harmful", str(small_lists / "harmful.txt"), "--benign", str(small_lists / "benign.txt")])
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-random:llama", "--artifacts", str(out), "--policies", str(REPO / "policies"),
                 "--tenant", "research-lab", "--prompt", "hello", "--force-strength", "1", "--max-new-tokens", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tenant"] == "research-lab" and result["policy"] == "permissive"
    assert result["strength"] == 1.0 and result["action"] == "forced"


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", "no/such/model", "--policy", str(REPO / "policies" / "default.yaml"),
                 "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("guardrail: error: model 'no/such/model' not found")
