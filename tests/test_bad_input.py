"""Bad input: each case is refused with an error naming the problem, and leaves nothing behind (no
audit record, no cached caption, no stage run). Through the Python API and over HTTP."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from json_mutation import json_values, paths, replaced
from fault_plugins import FaultPlugin, RecordingSink, SpyBackend, random_artifacts
from guardrail.errors import InputError
from guardrail.images import decode_image
from guardrail.pipeline import Guardrail
from guardrail.plugin.manager import PluginManager
from guardrail.tenants import UnknownTenantError
from guardrail.types import Request

POLICY = """\
name: {name}
reformulator: {{use: visual_context, with: {{captioner: fault_captioner}}}}
risk:
  assessors:
    - use: fault_assessor
      with: {{risk: 0.2}}
steering: {{use: fault_controller}}
bands:
  - {{name: all, upto: 1.0, strength: risk}}
limits:
  max_images: 2
  max_image_pixels: 10000
  max_image_bytes: 200000
  max_new_tokens: 8
"""


def png(size=(40, 30), color="red", mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height with a tiny, all-zero IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def adapter():
    from guardrail.models import load_model

    return load_model("tiny-random:llama")


@pytest.fixture(scope="module")
def artifacts(adapter, tmp_path_factory):
    return random_artifacts(adapter, tmp_path_factory.mktemp("bad-input-art"))


def build_guard(adapter, artifacts, folder: Path, tenants: str | None):
    from guardrail.engine.transformers import TransformersBackend

    folder.mkdir()
    (folder / "guarded.yaml").write_text(POLICY.format(name="guarded"))
    if tenants is not None:
        (folder / "tenants.yaml").write_text(tenants)
    plugin = FaultPlugin()
    spy = SpyBackend(TransformersBackend(adapter, artifacts))
    sink = RecordingSink()
    guard = Guardrail(
        spy, folder, plugins=PluginManager(entry_points=False, plugins=[plugin]),
        audit_log=folder.parent / "audit.jsonl", audit_sinks=[sink],
    )
    return guard, plugin, spy, sink


@pytest.fixture
def setup(adapter, artifacts, tmp_path):
    guard, plugin, spy, sink = build_guard(adapter, artifacts, tmp_path / "policies", "default_policy: guarded\n")
    yield guard, plugin, spy, sink
    guard.close()


def assert_nothing_happened(guard, plugin, spy, sink) -> None:
    assert sink.records == [] and plugin.audited == []
    assert len(guard.env.captions) == 0 and plugin.calls == {}
    assert spy.generated == [] and spy.risk_rows == 0


BAD_REQUESTS = {
    "empty prompt": (Request(""), "empty prompt"),
    "whitespace prompt": (Request(" \n\t  "), "empty prompt"),
    "prompt over the context": (Request("a" * 2100), "prompt too long: 2100 tokens plus max_new_tokens 8 exceeds the model's context of 2048"),
    "prompt plus answer over the context": (Request("a" * 2045, max_new_tokens=4), "prompt too long: 2045 tokens plus max_new_tokens 4"),
    "prompt not a string": (Request(b"hello"), "prompt must be a string, got bytes"),
    "prompt with a lone surrogate": (Request("hi \ud800 there"), "prompt is not valid Unicode: surrogates not allowed at position 3"),
    "corrupt image bytes": (Request("hi", images=[b"\x89PNG\r\n\x1a\n" + b"garbage" * 20]), "image 0: corrupt image data"),
    "truncated image": (Request("hi", images=[png()[:60]]), "image 0: corrupt image data"),
    "empty image": (Request("hi", images=[b""]), "image 0: empty image data"),
    "text, not an image": (Request("hi", images=[b"<svg xmlns='http://www.w3.org/2000/svg'/>"]), "image 0: not a readable image"),
    "unsupported format (PPM)": (Request("hi", images=[png(fmt="PPM")]), "image 0: unsupported image format PPM"),
    "unsupported format (ICO)": (Request("hi", images=[png((16, 16), fmt="ICO")]), "image 0: unsupported image format ICO"),
    "bomb header": (Request("hi", images=[png_header_only(6000, 6000)]), "image 0: 6000x6000 pixels exceeds the limit of 10000"),
    "huge bomb header": (Request("hi", images=[png_header_only(50_000, 50_000)]), "image 0: not a readable image (Image size (2500000000 pixels) exceeds limit"),
    "over the pixel limit": (Request("hi", images=[png((101, 100))]), "image 0: 101x100 pixels exceeds the limit of 10000"),
    "PIL image over the pixel limit": (Request("hi", images=[Image.new("RGB", (200, 200))]), "image 0: 200x200 pixels exceeds the limit of 10000"),
    "over the byte limit": (Request("hi", images=[png() + b"\x00" * 200_000]), "bytes exceeds the limit of 200000"),
    "too many images": (Request("hi", images=[png(), png(), png()]), "3 images exceeds the policy's limit of 2"),
    "image of the wrong type": (Request("hi", images=[42]), "image 0: expected bytes, a path or a PIL image, got int"),
    "images not a list": (Request("hi", images=png()), "images must be a list of images, got bytes"),
    "missing image file": (Request("hi", images=["/nonexistent/picture.png"]), "image 0: cannot read /nonexistent/picture.png"),
    "a device, not an image file": (Request("hi", images=["/dev/zero"]), "image 0: /dev/zero is not a regular file"),
    "max_new_tokens zero": (Request("hi", max_new_tokens=0), "max_new_tokens must be between 1 and 8, got 0"),
    "max_new_tokens over the policy": (Request("hi", max_new_tokens=9), "max_new_tokens must be between 1 and 8, got 9"),
    "max_new_tokens a bool": (Request("hi", max_new_tokens=True), "max_new_tokens must be a whole number, got bool"),
    "force_strength a string": (Request("hi", force_strength="1"), "force_strength must be a number, got str"),
    "force_strength NaN": (Request("hi", force_strength=float("nan")), "force_strength must be in [0, 1], got nan"),
    "unguarded a string": (Request("hi", unguarded="no"), "unguarded must be true or false, got str"),
    "tenant not a string": (Request("hi", tenant=["acme"]), "tenant must be a string, got list"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_refused_with_a_clear_error_and_no_partial_state(setup, case):
    guard, plugin, spy, sink = setup
    request, message = BAD_REQUESTS[case]
    with pytest.raises(InputError) as exc:
        guard.generate(request)
    assert message in str(exc.value)
    assert_nothing_happened(guard, plugin, spy, sink)


@pytest.mark.parametrize("case", ["corrupt image bytes", "too many images", "empty prompt"])
def test_one_bad_request_rejects_its_batch_before_any_stage_runs(setup, case):
    """The good request comes first and carries an image: nothing may be captioned, cached,
    assessed, generated or audited for it when a later request of the batch is bad."""
    guard, plugin, spy, sink = setup
    good = Request("describe this", images=[png((20, 20), "blue")])
    with pytest.raises(InputError) as exc:
        guard.generate_batch([good, BAD_REQUESTS[case][0]])
    assert str(exc.value).startswith("request 1: ")
    assert_nothing_happened(guard, plugin, spy, sink)
    # the good request alone is served, and its caption cached: the harness can see state
    result = guard.generate(good)
    assert result.visual_context == "The image shows a 20x20 picture." and len(guard.env.captions) == 1
    assert len(sink.records) == 1


def test_streaming_and_assess_refuse_bad_input_the_same_way(setup):
    guard, plugin, spy, sink = setup
    with pytest.raises(InputError, match="empty prompt"):
        guard.stream(Request("  "))
    with pytest.raises(InputError, match="3 images exceeds"):
        guard.assess(Request("hi", images=[png(), png(), png()]))
    assert_nothing_happened(guard, plugin, spy, sink)


def test_unknown_tenant_gets_the_default_policy_when_one_is_configured(setup):
    guard, plugin, spy, sink = setup
    result = guard.generate(Request("hello", tenant="nobody-we-know"))
    assert (result.tenant, result.policy) == ("nobody-we-know", "guarded")
    assert sink.records[0]["tenant"] == "nobody-we-know"


def test_unknown_tenant_is_refused_without_a_default_policy(adapter, artifacts, tmp_path):
    guard, plugin, spy, sink = build_guard(adapter, artifacts, tmp_path / "policies", "tenants: {acme: guarded}\n")
    try:
        assert guard.generate(Request("hello", tenant="acme")).policy == "guarded"
        sink.records.clear(), plugin.audited.clear(), spy.generated.clear(), plugin.calls.clear()
        spy.risk_rows = 0
        for tenant in ("nobody-we-know", None):
            with pytest.raises(UnknownTenantError) as exc:
                guard.generate(Request("hello", tenant=tenant))
            assert f"unknown tenant {tenant or 'default'!r} and no default_policy is configured" in str(exc.value)
        assert_nothing_happened(guard, plugin, spy, sink)
    finally:
        guard.close()


# ----- images directly ------------------------------------------------------------------------------
def test_pixel_limit_is_checked_from_the_header_before_decompression(monkeypatch):
    """The bomb's IDAT holds 64 zero bytes, far short of its claimed pixels: had the decoder run,
    the error would be 'corrupt image data'. The load is never even called."""
    from PIL import ImageFile

    calls = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self) or None)
    with pytest.raises(InputError, match=r"6000x6000 pixels exceeds the limit of 25000000"):
        decode_image(png_header_only(6000, 6000), max_pixels=25_000_000, max_bytes=10**6)
    assert calls == []


def test_pillow_own_bomb_guard_is_an_input_error_too():
    """A policy may allow more pixels than Pillow's own guard (2 x MAX_IMAGE_PIXELS): still a clean
    InputError, never Pillow's exception."""
    with pytest.raises(InputError, match="image 0: not a readable image"):
        decode_image(png_header_only(20_000, 20_000), max_pixels=10**12, max_bytes=10**6)


def test_image_file_over_the_byte_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(png() + b"\x00" * 5000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    with pytest.raises(InputError, match=r"image 3: \d+ bytes exceeds the limit of 1000"):
        decode_image(big, max_pixels=10**6, max_bytes=1000, index=3)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(0, 400), st.binary(max_size=8))
def test_mangled_image_bytes_are_an_image_or_an_input_error(prefix_garbage, cut, insert):
    """Random bytes, and valid images cut and spliced anywhere: decode_image returns an RGB image
    or raises InputError; nothing else."""
    valid = [png((12, 9)), png((12, 9), fmt="JPEG"), png((12, 9), fmt="GIF"), png((12, 9), fmt="BMP"), png((12, 9), fmt="WEBP")]
    for data in [prefix_garbage] + [v[:cut] + insert + v[cut + len(insert):] for v in valid]:
        try:
            decoded = decode_image(data, max_pixels=10_000, max_bytes=10_000)
        except InputError as exc:
            assert str(exc).startswith("image 0: ")
        else:
            assert decoded.image.mode == "RGB" and decoded.image.width * decoded.image.height <= 10_000


# ----- HTTP -------------------------------------------------------------------------------------------
USER = [{"role": "user", "content": "hi"}]
VALID_BODY = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]},
    ],
    "max_tokens": 4,
    "temperature": 0.0,
    "stream": False,
    "stream_options": {"include_usage": False},
    "metadata": {"k": "v"},
    "n": 1,
}
JSON_VALUES = json_values(st.integers(-(2**70), 2**70), text_size=10, key_size=5, leaves=6)


@pytest.fixture(scope="module")
def http(adapter, artifacts, tmp_path_factory):
    from starlette.testclient import TestClient

    from guardrail.serve import ServeConfig, create_app

    body = json.loads(json.dumps(VALID_BODY))
    import base64

    body["messages"][1]["content"][1]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(png((10, 10))).decode()
    folder = tmp_path_factory.mktemp("http")
    guard, plugin, spy, sink = build_guard(adapter, artifacts, folder / "policies", "tenants: {acme: guarded}\n")
    with TestClient(create_app(guard, ServeConfig())) as client:
        yield client, body, sink
    guard.close()


def post(client, body=None, raw: bytes | None = None, tenant: str | None = "acme"):
    headers = {"content-type": "application/json"}
    if tenant:
        headers["X-Guardrail-Tenant"] = tenant
    return client.post("/v1/chat/completions", content=raw if raw is not None else json.dumps(body), headers=headers)


def test_http_valid_body_is_answered_and_audited(http):
    client, body, sink = http
    before = len(sink.records)
    response = post(client, body)
    assert response.status_code == 200, response.text
    assert len(sink.records) == before + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_http_wrong_types_anywhere_are_4xx_with_a_message_never_500(http, data):
    """Any field of a valid body replaced by any JSON value: 200, or a 4xx whose message says what
    is wrong; never a 5xx, and no audit record unless the request was served."""
    client, body, sink = http
    path = data.draw(st.sampled_from(list(paths(body))[1:]))
    mutated = replaced(body, path, data.draw(JSON_VALUES))
    before = len(sink.records)
    response = post(client, mutated)
    assert response.status_code < 500, (path, response.text)
    if response.status_code == 200:
        assert len(sink.records) == before + 1
    else:
        assert 400 <= response.status_code < 500
        assert response.json()["error"]["message"].strip()
        assert len(sink.records) == before


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid Unicode"),
        (b"\xff\xfe{}", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (json.dumps({"messages": USER, "max_tokens": 10**30}).encode(), 400, "max_tokens must be between 1 and 8 (the policy"),
        (json.dumps({"messages": USER, "max_tokens": 2.0}).encode(), 400, "max_tokens must be an integer, got float"),
        (json.dumps({"messages": [{"role": "user", "content": []}]}).encode(), 400, "empty prompt"),
    ],
)
def test_http_hostile_bodies_are_4xx(http, raw, status, message):
    client, _, sink = http
    before = len(sink.records)
    response = post(client, raw=raw)
    assert response.status_code == status and message in response.json()["error"]["message"]
    assert len(sink.records) == before


def test_http_unknown_tenant_is_403_without_a_default_policy(http):
    client, _, sink = http
    before = len(sink.records)
    response = post(client, {"messages": USER}, tenant="nobody")
    assert response.status_code == 403 and "unknown tenant 'nobody'" in response.json()["error"]["message"]
    response = post(client, {"messages": USER}, tenant=None)
    assert response.status_code == 403 and "unknown tenant 'default'" in response.json()["error"]["message"]
    assert len(sink.records) == before
