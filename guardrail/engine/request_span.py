"""Which prompt tokens are the request's own: the span a risk pass's `pooled` states average.

The risk prompt wraps the request in fixed text: the chat template's opening and, in the
reformulated query, the safety prompt. A causal model gives that fixed text the same states in
every row, so an average over the whole prompt is mostly a constant, diluted by an amount that
depends on the request's length. `ChatRow.own_from` marks where the request's own words start in
the row's text. The request's own tokens are then the prompt's last n tokens, where n counts the
tokens that follow the part the encoded row shares with the same row cut at `own_from`. So the
template's closing tokens count, and so does a word merged with the boundary's last character.

Images are shown before the text, so n is counted on the text alone and is the same with the
images' tokens in front: an image's tokens are never among the request's own (its content
reaches them through attention, and through the visual context written into the text).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from guardrail.errors import ModelError
from guardrail.types import ChatRow


def own_token_count(adapter: Any, row: ChatRow, cut_ids: dict[Any, list[int]] | None = None) -> int:
    """How many of the row's last prompt tokens are the request's own (at least 1). `cut_ids`
    keeps the encoded cut rows of one batch: its rows mostly share one (template and safety prompt)."""
    if not 0 <= row.own_from <= len(row.text):
        raise ModelError(f"a prompt row marks its request as starting at character {row.own_from} of a "
                         f"{len(row.text)}-character text")
    text_only = replace(row, images=())
    full = _ids(adapter, text_only)
    cut_row = replace(text_only, text=row.text[:row.own_from])
    key = (cut_row.system, cut_row.text)
    cut = cut_ids.get(key) if cut_ids is not None else None
    if cut is None:
        cut = _ids(adapter, cut_row)
        if cut_ids is not None:
            cut_ids[key] = cut
    shared = 0
    for a, b in zip(full, cut):
        if a != b:
            break
        shared += 1
    return max(1, len(full) - shared)


def own_token_counts(adapter: Any, rows: Sequence[ChatRow]) -> list[int]:
    cut_ids: dict[Any, list[int]] = {}
    return [own_token_count(adapter, r, cut_ids) for r in rows]


def _ids(adapter: Any, row: ChatRow) -> list[int]:
    return list(adapter.tokenizer(adapter.prompt_text(row), add_special_tokens=False)["input_ids"])


def tail_mask(attention_mask: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """`attention_mask` ([B, T], left or right padded) keeping only each row's last `counts[i]`
    real tokens; a count above a row's real length is a ModelError (the span was counted on
    another encoding)."""
    mask = attention_mask.to(torch.long)
    real = mask.sum(1)
    want = torch.as_tensor(list(counts), dtype=torch.long)
    if bool((want > real).any()):
        row = int((want > real).nonzero()[0])
        raise ModelError(f"prompt row {row} has {int(real[row])} tokens, fewer than the {int(want[row])} "
                         "counted as its request's own")
    from_end = mask.flip(1).cumsum(1).flip(1)  # 1 at a row's last real token, 2 before it, ...
    return (mask.bool() & (from_end <= want[:, None])).to(attention_mask.dtype)
