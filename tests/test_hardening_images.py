"""Image shapes a family's processor would blow up (issue 13, bug 1), and image errors that name
their source instead of `<_io.BytesIO object at 0x...>`.

A 200000x1 PNG is 274 bytes and 0.2 MP, far under any policy limit, yet LLaVA's processor scales the
short side up (to 56 px on the tiny model, 336 px on a real one) before cropping: gigabytes of
pixels. The bound is the adapter's `image_shape_limits()`, checked from the header."""

from __future__ import annotations

import base64
import struct
import zlib
from types import SimpleNamespace

import httpx
import pytest

from conftest import VLM_FAMILIES, png_bytes, red_image, tiny_adapter, tiny_artifacts
from guardrail.errors import InputError
from guardrail.images import ImageShapeLimits, check_image_header, check_image_shape, decode_image, shape_limits_for
from guardrail.serve import ServeConfig, create_app
from guardrail.serve.server import ServerThread
from serving_support import write_policies


def png(width: int, height: int) -> bytes:
    """A grey PNG of any size in a few hundred bytes (rows of zeros compress to nothing)."""
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(b"\0" * (width + 1)) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def image_message(data: bytes, text: str = "What is in this picture?") -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


# ----- the adapters' stated limits ---------------------------------------------------------------
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_every_vlm_family_states_limits_that_pass_photos_and_refuse_slivers(family):
    limits = tiny_adapter(family).image_shape_limits()
    assert limits.family == family
    for size in ((640, 480), (480, 640), (1000, 100)):  # photos, portraits, a 10:1 banner
        check_image_shape(*size, limits)
    with pytest.raises(InputError, match=rf"image 2: 200000x1 has an aspect ratio of 200000:1; {family} models accept"):
        check_image_shape(200_000, 1, limits, "image 2")


def test_llava_limits_say_what_its_processor_builds_before_the_crop():
    """Shortest edge scaled to the processor's 56 px: a 2000x1 sliver becomes 112000x56."""
    limits = tiny_adapter("llava").image_shape_limits()
    assert limits.processed_size(2000, 1) == (112_000, 56)
    assert limits.processed_size(40, 30) == (74, 56)  # CLIP truncates the long side


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_limits_match_the_grid_its_processor_makes(family):
    adapter = tiny_adapter(family)
    limits = adapter.image_shape_limits()
    for size in ((640, 480), (300, 20), (20, 300)):
        grid = adapter.processor.image_processor(red_image(size), return_tensors="pt")["image_grid_thw"][0]
        assert limits.processed_size(*size) == (int(grid[2]) * 14, int(grid[1]) * 14)
    # Qwen's own processor refuses beyond 200:1; the adapter states that bound, not a stricter one.
    check_image_shape(190 * 28, 28, limits)


def test_the_processed_pixel_bound_applies_whatever_the_aspect_ratio():
    limits = ImageShapeLimits("toy", max_aspect_ratio=100.0, max_processed_pixels=40_000,
                              processed_size=lambda w, h: (w * 4, h * 4))
    check_image_shape(50, 50, limits)  # 200x200: at the limit
    with pytest.raises(InputError, match="would resize 60x60 to 240x240, more than its limit of 40000 pixels"):
        check_image_shape(60, 60, limits)
    with pytest.raises(InputError, match="has no pixels"):
        check_image_shape(0, 10, None)


def test_shape_limits_come_from_the_engines_adapter():
    adapter = tiny_adapter("llava")
    assert shape_limits_for(SimpleNamespace(adapter=adapter)).family == "llava"
    assert shape_limits_for(SimpleNamespace()) is None  # an engine that states nothing: no shape bound


def test_decode_image_refuses_the_shape_from_the_header_without_decompressing(monkeypatch):
    from PIL import ImageFile

    def never(self):
        raise AssertionError("the pixels were decompressed")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    limits = tiny_adapter("llava").image_shape_limits()
    with pytest.raises(InputError, match="image 3: 200000x1 has an aspect ratio"):
        decode_image(png(200_000, 1), max_pixels=25_000_000, max_bytes=10**6, index=3, shape=limits)
    with pytest.raises(InputError, match="image 0: 1x5000 has an aspect ratio"):
        check_image_header(png(1, 5000), max_pixels=25_000_000, max_bytes=10**6, shape=limits)
    assert check_image_header(png(40, 30), 25_000_000, 10**6, shape=limits) == (40, 30)


def test_decode_image_checks_a_pil_image_too():
    limits = tiny_adapter("llava").image_shape_limits()
    with pytest.raises(InputError, match="aspect ratio of 50:1"):
        decode_image(red_image((500, 10)), max_pixels=10**6, max_bytes=10**6, shape=limits)
    assert decode_image(red_image((40, 30)), max_pixels=10**6, max_bytes=10**6, shape=limits).image.size == (40, 30)


# ----- errors that name the source ---------------------------------------------------------------
def test_a_corrupt_image_error_names_the_source_not_a_bytesio(tmp_path):
    with pytest.raises(InputError) as from_bytes:
        decode_image(b"not an image at all", max_pixels=10**6, max_bytes=10**6)
    assert "BytesIO" not in str(from_bytes.value)
    assert "image 0: not a readable image" in str(from_bytes.value) and "19 bytes of image data" in str(from_bytes.value)
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError) as from_path:
        decode_image(bad, max_pixels=10**6, max_bytes=10**6, index=1)
    message = str(from_path.value)
    assert "BytesIO" not in message and message.startswith("image 1: ") and str(bad) in message


# ----- through the server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_server(art_root, tmp_path_factory):
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.method.artifacts import load_artifacts
    from guardrail.pipeline import Guardrail

    adapter = tiny_adapter("llava")
    art = load_artifacts(tiny_artifacts("llava", art_root), adapter.fingerprint())
    folder = write_policies(tmp_path_factory.mktemp("images") / "policies")
    guard = Guardrail(TransformersBackend(adapter, art), folder)
    app = create_app(guard, ServeConfig())
    with ServerThread(app) as server:
        yield SimpleNamespace(url=server.url, guard=guard, adapter=adapter)
    guard.close()


def post(url: str, messages: list[dict], tenant: str = "alpha") -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                      headers={"X-Guardrail-Tenant": tenant}, timeout=120)


def test_a_sliver_image_is_a_400_naming_the_field_before_any_model_work(llava_server, monkeypatch):
    encoded = []
    real = llava_server.adapter.encode
    monkeypatch.setattr(llava_server.adapter, "encode", lambda rows: encoded.append(len(rows)) or real(rows))
    # 2000x1: cheap even where it is not refused (112000x56 before the crop), so this test can fail fast.
    response = post(llava_server.url, image_message(png(2000, 1)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert "2000x1 has an aspect ratio of 2000:1; llava models accept at most" in error["message"]
    assert encoded == []  # neither captioned, nor assessed, nor generated
    ok = post(llava_server.url, image_message(png_bytes(red_image((40, 30)))), tenant="beta")
    assert ok.status_code == 200 and encoded


def test_a_corrupt_data_url_names_the_field_over_http(llava_server):
    response = post(llava_server.url, image_message(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20))
    assert response.status_code == 400
    error = response.json()["error"]
    assert "BytesIO" not in error["message"] and error["param"] == "messages[0].content[1].image_url.url"
    assert error["message"].startswith("messages[0].content[1].image_url.url: ")
