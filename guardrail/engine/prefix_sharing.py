"""`PrefixSharing`: computes, finds and lays out shared image prefixes for `TransformersBackend`.

A pass over chunk rows goes one of three ways (all inside a pipeline batch's `prefix_scope`):

* fast: every image row's prompt text splits, after the last image placeholder, into a head seen
  before and a tail; the ids are the cached prefix ids + the tail's ids. Neither the processor nor
  the vision encoder runs. The split is trusted only where it was checked against the processor's
  own ids for that very prefix (`_link_text`), so the ids are those of the unshared path.
* full: the processor encodes the chunk; prefixes found in the store are reused, missing ones
  computed (from the chunk's own encoding when none is cached, else one by one).
* plain (None returned): a row cannot share (no image span found, an image row steered by
  additive hooks, a prefix that could not be reproduced): the caller runs the unshared batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from guardrail.engine.prefix_cache import (
    PrefixEntry,
    PrefixStore,
    SharedBatch,
    assemble,
    image_span_ids,
    prefix_length,
    sharing_supported,
    text_positions,
)
from guardrail.types import ChatRow


class PrefixSharing:
    def __init__(self, adapter: Any, tokenizer_lock: Any, batch_size: int):
        self.adapter = adapter
        self.tokenizer_lock = tokenizer_lock
        self.batch_size = batch_size
        self.store = PrefixStore()
        self.supported = sharing_supported(adapter)
        self.span_ids = image_span_ids(adapter) if self.supported else frozenset()
        self.mrope = bool(getattr(adapter, "mrope", False))
        self.marker = self._placeholder_marker() if self.supported else None
        self._marker_len: int | None = None  # tokens of the marker itself, counted on first use
        self.fast_chunks = 0  # chunks laid out without the processor (for tests and metrics)

    @property
    def active(self) -> bool:
        return self.supported and self.store.active

    # ----- entry points --------------------------------------------------------------------------
    def fast(self, rows: Sequence[ChatRow], eligible: Sequence[bool] | None = None) -> SharedBatch | None:
        """The chunk from cached prefixes and tokenizer-only tails, or None."""
        if not self.active or self.marker is None or not any(r.images for r in rows):
            return None
        if eligible is not None and any(row.images and not ok for row, ok in zip(rows, eligible)):
            return None
        ids: list[torch.Tensor | None] = []
        entries: list[PrefixEntry | None] = []
        for row in rows:
            if not row.images:
                ids.append(None)
                entries.append(None)
                continue
            split = self._split(row)
            entry = self.store.get_by_text(self._text_key(row, split[0])) if split else None
            if entry is None:
                return None
            ids.append(torch.cat([entry.ids, self._tail_ids(split[1]).to(entry.ids.device)]))
            entries.append(entry)
        text_rows = [b for b, row in enumerate(rows) if not row.images]
        if text_rows:  # no images: the processor is only a tokenizer for these
            enc = self.encode([rows[b] for b in text_rows])
            for j, b in enumerate(text_rows):
                ids[b] = enc["input_ids"][j][enc["attention_mask"][j].bool()]
        self.store.count_hits(sum(e is not None for e in entries))
        self.fast_chunks += 1
        return self._layout(ids, entries)

    def full(self, rows: Sequence[ChatRow], batch: dict[str, Any], eligible: Sequence[bool] | None = None) -> SharedBatch | None:
        """The processor-encoded chunk laid out on cached (or now computed) prefixes, or None."""
        if not self.active or "attention_mask" not in batch:
            return None
        if eligible is not None and any(row.images and not ok for row, ok in zip(rows, eligible)):
            return None  # an image row without its prefix would need pixel_values in the suffix pass
        ids, mask = batch["input_ids"], batch["attention_mask"]
        unpadded = [ids[b][mask[b].bool()] for b in range(len(rows))]
        keys: list[tuple | None] = []
        for b, row in enumerate(rows):
            n = prefix_length(unpadded[b], self.span_ids) if row.images else 0
            if row.images and not n:
                return None
            keys.append(self.store.key(row, unpadded[b][:n]) if n else None)
        if not any(keys):
            return None
        entries = {k: self.store.get(k) for k in dict.fromkeys(k for k in keys if k is not None)}
        missing = [k for k, e in entries.items() if e is None]
        if missing and len(missing) == len(entries):
            # Nothing cached yet (the first pass of these requests): the chunk's own encoding holds
            # every prefix with its pixels, so run them from it, all rows in one forward.
            for k, entry in zip(keys, self._from_batch(batch, [len(k[0]) if k else 0 for k in keys])):
                if k is not None and entries[k] is None and entry is not None:
                    entries[k] = entry
                    self.store.put(k, entry)
        elif missing:
            first = {k: b for b, k in reversed(list(enumerate(keys))) if k is not None}
            for k in missing:
                entries[k] = entry = self._one(rows[first[k]], unpadded[first[k]][: len(k[0])])
                if entry is not None:
                    self.store.put(k, entry)
        row_entries = [entries[k] if k is not None else None for k in keys]
        if any(k is not None and e is None for k, e in zip(keys, row_entries)):
            return None  # a prefix could not be reproduced: run this chunk unshared
        for b, k in enumerate(keys):
            if k is not None:
                self._link_text(rows[b], unpadded[b], k)
        return self._layout(unpadded, row_entries)

    # ----- computing prefixes --------------------------------------------------------------------
    def _from_batch(self, batch: dict[str, Any], lengths: Sequence[int]) -> list[PrefixEntry | None]:
        """Prefix KV caches from a left-padded batch: one forward over the columns up to the end of
        the longest-reaching prefix (causal, so later columns cannot change a prefix's KV), with the
        positions generate would give each token; row b's prefix is its first lengths[b] real tokens."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pads = (mask == 0).sum(dim=1).tolist()
        width = max(p + n for p, n in zip(pads, lengths) if n)
        extra = self._pixel_inputs(batch, width)
        positions = self._prefill_positions(ids[:, :width], mask[:, :width], extra)
        out = self.adapter.model.model(
            input_ids=ids[:, :width], attention_mask=mask[:, :width], position_ids=positions, use_cache=True, **extra
        )
        layers = out.cache.layers
        return [
            PrefixEntry(
                ids=ids[b, p : p + n].clone(),
                kv=[(l.keys[b : b + 1, :, p : p + n].clone(), l.values[b : b + 1, :, p : p + n].clone()) for l in layers],
                rope_delta=self._rope_delta(positions, b, p + n - 1, n),
            )
            if n
            else None
            for b, (p, n) in enumerate(zip(pads, lengths))
        ]

    def _one(self, row: ChatRow, expected: torch.Tensor) -> PrefixEntry | None:
        """One prefix from the row's images re-encoded with a one-character text (the prefix ends
        before the text, so its ids cannot change; they are checked anyway)."""
        enc = self.encode([ChatRow(".", row.images, row.system)])
        n = int(expected.numel())
        if enc["input_ids"].shape[1] < n or not torch.equal(enc["input_ids"][0, :n], expected):
            return None
        return self._from_batch(enc, [n])[0]

    @staticmethod
    def _pixel_inputs(enc: dict[str, Any], width: int) -> dict[str, Any]:
        """Everything but ids and mask; per-token inputs (mm_token_type_ids, ...) cut to `width`."""
        extra = {}
        for key, value in enc.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[1] == enc["input_ids"].shape[1] and not value.is_floating_point():
                value = value[:, :width]
            extra[key] = value
        return extra

    def _prefill_positions(self, ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        """The positions generate gives a (left-padded) prompt: 1-D from the mask, plus the family's
        own 3-D multimodal positions for Qwen-VL."""
        positions = text_positions(mask)
        if not self.mrope:
            return positions
        vision, _ = self.adapter.model.model.get_rope_index(
            ids, mm_token_type_ids=extra.get("mm_token_type_ids"), image_grid_thw=extra.get("image_grid_thw"), attention_mask=mask
        )
        return torch.cat([positions[None], vision], dim=0)

    def _rope_delta(self, positions: torch.Tensor, row: int, last: int, n: int) -> int:
        """Multimodal RoPE: how far the next token's 3-D position runs ahead of its 1-D one."""
        if not self.mrope:
            return 0
        return int(positions[1:, row, last].max()) + 1 - n

    # ----- layout --------------------------------------------------------------------------------
    def _layout(self, unpadded: Sequence[torch.Tensor], entries: Sequence[PrefixEntry | None]) -> SharedBatch:
        input_ids, attention, kv, cached = assemble(unpadded, entries, int(self.adapter.tokenizer.pad_token_id))
        positions = text_positions(attention)
        if self.mrope:
            # Text after the images sits at its 1-D position + the row's delta in all three
            # sections, as generate continues it; the cached columns' positions are never read.
            delta = torch.tensor([e.rope_delta if e else 0 for e in entries], device=positions.device).view(-1, 1)
            positions = torch.cat([positions[None], (positions + delta)[None].expand(3, -1, -1)], dim=0)
        return SharedBatch(input_ids, attention, positions, kv, cached)

    # ----- tokenizer-only tails ------------------------------------------------------------------
    def encode(self, rows: Sequence[ChatRow]) -> dict[str, Any]:
        """The processor's batch for `rows`, on the model's device (tokenizer calls take the lock)."""
        with self.tokenizer_lock:
            batch = self.adapter.encode(rows)
        device = self.adapter.device
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _placeholder_marker(self) -> str | None:
        """The text that closes an image in the rendered prompt (before the processor expands it)."""
        if self.mrope:
            return "<|vision_end|>"
        marker = getattr(self.adapter.processor, "image_token", None)
        return marker if isinstance(marker, str) and marker else None

    def _split(self, row: ChatRow) -> tuple[str, str] | None:
        text = self.adapter.prompt_text(row)
        cut = text.rfind(self.marker)
        if cut < 0:
            return None
        cut += len(self.marker)
        return text[:cut], text[cut:]

    def _tail_ids(self, tail: str) -> torch.Tensor:
        """The tail's ids as the processor tokenizes them: after the marker, never at the start of a
        string (tokenizers that mark a string's first word would otherwise differ)."""
        tok = self.adapter.tokenizer
        with self.tokenizer_lock:
            if self._marker_len is None:
                self._marker_len = len(tok(self.marker, add_special_tokens=False)["input_ids"])
            both = tok(self.marker + tail, add_special_tokens=False)["input_ids"]
        return torch.tensor(both[self._marker_len :], dtype=torch.long)

    def _text_key(self, row: ChatRow, head: str) -> tuple:
        return (head, tuple(self.store.image_hash(img) for img in row.images))

    def _link_text(self, row: ChatRow, unpadded: torch.Tensor, key: tuple) -> None:
        """Let later passes find this prefix by text, if the tokenizer-only tail reproduces the
        processor's ids for this row exactly (checked once per prefix)."""
        if self.marker is None:
            return
        split = self._split(row)
        if split is None:
            return
        text_key = self._text_key(row, split[0])
        if self.store.has_text(text_key):
            return
        n = len(key[0])
        if torch.equal(self._tail_ids(split[1]), unpadded[n:].cpu()):
            self.store.link_text(text_key, key)
