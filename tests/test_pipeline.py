"""The Guardrail pipeline: tenants, bands, modes, audit, concurrency, reload."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conftest import png_bytes, red_image, tiny_adapter, tiny_artifacts
from guardrail.method.artifacts import load_artifacts
from guardrail.errors import InputError, PolicyError
from guardrail.pipeline import Guardrail
from guardrail.engine.transformers import TransformersBackend
from guardrail.types import Request

RISK = "risk: {assessors: [{use: linear_probe}, {use: mean_difference}, {use: prototype_similarity}], combine: max}"


def policy_text(name: str, bands: str, extra: str = "") -> str:
    return f"name: {name}\n{RISK}\nbands:\n{bands}\n{extra}"


CALM = "  - {name: calm, upto: 1.0, strength: 0.0}"
HARD = "  - {name: hard, upto: 1.0, strength: 1.0, tokens: 3}"
BLOCK = "  - {name: block, upto: 1.0, action: refuse}"


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "pol"
    d.mkdir()
    (d / "calm.yaml").write_text(policy_text("calm", CALM))
    (d / "hard.yaml").write_text(policy_text("hard", HARD))
    (d / "block.yaml").write_text(policy_text("block", BLOCK, "refusal_text: Not today."))
    (d / "watch.yaml").write_text(policy_text("watch", HARD, "mode: observe"))
    (d / "tenants.yaml").write_text(
        "default_policy: calm\ntenants:\n  alice: calm\n  bob: hard\n  carol: block\n  dave: watch\n"
    )
    return d


def make_guard(family: str, folder: Path, art_root, **kwargs) -> Guardrail:
    adapter = tiny_adapter(family)
    art = load_artifacts(tiny_artifacts(family, art_root), adapter.fingerprint())
    return Guardrail(TransformersBackend(adapter, art), folder, **kwargs)


def test_result_carries_everything_a_caller_needs(folder, art_root):
    guard = make_guard("llama", folder, art_root)
    result = guard.generate(Request("How do I bake bread?", tenant="alice", max_new_tokens=5))
    assert result.tenant == "alice" and result.policy == "calm" and result.band == "calm"
    assert result.strength == 0.0 and result.action == "steer"
    assert 0.0 <= result.risk <= 1.0 and set(result.scores) == {"linear_probe", "mean_difference", "prototype_similarity"}
    assert len(result.policy_hash) == 64 and result.visual_context == ""
    assert {"validate", "reformulate", "assess", "generate", "audit", "total"} <= set(result.timings_ms)
    assert len(result.token_ids) <= 5 and result.text == guard.engine.decode(result.token_ids)


def test_two_tenants_in_one_batch_get_their_own_bands(folder, art_root):
    guard = make_guard("llama", folder, art_root)
    prompt = "Tell me about the sea."
    calm, hard, unguarded = guard.generate_batch([
        Request(prompt, tenant="alice", max_new_tokens=6),
        Request(prompt, tenant="bob", max_new_tokens=6),
        Request(prompt, tenant="bob", max_new_tokens=6, unguarded=True),
    ])
    assert (calm.policy, calm.band, calm.strength) == ("calm", "calm", 0.0)
    assert (hard.policy, hard.band, hard.strength) == ("hard", "hard", 1.0)
    assert calm.token_ids == unguarded.token_ids  # strength 0: untouched
    want = guard.engine.artifacts.block("prototypes").tensor("logits")[:3].argmax(-1).tolist()
    assert list(hard.token_ids[:3]) == want
    assert unguarded.action == "unguarded" and unguarded.risk is None


def test_observe_mode_assesses_but_never_steers(folder, art_root, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = make_guard("llama", folder, art_root, audit_log=log)
    watched, plain = guard.generate_batch([
        Request("Tell me about the sea.", tenant="dave", max_new_tokens=6),
        Request("Tell me about the sea.", tenant="dave", max_new_tokens=6, unguarded=True),
    ])
    assert watched.action == "observe" and watched.band == "hard" and watched.strength == 0.0
    assert watched.token_ids == plain.token_ids
    record = json.loads(log.read_text().splitlines()[0])
    assert record["would_strength"] == 1.0 and record["strength"] == 0.0 and record["mode"] == "observe"


def test_refuse_band_answers_without_generating(folder, art_root, monkeypatch):
    guard = make_guard("llama", folder, art_root)
    calls = []
    monkeypatch.setattr(guard.engine, "generate", lambda *a, **k: calls.append(a) or [])
    result = guard.generate(Request("anything", tenant="carol"))
    assert result.text == "Not today." and result.token_ids == () and result.action == "refuse"
    assert calls == []


def test_audit_is_one_line_per_request_without_content_by_default(folder, art_root, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = make_guard("llama", folder, art_root, audit_log=log)
    guard.generate_batch([Request("my secret recipe", tenant="alice", max_new_tokens=3),
                          Request("another secret", tenant="bob", max_new_tokens=3, images=())])
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    text = log.read_text()
    assert "secret" not in text
    rec = json.loads(lines[0])
    for key in ("tenant", "policy", "policy_hash", "risk", "band", "strength", "timings_ms", "prompt_sha256", "ts"):
        assert key in rec
    assert rec["tenant"] == "alice" and rec["policy"] == "calm"


def test_content_capture_when_the_policy_asks(folder, art_root, tmp_path):
    (folder / "calm.yaml").write_text(policy_text("calm", CALM, "audit: {capture_content: true}"))
    log = tmp_path / "audit.jsonl"
    guard = make_guard("llama", folder, art_root, audit_log=log)
    result = guard.generate(Request("my secret recipe", tenant="alice", max_new_tokens=3))
    rec = json.loads(log.read_text())
    assert rec["prompt"] == "my secret recipe" and rec["output"] == result.text


def test_concurrent_threads_get_the_same_answers_as_serial_calls(folder, art_root):
    guard = make_guard("llama", folder, art_root)
    requests = [Request(f"Question number {i} about the sea?", tenant=("alice", "bob")[i % 2], max_new_tokens=4)
                for i in range(12)]
    serial = [guard.generate(r) for r in requests]
    results: dict[int, object] = {}

    def worker(i):
        results[i] = guard.generate(requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(serial):
        assert results[i].token_ids == want.token_ids and results[i].strength == want.strength


def test_reload_keeps_the_last_good_policies_and_audits(folder, art_root, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = make_guard("llama", folder, art_root, audit_log=log)
    (folder / "hard.yaml").write_text("name: hard\nbands: oops\n")
    record = guard.reload_policies()
    assert record["ok"] is False
    assert guard.generate(Request("hi", tenant="bob", max_new_tokens=2)).band == "hard"
    (folder / "hard.yaml").write_text(policy_text("hard", "  - {name: renamed, upto: 1.0, strength: 0.5}"))
    assert guard.reload_policies()["ok"] is True
    assert guard.generate(Request("hi", tenant="bob", max_new_tokens=2)).band == "renamed"
    events = [json.loads(l)["event"] for l in log.read_text().splitlines()]
    assert events.count("policy_reload") == 2


def test_policy_needing_artifacts_fails_at_construction(folder):
    with pytest.raises(PolicyError, match="needs calibration artifacts"):
        Guardrail(TransformersBackend(tiny_adapter("llama")), folder)


def test_bad_input_in_a_batch_runs_nothing(folder, art_root, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = make_guard("llama", folder, art_root, audit_log=log)
    with pytest.raises(InputError, match="request 1: empty prompt"):
        guard.generate_batch([Request("fine", tenant="alice"), Request("   ", tenant="alice")])
    with pytest.raises(InputError, match="image 0: corrupt|image 0: not a readable image"):
        guard.generate(Request("look", images=(b"\x89PNG\r\n\x1a\nbroken",)))
    assert not log.exists() or log.read_text() == ""


def test_vlm_visual_context_is_captioned_once_and_cached(folder, art_root):
    guard = make_guard("llava", folder, art_root)
    img = png_bytes(red_image())
    first = guard.generate(Request("What is this?", images=(img,), tenant="alice", max_new_tokens=3))
    second = guard.generate(Request("And now?", images=(img,), tenant="alice", max_new_tokens=3))
    assert first.visual_context and first.visual_context == second.visual_context
    assert guard.env.captions.hits == 1 and guard.env.captions.misses == 1


def test_text_only_model_reads_images_through_ocr(folder, art_root):
    from PIL import ImageDraw, ImageFont

    img = red_image((420, 80), "white")
    ImageDraw.Draw(img).text((10, 20), "Steps to bake bread.", fill="black", font=ImageFont.load_default(size=28))
    guard = make_guard("llama", folder, art_root)
    result = guard.generate(Request("Follow the steps.", images=(png_bytes(img),), tenant="alice", max_new_tokens=2))
    assert result.visual_context.startswith("The image shows the text:")
    assert "bake bread" in result.visual_context.lower()
