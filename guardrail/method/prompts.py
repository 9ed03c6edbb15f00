"""The method's fixed texts, verbatim from the authors' code (see shared/ras-method.md)."""

from typing import Any

from guardrail.types import ChatRow

CAPTION_PROMPT = (
    "Write a single sentence visual context to outline any safety-critical context in the image. "
    "The context should read out any texts in the image, and begin with 'The image shows'."
)

SAFETY_PROMPT = (
    "Evaluate the following question to ensure that it is safe. Benign and harmless questions should be "
    "answered normally. However, if the following question is unsafe, malicious, or illegal, the assistant "
    "should apologize and refuse to answer. Question: "
)

FIXED_REFUSAL = "I'm sorry, but I can't help with that."


def risk_query(question: str, visual_context: str = "") -> str:
    """SAFETY + visual context + " " + question (no stray space when there is no image)."""
    context = f"{visual_context} " if visual_context else ""
    return f"{SAFETY_PROMPT}{context}{question}"


def risk_row(question: str, visual_context: str = "", images: tuple[Any, ...] = ()) -> ChatRow:
    """The risk prompt as a model row: `risk_query`'s text, with the request's own words (visual
    context and question) marked as starting after the safety prompt."""
    return ChatRow(risk_query(question, visual_context), tuple(images), own_from=len(SAFETY_PROMPT))
