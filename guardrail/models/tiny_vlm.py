"""Tiny random vision-language models (`tiny-random:ARCH` for the VLM families).

Each builder makes a seeded, randomly initialised model of the family's real layout (vision tower,
projector, text decoder) from config classes alone, with a processor built offline from the family's
image-processor class (the PIL backend, so torchvision is not needed) and the byte-level tokenizer of
`guardrail.models.tiny` extended with the family's special tokens. Each also carries a chat template
that places images the way the family's processor expects, so the adapters in `guardrail.models.vlm`
run the real processor code paths (placeholder expansion, grids, tiles, padding) in tests.

Image-token counts are small by default so tests stay fast: 16 per image (Qwen-VL: about 16, the
count follows the image's aspect ratio as in the real processor; LLaVA-NeXT: a 2x2-token base tile
plus its any-res grid, 16 to 24 tokens). Every builder takes an optional `image_tokens` keyword to
size the image grid like the real checkpoints, e.g. `build("llava", image_tokens=576)` is the
LLaVA-1.5 layout (336 px images, 14 px patches). `build_tiny` (tiny-random:ARCH) uses the defaults. `tokenizer="smollm2"` builds the text side
on SmolLM2's real tokenizer instead of the byte-level one, so prompts have a real model's length
(the image benchmarks use it).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from guardrail.errors import ModelError
from guardrail.models.tiny import tokenizer_for

DEFAULT_IMAGE_TOKENS = 16
PATCH = 14  # the vision towers' patch size, as in the real checkpoints
TEXT_LAYERS = 4
HIDDEN = 64
VISION_HIDDEN = 32

# A part list for a message whose content may be a plain string (shared by the templates below).
_PARTS = (
    "{% if message['content'] is string %}"
    "{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
)

# LLaVA-1.5 (llava-hf): "USER: <image>\n{text} ASSISTANT:", a system message goes first, unprefixed.
LLAVA_TEMPLATE = (
    "{% for message in messages %}" + _PARTS + "{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in parts | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in parts | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA-NeXT (llava-v1.6-mistral): "[INST] <image>\n{text} [/INST]", system as a <<SYS>> block.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}" + _PARTS + "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' }}"
    "{% for part in parts | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{{ '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in parts | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in parts | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% else %}{% for part in parts | selectattr('type', 'equalto', 'text') %}{{ ' ' + part['text'] }}"
    "{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Qwen2-VL / Qwen2.5-VL: ChatML with a default system prompt; an image is
# <|vision_start|><|image_pad|><|vision_end|>, the processor expands <|image_pad|> to the grid.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}" + _PARTS + "{% for part in parts %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _idefics_template(prefix: str) -> str:
    """Idefics3 / SmolVLM: "User:<image>{text}<end_of_utterance>\nAssistant:"; the processor expands
    each <image> to <fake_token_around_image><global-img><image>*N<fake_token_around_image>."""
    return (
        prefix + "{% for message in messages %}" + _PARTS + "{{ message['role'] | capitalize }}"
        "{% if parts[0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for part in parts %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
        "{% endfor %}{{ '<end_of_utterance>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


IDEFICS3_TEMPLATE = _idefics_template("{{ bos_token }}")
SMOLVLM_TEMPLATE = _idefics_template("{{ '<|im_start|>' }}")

IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _side(image_tokens: int | None, default: int = DEFAULT_IMAGE_TOKENS) -> int:
    """Image tokens per side of a square grid."""
    n = default if image_tokens is None else int(image_tokens)
    side = math.isqrt(n)
    if n <= 0 or side * side != n:
        raise ModelError(f"image_tokens must be a positive square number (e.g. 16, 64, 576), not {image_tokens!r}")
    return side


def _llama_text(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _clip_vision(image_size: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=VISION_HIDDEN,
    )


def _build(model_cls: Any, config: Any, seed: int, tok: Any) -> Any:
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    # Random models rarely emit EOS; generation lengths are set by max_new_tokens.
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _video_processor(class_name: str, **kwargs: Any) -> Any:
    from guardrail.models.vlm import make_video_processor

    return make_video_processor(class_name, **kwargs)


# ----- LLaVA 1.5 ------------------------------------------------------------------------------------
def _llava(seed: int, image_tokens: int | None = None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    side = _side(image_tokens)
    size = side * PATCH  # 16 tokens: 56 px; 576 tokens: 336 px as in llava-1.5
    tok = tokenizer_for(tokenizer, ["<image>"], LLAVA_TEMPLATE)
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=_clip_vision(size),
        text_config=_llama_text(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=side * side,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tok.pad_token_id,
    )
    return _build(LlavaForConditionalGeneration, config, seed, tok), tok, processor


# ----- LLaVA-NeXT (1.6) -----------------------------------------------------------------------------
def _llava_next(seed: int, image_tokens: int | None = None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    """`image_tokens` sizes the base tile; any-res adds the unpadded high-res grid and a newline per
    row, so an image gets more tokens than that (up to about 6x for the default 2x2 grid)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    side = _side(image_tokens, default=4)  # 4 base tokens + up to 20 from the 2x2 grid by default
    size = side * PATCH
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    tok = tokenizer_for(tokenizer, ["<image>"], LLAVA_NEXT_TEMPLATE)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=_clip_vision(size),
        text_config=_llama_text(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=side * side,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tok.pad_token_id,
    )
    return _build(LlavaNextForConditionalGeneration, config, seed, tok), tok, processor


# ----- Qwen2-VL and Qwen2.5-VL ----------------------------------------------------------------------
def _qwen_parts(image_tokens: int | None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    """Tokenizer, image processor and video processor shared by both Qwen-VL generations. Images are
    resized to a multiple of 28 px (14 px patches, 2x2 merge) with at most `image_tokens` merged
    tokens; a square image gets exactly `image_tokens`, others about as many, as in the real one."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    n = DEFAULT_IMAGE_TOKENS if image_tokens is None else int(image_tokens)
    if n < 1:
        raise ModelError(f"image_tokens must be positive, not {image_tokens!r}")
    unit = (PATCH * 2) ** 2  # pixels per merged token
    tok = tokenizer_for(tokenizer, QWEN_SPECIALS, QWEN_VL_TEMPLATE)
    pixels = {"shortest_edge": n * unit, "longest_edge": n * unit}
    image_processor = Qwen2VLImageProcessorPil(
        size=pixels, patch_size=PATCH, temporal_patch_size=2, merge_size=2
    )
    video_processor = _video_processor(
        "Qwen2VLVideoProcessor", size=pixels, patch_size=PATCH, temporal_patch_size=2, merge_size=2
    )
    return tok, image_processor, video_processor


def _qwen_text(config_cls: Any, tok: Any) -> Any:
    return config_cls(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # M-RoPE splits each head's 8 rotary frequencies into temporal, height and width sections.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _qwen_ids(tok: Any) -> dict[str, int]:
    return {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen2_vl(seed: int, image_tokens: int | None = None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    tok, image_processor, video_processor = _qwen_parts(image_tokens, tokenizer)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=QWEN_VL_TEMPLATE
    )
    vision = Qwen2VLVisionConfig(
        depth=2,
        embed_dim=VISION_HIDDEN,
        hidden_size=HIDDEN,  # the patch merger's output: the text hidden size
        num_heads=4,
        mlp_ratio=2,
        patch_size=PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=_qwen_text(Qwen2VLTextConfig, tok), vision_config=vision, pad_token_id=tok.pad_token_id, **_qwen_ids(tok)
    )
    return _build(Qwen2VLForConditionalGeneration, config, seed, tok), tok, processor


def _qwen2_5_vl(seed: int, image_tokens: int | None = None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    tok, image_processor, video_processor = _qwen_parts(image_tokens, tokenizer)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=QWEN_VL_TEMPLATE
    )
    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=HIDDEN,
        patch_size=PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=2 * PATCH * 2,  # 2x2 merged tokens per attention window
        fullatt_block_indexes=[1],  # block 0 windowed, block 1 full, as in the real tower
    )
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(Qwen2_5_VLTextConfig, tok),
        vision_config=vision,
        pad_token_id=tok.pad_token_id,
        **_qwen_ids(tok),
    )
    return _build(Qwen2_5_VLForConditionalGeneration, config, seed, tok), tok, processor


# ----- Idefics3 and SmolVLM -------------------------------------------------------------------------
def _idefics_geometry(image_tokens: int | None) -> tuple[int, int]:
    """(image size in px, image_seq_len): the connector's pixel shuffle (scale factor 2) merges 2x2
    patches, so a 16-token image is 8x8 patches of 14 px = 112 px."""
    side = _side(image_tokens)
    return 2 * side * PATCH, side * side


def _idefics_parts(image_tokens: int | None, image_processor_cls: Any, vision_config_cls: Any) -> tuple[Any, Any, int]:
    """What Idefics3 and SmolVLM share: (image processor, vision config, image_seq_len). No splitting
    into tiles (the real processor tiles large images): one global image per picture keeps the token
    count at image_seq_len."""
    size, seq_len = _idefics_geometry(image_tokens)
    edge = {"longest_edge": size}
    image_processor = image_processor_cls(size=edge, max_image_size=edge, do_image_splitting=False)
    vision = vision_config_cls(
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=size,
        patch_size=PATCH,
    )
    return image_processor, vision, seq_len


def _idefics_config(config_cls: Any, vision: Any, tok: Any) -> Any:
    return config_cls(
        vision_config=vision,
        text_config=_llama_text(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )


def _idefics3(seed: int, image_tokens: int | None = None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor, vision, seq_len = _idefics_parts(image_tokens, Idefics3ImageProcessorPil, Idefics3VisionConfig)
    tok = tokenizer_for(tokenizer, IDEFICS_SPECIALS, IDEFICS3_TEMPLATE)
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE
    )
    config = _idefics_config(Idefics3Config, vision, tok)
    return _build(Idefics3ForConditionalGeneration, config, seed, tok), tok, processor


def _smolvlm(seed: int, image_tokens: int | None = None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    from guardrail.models.vlm import ensure_smolvlm_processor

    ensure_smolvlm_processor()
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    image_processor, vision, seq_len = _idefics_parts(image_tokens, SmolVLMImageProcessorPil, SmolVLMVisionConfig)
    edge = {"longest_edge": _idefics_geometry(image_tokens)[0]}
    tok = tokenizer_for(tokenizer, IDEFICS_SPECIALS + ["<video>"], SMOLVLM_TEMPLATE)
    video_processor = _video_processor(
        "SmolVLMVideoProcessor", size=edge, max_image_size=dict(edge), num_frames=8, fps=1
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_len=seq_len,
        chat_template=SMOLVLM_TEMPLATE,
    )
    config = _idefics_config(SmolVLMConfig, vision, tok)
    return _build(SmolVLMForConditionalGeneration, config, seed, tok), tok, processor


# ----- PaliGemma ------------------------------------------------------------------------------------
def _paligemma(seed: int, image_tokens: int | None = None, tokenizer: str = "bytes") -> tuple[Any, Any, Any]:
    """PaliGemma (1, Gemma backbone). No chat template: its prompt is "<image>"*N + BOS + text + "\\n"
    with a bidirectional prefix; the adapter builds it."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    side = _side(image_tokens)
    size = side * PATCH  # 16 tokens: 56 px; 256 tokens: 224 px as in paligemma-3b-224
    tok = tokenizer_for(tokenizer, ["<image>"], chat_template=None)
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    image_processor.image_seq_length = side * side
    # The processor adds PaliGemma's <loc....> and <seg...> tokens, so the vocab is sized after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    text = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=size,
        patch_size=PATCH,
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=len(tok),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
        pad_token_id=tok.pad_token_id,
    )
    return _build(PaliGemmaForConditionalGeneration, config, seed, tok), tok, processor


# ARCH -> builder(seed, image_tokens=None) -> (model, tokenizer, processor)
BUILDERS: dict[str, Callable[..., tuple[Any, Any, Any]]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "paligemma": _paligemma,
}


def build(arch: str, seed: int = 0, *, image_tokens: int | None = None, tokenizer: str = "bytes",
          text_head_dim: int | None = None) -> tuple[Any, Any, Any]:
    """`BUILDERS[arch]` with a clear error for an unknown arch, e.g. for a benchmark that wants the
    real image-token count: `build("llava", image_tokens=576)`; wrap it with `adapter_for`.
    `text_head_dim`: the text decoder's attention head size (HIDDEN must be a multiple), with one
    key/value head; vLLM's CPU attention needs at least 32, the default layout has 16."""
    if arch not in BUILDERS:
        raise ModelError(f"unknown tiny VLM architecture {arch!r}; known: {', '.join(sorted(BUILDERS))}")
    model, tok, processor = BUILDERS[arch](seed, image_tokens=image_tokens, tokenizer=tokenizer)
    if text_head_dim is not None:
        text = model.config.get_text_config()
        if text_head_dim < 1 or text.hidden_size % text_head_dim:
            raise ModelError(f"text_head_dim must divide the hidden size {text.hidden_size}, got {text_head_dim}")
        text.num_attention_heads, text.num_key_value_heads, text.head_dim = text.hidden_size // text_head_dim, 1, text_head_dim
        generation = model.generation_config
        model = _build(type(model), model.config, seed, tok)
        model.generation_config = generation
    return model, tok, processor


def save(arch: str, folder: Any, seed: int = 0, **kwargs: Any) -> Any:
    """Write a tiny VLM as a checkpoint folder (weights, config, tokenizer, processor), e.g. for a
    serving engine that loads models from disk: `save("idefics3", dir, tokenizer="smollm2",
    text_head_dim=32)` is one vLLM's CPU build serves. Returns the folder."""
    from pathlib import Path

    folder = Path(folder)
    model, tok, processor = build(arch, seed, **kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
