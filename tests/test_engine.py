"""RAS engine mechanics on tiny random models of every family (issue "RAS engine", done-when list).

- strength 0 leaves response token ids identical to plain `model.generate`;
- strength 1 makes the first N response tokens the argmax of the prototype logits, whatever the prompt;
- a batch with mixed strengths matches running each row alone;
- hooks are gone after generation, also when generation raises.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, direction_plan, proto_plan, red_image, tiny_adapter, tiny_artifacts
from guardrail.method.artifacts import load_artifacts
from guardrail.engine.transformers import TransformersBackend
from guardrail.types import ChatRow, SteeringPlan

MAX_NEW = 6


def rows_for(family: str) -> list[ChatRow]:
    img = (red_image(),) if family != "llama" else ()
    img2 = (red_image((48, 64), "blue"),) if family != "llama" else ()
    return [
        ChatRow("How do I bake bread?", img),
        ChatRow("Tell me a short story about a lighthouse keeper and the sea.", ()),
        ChatRow("What is shown here?", img2),
    ]


def backend_for(family: str, art_root) -> TransformersBackend:
    adapter = tiny_adapter(family)
    art = load_artifacts(tiny_artifacts(family, art_root), adapter.fingerprint())
    return TransformersBackend(adapter, art)


def plain_generate(adapter, row: ChatRow, max_new: int) -> list[int]:
    """Plain `model.generate` on the same prompt, greedy, no guardrail code in the way."""
    batch = adapter.encode([row])
    out = adapter.model.generate(**batch, max_new_tokens=max_new, do_sample=False)
    ids = out[0, batch["input_ids"].shape[1]:].tolist()
    eos = set(adapter.eos_token_ids())
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut]


def all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_is_plain_generate(family, art_root):
    backend = backend_for(family, art_root)
    rows = rows_for(family)
    plans = [proto_plan(backend.artifacts, 0.0, 3)] * len(rows)
    for row in rows:
        got = backend.generate([row], [plans[0]], MAX_NEW)[0]
        assert list(got.token_ids) == plain_generate(backend.adapter, row, MAX_NEW)


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_one_emits_prototype_argmax(family, art_root):
    backend = backend_for(family, art_root)
    n = 3
    expected = backend.artifacts.block("prototypes").tensor("logits")[:n].argmax(-1).tolist()
    for row in rows_for(family):
        got = backend.generate([row], [proto_plan(backend.artifacts, 1.0, n)], MAX_NEW)[0]
        # Random models can emit EOS among the prototype tokens; compare what was produced.
        eos = set(backend.adapter.eos_token_ids())
        want = expected[: next((i for i, t in enumerate(expected) if t in eos), n)]
        assert list(got.token_ids[: len(want)]) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_solo_runs(family, art_root):
    """Each row of a mixed-strength batch equals that row run alone. Left padding can move logits by
    float noise; the VLM adapter tests bound that below 1e-4, and here token ids must match."""
    backend = backend_for(family, art_root)
    rows = rows_for(family)
    plans = [
        proto_plan(backend.artifacts, 0.0, 3),
        proto_plan(backend.artifacts, 1.0, 3),
        proto_plan(backend.artifacts, 0.5, 2),
    ]
    batched = backend.generate(rows, plans, MAX_NEW)
    for row, plan, got in zip(rows, plans, batched):
        solo = backend.generate([row], [plan], MAX_NEW)[0]
        assert got.token_ids == solo.token_ids


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_5_vl"])
def test_mixed_batch_logits_match_solo_within_tolerance(family, art_root):
    """The steered steps' logits of each row in a batch match its solo run within 1e-4."""
    from transformers import LogitsProcessor, LogitsProcessorList

    backend = backend_for(family, art_root)
    rows = rows_for(family)
    plans = [proto_plan(backend.artifacts, s, 3) for s in (0.0, 0.7, 0.3)]

    def steered_scores(rows_, plans_):
        captured = []

        class Record(LogitsProcessor):
            def __call__(self, input_ids, scores):
                captured.append(scores.clone())
                return scores

        batch = backend.adapter.encode(rows_)
        procs, hooks = backend._steering(plans_, batch["input_ids"].shape[1])
        with hooks:
            backend.adapter.model.generate(**batch, generation_config=backend._config(3),
                                           logits_processor=LogitsProcessorList(procs + [Record()]))
        return torch.stack(captured, 1)  # [B, steps, V]

    together = steered_scores(rows, plans)
    for i, (row, plan) in enumerate(zip(rows, plans)):
        alone = steered_scores([row], [plan])[0]
        assert torch.allclose(together[i], alone, atol=1e-4, rtol=0)


def test_hidden_state_interpolation_equals_logit_interpolation(art_root, monkeypatch):
    """The final-norm hook path (used for non-affine heads) gives the same tokens as the logits
    processor on an affine head: the two are the same edit before and after lm_head."""
    backend = backend_for("llama", art_root)
    rows = rows_for("llama")
    plans = [proto_plan(backend.artifacts, s, 3) for s in (0.0, 1.0, 0.6)]
    via_logits = backend.generate(rows, plans, MAX_NEW)
    before = all_hooks(backend.adapter.model)
    monkeypatch.setattr(type(backend.adapter), "logits_are_affine", property(lambda self: False))
    via_hidden = backend.generate(rows, plans, MAX_NEW)
    assert all_hooks(backend.adapter.model) == before
    assert [g.token_ids for g in via_hidden] == [g.token_ids for g in via_logits]


@pytest.mark.parametrize("family", ["llama", "llava", "idefics3"])
def test_hooks_removed_after_generation_and_after_errors(family, art_root):
    backend = backend_for(family, art_root)
    model = backend.adapter.model
    before = all_hooks(model)
    rows = rows_for(family)[:2]
    layer = backend.adapter.num_layers // 2
    plans = [direction_plan(backend.artifacts, 1.0, [layer], 2.0),
             proto_plan(backend.artifacts, 1.0, 3)]
    backend.generate(rows, plans, 3)
    assert all_hooks(model) == before
    backend.risk_pass(rows, 3, [0, layer])
    assert all_hooks(model) == before

    def boom(*args, **kwargs):
        raise RuntimeError("generation failed")

    original = model.generate
    model.generate = boom
    try:
        with pytest.raises(RuntimeError, match="generation failed"):
            backend.generate(rows, plans, 3)
        with pytest.raises(RuntimeError, match="generation failed"):
            backend.risk_pass(rows, 3, [layer])
    finally:
        model.generate = original
    assert all_hooks(model) == before


def test_additive_steering_touches_only_steered_rows(art_root):
    backend = backend_for("llama", art_root)
    rows = rows_for("llama")
    layer = 1
    strong = direction_plan(backend.artifacts, 1.0, [layer], 50.0)
    none = SteeringPlan()
    mixed = backend.generate(rows, [none, strong, none], MAX_NEW)
    plain = backend.generate(rows, [none, none, none], MAX_NEW)
    assert mixed[0].token_ids == plain[0].token_ids
    assert mixed[2].token_ids == plain[2].token_ids
    assert mixed[1].token_ids != plain[1].token_ids  # a 50x direction must change a random model


def test_no_logits_processor_or_hooks_when_nothing_is_steered(art_root):
    backend = backend_for("llava", art_root)
    before = all_hooks(backend.adapter.model)  # transformers keeps a few hooks of its own
    procs, hooks = backend._steering([SteeringPlan(), proto_plan(backend.artifacts, 0.0, 3)], 10)
    assert procs == []
    with hooks:
        assert all_hooks(backend.adapter.model) == before


def test_risk_pass_steps_and_states_match_a_manual_forward(art_root):
    """The batched risk pass returns, per row, the logits of N greedy steps and the decoder-layer
    output at the last prompt token; check step 1 and the states against a plain forward."""
    backend = backend_for("llava", art_root)
    rows = rows_for("llava")
    rp = backend.risk_pass(rows, 3, [1, 2])
    assert rp.step_logits.shape == (3, 3, backend.adapter.vocab_size)
    for i, row in enumerate(rows):
        batch = backend.adapter.encode([row])
        with torch.no_grad():
            out = backend.adapter.model(**batch, output_hidden_states=True)
        assert torch.allclose(rp.step_logits[i, 0], out.logits[0, -1].float(), atol=1e-4)
        # hidden_states[l + 1] is the output of decoder layer l
        assert torch.allclose(rp.states[2][i], out.hidden_states[3][0, -1].float(), atol=1e-4)
        assert rp.tokens[i, 0].item() == int(out.logits[0, -1].argmax())


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_states_are_the_mean_over_the_requests_own_tokens(family, art_root):
    """`pooled` layers come back as the decoder-layer output averaged over the request's own tokens
    (the row's last n real tokens: its text from `own_from` on and the template's closing; the
    template's opening, a fixed instruction before `own_from` and any image tokens left out): the
    same in a padded batch as for the row alone, with and without greedy steps, and the last-token
    states beside them unchanged."""
    from dataclasses import replace

    from guardrail.engine.request_span import own_token_count

    backend = backend_for(family, art_root)
    plain = rows_for(family)
    fixed = "Read the following with care, then answer it plainly. Request: "
    rows = [replace(plain[0], text=fixed + plain[0].text, own_from=len(fixed)), plain[1],
            replace(plain[2], text=fixed + plain[2].text, own_from=len(fixed))]
    with backend.prefix_scope():  # as the pipeline runs it: the own tokens follow any shared image prefix
        rp = backend.risk_pass(rows, 2, [1], pooled=[0, 2])
    alone = backend.risk_pass(rows, 0, [1])
    tokenizer = backend.adapter.tokenizer
    for i, row in enumerate(rows):
        batch = backend.adapter.encode([row])
        ids = batch["input_ids"][0].tolist()
        n = own_token_count(backend.adapter, row)
        # the span is the request's words and what follows them, never the fixed text before them
        own, before = tokenizer.decode(ids[-n:]), tokenizer.decode(ids[:-n])
        assert row.text[row.own_from:].strip(" ?.") in own and "Request:" not in own
        assert row.text[row.own_from:].split()[-1] not in before
        with torch.no_grad():
            out = backend.adapter.model(**batch, output_hidden_states=True)
        for layer in (0, 2):
            want = out.hidden_states[layer + 1][0, -n:].float().mean(0)
            torch.testing.assert_close(rp.pooled[layer][i], want, atol=1e-4, rtol=1e-3)
            if row.own_from:  # leaving the fixed text out changes the average
                assert not torch.allclose(want, out.hidden_states[layer + 1][0].float().mean(0), atol=1e-3)
        torch.testing.assert_close(rp.states[1][i], alone.states[1][i], atol=1e-4, rtol=1e-3)
    assert len(rp.select([2]).pooled[0]) == 1
