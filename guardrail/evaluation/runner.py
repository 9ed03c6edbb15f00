"""Running methods over prompt sets through one guard, with timings and progress bars."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from guardrail.prompt_files import PromptItem
from guardrail.types import Request

ROLES = ("harmful", "benign", "edgy", "matched")
PER_REQUEST_STAGES = ("validate", "audit")


@dataclass(frozen=True)
class EvalItem:
    role: str  # harmful | benign | edgy | matched (harmful, matched to benign: risk only)
    source: str  # the file it came from (its stem)
    index: int
    prompt: str
    image: Path | None = None

    def request(self, method: str, unguarded: bool, max_new_tokens: int) -> Request:
        images = (self.image.read_bytes(),) if self.image is not None else ()
        return Request(text=self.prompt, images=images, tenant=method, unguarded=unguarded,
                       max_new_tokens=max_new_tokens, request_id=f"{method}/{self.source}/{self.index}")


def items_from(role: str, source: str, prompts: Sequence[PromptItem]) -> list[EvalItem]:
    return [EvalItem(role, source, i, p.prompt, p.image) for i, p in enumerate(prompts)]


@dataclass
class Row:
    """One answered (or assessed) item under one method."""

    item: EvalItem
    answer: str | None
    risk: float | None
    band: str | None
    strength: float
    action: str
    scores: dict[str, float]
    visual_context: str
    error: str | None
    refusal: bool | None = None
    judge_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.item.role, "source": self.item.source, "index": self.item.index,
            "prompt": self.item.prompt, "image": str(self.item.image) if self.item.image else None,
            "visual_context": self.visual_context, "risk": self.risk, "scores": self.scores, "band": self.band,
            "strength": self.strength, "action": self.action, "answer": self.answer, "refusal": self.refusal,
            "judge_reason": self.judge_reason, "error": self.error,
        }


@dataclass
class MethodRun:
    rows: list[Row] = field(default_factory=list)
    wall_s: float = 0.0  # generation runs only (assess-only runs are timed apart)
    answered: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)  # summed over batches


def _batches(items: Sequence[EvalItem], size: int) -> list[list[EvalItem]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def warm_captions(guard: Any, items: Sequence[EvalItem], method: str, batch_size: int, progress: bool) -> float:
    """Compute every image's visual context once (the guard caches them by image hash), so that no
    method is charged for captions another method already paid for. Returns seconds spent."""
    from tqdm.auto import tqdm

    with_images = [it for it in items if it.image is not None]
    t0 = time.perf_counter()
    with tqdm(total=len(with_images), desc="visual contexts", disable=not progress, leave=False) as bar:
        for batch in _batches(with_images, batch_size):
            guard.assess_batch([it.request(method, True, 1) for it in batch])
            bar.update(len(batch))
    return time.perf_counter() - t0


def run_method(guard: Any, method: Any, items: Sequence[EvalItem], batch_size: int, max_new_tokens: int,
               progress: bool) -> MethodRun:
    """Answer the harmful/benign/edgy items and assess the matched ones under one method."""
    from tqdm.auto import tqdm

    run = MethodRun()
    answer_items = [it for it in items if it.role != "matched"]
    assess_items = [it for it in items if it.role == "matched"] if method.reads_risk else []
    with tqdm(total=len(answer_items) + len(assess_items), desc=method.name, disable=not progress, leave=False) as bar:
        for batch in _batches(answer_items, batch_size):
            requests = [it.request(method.name, method.unguarded, max_new_tokens) for it in batch]
            t0 = time.perf_counter()
            results = guard.generate_batch(requests)
            run.wall_s += time.perf_counter() - t0
            run.answered += len(batch)
            for stage in {k for r in results for k in r.timings_ms if k != "total"}:
                times = [r.timings_ms.get(stage, 0.0) for r in results]
                # Batched stages report the batch's elapsed time on each of its requests (count it
                # once); validation and audit are timed per request (add them up).
                spent = sum(times) if stage in PER_REQUEST_STAGES else max(times)
                run.stage_ms[stage] = run.stage_ms.get(stage, 0.0) + spent
            run.rows += [_row(it, r, answered=True) for it, r in zip(batch, results)]
            bar.update(len(batch))
        for batch in _batches(assess_items, batch_size):
            results = guard.assess_batch([it.request(method.name, False, 1) for it in batch])
            run.rows += [_row(it, r, answered=False) for it, r in zip(batch, results)]
            bar.update(len(batch))
    return run


def _row(item: EvalItem, result: Any, answered: bool) -> Row:
    return Row(item=item, answer=result.text if answered else None, risk=result.risk, band=result.band,
               strength=result.strength, action=result.action, scores=dict(result.scores),
               visual_context=result.visual_context, error=result.error)
