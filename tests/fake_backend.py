"""A `Backend` with no model: words are tokens, answers are canned, plans are recorded and applied
by their meaning (a ForcedPrefix's ids come first). Pipeline, runner, tenant, audit and span tests
read like transcripts with it and need no weights, no calibration and no torch (its states are
plain lists; test_pipeline_fake runs once more with torch unimportable to keep it so)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from guardrail.engine.backend import RiskPass
from guardrail.engine.interventions import KINDS, ForcedPrefix, SteeringPlan, unsupported
from guardrail.types import ChatRow, Generation


class FakeBackend:
    name = "fake"
    supports_images = False
    artifacts = None
    max_context = 4096
    batch_size = 16

    def __init__(self, answer: Callable[[str], str] = lambda prompt: "Here is a plain answer.", layers: int = 2):
        self.answer = answer
        self.layers = layers
        self.interventions = frozenset(KINDS)
        self.vocab: list[str] = ["<eos>"]
        self.generated: list[tuple[list[str], list[SteeringPlan]]] = []  # (prompts, plans) per call
        self.risk_prompts: list[str] = []

    def _id(self, word: str) -> int:
        if word not in self.vocab:
            self.vocab.append(word)
        return self.vocab.index(word)

    def fingerprint(self) -> dict[str, Any]:
        return {"architecture": "fake", "hidden_size": 2, "vocab_size": 1024, "num_layers": self.layers}

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode_text(self, text: str) -> list[int]:
        return [self._id(w) for w in text.split()]

    def eos_token_ids(self) -> list[int]:
        return [0]

    def decode(self, token_ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in token_ids)

    def caption(self, rows: Sequence[ChatRow], max_new_tokens: int) -> list[str]:
        return ["The image shows nothing in particular." for _ in rows]

    def risk_pass(self, rows: Sequence[ChatRow], steps: int, layers: Sequence[int], pooled: Sequence[int] = ()) -> RiskPass:
        """State of every layer, last-token or pooled: [word count, 1 if 'bomb' is in the prompt];
        flat step logits."""
        self.risk_prompts += [r.text for r in rows]
        feats = [[float(len(r.text.split())), float("bomb" in r.text.lower())] for r in rows]
        logits = [[[0.0] * 8 for _ in range(steps)] for _ in rows] if steps else None
        return RiskPass(step_logits=logits, states={int(l): [list(f) for f in feats] for l in layers},
                        pooled={int(l): [list(f) for f in feats] for l in pooled})

    def generate(self, rows: Sequence[ChatRow], plans: Sequence[SteeringPlan], max_new_tokens: int,
                 on_tokens: Any = None) -> list[Generation]:
        self.generated.append(([r.text for r in rows], list(plans)))
        out = []
        for b, (row, plan) in enumerate(zip(rows, plans)):
            missing = unsupported(plan, self.interventions)
            if missing:
                raise RuntimeError(f"fake backend cannot apply {missing}")
            forced = [iv.ids for iv in plan.interventions if isinstance(iv, ForcedPrefix)]
            ids = list(forced[0]) if forced else self.encode_text(self.answer(row.text))
            ids = ids[:max_new_tokens]
            for token in ids:
                if on_tokens is not None:
                    on_tokens(b, token)
            out.append(Generation(self.decode(ids), tuple(ids), "stop" if len(ids) < max_new_tokens else "length"))
        return out
