"""The generation backend seam: the only thing in guardrail that touches a model.

Stages and policies never see a transformers object; they talk to a `Backend`. The seam is narrow
on purpose, so a backend on another serving engine can slot in without touching stages or policies:

* `caption(rows, max_new_tokens)` — greedy answers to caption prompts (image + instruction).
* `risk_pass(rows, steps, layers, pooled=())` — one greedy pass over the reformulated prompts that
  returns the raw next-token logits at response steps 1..steps, the decoder-layer states at the last
  prompt token (`layers`) and, for `pooled`, the layer states averaged over the request's own
  tokens (from `ChatRow.own_from` on, see guardrail/engine/request_span.py). The
  paper's risk needs only the logits (vLLM: `logprobs` over the full vocabulary, or a logits
  processor that records them); the hidden-state assessors need the layer states. `pooled` is
  passed only when an assessor asks for it, so a backend that never gives it may leave it out.
  `readouts` (also passed only when asked for): typed statistics of the greedy steps
  (`guardrail.engine.readouts`), each [B], computed where that is cheapest — the transformers
  backend from its logits, the vLLM backend inside the engine.
* `generate(rows, plans, max_new_tokens, on_tokens)` — batched greedy generation in which each row
  follows its own `SteeringPlan`: a tuple of typed interventions (`guardrail.engine.interventions`).
  A backend applies the kinds it lists in `interventions` and refuses others; the pipeline refuses
  a policy whose controller needs a kind the backend lacks when the policy loads. A logit
  interpolation needs no hidden states (on vLLM: a per-request logits processor); an additive
  direction needs layer hooks and exists only where the engine exposes them.

Backends must be safe to call from several threads (serialise model access internally).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from guardrail.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:  # imported when a tensor is first made, so registering and routing need no torch
    torch = lazy_module("torch")


if TYPE_CHECKING:  # pragma: no cover
    from guardrail.method.artifacts import Artifacts
    from guardrail.types import ChatRow, Generation, SteeringPlan

TokenCallback = Callable[[int, int], None]
"""on_tokens(row_index, token_id): called for each new response token as it is generated."""


@dataclass
class RiskPass:
    """What one batched risk pass computed, row-aligned with its input."""

    step_logits: torch.Tensor | None  # [B, steps, V] float32 raw logits, or None when steps == 0
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, d] float32
    tokens: torch.Tensor | None = None  # [B, steps] the greedy tokens
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, d] mean over the request's own tokens
    readouts: dict[Any, torch.Tensor] = field(default_factory=dict)  # readout -> [B] (guardrail.engine.readouts)

    def select(self, rows: Sequence[int]) -> "RiskPass":
        """The same pass restricted to some rows (an assessor scores only its policy's rows)."""
        rows = list(rows)
        return RiskPass(
            step_logits=_pick(self.step_logits, rows),
            states={layer: _pick(value, rows) for layer, value in self.states.items()},
            tokens=_pick(self.tokens, rows),
            pooled={layer: _pick(value, rows) for layer, value in self.pooled.items()},
            readouts={key: _pick(value, rows) for key, value in self.readouts.items()},
        )

    def readout(self, key: Any, artifacts: Any) -> "torch.Tensor":
        """A readout's values: the backend's, else computed from this pass's step logits (a pass
        built by hand, e.g. in calibration's held-out folds, carries only the logits)."""
        if key in self.readouts:
            return torch.as_tensor(self.readouts[key])
        if self.step_logits is None:
            raise ValueError(f"the risk pass has neither the readout {key!r} nor step logits to compute it")
        return key.from_logits(self.step_logits, artifacts)

    def __len__(self) -> int:
        if self.step_logits is not None:
            return len(self.step_logits)
        filled = self.states or self.pooled or self.readouts
        return len(next(iter(filled.values()))) if filled else 0


def _pick(value: Any, rows: list[int]) -> Any:
    """Rows of a tensor, or of a plain list (a test double's states need no torch)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [value[i] for i in rows]
    return value[torch.tensor(rows, dtype=torch.long)]


class Backend(Protocol):
    name: str
    supports_images: bool
    artifacts: "Artifacts | None"
    max_context: int
    interventions: frozenset[type]  # the intervention kinds generate() applies

    def fingerprint(self) -> dict[str, Any]: ...

    def count_tokens(self, text: str) -> int: ...

    def encode_text(self, text: str) -> list[int]: ...

    def eos_token_ids(self) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def caption(self, rows: Sequence["ChatRow"], max_new_tokens: int) -> list[str]: ...

    def risk_pass(
        self, rows: Sequence["ChatRow"], steps: int, layers: Sequence[int], pooled: Sequence[int] = (),
        readouts: Sequence[Any] = (),
    ) -> RiskPass: ...

    def generate(
        self,
        rows: Sequence["ChatRow"],
        plans: Sequence["SteeringPlan"],
        max_new_tokens: int,
        on_tokens: TokenCallback | None = None,
    ) -> list["Generation"]: ...
