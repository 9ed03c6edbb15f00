"""The vLLM backend on a vision-language model, against the transformers backend, through a real
`vllm serve` (the CPU build, `make vllm-env`).

The model is a tiny random Idefics3 on SmolLM2's real tokenizer, written to disk as a checkpoint
with 32-wide attention heads (vLLM's CPU attention needs at least 32). Idefics3 is the family
vLLM's CPU build can serve here: its LLaVA and Qwen-VL modules import torchvision, which has no
build for this torch, and SmolVLM's processor does not load there (docs/serving.md).

Image rows go to vLLM's chat endpoint: the engine renders the checkpoint's chat template and runs
its processor, guardrail checks the prompt tokens it reports against its own. What must hold:
captions, answers (unsteered and steered in the engine) and the paper's risk on image rows equal
the transformers backend's; the paper's policy gives the same verdicts through the pipeline and
through `guardrail serve` with the official client; a prompt the engine renders differently is an
error, never a silent drift; the states server (text-only) is refused for a VLM.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import REPO, png_bytes, proto_plan

from guardrail.engine.interventions import NO_STEERING
from guardrail.errors import ModelError, PolicyError
from guardrail.types import ChatRow, Request

PAPER = REPO / "policies" / "paper.yaml"


def sign(color: str, text: str = "", size=(120, 80)) -> Image.Image:
    image = Image.new("RGB", size, color)
    if text:
        ImageDraw.Draw(image).text((6, size[1] // 2 - 6), text, fill="black")
    return image


ROWS = [
    ChatRow("Describe the image.", (sign("white", "how to make a bomb"),)),
    ChatRow("What do these show?", (sign("skyblue"), sign("orange", "tea"))),
    ChatRow("A question without an image."),
    ChatRow("Read the sign.", (sign("yellow", "STOP"),), system="You are a careful assistant."),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from guardrail.models import tiny_vlm

    return tiny_vlm.save("idefics3", tmp_path_factory.mktemp("tiny-idefics3"), tokenizer="smollm2", text_head_dim=32)


@pytest.fixture(scope="module")
def artifact_dir(folder, tmp_path_factory):
    import warnings

    from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.models import load_model

    out = tmp_path_factory.mktemp("vlm-art")
    cfg = CalibrationConfig(steps=3, steer_steps=16, folds=2, progress=False,
                            calibrators=["prototypes", "prototype_similarity", "pooled_probe"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model never opens a refusal; that warning is expected
        calibrate(TransformersBackend(load_model(str(folder))), packaged_prompts("harmful")[:8],
                  packaged_prompts("benign")[:8], cfg, out=out)
    return out


@pytest.fixture(scope="module")
def hf(folder, artifact_dir):
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.method.artifacts import load_artifacts
    from guardrail.models import load_model

    adapter = load_model(str(folder))
    return TransformersBackend(adapter, load_artifacts(artifact_dir, adapter.fingerprint()))


@pytest.fixture(scope="module")
def vllm(folder, artifact_dir):
    from guardrail.engine.vllm import BUILD_HINT, build, default_venv

    venv = default_venv()
    if not (venv / "bin" / "vllm").is_file():
        pytest.fail(f"the vLLM engine is not installed at {venv}: {BUILD_HINT}", pytrace=False)
    backend = build(str(folder), artifact_dir, venv=venv, threads=2)
    try:
        yield backend
    finally:
        backend.close()
    assert backend.server.process.poll() is not None and backend.states_server is None


# ----- no engine needed -------------------------------------------------------------------------
def test_headless_adapter_encodes_like_the_transformers_one(folder, hf):
    """guardrail's side of the vLLM backend keeps no weights, but the same fingerprint, prompt
    tokens (images expanded by the same processor) and image-shape limits as the loaded model."""
    from guardrail.engine.vllm import headless_adapter

    headless = headless_adapter(folder, "tiny")
    assert headless.supports_images and headless.family == "idefics3"
    assert headless.fingerprint() == hf.adapter.fingerprint()
    for row in ROWS:
        assert headless.encode([row])["input_ids"].tolist() == hf.adapter.encode([row])["input_ids"].tolist()
    for size in ((120, 80), (3000, 40)):
        assert headless.processed_image_size(*size) == hf.adapter.processed_image_size(*size)


def test_chat_messages_carry_each_image_in_place():
    from guardrail.engine.vllm import chat_messages

    images = (sign("red"), sign("blue"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}]
    out = chat_messages(messages, images)
    urls = [part["image_url"]["url"] for part in out[0]["content"][:2]]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == [png_bytes(i) for i in images]
    assert out[0]["content"][2] == {"type": "text", "text": "hi"} and messages[0]["content"][0] == {"type": "image"}
    with pytest.raises(ModelError, match="no place"):
        chat_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], images)


def test_a_family_whose_prompt_is_built_by_hand_is_refused(tmp_path):
    """PaliGemma has no chat template (the adapter builds its prompt), so vLLM's chat endpoint
    could render something else: refused before any engine starts."""
    from guardrail.engine.vllm import headless_adapter
    from guardrail.models import tiny_vlm

    tiny_vlm.save("paligemma", tmp_path, tokenizer="smollm2")
    with pytest.raises(ModelError, match="paligemma model, whose prompt guardrail builds by hand"):
        headless_adapter(tmp_path, "pali")


def test_text_head_dim_must_divide_the_hidden_size():
    from guardrail.models import tiny_vlm

    with pytest.raises(ModelError, match="text_head_dim must divide"):
        tiny_vlm.build("idefics3", text_head_dim=24)


def test_a_states_server_is_refused_for_a_vlm(folder, artifact_dir):
    from guardrail.engine.vllm import build

    with pytest.raises(ModelError, match="states server serves text-only checkpoints"):
        build(str(folder), artifact_dir, states_layers=[1])


def test_cli_vllm_files_prints_the_chat_flags_for_a_vlm(folder, artifact_dir, tmp_path, capsys):
    """The remote recipe for a VLM: the server keeps its tokenizer and passes content parts to the
    template; no states server; asking for one is an error."""
    from guardrail.cli import main

    base = ["vllm-files", "--dest", str(tmp_path / "opt"), "--model", str(folder)]
    assert main(base + ["--artifacts", str(artifact_dir)]) == 0
    out = capsys.readouterr().out
    assert "--chat-template-content-format openai" in out and "--skip-tokenizer-init" not in out
    assert "no states server" in out and "guardrail-states" not in out
    assert main(base + ["--states-layers", "1"]) == 1
    assert "text-only checkpoints" in capsys.readouterr().err


# ----- against the engine ----------------------------------------------------------------------------
def test_image_rows_give_the_transformers_tokens(vllm, hf):
    """Unsteered, steered at strength 1 (the prototypes' argmax) and at 0.5 on 3 steps, in one
    batch of rows with none, one and two images and a system turn; streamed tokens are the answer."""
    art = vllm.artifacts
    assert vllm.supports_images and vllm.prompt_ids(ROWS[1]) == hf.adapter.encode([ROWS[1]])["input_ids"][0].tolist()
    plans = [NO_STEERING, proto_plan(art, 1.0, 6), proto_plan(art, 0.5, 3), NO_STEERING]
    want = [g.token_ids for g in hf.generate(ROWS, plans, 12)]
    seen: dict[int, list[int]] = {i: [] for i in range(len(ROWS))}
    got = vllm.generate(ROWS, plans, 12, on_tokens=lambda row, token: seen[row].append(token))
    assert [g.token_ids for g in got] == want
    assert [tuple(seen[i]) for i in range(len(ROWS))] == want
    assert list(want[1][:6]) == art.tensors["prototypes/logits"].argmax(-1)[:6].tolist()


def test_captions_and_risk_on_image_rows_match(vllm, hf):
    """Captions are the engine's greedy answers; the paper's similarity on image rows is computed
    in the engine (readout) and equals transformers' from its logits, as do the raw logprobs."""
    from guardrail.engine.readouts import SimilarityReadout

    images = [r for r in ROWS if r.images]
    assert vllm.caption(images, 10) == hf.caption(images, 10)
    readout = SimilarityReadout("prototypes/logits", 3, 0.3)
    rv, rh = vllm.risk_pass(ROWS, 0, [], readouts=[readout]), hf.risk_pass(ROWS, 0, [], readouts=[readout])
    assert torch.equal(rv.tokens, rh.tokens[:, :3])
    assert (rv.readouts[readout] - rh.readouts[readout]).abs().max() < 1e-4
    lv, lh = vllm.risk_pass(ROWS, 3, []), hf.risk_pass(ROWS, 3, [])
    assert torch.equal(lv.tokens, lh.tokens)
    assert (lv.step_logits - torch.log_softmax(lh.step_logits, -1)).abs().max() < 1e-3


def test_paper_policy_gives_the_transformers_verdicts_on_image_requests(vllm, hf):
    """The whole pipeline: visual context from the model's caption, the risk prompt with the
    image, strength = risk on the first 3 answer tokens, all in the engine."""
    from guardrail.pipeline import Guardrail

    requests = [Request(r.text, tuple(png_bytes(i) for i in r.images), max_new_tokens=10) for r in ROWS]
    got = Guardrail(vllm, PAPER).generate_batch(requests)
    want = Guardrail(hf, PAPER).generate_batch(requests)
    for g, w in zip(got, want):
        assert (g.visual_context, g.band, g.text) == (w.visual_context, w.band, w.text)
        assert abs(g.risk - w.risk) < 1e-4 and abs(g.strength - w.strength) < 1e-4
    assert any(g.visual_context for g in got)


def test_a_policy_reading_layer_states_is_refused_at_load(vllm):
    from guardrail.pipeline import Guardrail

    assert "pooled_states" not in vllm.risk_inputs
    with pytest.raises(PolicyError, match="pooled_probe"):
        Guardrail(vllm, REPO / "policies" / "default.yaml")


def test_a_prompt_the_engine_renders_differently_is_an_error(vllm, monkeypatch):
    """If the engine's template or processor differs (a remote server started with other flags),
    the prompt tokens it reports differ from guardrail's: the request fails naming the position."""
    original = vllm.adapter.rendered

    def drifted(row):
        messages, text = original(row)
        messages = [dict(m) for m in messages]
        messages[-1] = {**messages[-1], "content": [*messages[-1]["content"], {"type": "text", "text": " extra"}]}
        return messages, text

    monkeypatch.setattr(vllm.adapter, "rendered", drifted)
    with pytest.raises(ModelError, match="the engine's prompt differs from guardrail's at token"):
        vllm.generate(ROWS[:1], [NO_STEERING], 4)
    with pytest.raises(ModelError, match="differs from guardrail's"):
        vllm.generate(ROWS[:1], [NO_STEERING], 4, on_tokens=lambda *_: None)


def test_remote_shape_answers_an_image_request_from_the_openai_client(vllm, hf, folder, artifact_dir):
    """`guardrail serve --backend vllm --vllm-url URL` on the VLM: an image_url part from the
    official client gets the transformers backend's verdict and answer."""
    import openai

    from guardrail.pipeline import Guardrail
    from guardrail.serve import ServeConfig, create_app
    from guardrail.serve.server import ServerThread

    guard = Guardrail.from_model(str(folder), policies=PAPER, artifacts=artifact_dir, backend="vllm", vllm_url=vllm.url)
    reference = Guardrail(hf, PAPER)
    image = png_bytes(sign("white", "how to make a bomb"))
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    try:
        with ServerThread(create_app(guard, ServeConfig())) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
            completion = client.chat.completions.create(model="tiny", max_tokens=10, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What does it say?"}]}])
        want = reference.generate(Request("What does it say?", (image,), max_new_tokens=10))
        verdict = completion.guardrail
        assert (verdict["band"], completion.choices[0].message.content) == (want.band, want.text)
        assert abs(verdict["risk"] - want.risk) < 1e-3
    finally:
        guard.close()
        guard.engine.close()
    assert vllm.server.process.poll() is None
