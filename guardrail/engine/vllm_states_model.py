"""Decoder-layer states from a vLLM server: the in-engine half of the vLLM backend's states pass.

Copied into a vLLM server's environment as `guardrail_vllm_states.py` (with a one-line entry point,
`guardrail.engine.vllm.processor_dir()`), like the logits processor beside it: it imports nothing
but torch, the standard library and vLLM, and nothing of guardrail.

Why a pooling model: mainline vLLM returns no middle-layer states per request, but its models
already collect the residual stream after chosen layers for EAGLE-3 speculative decoding
(`aux_hidden_state_layers`: hidden + residual after decoder layer l is aux index l + 1), and a
pooling runner hands a model's per-token output to a pooler that sees each request's span. So
`GuardrailStates<Arch>` (for any text `<Arch>ForCausalLM` of the registry whose model supports
those aux states, e.g. Llama, Qwen2, Mistral) is that model with its head dropped: its per-token
output is the chosen layers' states side by side, and `StatesPooler` turns each request into one
vector:

    [k, l_1 … l_k, mean_1 … mean_k, last_1 … last_k]

k and the layer indices (exact small integers in float32) first, so the client checks which
layers it got; then each layer's state averaged over every prompt token, then each layer's
state at the last prompt token. That is what the transformers backend's risk pass captures with
forward hooks on decoder layer l (`pooled` and `layers`), so a probe calibrated there reads the
same numbers here (SmolLM2-135M: equal to 6e-5 on values up to ~800).

Served as:

    vllm serve MODEL --runner pooling --no-enable-chunked-prefill --no-enable-prefix-caching \\
      --hf-overrides '{"architectures": ["GuardrailStatesLlamaForCausalLM"], "guardrail_layers": [12, 14]}'

`guardrail_layers` (default: every layer) bounds the extra memory, which grows with tokens × layers.
A prompt must be computed whole in one step: chunked prefill or a prefix-cache hit would hand the
pooler part of it, so both are off and a partial span is refused, never averaged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

ARCH_PREFIX = "GuardrailStates"
CONFIG_KEY = "guardrail_layers"


def register() -> None:
    """vLLM general plugin (entry point group `vllm.general_plugins`, loaded in every vLLM
    process): one lazily imported `GuardrailStates<Arch>` per registered `*ForCausalLM`. Idempotent."""
    from vllm import ModelRegistry

    for arch in list(ModelRegistry.get_supported_archs()):
        if arch.endswith("ForCausalLM") and not arch.startswith(ARCH_PREFIX):
            name = ARCH_PREFIX + arch
            if name not in ModelRegistry.get_supported_archs():
                ModelRegistry.register_model(name, f"{__name__}:{name}")


def layout(layers: list[int], hidden: int) -> int:
    """Length of one request's vector for `layers` of width `hidden`."""
    return 1 + len(layers) + 2 * len(layers) * hidden


class StatesPooler(nn.Module):
    """One vector per request from the per-token `[tokens, k·d]` states (see the module docstring)."""

    def __init__(self, layers: list[int]):
        super().__init__()
        self.header = torch.tensor([float(len(layers))] + [float(l) for l in layers], dtype=torch.float32)

    def get_supported_tasks(self) -> set[str]:
        return {"embed"}

    def get_pooling_updates(self, task: Any) -> Any:
        from vllm.model_executor.layers.pooler import PoolingParamsUpdate

        return PoolingParamsUpdate()

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: Any) -> list[torch.Tensor]:
        cursor = pooling_metadata.get_pooling_cursor()
        if cursor.is_partial_prefill():
            raise RuntimeError("guardrail states need each prompt computed whole in one step: serve with "
                               "--no-enable-chunked-prefill and --no-enable-prefix-caching")
        firsts = cursor.first_token_indices_gpu.tolist()
        lasts = cursor.last_token_indices_gpu.tolist()
        lens = cursor.prompt_lens_cpu.tolist()
        header = self.header.to(hidden_states.device)
        out = []
        for first, last, n in zip(firsts, lasts, lens):
            if last - first + 1 != n:  # a cached prefix was skipped: its tokens are not in this step
                raise RuntimeError(f"guardrail states got {last - first + 1} of a prompt's {n} tokens: serve with "
                                   "--no-enable-prefix-caching")
            span = hidden_states[first:last + 1].float()
            out.append(torch.cat([header, span.mean(0), span[-1]]))
        return out


@functools.lru_cache(maxsize=None)
def _states_class(arch: str) -> type:
    from vllm import ModelRegistry
    from vllm.model_executor.models.adapters import as_embedding_model

    base_name = arch[len(ARCH_PREFIX):]
    registered = ModelRegistry.models.get(base_name)
    if registered is None:
        raise AttributeError(f"vLLM has no architecture {base_name!r} to read guardrail states from")
    base = registered.load_model_cls()

    class States(as_embedding_model(base)):  # type: ignore[misc, valid-type]
        def _init_pooler(self, vllm_config: Any, prefix: str = "") -> nn.Module:
            config = vllm_config.model_config.hf_config
            total = int(config.get_text_config().num_hidden_layers)
            layers = sorted({int(l) for l in (getattr(config, CONFIG_KEY, None) or range(total))})
            bad = [l for l in layers if not 0 <= l < total]
            if bad:
                raise ValueError(f"{CONFIG_KEY} {bad} out of range: the model has {total} decoder layers")
            self.guardrail_layers = layers
            return StatesPooler(layers)

        def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            inner = getattr(self, "model", None)
            if not hasattr(inner, "_set_aux_hidden_state_layers"):
                raise ValueError(f"{base_name}'s vLLM model does not collect per-layer states (no EAGLE-3 aux "
                                 "hidden states): guardrail cannot read its decoder layers in vLLM")
            # aux index l + 1 = hidden + residual after decoder layer l (index 0 = the embeddings)
            inner._set_aux_hidden_state_layers(tuple(l + 1 for l in self.guardrail_layers))

        def forward(self, input_ids: Any, positions: Any, intermediate_tensors: Any = None,
                    inputs_embeds: Any = None, **kwargs: Any) -> torch.Tensor:
            out = self.model(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
            if not isinstance(out, tuple):  # e.g. a pipeline stage that is not the last
                return out
            _, aux = out
            return torch.cat(aux, dim=-1)

    States.__name__ = States.__qualname__ = arch
    return States


def __getattr__(name: str) -> Any:
    """`GuardrailStates<Arch>` classes, built on first import by vLLM's lazy registry (once per
    name, so every lookup in a process gets the same class)."""
    if not name.startswith(ARCH_PREFIX) or name == ARCH_PREFIX:
        raise AttributeError(name)
    return _states_class(name)
