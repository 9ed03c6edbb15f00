"""The one place that knows a model family's quirks: `ModelAdapter`.

An adapter wraps a loaded transformers model and its tokenizer or processor. It knows how to turn
chat rows (text + images) into a left-padded batch that `model.generate(**batch)` accepts, and where
the language model's decoder layers, final norm and `lm_head` live (never the vision tower's).
Everything model-independent (steering, risk passes, calibration) is written against this class.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
from torch import nn

from guardrail.errors import ModelError
from guardrail.types import ChatRow


class ModelAdapter:
    """Base adapter; subclasses override `encode` and, where the layout differs, the locators."""

    family = "causal_lm"
    shares_image_prefix = False  # text-only: there is no image prefix to share
    mrope = False
    supports_images = False
    # Image shape bounds (see guardrail.images.ImageShapeLimits). Photos, screenshots and documents
    # stay well under 20:1; beyond it a processor that scales the short side up builds huge arrays,
    # and one that crops to a square keeps almost nothing of the image anyway.
    max_image_aspect_ratio = 20.0
    # ~190 MB as float32 RGB, the most one image may cost the processor (four per request allowed).
    max_processed_image_pixels = 16_000_000

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any | None = None, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if self.tokenizer.pad_token_id is None:
            # Left padding needs a pad id; EOS is the usual stand-in and is masked out anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self._fingerprint: dict[str, Any] | None = None

    # ----- prompts -------------------------------------------------------------------------------
    def messages(self, row: ChatRow) -> list[dict[str, Any]]:
        """Chat messages for one row, images first (as the RAS authors place them)."""
        msgs: list[dict[str, Any]] = []
        if row.system:
            msgs.append({"role": "system", "content": row.system})
        msgs.append({"role": "user", "content": row.text})
        return msgs

    def prompt_text(self, row: ChatRow) -> str:
        if row.images and not self.supports_images:
            raise ModelError(f"{self.name} is a text-only model and cannot take images")
        return self.tokenizer.apply_chat_template(self.messages(row), tokenize=False, add_generation_prompt=True)

    def encode(self, rows: Sequence[ChatRow]) -> dict[str, torch.Tensor]:
        """A left-padded batch for `model(**batch)` / `model.generate(**batch)`."""
        texts = [self.prompt_text(r) for r in rows]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return dict(enc)

    # ----- image shapes --------------------------------------------------------------------------
    def processed_image_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) this model's preprocessing resizes a width x height image to. A
        text-only model reads images through the OCR captioner, which gets the decoded image."""
        return width, height

    def image_shape_limits(self) -> Any:
        """What the intake checks every image against before any model work (guardrail.images)."""
        from guardrail.images import ImageShapeLimits

        return ImageShapeLimits(
            family=self.family,
            max_aspect_ratio=self.max_image_aspect_ratio,
            max_processed_pixels=self.max_processed_image_pixels,
            processed_size=self.processed_image_size,
        )

    # ----- where things live ---------------------------------------------------------------------
    def language_model(self) -> nn.Module:
        """The decoder stack (has `.layers` and `.norm`), never a vision tower."""
        inner = self.model.model
        return getattr(inner, "language_model", inner)

    def decoder_layers(self) -> nn.ModuleList:
        layers = getattr(self.language_model(), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ModelError(f"cannot find the decoder layers of {type(self.model).__name__}")
        return layers

    def final_norm(self) -> nn.Module:
        norm = getattr(self.language_model(), "norm", None)
        if norm is None:
            raise ModelError(f"cannot find the final norm of {type(self.model).__name__}")
        return norm

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def text_config(self) -> Any:
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        return int(self.text_config().hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logits_are_affine(self) -> bool:
        """True when logits = lm_head(h) is affine in h, so hidden-state interpolation after the
        final norm equals logit interpolation exactly (a bias is fine: affine maps keep convex
        combinations). Soft-capped logits (Gemma 2/3) are not, and are steered on the hidden state."""
        cap = getattr(self.text_config(), "final_logit_softcapping", None)
        return not cap and isinstance(self.lm_head(), nn.Linear)

    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for value in (eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, (list, tuple)):
                ids.extend(int(v) for v in value)
        return sorted(set(ids))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ----- identity ------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a calibration artifact must match: shape of the model and its tokenizer."""
        if self._fingerprint is None:
            vocab = self.tokenizer.get_vocab()
            tok_hash = hashlib.sha256(
                json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")
            ).hexdigest()
            self._fingerprint = {
                "architecture": type(self.model).__name__,
                "family": self.family,
                "hidden_size": self.hidden_size,
                "num_layers": self.num_layers,
                "vocab_size": self.vocab_size,
                "tokenizer_sha256": tok_hash,
                "weights_sha256": self._weights_digest(),
            }
        return dict(self._fingerprint)

    def _weights_digest(self) -> str:
        """A cheap digest of the final norm and the first rows of the unembedding: tells two
        checkpoints of the same architecture apart without hashing the whole model."""
        digest = hashlib.sha256()
        for tensor in (getattr(self.final_norm(), "weight", None), self.lm_head().weight[:16]):
            if tensor is not None:
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def fingerprint_id(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
