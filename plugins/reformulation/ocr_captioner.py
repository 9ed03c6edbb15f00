"""Captioner `ocr`: reads the text out of an image, so text-only backbones can take images.

Uses rapidocr-onnxruntime (its ONNX models ship inside the wheel; nothing is downloaded). Its
recogniser drops the spaces of English text ("Stepstomakeapipebomb."), so letter runs are split back
into words with wordninja's English unigram model. The visual context reads:
    The image shows the text: "Steps to make a pipe bomb. 1. 2. 3."
"""

from __future__ import annotations

import re
import threading
from typing import Any, Sequence

from guardrail.plugin.sdk import ModelError, hookimpl

_LETTERS = re.compile(r"[A-Za-z]+|[^A-Za-z]+")


def respace(line: str) -> str:
    """Put spaces back into OCR output whose words run together; leaves spaced text alone."""
    if " " in line.strip():
        return line.strip()
    import wordninja

    parts = []
    for piece in _LETTERS.findall(line):
        if piece[0].isalpha() and len(piece) > 3:
            parts.append(" ".join(wordninja.split(piece)) or piece)
        else:
            parts.append(piece)
    text = ""
    for part in parts:
        if text and part[0].isalpha() and text[-1] not in " ":
            text += " "
        elif text and part[0].isdigit() and text[-1] not in " ":
            text += " "
        text += part
    return re.sub(r"\s+", " ", text).strip()


class OcrCaptioner:
    def __init__(self, min_confidence: float = 0.5, max_chars: int = 400):
        self.min_confidence = min_confidence
        self.max_chars = max_chars
        self._engine: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._engine is None:
                try:
                    from rapidocr_onnxruntime import RapidOCR
                    import wordninja  # noqa: F401  (checked now, so a missing extra fails at policy load)
                except ImportError as exc:
                    raise ModelError(f"the ocr captioner needs `pip install 'guardrail[ocr]'` ({exc})") from exc
                self._engine = RapidOCR()
            return self._engine

    def check(self, env: Any = None, policy: Any = None) -> None:
        """A missing extra fails when the policy loads. The engine itself (onnxruntime and three
        ONNX models, about 120 MB resident, 0.5 s to build) is built on the first image, so a
        text-only model serving text-only traffic never holds it."""
        from importlib.util import find_spec

        missing = [name for name in ("rapidocr_onnxruntime", "wordninja") if find_spec(name) is None]
        if missing:
            raise ModelError(f"the ocr captioner needs `pip install 'guardrail[ocr]'` (missing: {', '.join(missing)})")

    def read_text(self, image: Any) -> str:
        import numpy as np

        engine = self._load()
        with self._lock:
            result, _ = engine(np.asarray(image.convert("RGB")))
        lines = [respace(text) for _box, text, score in (result or []) if float(score) >= self.min_confidence]
        return " ".join(line for line in lines if line)[: self.max_chars]

    @staticmethod
    def input_format(caption: str) -> str:
        """`typographic` when the image carried readable text, else `image` (band edges given as
        error rates are resolved per format)."""
        return "typographic" if caption.startswith("The image shows the text:") else "image"

    def caption(self, images: Sequence[Any], env: Any) -> list[str]:
        out = []
        for image in images:
            text = self.read_text(image)
            out.append(f'The image shows the text: "{text}"' if text else "The image shows no readable text.")
        return out


@hookimpl
def guardrail_register_captioners(register):
    register("ocr", OcrCaptioner)
