"""The default calibration's cache folder: a new or changed calibrator (a plugin adding an assessor)
must not be served an artifact calibrated without it."""

from __future__ import annotations

from guardrail.calibration import CalibrationConfig
from guardrail.evaluation import cached


class Adapter:
    name = "tiny/model"

    def fingerprint(self):
        return {"architecture": "x", "weights_sha256": "0" * 64}


def test_the_folder_changes_with_the_installed_calibrators(monkeypatch, tmp_path):
    monkeypatch.setenv("GUARDRAIL_HOME", str(tmp_path))
    installed = [[name, version] for name, version in cached.installed_calibrators()]
    assert ["pooled_probe", 3] in installed and ["linear_probe", 1] in installed
    cfg = CalibrationConfig(progress=False)
    before = cached.artifact_dir(Adapter(), ["h"], ["b"], cfg)
    assert cached.artifact_dir(Adapter(), ["h"], ["b"], cfg) == before  # deterministic
    monkeypatch.setattr(cached, "installed_calibrators", lambda: installed + [["new_block", 1]])
    assert cached.artifact_dir(Adapter(), ["h"], ["b"], cfg) != before
    monkeypatch.setattr(cached, "installed_calibrators", lambda: [[n, 4 if n == "pooled_probe" else v] for n, v in installed])
    assert cached.artifact_dir(Adapter(), ["h"], ["b"], cfg) != before
    # an explicit choice of calibrators is part of the config already
    chosen = CalibrationConfig(progress=False, calibrators=["linear_probe"])
    assert cached.artifact_dir(Adapter(), ["h"], ["b"], chosen) != before
