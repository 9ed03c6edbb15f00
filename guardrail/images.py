"""Image intake: decode, validate and hash what a request carries, before any stage sees it.

Two kinds of bound apply. The policy's limits (`max_image_bytes`, `max_image_pixels`) bound the
encoded file and the decoded image. `ImageShapeLimits`, stated per model family by its adapter
(`ModelAdapter.image_shape_limits()`), bounds what the family's image processor will make of the
image: a 200000x1 PNG is 0.2 MP and 274 bytes, but a processor that scales the short side up to
336 px would build a 67-gigapixel array from it. Both are checked from the header, before the
pixels are decompressed and long before any model work.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from guardrail.errors import InputError
from guardrail.types import DecodedImage

ALLOWED_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"}
_BYTESIO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class ImageShapeLimits:
    """How far one model family's image processor may be pushed (see the module docstring)."""

    family: str
    max_aspect_ratio: float  # longer side / shorter side
    max_processed_pixels: int  # of the array the processor resizes the image to
    processed_size: Callable[[int, int], tuple[int, int]]  # (width, height) -> its (width, height)


def check_image_shape(width: int, height: int, limits: ImageShapeLimits | None, label: str = "image 0") -> None:
    """Raise InputError when a width x height image would push the family's processor past its
    limits; `limits=None` (no adapter stated any) checks only that the image has pixels."""
    if width < 1 or height < 1:
        raise InputError(f"{label}: a {width}x{height} image has no pixels")
    if limits is None:
        return
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise InputError(
            f"{label}: {width}x{height} has an aspect ratio of {ratio:.0f}:1; {limits.family} models accept "
            f"at most {limits.max_aspect_ratio:g}:1 (crop or split the image)"
        )
    out_w, out_h = limits.processed_size(width, height)
    if out_w * out_h > limits.max_processed_pixels:
        raise InputError(
            f"{label}: the {limits.family} image processor would resize {width}x{height} to {out_w}x{out_h}, "
            f"more than its limit of {limits.max_processed_pixels} pixels"
        )


def shape_limits_for(engine: Any) -> ImageShapeLimits | None:
    """The shape limits of the model behind an engine (a backend holding `.adapter`), if stated."""
    adapter = getattr(engine, "adapter", engine)
    method = getattr(adapter, "image_shape_limits", None)
    return method() if callable(method) else None


def _read_file(path: Path, max_bytes: int, label: str) -> bytes:
    """The file's bytes, refusing before opening it a device or pipe (/dev/zero never ends, a
    FIFO blocks the open) and a file over the byte limit (it would be read whole first)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{label}: {path} is not a regular file")
        if info.st_size > max_bytes:
            raise InputError(f"{label}: {info.st_size} bytes exceeds the limit of {max_bytes}")
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)  # the file may have grown since; the caller checks the size
    except OSError as exc:
        raise InputError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None


def _source_bytes(source: Any, max_bytes: int, label: str) -> tuple[bytes, str]:
    """(encoded bytes, how to name them in an error) for a path or bytes."""
    if isinstance(source, (str, Path)):
        data, name = _read_file(Path(source), max_bytes, label), str(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"{len(data)} bytes of image data"
    else:
        raise InputError(f"{label}: expected bytes, a path or a PIL image, got {type(source).__name__}")
    if not data:
        raise InputError(f"{label}: empty image data")
    if len(data) > max_bytes:
        raise InputError(f"{label}: {len(data)} bytes exceeds the limit of {max_bytes}")
    return data, name


def _unreadable(label: str, what: str, exc: Exception, name: str) -> InputError:
    """`image 0: corrupt image data (Truncated File Read); source: photo.png`. Pillow names an
    in-memory file by its repr (`<_io.BytesIO object at 0x...>`), which says nothing: the source
    is named instead (the path, or how many bytes came in)."""
    reason = _BYTESIO_REPR.sub("", str(exc)).strip() or type(exc).__name__
    return InputError(f"{label}: {what} ({reason}); source: {name}")


def _open(data: bytes, name: str, max_pixels: int, label: str, shape: ImageShapeLimits | None) -> Any:
    """The lazily opened image, its format and size checked from the header (nothing decoded yet)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _unreadable(label, "not a readable image", exc, name) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(label, "corrupt image data", exc, name) from None
    fmt = (img.format or "").upper()
    if fmt not in ALLOWED_FORMATS:
        raise InputError(f"{label}: unsupported image format {fmt or 'unknown'} (allowed: {', '.join(sorted(ALLOWED_FORMATS))})")
    width, height = img.size
    if width * height > max_pixels:
        raise InputError(f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels}")
    check_image_shape(width, height, shape, label)
    return img


def check_image_header(
    source: Any, max_pixels: int, max_bytes: int, label: str = "image 0", shape: ImageShapeLimits | None = None
) -> tuple[int, int]:
    """(width, height) of an encoded image, checked from its header alone: readable, an allowed
    format, within the pixel limit and the family's shape limits. Cheap (nothing is decompressed),
    so a server can refuse a hostile image before it queues the request for the model."""
    data, name = _source_bytes(source, max_bytes, label)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _bomb_warning())
        img = _open(data, name, max_pixels, label, shape)
    return img.size


def _bomb_warning() -> type:
    from PIL import Image

    return Image.DecompressionBombWarning


def decode_image(
    source: Any, max_pixels: int, max_bytes: int, index: int = 0, shape: ImageShapeLimits | None = None
) -> DecodedImage:
    """Bytes, a path or a PIL image -> an RGB image and the sha256 of its encoded bytes.

    Rejects corrupt data, unsupported formats, oversized files, images with more pixels than
    `max_pixels` and, given the model family's `shape` limits, images its processor would blow up
    (all checked from the header, before the pixels are decompressed)."""
    from PIL import Image

    label = f"image {index}"
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise InputError(f"{label}: {source.width}x{source.height} pixels exceeds the limit of {max_pixels}")
        check_image_shape(source.width, source.height, shape, label)
        rgb = source.convert("RGB")
        digest = hashlib.sha256(rgb.tobytes() + f"{rgb.size}".encode()).hexdigest()
        return DecodedImage(rgb, digest)
    data, name = _source_bytes(source, max_bytes, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(data, name, max_pixels, label, shape)
            img.load()
            rgb = img.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _unreadable(label, "not a readable image", exc, name) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
        raise _unreadable(label, "corrupt image data", exc, name) from None
    return DecodedImage(rgb, hashlib.sha256(data).hexdigest())
