"""Image intake: decode, validate and hash what a request carries, before any stage sees it."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from guardrail.errors import InputError
from guardrail.types import DecodedImage

ALLOWED_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"}


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


def decode_image(source: Any, max_pixels: int, max_bytes: int, index: int = 0) -> DecodedImage:
    """Bytes, a path or a PIL image -> an RGB image and the sha256 of its encoded bytes.

    Rejects corrupt data, unsupported formats, oversized files and images with more pixels than
    `max_pixels` (checked from the header, before the pixels are decompressed)."""
    from PIL import Image, UnidentifiedImageError

    label = f"image {index}"
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise InputError(f"{label}: {source.width}x{source.height} pixels exceeds the limit of {max_pixels}")
        rgb = source.convert("RGB")
        digest = hashlib.sha256(rgb.tobytes() + f"{rgb.size}".encode()).hexdigest()
        return DecodedImage(rgb, digest)
    if isinstance(source, (str, Path)):
        data = _read_file(Path(source), max_bytes, label)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise InputError(f"{label}: expected bytes, a path or a PIL image, got {type(source).__name__}")
    if not data:
        raise InputError(f"{label}: empty image data")
    if len(data) > max_bytes:
        raise InputError(f"{label}: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = (img.format or "").upper()
            if fmt not in ALLOWED_FORMATS:
                raise InputError(f"{label}: unsupported image format {fmt or 'unknown'} (allowed: {', '.join(sorted(ALLOWED_FORMATS))})")
            width, height = img.size
            if width * height > max_pixels:
                raise InputError(f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels}")
            img.load()
            rgb = img.convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{label}: not a readable image ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
        raise InputError(f"{label}: corrupt image data ({exc})") from None
    return DecodedImage(rgb, hashlib.sha256(data).hexdigest())
