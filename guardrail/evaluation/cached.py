"""Calibration artifacts built once per (model, calibration inputs) and kept in the cache folder,
so `guardrail demo` (and anything else that wants the default calibration) pays for it once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from guardrail.paths import cache_home


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
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "-_" else "-" for c in adapter.name)
    return cache_home() / "artifacts" / f"{safe_name}-{digest}"


def ensure_artifacts(adapter: Any, progress: bool = True, log: Callable[[str], None] = print) -> tuple[Path, Any]:
    """(folder, Artifacts) for the packaged calibration lists and default settings; calibrates
    only when the cache holds no valid artifact for them."""
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
