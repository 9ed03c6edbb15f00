"""The VLM adapters on the seeded tiny-random models of each family (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from guardrail.errors import ModelError
from guardrail.models import load_model
from guardrail.models.tiny import build_tiny
from guardrail.models.tiny_vlm import BUILDERS, build
from guardrail.models.vlm import ADAPTERS, VLMAdapter
from guardrail.types import ChatRow

ARCHS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma"]
NEW_TOKENS = 4


def _rows() -> list[ChatRow]:
    return [
        ChatRow("What is in this picture?", (Image.new("RGB", (32, 32), (200, 30, 30)),)),
        ChatRow("hello", system="Answer briefly."),
        ChatRow(
            "Describe everything you can see in this wide picture, in as much detail as you can manage.",
            (Image.new("RGB", (48, 24), (20, 40, 220)),),  # not square
        ),
    ]


@pytest.fixture(scope="module", params=ARCHS)
def adapter(request: pytest.FixtureRequest) -> VLMAdapter:
    ad = load_model(f"tiny-random:{request.param}")
    assert isinstance(ad, VLMAdapter)
    return ad


def _generate(ad: VLMAdapter, batch: dict[str, torch.Tensor]):
    with torch.no_grad():
        return ad.model.generate(
            **batch, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
        )


def test_registry_covers_every_family() -> None:
    assert set(ARCHS) <= set(BUILDERS)
    assert set(ARCHS) <= set(ADAPTERS)
    for arch in ARCHS:
        assert ADAPTERS[arch].supports_images
        assert ADAPTERS[arch].mixed_image_batches  # every family here takes mixed batches


def test_model_type_picks_adapter(adapter: VLMAdapter) -> None:
    assert type(adapter) is ADAPTERS[adapter.model.config.model_type]
    assert adapter.family == adapter.model.config.model_type


def test_batch_is_left_padded_and_mixes_image_rows(adapter: VLMAdapter) -> None:
    rows = _rows()
    batch = adapter.encode(rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(rows)
    for row_mask in mask:
        # left padding: zeros only before the first one, never after it
        first = int(row_mask.nonzero()[0])
        assert row_mask[:first].sum() == 0 and bool(row_mask[first:].all())
    assert (mask[:, 0] == 0).any(), "some row should be padded on the left"
    assert bool(mask[:, -1].all()), "every row should end with real tokens"
    assert bool((ids[mask == 0] == adapter.tokenizer.pad_token_id).all())
    image_id = adapter.model.config.image_token_id
    per_row = (ids == image_id).sum(dim=1).tolist()
    assert per_row[0] > 0 and per_row[1] == 0 and per_row[2] > 0
    assert batch["pixel_values"].dtype == torch.float32


def test_batched_greedy_equals_each_row_alone(adapter: VLMAdapter) -> None:
    rows = _rows()
    batch = adapter.encode(rows)
    out = _generate(adapter, batch)
    prompt_len = batch["input_ids"].shape[1]
    assert out.sequences.shape == (len(rows), prompt_len + NEW_TOKENS)
    for i, row in enumerate(rows):
        single = adapter.encode([row])
        alone = _generate(adapter, single)
        assert out.sequences[i, prompt_len:].tolist() == alone.sequences[0, single["input_ids"].shape[1]:].tolist()
        # The tokens agree; the step logits agree too (left padding only moves float noise).
        for step in range(NEW_TOKENS):
            assert torch.allclose(out.scores[step][i], alone.scores[step][0], atol=1e-4)


def test_plain_forward_is_padding_invariant(adapter: VLMAdapter) -> None:
    """`model(**batch)` (risk passes without generation) sees each row as if it ran alone."""
    rows = _rows()
    batch = adapter.encode(rows)
    with torch.no_grad():
        last = adapter.model(**batch, use_cache=False).logits[:, -1]
        for i, row in enumerate(rows):
            alone = adapter.model(**adapter.encode([row]), use_cache=False).logits[0, -1]
            assert torch.allclose(last[i], alone, atol=1e-4)


def test_rows_with_several_images(adapter: VLMAdapter) -> None:
    red, blue, tall = (Image.new("RGB", s, c) for s, c in [((32, 32), "red"), ((48, 24), "blue"), ((20, 60), "green")])
    rows = [ChatRow("two", (red, blue)), ChatRow("none"), ChatRow("three", (blue, tall, red), system="Be brief.")]
    batch = adapter.encode(rows)
    out = _generate(adapter, batch)
    for i, row in enumerate(rows):
        alone = _generate(adapter, adapter.encode([row]))
        assert torch.allclose(out.scores[0][i], alone.scores[0][0], atol=1e-4)


def test_text_only_batch(adapter: VLMAdapter) -> None:
    rows = [ChatRow("hi"), ChatRow("a longer question without any picture", system="Be careful.")]
    batch = adapter.encode(rows)
    assert "pixel_values" not in batch
    assert (batch["attention_mask"][:, 0] == 0).any()
    out = _generate(adapter, batch)
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS


def test_image_reaches_the_decoder(adapter: VLMAdapter) -> None:
    def first_logits(color: tuple[int, int, int]) -> torch.Tensor:
        batch = adapter.encode([ChatRow("What colour?", (Image.new("RGB", (32, 32), color),))])
        with torch.no_grad():
            return adapter.model(**batch).logits[0, -1]

    assert not torch.allclose(first_logits((255, 0, 0)), first_logits((0, 0, 255)), atol=1e-6)


def test_prompt_places_images_before_text(adapter: VLMAdapter) -> None:
    row = _rows()[0]
    prompt = adapter.prompt_text(row)
    assert prompt.rstrip().count(row.text) == 1
    image_token = adapter.processor.image_token
    assert image_token in prompt and prompt.index(image_token) < prompt.index(row.text)
    system_row = ChatRow("hello", system="Answer briefly.")
    prompt = adapter.prompt_text(system_row)
    assert prompt.index("Answer briefly.") < prompt.index("hello")
    if adapter.chat_template():  # templating through the processor gives the same prompt
        rendered = adapter.processor.apply_chat_template(
            adapter.messages(row), tokenize=False, add_generation_prompt=True
        )
        assert rendered == adapter.prompt_text(row)


def test_same_seed_same_weights_other_seed_differs(adapter: VLMAdapter) -> None:
    arch = adapter.model.config.model_type
    first = build_tiny(arch, 0)[0].state_dict()
    again = build_tiny(arch, 0)[0].state_dict()
    other = build_tiny(arch, 1)[0].state_dict()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    # the spec's default seed is 0: load_model built the very same weights
    loaded = adapter.model.state_dict()
    assert all(torch.equal(first[k], loaded[k]) for k in first)


def test_locators_point_at_the_text_decoder(adapter: VLMAdapter) -> None:
    lm = adapter.language_model()
    layers = adapter.decoder_layers()
    text_cfg = adapter.model.config.get_text_config()
    assert layers is lm.layers and adapter.final_norm() is lm.norm
    assert len(layers) == adapter.num_layers == text_cfg.num_hidden_layers
    lm_modules = {id(m) for m in lm.modules()}
    assert all(id(layer) in lm_modules for layer in layers)
    vision = adapter.vision_modules()
    assert vision, "the adapter should know where the vision tower is"
    vision_modules = {id(m) for v in vision for m in v.modules()}
    assert not lm_modules & vision_modules
    assert adapter.lm_head() is adapter.model.lm_head
    assert adapter.hidden_size == text_cfg.hidden_size == lm.embed_tokens.embedding_dim
    assert adapter.vocab_size == len(adapter.tokenizer) == text_cfg.vocab_size
    assert adapter.logits_are_affine
    fp = adapter.fingerprint()
    assert fp["hidden_size"] == text_cfg.hidden_size
    assert fp["num_layers"] == text_cfg.num_hidden_layers
    assert fp["family"] == adapter.family


def test_hooks_on_decoder_layers_fire_during_generate(adapter: VLMAdapter) -> None:
    seen: dict[int, list[tuple[int, ...]]] = {}

    def hook(index: int):
        def fn(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen.setdefault(index, []).append(tuple(hidden.shape))

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(adapter.decoder_layers())]
    try:
        batch = adapter.encode(_rows()[:2])
        _generate(adapter, batch)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(adapter.num_layers))
    for shapes in seen.values():
        assert len(shapes) == NEW_TOKENS  # the prompt pass, then one call per further token
        assert shapes[0] == (2, batch["input_ids"].shape[1], adapter.hidden_size)
        assert shapes[-1] == (2, 1, adapter.hidden_size)


def test_image_tokens_option_sizes_the_grid() -> None:
    model, tok, proc = build("llava", image_tokens=576)  # LLaVA-1.5: 336 px, 14 px patches
    assert model.config.vision_config.image_size == 336 and model.config.image_seq_length == 576
    adapter = ADAPTERS["llava"](model, tok, proc)
    batch = adapter.encode([ChatRow("what", (Image.new("RGB", (64, 40), "green"),))])
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 576
    assert tuple(batch["pixel_values"].shape) == (1, 3, 336, 336)
    with pytest.raises(ModelError):
        build("llava", image_tokens=20)
    with pytest.raises(ModelError):
        build("no_such_vlm")


@pytest.mark.parametrize("arch", ARCHS)
def test_smollm2_tokenizer_gives_real_lengths_and_the_same_mechanics(arch: str) -> None:
    """tokenizer="smollm2" (what the image benchmarks build on): SmolLM2's own vocabulary plus the
    family's special tokens; prompts as long as a real model's, images placed and batched alike."""
    model, tok, proc = build(arch, tokenizer="smollm2")
    adapter = ADAPTERS[arch](model, tok, proc)
    assert len(tok) >= 49152 and model.get_input_embeddings().weight.shape[0] == len(tok)
    text = "Describe everything you can see in this wide picture, in as much detail as you can manage."
    bytes_tok = build(arch)[1]
    assert len(tok(text)["input_ids"]) * 3 < len(bytes_tok(text)["input_ids"])
    rows = _rows()
    batch = adapter.encode(rows)
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert per_row[0] > 0 and per_row[1] == 0 and per_row[2] > 0
    out = _generate(adapter, batch)
    single = adapter.encode([rows[2]])
    alone = _generate(adapter, single)
    width = batch["input_ids"].shape[1]
    assert out.sequences[2, width:].tolist() == alone.sequences[0, single["input_ids"].shape[1]:].tolist()
    with pytest.raises(ModelError, match="tokenizer"):
        build(arch, tokenizer="no_such_tokenizer")


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl", "smolvlm", "paligemma"])
def test_load_local_round_trip(arch: str, tmp_path) -> None:
    original = load_model(f"tiny-random:{arch}")
    original.model.save_pretrained(tmp_path)
    original.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded) is type(original)
    assert loaded.fingerprint() == original.fingerprint()
    rows = _rows()
    a, b = original.encode(rows), loaded.encode(rows)
    assert a.keys() == b.keys()
    for key in a:
        # With torchvision installed the reloaded image processor is the torchvision backend, not
        # PIL: same pixels for these one-colour images, up to float rounding.
        same = torch.allclose(a[key], b[key], atol=1e-5) if a[key].is_floating_point() else torch.equal(a[key], b[key])
        assert same, key
    with torch.no_grad():
        assert torch.allclose(original.model(**a).logits, loaded.model(**b).logits, atol=1e-4)
