"""Reading prompt lists: `.txt` (one prompt a line, `#` comments), `.csv` (a `prompt`, `question`
or `Behavior` column) and `.jsonl` (`prompt`, optional `image` path relative to the file)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from guardrail.errors import InputError

CSV_COLUMNS = ("prompt", "question", "Behavior")


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    image: Path | None = None


def read_prompt_items(path: str | Path) -> list[PromptItem]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        column = next((c for c in CSV_COLUMNS if rows and c in rows[0]), None)
        if column is None:
            raise InputError(f"{path}: needs one of the columns {', '.join(CSV_COLUMNS)}")
        items = [PromptItem(r[column].strip()) for r in rows if (r.get(column) or "").strip()]
    elif suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(f"{path}:{number}: each line needs a string field 'prompt'")
            image = obj.get("image")
            items.append(PromptItem(obj["prompt"], (path.parent / image) if image else None))
    else:
        items = [PromptItem(line.strip()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise InputError(f"{path}: no prompts found")
    return items


def read_prompts(path: str | Path) -> list[str]:
    """Text prompts only (calibration uses text, as the paper does); image rows are refused."""
    items = read_prompt_items(path)
    if any(item.image for item in items):
        raise InputError(f"{path}: image rows are not supported here")
    return [item.prompt for item in items]
