"""The request's own tokens (guardrail/engine/request_span.py): the span `pooled` states average,
checked at its edges, as a mask over left- or right-padded batches, and as the vLLM states
client derives it from whole-prompt averages (the prefix's share subtracted)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import threading

import pytest
import torch

from conftest import tiny_adapter
from guardrail.engine.request_span import own_token_count, own_token_counts, tail_mask
from guardrail.errors import ModelError
from guardrail.method.prompts import SAFETY_PROMPT, risk_row
from guardrail.types import ChatRow


def test_the_own_token_span_is_checked():
    """A row whose `own_from` lies outside its text, or a count beyond a row's real tokens, is an
    error naming it; the tail mask keeps the last n real tokens with left or right padding."""
    with pytest.raises(ModelError, match="character 99 of a 5-character text"):
        own_token_count(tiny_adapter("llama"), ChatRow("hello", own_from=99))
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert tail_mask(left, [2, 4]).tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    right = torch.tensor([[1, 1, 1, 0, 0]])
    assert tail_mask(right, [2]).tolist() == [[0, 1, 1, 0, 0]]
    with pytest.raises(ModelError, match="row 0 has 3 tokens, fewer than the 4"):
        tail_mask(right, [4])


def test_a_risk_rows_own_tokens_are_its_question_and_the_templates_closing():
    """The span decodes to exactly the question and what the template puts after it: the
    safety prompt and the template's opening never count, whatever the question's length."""
    adapter = tiny_adapter("llama")
    rows = [risk_row("Why?"), risk_row("Why is the sky blue on a clear day?")]
    for row, n in zip(rows, own_token_counts(adapter, rows)):
        ids = adapter.encode([row])["input_ids"][0].tolist()
        rendered = adapter.prompt_text(row)
        question = row.text[len(SAFETY_PROMPT):]
        after_safety_prompt = rendered[rendered.index(SAFETY_PROMPT) + len(SAFETY_PROMPT):]
        assert adapter.tokenizer.decode(ids[-n:]).strip() == after_safety_prompt.strip()
        assert after_safety_prompt.startswith(question)
    # with own_from 0 the whole user text is the request's: only the template's opening is left out
    short = rows[0]
    assert own_token_count(adapter, ChatRow(short.text)) > own_token_count(adapter, short)


class _FakeServer:
    """Per-token states of a prompt: deterministic in the token and everything before it (causal)."""

    def __init__(self, hidden: int, layers: list[int]):
        self.hidden, self.layers, self.calls = hidden, layers, []

    def token_states(self, prompt: list[int]) -> torch.Tensor:  # [T, k, d]
        g = torch.Generator().manual_seed(0)
        base = torch.randn(50, len(self.layers), self.hidden, generator=g, dtype=torch.float64)
        return torch.stack([base[t] * (1 + i % 3) + sum(prompt[:i]) * 0.01 for i, t in enumerate(prompt)])

    def one(self, prompt: list[int]):
        self.calls.append(list(prompt))
        x = self.token_states(prompt)
        return self.layers, x.mean(0).float(), x[-1].float()


def test_the_vllm_client_gives_the_own_tokens_average_from_whole_prompt_averages(monkeypatch):
    from guardrail.engine.vllm_states import StatesClient

    server = _FakeServer(hidden=4, layers=[2, 5])
    client = object.__new__(StatesClient)  # no server: the maths only
    client.hidden, client.pool = 4, ThreadPoolExecutor(2)
    client.prefix_means, client.prefix_lock = {}, threading.Lock()
    monkeypatch.setattr(client, "_one", server.one)
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [9, 9]]
    counts = [3, 2, 2]
    states, means = client.fetch(prompts, [5], [2, 5], counts)
    for row, (prompt, n) in enumerate(zip(prompts, counts)):
        want = server.token_states(prompt)[-n:].mean(0)
        for i, layer in enumerate([2, 5]):
            torch.testing.assert_close(means[layer][row], want[i].float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states[5][row], server.token_states(prompt)[-1, 1].float())
    assert server.calls.count([1, 2, 3]) == 1  # the shared prefix is asked for once
    client.fetch(prompts[:1], [], [2], counts[:1])
    assert server.calls.count([1, 2, 3]) == 1  # and kept
    with pytest.raises(ModelError, match="do not fit"):
        client.fetch(prompts[:1], [], [2], [7])
