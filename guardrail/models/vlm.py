"""Adapters for the vision-language families: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3,
SmolVLM and PaliGemma (transformers 5.x layouts).

Each adapter turns chat rows into one LEFT-padded batch through the family's own processor (so image
placeholders are expanded exactly as the checkpoint expects) and points the locators at the text
decoder, never at the vision tower. Images go before the text in the user turn. A batch may mix rows
with and without images in every family here (`mixed_image_batches` stays True); an adapter that
could not would set it False and `encode` would refuse such a batch so the engine splits it.

`load_local` loads a real checkpoint folder offline. Without torchvision the Qwen-VL and SmolVLM
processors cannot build their video processor; the processor is then assembled with a stand-in that
refuses video (guardrail only sends images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from guardrail.errors import ModelError
from guardrail.models.base import ModelAdapter
from guardrail.types import ChatRow


# ----- processor helpers ---------------------------------------------------------------------------
def _images_only_video_processor_class() -> type:
    from transformers.video_processing_utils import VideoProcessorMixin

    class ImagesOnlyVideoProcessor(VideoProcessorMixin):
        """Stands in for a family's video processor where torchvision (which the real ones need) is
        missing. The processor constructors require one; guardrail never sends video."""

        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def preprocess(self, videos: Any, **kwargs: Any) -> Any:
            raise ModelError("video input is not supported here (the video processor needs torchvision)")

    return ImagesOnlyVideoProcessor


_STUB_CLASS: type | None = None


def _export_video_processor_base() -> None:
    """Without torchvision, transformers does not export `VideoProcessorMixin` at top level, yet
    ProcessorMixin checks a `video_processor` argument by looking that name up there, so no Qwen-VL
    or SmolVLM processor can be constructed at all. Export the (always importable) class under the
    name it has in a torchvision install."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(transformers, "VideoProcessorMixin"):
        setattr(transformers, "VideoProcessorMixin", VideoProcessorMixin)


def images_only_video_processor(**kwargs: Any) -> Any:
    global _STUB_CLASS
    _export_video_processor_base()
    if _STUB_CLASS is None:
        _STUB_CLASS = _images_only_video_processor_class()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("video_processor_type", "processor_class")}
    return _STUB_CLASS(**kwargs)


def make_video_processor(class_name: str, **kwargs: Any) -> Any:
    """The family's real video processor when it can be built (torchvision installed), else the
    images-only stand-in with the same settings."""
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is not None:
        try:
            return cls(**kwargs)
        except (ImportError, TypeError, ValueError):  # ImportError: the placeholder without torchvision
            pass
    return images_only_video_processor(**kwargs)


def _num2words_fallback(number: Any, *args: Any, **kwargs: Any) -> str:
    return str(number)


def ensure_smolvlm_processor() -> None:
    """SmolVLMProcessor refuses to construct without the package num2words, which it uses only to
    spell out the frame count of a video prompt. guardrail sends no video, so when num2words is
    missing a digits-only stand-in is put in its place (video prompts would read "8", not "eight")."""
    from transformers.models.smolvlm import processing_smolvlm

    if not getattr(processing_smolvlm, "num2words", None):
        processing_smolvlm.num2words = _num2words_fallback


def _size_value(size: Any, key: str) -> Any:
    """One entry of an image processor's `size` (a dict, or transformers' SizeDict)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


# ----- the adapters --------------------------------------------------------------------------------
class VLMAdapter(ModelAdapter):
    """Common ground of the VLM families; subclasses set the family's quirks as class attributes."""

    family = "vlm"
    # Whether the caption, risk and answer passes may share one KV cache of the image prefix
    # (guardrail.engine.prefix_cache); the families that cannot share soundly say False.
    shares_image_prefix = True
    mrope = False  # 3-D multimodal rope positions (Qwen-VL): a continued prefix needs them rebuilt
    supports_images = True
    mixed_image_batches = True  # rows with and without images may share one batch
    supports_system = True  # the chat template has a system turn (else it is prepended to the text)
    nested_images = False  # the processor wants one list of images per row (Idefics3, SmolVLM)
    text_attr = "language_model"  # model.model.<text_attr> is the text decoder stack
    vision_attrs: tuple[str, ...] = ("vision_tower", "multi_modal_projector")
    drop_keys: tuple[str, ...] = ("labels", "token_type_ids")  # not inputs of these models' forward

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any | None = None, name: str = ""):
        if processor is None:
            raise ModelError(f"{type(model).__name__} needs its processor to encode images")
        super().__init__(model, tokenizer, processor, name=name)
        inner = getattr(processor, "tokenizer", None)
        if inner is not None and inner is not self.tokenizer:
            if inner.pad_token_id is None:
                inner.pad_token = inner.eos_token
            inner.padding_side = "left"

    # ----- prompts -------------------------------------------------------------------------------
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def messages(self, row: ChatRow, system_turn: bool | None = None) -> list[dict[str, Any]]:
        """Chat messages for one row: image parts first, then the text, in the user turn."""
        system_turn = self.supports_system if system_turn is None else system_turn
        text = row.text
        msgs: list[dict[str, Any]] = []
        if row.system:
            if system_turn:
                msgs.append({"role": "system", "content": [{"type": "text", "text": row.system}]})
            else:
                text = f"{row.system}\n\n{text}"
        content: list[dict[str, Any]] = [{"type": "image"} for _ in row.images]
        content.append({"type": "text", "text": text})
        msgs.append({"role": "user", "content": content})
        return msgs

    def _render(self, messages: list[dict[str, Any]]) -> str:
        template = self.chat_template()
        if not template:
            raise ModelError(f"{self.name} has no chat template")
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def prompt_text(self, row: ChatRow) -> str:
        return self.rendered(row)[1]

    def rendered(self, row: ChatRow) -> tuple[list[dict[str, Any]], str]:
        """The chat messages a row is rendered from and the prompt text (a serving engine that
        renders the template itself gets the same messages)."""
        messages = self.messages(row)
        if not row.system or not self.supports_system:
            return messages, self._render(messages)
        from jinja2 import TemplateError

        try:
            return messages, self._render(messages)
        except TemplateError:  # this checkpoint's template refuses a system turn
            messages = self.messages(row, system_turn=False)
            return messages, self._render(messages)

    # ----- batches -------------------------------------------------------------------------------
    def _check_rows(self, rows: Sequence[ChatRow]) -> list[ChatRow]:
        rows = list(rows)
        if not rows:
            raise ModelError("encode needs at least one row")
        with_images = [bool(r.images) for r in rows]
        if not self.mixed_image_batches and any(with_images) and not all(with_images):
            raise ModelError(f"{self.family} cannot batch rows with and without images together; split the batch")
        return rows

    def _images_arg(self, rows: Sequence[ChatRow]) -> Any:
        if not any(r.images for r in rows):
            return None
        if self.nested_images:
            return [list(r.images) for r in rows]
        return [image for r in rows for image in r.images]

    def encode(self, rows: Sequence[ChatRow]) -> dict[str, torch.Tensor]:
        """A left-padded batch for `model(**batch)` / `model.generate(**batch)`."""
        rows = self._check_rows(rows)
        texts = [self.prompt_text(r) for r in rows]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "padding_side": "left", "return_tensors": "pt"}
        bos = self.tokenizer.bos_token
        if bos and all(t.startswith(bos) for t in texts):
            kwargs["add_special_tokens"] = False  # the template already starts with BOS
        images = self._images_arg(rows)
        if images is not None:
            kwargs["images"] = images
        enc = self.processor(**kwargs)
        return self._finish(dict(enc))

    def _finish(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dtype = self._float_dtype()
        out: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if key in self.drop_keys or value is None:
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
            if value.is_floating_point() and value.dtype != dtype:
                value = value.to(dtype)
            out[key] = value
        return out

    def _float_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # ----- image shapes --------------------------------------------------------------------------
    def processed_image_size(self, width: int, height: int) -> tuple[int, int]:
        """What the family's image processor resizes to, read from its `size` setting: a fixed
        height x width (PaliGemma), the shortest edge scaled up or down to S (LLaVA: the step that
        turns a sliver into gigapixels, before the centre crop), or the longest edge to L (Idefics3)."""
        size = getattr(getattr(self.processor, "image_processor", None), "size", None)
        fixed_h, fixed_w = _size_value(size, "height"), _size_value(size, "width")
        if fixed_h and fixed_w:
            return int(fixed_w), int(fixed_h)
        shortest, longest = _size_value(size, "shortest_edge"), _size_value(size, "longest_edge")
        if shortest:  # as CLIP's get_resize_output_image_size: short side S, long side truncated
            short, long = min(width, height), max(width, height)
            scaled_long = int(shortest * long / short)
            return (scaled_long, int(shortest)) if width >= height else (int(shortest), scaled_long)
        if longest:
            scale = longest / max(width, height)
            return max(1, int(width * scale)), max(1, int(height * scale))
        return width, height

    # ----- where things live ---------------------------------------------------------------------
    def language_model(self) -> nn.Module:
        inner = getattr(self.model, "model", None)
        lm = getattr(inner, self.text_attr, None) if inner is not None else None
        if lm is None:
            raise ModelError(f"cannot find the text decoder ({self.text_attr}) of {type(self.model).__name__}")
        return lm

    def vision_modules(self) -> list[nn.Module]:
        """The vision tower and projector: what steering must never touch."""
        inner = getattr(self.model, "model", self.model)
        return [m for m in (getattr(inner, a, None) for a in self.vision_attrs) if isinstance(m, nn.Module)]

    def lm_head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        if head is None:
            raise ModelError(f"cannot find the lm_head of {type(self.model).__name__}")
        return head


class LlavaAdapter(VLMAdapter):
    family = "llava"


class LlavaNextAdapter(VLMAdapter):
    family = "llava_next"

    def processed_image_size(self, width: int, height: int) -> tuple[int, int]:
        """Any-res: the image is fitted into the best of the processor's grid pinpoints (plus a
        base tile of the shortest edge), so what it builds is bounded by the largest pinpoint."""
        from transformers.image_processing_utils import select_best_resolution

        pinpoints = getattr(self.processor.image_processor, "image_grid_pinpoints", None)
        if not pinpoints:
            return super().processed_image_size(width, height)
        best_h, best_w = select_best_resolution((height, width), [tuple(p) for p in pinpoints])
        return int(best_w), int(best_h)


class Qwen2VLAdapter(VLMAdapter):
    """The processor returns `mm_token_type_ids`, which M-RoPE needs (without it transformers 5.x
    cannot place image tokens in 3-D positions), plus flat `pixel_values` and `image_grid_thw`."""

    family = "qwen2_vl"
    mrope = True
    vision_attrs = ("visual",)
    max_image_aspect_ratio = 200.0  # Qwen's smart_resize keeps pixels within max_pixels up to 200:1 (its own bound)

    def processed_image_size(self, width: int, height: int) -> tuple[int, int]:
        """The processor's own smart_resize: sides a multiple of patch x merge, pixels within
        [min_pixels, max_pixels] (stored as the size's shortest and longest edge)."""
        import importlib

        ip = self.processor.image_processor
        smart_resize = importlib.import_module(type(ip).__module__).smart_resize
        h, w = smart_resize(
            height, width, factor=ip.patch_size * ip.merge_size,
            min_pixels=_size_value(ip.size, "shortest_edge"), max_pixels=_size_value(ip.size, "longest_edge"),
        )
        return int(w), int(h)

    def encode(self, rows: Sequence[ChatRow]) -> dict[str, torch.Tensor]:
        batch = super().encode(rows)
        if "mm_token_type_ids" not in batch:  # older processors: derive it from the placeholder ids
            ids = batch["input_ids"]
            types = torch.zeros_like(ids)
            config = self.model.config
            types[ids == config.image_token_id] = 1
            types[ids == config.video_token_id] = 2
            batch["mm_token_type_ids"] = types
        return batch


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"


class Idefics3Adapter(VLMAdapter):
    """Images go to the processor nested per row; the batch carries `pixel_attention_mask`, and rows
    with fewer images are padded with all-zero images that the model drops."""

    family = "idefics3"
    nested_images = True
    text_attr = "text_model"
    vision_attrs = ("vision_model", "connector")


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"


class PaliGemmaAdapter(VLMAdapter):
    """PaliGemma has no chat template and no system turn. Its prompt is the image tokens, then BOS,
    the text and a newline; the whole prompt is a bidirectional prefix (`token_type_ids` all 0).
    The prompt is built here rather than by PaliGemmaProcessor, which demands images for every call
    and misplaces BOS in a row without an image."""

    family = "paligemma"
    shares_image_prefix = False  # its prompt is one bidirectional prefix block: no text-only continuation
    supports_system = False
    drop_keys = ("labels",)  # token_type_ids stays: it marks the bidirectional prefix

    def prompt_text(self, row: ChatRow) -> str:
        text = f"{row.system}\n\n{row.text}" if row.system else row.text
        image_token = getattr(self.processor, "image_token", "<image>")
        seq_len = int(getattr(self.processor, "image_seq_length", 0) or self.model.config.text_config.num_image_tokens)
        bos = self.tokenizer.bos_token or ""
        return image_token * (seq_len * len(row.images)) + bos + text + "\n"

    def encode(self, rows: Sequence[ChatRow]) -> dict[str, torch.Tensor]:
        rows = self._check_rows(rows)
        texts = [self.prompt_text(r) for r in rows]
        enc = self.tokenizer(
            texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
        )
        batch: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        batch["token_type_ids"] = torch.zeros_like(enc["input_ids"])
        images = self._images_arg(rows)
        if images is not None:
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return self._finish(batch)


ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": SmolVLMAdapter,
    "paligemma": PaliGemmaAdapter,
}


# ----- loading a local checkpoint ------------------------------------------------------------------
def load_processor(path: Any, config: Any) -> Any:
    """The checkpoint's processor, offline. Falls back to assembling it from its parts with an
    images-only video processor when the real video processor cannot be built (no torchvision)."""
    from transformers import AutoProcessor

    if config.model_type == "smolvlm":
        ensure_smolvlm_processor()
    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (ImportError, ValueError, TypeError, OSError) as exc:
        first_error = exc
    try:
        return _assemble_processor(Path(path), config)
    except Exception as exc:  # report the first failure: it names what is missing
        raise ModelError(f"cannot load the processor of {path}: {first_error}") from exc


def _processor_class(path: Path, config: Any) -> type:
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / fname
        if f.is_file():
            name = json.loads(f.read_text(encoding="utf-8")).get("processor_class")
            if name:
                break
    name = name or PROCESSOR_MAPPING_NAMES.get(config.model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ModelError(f"no processor class for model type {config.model_type!r}")
    return cls


def _assemble_processor(path: Path, config: Any) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer

    cls = _processor_class(path, config)
    processor_dict, extra = cls.get_processor_dict(str(path), local_files_only=True)
    args = []
    for attribute in cls.get_attributes():
        if "tokenizer" in attribute:
            args.append(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        elif attribute == "image_processor":
            args.append(AutoImageProcessor.from_pretrained(str(path), local_files_only=True))
        elif attribute == "video_processor":
            settings = processor_dict.get("video_processor")
            if not isinstance(settings, dict):
                f = path / "video_preprocessor_config.json"
                settings = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
            args.append(images_only_video_processor(**settings))
        else:
            raise ModelError(f"cannot build the {attribute} of {cls.__name__} offline")
    processor_dict = {k: v for k, v in processor_dict.items() if k not in cls.get_attributes()}
    return cls.from_args_and_dict(args, processor_dict, **extra)


def load_local(path: Any, config: Any, kwargs: dict[str, Any], name: str) -> ModelAdapter:
    """Load a local VLM folder (transformers format) offline and wrap it in its family's adapter."""
    adapter_cls = ADAPTERS.get(config.model_type)
    if adapter_cls is None:
        raise ModelError(f"no adapter for model type {config.model_type!r}")
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path, config)
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"cannot load {path} as an image-text-to-text model: {exc}") from exc
    model.eval()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ModelError(f"the processor of {path} has no tokenizer")
    return adapter_cls(model, tokenizer, processor, name=name)
