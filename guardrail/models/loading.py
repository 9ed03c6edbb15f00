"""`load_model(spec)`: a model spec string to a ready `ModelAdapter`.

Specs: `smollm2` (the embedded default), `tiny-random:ARCH[:SEED]`, a local folder in transformers
format, or a local `.gguf` file. Loading is offline: nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from guardrail.errors import ModelError
from guardrail.models.base import ModelAdapter

TINY_PREFIX = "tiny-random:"


def adapter_for(model: Any, tokenizer: Any, processor: Any = None, name: str = "") -> ModelAdapter:
    """Pick the adapter class for a loaded model by its config's model_type."""
    from guardrail.models import vlm

    model_type = getattr(model.config, "model_type", "")
    cls = vlm.ADAPTERS.get(model_type, ModelAdapter)
    if cls is ModelAdapter and not hasattr(model, "get_output_embeddings"):
        raise ModelError(f"unsupported model type {model_type!r}")
    return cls(model, tokenizer, processor, name=name)


def load_model(spec: str, device: str | None = None, dtype: torch.dtype | None = None) -> ModelAdapter:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if spec.startswith(TINY_PREFIX):
        from guardrail.models.tiny import build_tiny

        arch, _, seed = spec[len(TINY_PREFIX):].partition(":")
        try:
            seed_value = int(seed) if seed else 0
        except ValueError as exc:
            raise ModelError(f"bad seed in model spec {spec!r}") from exc
        model, tok, proc = build_tiny(arch, seed_value)
        adapter = adapter_for(model, tok, proc, name=spec)
    else:
        path = _resolve_path(spec)
        adapter = _load_local(path, spec, dtype)
    if device:
        adapter.model.to(device)
    adapter.model.eval()
    return adapter


def _resolve_path(spec: str) -> Path:
    if spec == "smollm2":
        from guardrail.models.smollm2 import ensure_converted

        return ensure_converted()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(
            f"model {spec!r} not found: give a local folder, a .gguf file, 'smollm2', or tiny-random:ARCH "
            "(nothing is downloaded from a model hub)"
        )
    return path


def _load_local(path: Path, spec: str, dtype: torch.dtype | None) -> ModelAdapter:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "local_files_only": True}
    if path.is_file() and path.suffix == ".gguf":
        folder, gguf = str(path.parent), path.name
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kwargs)
        except ImportError as exc:
            raise ModelError(f"loading GGUF needs the packages gguf and accelerate: {exc}") from exc
        return adapter_for(model, tok, None, name=spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a transformers model folder")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    from guardrail.models import vlm

    if config.model_type in vlm.ADAPTERS:
        return vlm.load_local(path, config, kwargs, name=spec)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return adapter_for(model, tok, None, name=spec)
