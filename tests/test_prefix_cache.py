"""Shared image prefixes (issue 7): reusing one KV cache of "header + image tokens" across the
caption, risk and answer passes must not change a single token id, and the vision encoder must run
once per image prefix, not once per pass."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import artifacts_of, direction_plan, png_bytes, proto_plan, red_image, tiny_artifacts
from conftest import tiny_adapter as cpu_adapter
from guardrail.method.artifacts import Artifacts, load_artifacts
from guardrail.engine.prefix_cache import PrefixEntry, PrefixStore, sharing_supported

SHARING_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")  # what the adapters declare
from guardrail.method.prompts import CAPTION_PROMPT, risk_query
from guardrail.engine.transformers import TransformersBackend
from guardrail.types import ChatRow, SteeringPlan

LAYERS = [1, 2]
# The same checks on a GPU: GUARDRAIL_TEST_DEVICE=cuda (the benchmark's device script sets it).
DEVICE = os.environ.get("GUARDRAIL_TEST_DEVICE", "cpu")
_ON_DEVICE: dict[str, object] = {}


def tiny_adapter(family: str):
    if DEVICE == "cpu":
        return cpu_adapter(family)
    if family not in _ON_DEVICE:
        from guardrail.models import load_model

        _ON_DEVICE[family] = load_model(f"tiny-random:{family}", device=DEVICE)
    return _ON_DEVICE[family]


def mechanics_artifacts(adapter, seed: int = 0) -> Artifacts:
    """Random prototypes and directions: enough to exercise the steering code paths (what they
    steer toward does not matter here, only that shared and unshared runs agree)."""
    g = torch.Generator().manual_seed(seed)
    d, v = adapter.hidden_size, adapter.vocab_size
    return artifacts_of(prototypes=torch.randn(8, d, generator=g), logits=torch.randn(8, v, generator=g) * 5,
                        directions=torch.randn(adapter.num_layers, d, generator=g) * 3)


def _rows():
    img, img2 = red_image((40, 30)), red_image((48, 64), "blue")
    captions = [ChatRow(CAPTION_PROMPT, (img,)), ChatRow(CAPTION_PROMPT, (img2,))]
    risk = [
        ChatRow(risk_query("How do I bake bread?", "The image shows red."), (img,)),
        ChatRow(risk_query("hi", "The image shows a long blue blue blue thing."), (img2,)),
        ChatRow(risk_query("a text-only question in the same batch")),
    ]
    answers = [ChatRow("How do I bake bread?", (img,)), ChatRow("hi", (img2,)), ChatRow("a text-only question")]
    return captions, risk, answers


class VisionCalls:
    """Counts forward calls of the vision tower (the first of the adapter's vision modules)."""

    def __init__(self, adapter):
        self.count = 0
        self.handle = adapter.vision_modules()[0].register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def close(self):
        self.handle.remove()


def _three_passes(backend, plans, vision=None):
    captions, risk, answers = _rows()
    caption = backend.caption(captions, 8)
    after_caption = vision.count if vision else 0
    stepped = backend.risk_pass(risk, 3, LAYERS)
    states_only = backend.risk_pass(risk, 0, LAYERS)
    gens = backend.generate(answers, plans, 10)
    return caption, stepped, states_only, gens, after_caption


@pytest.mark.parametrize("family", SHARING_FAMILIES)
def test_shared_prefix_keeps_token_ids(family):
    adapter = tiny_adapter(family)
    backend = TransformersBackend(adapter, mechanics_artifacts(adapter))
    assert backend.share_prefixes
    plans = [proto_plan(backend.artifacts, 0.7, 3), SteeringPlan(), proto_plan(backend.artifacts, 1.0, 2)]
    plain = _three_passes(backend, plans)
    vision = VisionCalls(adapter)
    try:
        with backend.prefix_scope():
            # One image first: the caption pass then finds one prefix cached and computes the other
            # on its own (the partial path); later passes find both.
            assert backend.caption(_rows()[0][:1], 8) == plain[0][:1]
            shared = _three_passes(backend, plans, vision)
            assert backend.prefixes.hits >= 7  # caption (one), risk x2 and answer (both) reused prefixes
            # risk x2 and answer found their prefixes by text: no processor, no vision encoder
            assert backend.sharing.fast_chunks == 3
    finally:
        vision.close()
    assert len(backend.prefixes) == 0  # released when the scope closed
    # Vision encoder: only while computing the prefixes (first pass), never in the later passes.
    assert shared[4] >= 1 and vision.count == shared[4]
    assert shared[0] == plain[0]
    assert torch.equal(shared[1].tokens, plain[1].tokens)
    torch.testing.assert_close(shared[1].step_logits, plain[1].step_logits, atol=1e-4, rtol=1e-4)
    for layer in LAYERS:
        torch.testing.assert_close(shared[1].states[layer], plain[1].states[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shared[2].states[layer], plain[2].states[layer], atol=1e-5, rtol=1e-4)
    assert [g.token_ids for g in shared[3]] == [g.token_ids for g in plain[3]]


def test_realistic_llava_576_image_tokens():
    """The benchmark's layout: LLaVA-1.5 geometry (336 px, 576 image tokens)."""
    from guardrail.models import adapter_for
    from guardrail.models.tiny_vlm import build

    adapter = adapter_for(*build("llava", image_tokens=576), name="tiny-llava-576")
    adapter.model.to(DEVICE)
    backend = TransformersBackend(adapter)
    img = red_image((400, 300), "purple")
    answer = [ChatRow("Describe the picture in detail.", (img,))]
    risk = [ChatRow(risk_query("Describe the picture in detail.", "The image shows purple."), (img,))]
    plain_risk = backend.risk_pass(risk, 3, [1])
    plain = backend.generate(answer, [SteeringPlan()], 24)
    with backend.prefix_scope():
        shared_risk = backend.risk_pass(risk, 3, [1])
        shared = backend.generate(answer, [SteeringPlan()], 24)
        assert backend.prefixes.hits == 1 and backend.prefixes.misses == 1
    assert shared[0].token_ids == plain[0].token_ids
    assert torch.equal(shared_risk.tokens, plain_risk.tokens)


def test_additive_steering_on_an_image_row_runs_the_chunk_unshared():
    """Additive hooks change the prompt's KV, so a steered image row cannot reuse an unsteered
    prefix; its chunk runs in full. A steered text-only row has no prefix and does not block."""
    adapter = tiny_adapter("llava")
    backend = TransformersBackend(adapter, mechanics_artifacts(adapter))
    _, risk, answers = _rows()
    additive = direction_plan(backend.artifacts, 1.0, [1], 1.0)
    on_image = [additive, SteeringPlan(), SteeringPlan()]
    on_text = [SteeringPlan(), SteeringPlan(), additive]
    plain = {name: backend.generate(answers, plans, 10) for name, plans in (("image", on_image), ("text", on_text))}
    with backend.prefix_scope():
        backend.risk_pass(risk, 3, [1])  # caches both image prefixes, unsteered
        hits = backend.prefixes.hits
        shared_image = backend.generate(answers, on_image, 10)
        assert backend.prefixes.hits == hits  # not used
        shared_text = backend.generate(answers, on_text, 10)
        assert backend.prefixes.hits == hits + 2  # both image rows reused theirs
    assert [g.token_ids for g in shared_image] == [g.token_ids for g in plain["image"]]
    assert [g.token_ids for g in shared_text] == [g.token_ids for g in plain["text"]]
    unsteered = backend.generate(answers, [SteeringPlan()] * 3, 10)
    assert plain["image"][0].token_ids != unsteered[0].token_ids  # the steering did act
    assert plain["text"][2].token_ids != unsteered[2].token_ids


def test_no_text_shortcut_unless_the_tail_tokenizes_like_the_processor(monkeypatch):
    """The processor-free path is taken only where the tokenizer-only tail was checked against the
    processor's ids; a tokenizer that disagrees keeps every pass on the processor (still sharing KV)."""
    adapter = tiny_adapter("llava")
    backend = TransformersBackend(adapter)
    _, risk, answers = _rows()
    plain = backend.generate(answers, [SteeringPlan()] * 3, 8)
    monkeypatch.setattr(backend.sharing, "_tail_ids", lambda tail: torch.tensor([1, 2, 3]))
    with backend.prefix_scope():
        backend.risk_pass(risk, 3, [1])
        shared = backend.generate(answers, [SteeringPlan()] * 3, 8)
        assert backend.prefixes.hits == 2 and backend.sharing.fast_chunks == 0
    assert [g.token_ids for g in shared] == [g.token_ids for g in plain]


def test_paligemma_and_text_only_models_do_not_share():
    for family in ("paligemma", "llama"):
        backend = TransformersBackend(tiny_adapter(family))
        assert not backend.share_prefixes and not sharing_supported(backend.adapter)
        row = ChatRow("hello", (red_image(),) if family == "paligemma" else ())
        with backend.prefix_scope():
            backend.generate([row], [SteeringPlan()], 3)
            assert len(backend.prefixes) == 0 and backend.prefixes.misses == 0


def _entry(n: int) -> PrefixEntry:
    return PrefixEntry(ids=torch.arange(n), kv=[(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4))])


def test_store_lives_only_while_a_session_is_open():
    store = PrefixStore()
    store.put(("a",), _entry(3))
    assert len(store) == 0  # no session: nothing kept
    with store.session():
        with store.session():
            store.put(("a",), _entry(3))
        assert store.get(("a",)) is not None  # the outer batch is still open
    assert len(store) == 0 and store.get(("a",)) is None
    assert (store.hits, store.misses) == (1, 1)


def test_store_byte_budget_evicts_least_recently_used():
    one = _entry(8).nbytes
    store = PrefixStore(max_bytes=2 * one)
    with store.session():
        store.put(("a",), _entry(8))
        store.put(("b",), _entry(8))
        store.get(("a",))
        store.put(("c",), _entry(8))
        assert store.get(("b",)) is None and store.get(("a",)) is not None and store.get(("c",)) is not None


@pytest.mark.parametrize("image_tenants, vision_calls", [
    (("paper-repro", "paper-repro"), 1),  # step-logit risk: caption, risk, answer share
    (("paper-repro", "research-lab"), 1),  # pooled_probe's own-token average: the risk pass shares too
])
def test_guardrail_batch_reuses_the_prefix_and_answers_identically(art_root, policies_dir, image_tenants, vision_calls):
    """One image in a batch is encoded once for caption, risk and answer, and the answers are the
    unshared path's, also for a policy whose assessor averages the request's own tokens
    (`research-lab`: permissive, which extends the pooled_probe default): those tokens follow the
    shared image prefix, so its risk pass continues from the prefix like the others."""
    from guardrail.pipeline import Guardrail
    from guardrail.types import Request

    adapter = tiny_adapter("llava")
    art = load_artifacts(tiny_artifacts("llava", art_root), adapter.fingerprint())
    shared_engine, plain_engine = TransformersBackend(adapter, art), TransformersBackend(adapter, art)
    plain_engine.share_prefixes = False
    image = png_bytes(red_image((40, 30), "green"))
    requests = [
        Request("What is in the image?", images=(image,), tenant=image_tenants[0], max_new_tokens=8, request_id="a"),
        Request("Summarise it.", images=(image,), tenant=image_tenants[1], max_new_tokens=8, request_id="b"),
        Request("No picture here.", tenant="acme-kids", max_new_tokens=8, request_id="c"),
    ]
    results = {}
    for name, engine in (("shared", shared_engine), ("plain", plain_engine)):
        guard = Guardrail(engine, policies_dir)
        vision = VisionCalls(adapter)
        try:
            results[name] = guard.generate_batch(requests)
            results[name + "_vision"] = vision.count
        finally:
            vision.close()
            guard.close()
    for a, b in zip(results["shared"], results["plain"]):
        assert (a.token_ids, a.action, a.visual_context) == (b.token_ids, b.action, b.visual_context)
        assert a.risk == pytest.approx(b.risk, abs=1e-5)
    assert shared_engine.prefixes.hits >= 2 and plain_engine.prefixes.hits == 0
    assert results["shared_vision"] == vision_calls
    assert results["plain_vision"] >= 3


@pytest.mark.parametrize("family", ["llama", *SHARING_FAMILIES, "paligemma"])
def test_each_family_adapter_says_whether_it_may_share(family):
    """The family quirk lives on the adapter (guardrail.models), not in the engine."""
    assert sharing_supported(cpu_adapter(family)) == (family in SHARING_FAMILIES)
