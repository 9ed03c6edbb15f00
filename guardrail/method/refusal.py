"""Recognising a refusal opening (used by calibration to elicit refusal prototypes)."""

from __future__ import annotations

import re

# Openings of a refusal, matched at the start of an answer (after whitespace and quotes).
_OPENINGS = re.compile(
    r"^\W*(i'?m\s+(really\s+|very\s+)?sorry|i\s+am\s+(really\s+|very\s+)?sorry|i\s+apologi[sz]e|my\s+apologies|"
    r"sorry\b|i\s+(can'?t|cannot|can\s+not|won'?t|will\s+not|must\s+decline|am\s+unable|'m\s+unable|am\s+not\s+able)|"
    r"i'?m\s+(not\s+able|unable)|as\s+an\s+ai\b|unfortunately,?\s+i\s+(can'?t|cannot))",
    re.IGNORECASE,
)


def opens_refusal(text: str) -> bool:
    return bool(_OPENINGS.match(text.replace("\u2019", "'")))
