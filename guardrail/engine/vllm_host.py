"""The host side of a model served by vLLM: tokenizer, chat template, processor and fingerprint,
with no weights (`headless_adapter`). guardrail's process encodes every row exactly as the
transformers backend does; the weights live in the vLLM server."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from guardrail.errors import ModelError
from guardrail.models.base import ModelAdapter


class _Stub:
    def __init__(self, config: Any, generation_config: Any):
        self.config = config
        self.generation_config = generation_config


class HeadlessAdapter(ModelAdapter):
    """A `ModelAdapter` without the model: chat template, tokenizer, EOS ids and the fingerprint
    (computed from the checkpoint's header and two small tensors, exactly as `ModelAdapter` does
    from the loaded weights), for a backend whose weights live in another process. Use
    `headless_adapter(folder)`: for a vision-language checkpoint it is mixed with the family's
    adapter (guardrail.models.vlm), so prompts, image placement and image-shape limits are that
    family's, and the processor is loaded (no weights) to encode rows exactly as transformers does."""

    def __init__(self, folder: Path, name: str):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from guardrail.models import vlm

        self.folder = folder
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        try:
            gen = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        except OSError:
            gen = None
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        processor = vlm.load_processor(folder, config) if config.model_type in vlm.ADAPTERS else None
        super().__init__(_Stub(config, gen), tok, processor, name=name)
        self._tensors = self._tensor_index()

    def _float_dtype(self) -> torch.dtype:  # the engine runs float32 (`--dtype float32`)
        return torch.float32

    def _tensor_index(self) -> dict[str, Path]:
        from safetensors import safe_open

        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.folder} has no .safetensors weights: vLLM and the fingerprint need them")
        index: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), "pt") as fh:
                for key in fh.keys():
                    index[key] = path
        return index

    def _tensor(self, key: str, rows: int | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._tensors[key]), "pt") as fh:
            part = fh.get_slice(key)
            return part[:rows] if rows is not None else part[:]

    def _text_prefixes(self) -> list[str]:
        # where checkpoints keep the text decoder: text models, VLMs as transformers 5 names them
        # (model.<text_attr>), and the original layout some families are saved in (language_model.model)
        inner = getattr(self, "text_attr", None)
        return ["model."] + ([f"model.{inner}."] if inner else []) + ["language_model.model."]

    def _first_key(self, keys: Sequence[str]) -> str | None:
        return next((key for key in keys if key in self._tensors), None)

    def _head_key(self) -> str:
        head = self._first_key(["lm_head.weight", "language_model.lm_head.weight"])
        if head is not None:
            return head
        tied = getattr(self.text_config(), "tie_word_embeddings", False) or getattr(self.model.config, "tie_word_embeddings", False)
        embed = self._first_key([p + "embed_tokens.weight" for p in self._text_prefixes()]) if tied else None
        if embed is not None:
            return embed
        raise ModelError(f"{self.folder}: cannot find the unembedding (lm_head.weight) in the checkpoint")

    def _norm_key(self) -> str | None:
        return self._first_key([p + "norm.weight" for p in self._text_prefixes()])

    @property
    def num_layers(self) -> int:
        return int(self.text_config().num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        from safetensors import safe_open

        with safe_open(str(self._tensors[self._head_key()]), "pt") as fh:
            return int(fh.get_slice(self._head_key()).get_shape()[0])

    @property
    def logits_are_affine(self) -> bool:
        return not getattr(self.text_config(), "final_logit_softcapping", None)

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            vocab = self.tokenizer.get_vocab()
            tok_hash = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")).hexdigest()
            archs = getattr(self.model.config, "architectures", None) or ["?"]
            digest = hashlib.sha256()
            for key, rows in ((self._norm_key(), None), (self._head_key(), 16)):
                if key is not None:
                    digest.update(self._tensor(key, rows).float().contiguous().numpy().tobytes())
            self._fingerprint = {
                "architecture": archs[0], "family": self.family, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "vocab_size": self.vocab_size,
                "tokenizer_sha256": tok_hash, "weights_sha256": digest.hexdigest(),
            }
        return dict(self._fingerprint)


@functools.lru_cache(maxsize=None)
def _headless_class(family: type) -> type:
    return type(f"Headless{family.__name__}", (HeadlessAdapter, family), {"__doc__": HeadlessAdapter.__doc__})


def headless_adapter(folder: Path, name: str) -> HeadlessAdapter:
    """The weightless adapter for a checkpoint folder: text-only, or one of guardrail's VLM families
    (whose prompts come from a chat template, as vLLM's chat endpoint renders them)."""
    from guardrail.models import vlm

    model_type = _model_type(folder)
    family = vlm.ADAPTERS.get(model_type)
    if family is None:
        return HeadlessAdapter(folder, name)
    if family.prompt_text is not vlm.VLMAdapter.prompt_text:
        raise ModelError(f"the vLLM backend sends image rows as chat messages, which vLLM renders with the "
                         f"checkpoint's chat template; {name} is a {model_type} model, whose prompt guardrail "
                         "builds by hand, so its prompts could differ")
    return _headless_class(family)(folder, name)


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_vlm_checkpoint(folder: Path) -> bool:
    """Whether a checkpoint's config.json names one of guardrail's vision-language families."""
    from guardrail.models import vlm

    return _model_type(folder) in vlm.ADAPTERS


def checkpoint_architecture(folder: Path) -> str:
    """The first architecture a checkpoint's config.json names (what the states server wraps)."""
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    if not archs:
        raise ModelError(f"{folder / 'config.json'} names no architecture")
    return str(archs[0])
