"""Shared image prefixes: the KV cache of "chat header + image tokens", computed once per request.

The caption, risk and answer prompts of a request differ only in their text; for the VLM families
here the text comes after the images, so all three start with the same tokens up to the last image
token. `PrefixStore` keeps the KV cache of that prefix (the vision encoder runs only there) for the
duration of a pipeline batch (`session()`), keyed by the prefix token ids and the images' content.
`assemble` lays out a batch so that every row's cached prefix starts at column 0 and its remaining
tokens are right-aligned, with the gap in between masked:

    row 0:  [prefix 0 ............][pad][suffix 0 .....]
    row 1:  [prefix 1 ......][pad ......][suffix 1 ....]
             <------ cached: C -------><-- uncached: S -->

Positions come from the attention mask (cumsum), so every token gets the position it has in the
plain left-padded batch and masked columns are never attended to: the computation per row is the
same as in the unshared path, only the prefix is not recomputed. Multimodal RoPE (Qwen-VL) gets its
3-D positions from the family's own `get_rope_index` over the assembled layout.

Families that cannot share soundly fall back to the unshared path: PaliGemma (its prompt is one
bidirectional prefix, so the image tokens' KV depends on the text after them), text-only models (no
image prefix), sliding-window attention (the cache layout would differ), and rows steered by
additive hooks (those change the prompt's KV too).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from guardrail.types import ChatRow

# Tokens that close an image span; the prefix ends at the last of them (all special tokens, so no
# BPE merge can move the boundary).
_SPAN_CONFIG_KEYS = ("image_token_id", "image_token_index", "vision_end_token_id")
_SPAN_TOKENS = ("<fake_token_around_image>",)


def sharing_supported(adapter: Any) -> bool:
    """Whether prefix KV caches can be reused for this model without changing any result."""
    if not getattr(adapter, "shares_image_prefix", False):  # the family's adapter says (guardrail.models)
        return False
    cfg = adapter.text_config()
    if getattr(cfg, "sliding_window", None) is not None:
        return False
    layer_types = getattr(cfg, "layer_types", None) or ()
    return all(t == "full_attention" for t in layer_types)


def image_span_ids(adapter: Any) -> frozenset[int]:
    cfg = adapter.model.config
    ids = {getattr(cfg, key) for key in _SPAN_CONFIG_KEYS if isinstance(getattr(cfg, key, None), int)}
    tok = adapter.tokenizer
    for token in _SPAN_TOKENS:
        if token in tok.get_vocab():
            ids.add(int(tok.convert_tokens_to_ids(token)))
    return frozenset(ids)


def prefix_length(ids: torch.Tensor, span_ids: frozenset[int]) -> int:
    """Tokens up to and including the last image-span token of one unpadded row (0: no image)."""
    if not span_ids:
        return 0
    hits = torch.isin(ids, torch.tensor(sorted(span_ids), dtype=ids.dtype, device=ids.device)).nonzero()
    return int(hits.max()) + 1 if hits.numel() else 0


@dataclass
class PrefixEntry:
    ids: torch.Tensor  # [L] the prefix token ids
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [1, heads, L, dim]
    rope_delta: int = 0  # multimodal RoPE: next 3-D position minus L (0 elsewhere)

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


class PrefixStore:
    """Prefix KV caches that live while at least one pipeline batch is open (`session()`).

    Outside a session nothing is stored and the backend takes the unshared path, so direct backend
    use (calibration) is unchanged. Entries are keyed by content (prefix token ids + image hashes),
    so concurrent sessions may share them safely; a byte budget bounds what overlapping sessions
    can hold, least recently used first out. Counters `hits`/`misses` are for metrics."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()
        self._image_hashes: dict[int, tuple[Any, str]] = {}  # id(image) -> (image, sha256); keeps it alive
        self._by_text: dict[tuple, tuple] = {}  # (prompt text up to the last image, image hashes) -> key
        self._open = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @contextlib.contextmanager
    def session(self) -> Iterator["PrefixStore"]:
        with self._lock:
            self._open += 1
        try:
            yield self
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0:
                    self._entries.clear()
                    self._by_text.clear()
                    self._image_hashes.clear()
                    self._bytes = 0

    @property
    def active(self) -> bool:
        return self._open > 0

    def image_hash(self, image: Any) -> str:
        with self._lock:
            known = self._image_hashes.get(id(image))
        if known is not None and known[0] is image:
            return known[1]
        digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
        value = digest.hexdigest()
        with self._lock:
            self._image_hashes[id(image)] = (image, value)
        return value

    def key(self, row: ChatRow, prefix_ids: torch.Tensor) -> tuple:
        return (tuple(prefix_ids.tolist()), tuple(self.image_hash(img) for img in row.images))

    def get(self, key: tuple) -> PrefixEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def get_by_text(self, text_key: tuple) -> PrefixEntry | None:
        """The entry a checked prompt-text head points to. Counts nothing: the caller counts hits
        (`count_hits`) once the whole chunk was found, else falls through to `get`, which counts."""
        with self._lock:
            key = self._by_text.get(text_key)
            entry = self._entries.get(key) if key is not None else None
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def count_hits(self, n: int) -> None:
        with self._lock:
            self.hits += n

    def has_text(self, text_key: tuple) -> bool:
        with self._lock:
            return text_key in self._by_text

    def link_text(self, text_key: tuple, key: tuple) -> None:
        with self._lock:
            if self._open and key in self._entries:
                self._by_text[text_key] = key

    def put(self, key: tuple, entry: PrefixEntry) -> None:
        with self._lock:
            if not self._open:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class SharedBatch:
    """Inputs for `model.generate` / a forward that continue from the rows' cached prefixes."""

    input_ids: torch.Tensor  # [B, C + S]
    attention_mask: torch.Tensor  # [B, C + S]
    position_ids: torch.Tensor  # [B, C + S], or [4, B, C + S] for multimodal RoPE
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [B, heads, C, dim]
    cached: int  # C

    def cache(self, config: Any) -> Any:
        """A fresh DynamicCache (generation appends to it; the stored prefixes stay untouched)."""
        from transformers import DynamicCache

        return DynamicCache(self.kv, config=config)

    def generate_kwargs(self, config: Any) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "cache": self.cache(config),
        }


def assemble(
    rows_ids: Sequence[torch.Tensor], entries: Sequence[PrefixEntry | None], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Middle-padded ids, mask and batch KV for unpadded rows whose first len(entry.ids) tokens are
    cached (a row without an entry has everything in its suffix)."""
    lengths = [0 if e is None else int(e.ids.numel()) for e in entries]
    cached = max(lengths)
    suffix = max(int(ids.numel()) - n for ids, n in zip(rows_ids, lengths))
    width = cached + suffix
    batch = len(rows_ids)
    device = rows_ids[0].device
    input_ids = torch.full((batch, width), pad_id, dtype=rows_ids[0].dtype, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, (ids, n) in enumerate(zip(rows_ids, lengths)):
        tail = ids[n:]
        input_ids[b, :n] = ids[:n]
        mask[b, :n] = 1
        input_ids[b, width - tail.numel() :] = tail
        mask[b, width - tail.numel() :] = 1
    template = next(e for e in entries if e is not None)
    kv = []
    for layer, (k0, v0) in enumerate(template.kv):
        keys = k0.new_zeros((batch, k0.shape[1], cached, k0.shape[3]))
        values = v0.new_zeros((batch, v0.shape[1], cached, v0.shape[3]))
        for b, (entry, n) in enumerate(zip(entries, lengths)):
            if entry is not None:
                keys[b, :, :n] = entry.kv[layer][0][0]
                values[b, :, :n] = entry.kv[layer][1][0]
        kv.append((keys, values))
    return input_ids, mask, kv, cached


def text_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions as HF generate derives them from a 2-D mask: each token's count of real tokens before it."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
