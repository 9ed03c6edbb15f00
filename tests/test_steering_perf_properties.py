"""Issue 7's cost properties of steering, checked structurally (speed itself is measured by
`guardrail bench`, never asserted here): no guard code runs per decode token beyond the N steered
steps, and no hook at all is installed when no row is steered."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import artifacts_of, proto_plan, red_image, tiny_adapter
from guardrail.method.artifacts import Artifacts
from guardrail.engine.transformers import TransformersBackend
from guardrail.types import ChatRow, SteeringPlan

GUARDRAIL_DIR = str(Path(__import__("guardrail").__file__).parent)


def _backend(family: str = "llava") -> TransformersBackend:
    adapter = tiny_adapter(family)
    g = torch.Generator().manual_seed(1)
    art = artifacts_of(prototypes=torch.randn(8, adapter.hidden_size, generator=g),
                       logits=torch.randn(8, adapter.vocab_size, generator=g) * 5)
    return TransformersBackend(adapter, art)


def _guard_calls(fn) -> int:
    """How many Python calls land in guardrail's own code while `fn` runs."""
    count = [0]

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(GUARDRAIL_DIR):
            count[0] += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0]


@pytest.mark.parametrize("affine", [True, False])
def test_guard_code_per_generation_does_not_grow_with_answer_length(affine, monkeypatch):
    backend = _backend()
    if not affine:  # the final-norm hook path used for soft-capped heads
        monkeypatch.setattr(type(backend.adapter), "logits_are_affine", property(lambda self: False))
    rows = [ChatRow("How do I bake bread?", (red_image(),)), ChatRow("Tell me a story.")]
    plans = [proto_plan(backend.artifacts, 0.8, 3), SteeringPlan()]
    backend.generate(rows, plans, 4)  # warm-up: first-call imports stay out of the count
    short = _guard_calls(lambda: backend.generate(rows, plans, 8))
    long = _guard_calls(lambda: backend.generate(rows, plans, 40))
    assert short == long  # 32 more decode steps, not one more call into guardrail


def test_interpolation_hook_is_gone_after_the_last_steered_step():
    backend = _backend()
    head = backend.adapter.lm_head()
    seen = []
    probe = head.register_forward_hook(lambda m, a, o: seen.append(len(m._forward_hooks)))
    try:
        backend.generate([ChatRow("hi", (red_image(),))], [proto_plan(backend.artifacts, 1.0, 3)], 8)
    finally:
        probe.remove()
    # steps 1-3 see the steering hook and the probe; from step 4 on only the probe is left
    assert seen == [2, 2, 2] + [1] * 5
    assert len(head._forward_hooks) == 0


def test_no_hook_anywhere_while_generating_unsteered_rows():
    backend = _backend()
    model = backend.adapter.model

    def hooks() -> int:
        return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in model.modules())

    before = hooks()  # transformers keeps a few hooks of its own
    seen = []
    probe = backend.adapter.lm_head().register_forward_hook(lambda m, a, o: seen.append(hooks()))
    try:
        backend.generate([ChatRow("hi", (red_image(),)), ChatRow("there")], [SteeringPlan(), proto_plan(backend.artifacts, 0.0, 3)], 5)
    finally:
        probe.remove()
    assert seen == [before + 1] * 5  # only the probe itself was added


def test_steered_tokens_follow_the_prototypes_then_run_free():
    """Strength 1 makes the first k tokens the prototypes' argmax (the edit still happens where
    the logits are produced), and steps after k are the model's own continuation."""
    backend = _backend()
    art = backend.artifacts
    row = ChatRow("What is this?", (red_image(),))
    out = backend.generate([row], [proto_plan(backend.artifacts, 1.0, 3)], 6)[0]
    assert list(out.token_ids[:3]) == art.block("prototypes").tensor("logits")[:3].argmax(-1).tolist()
