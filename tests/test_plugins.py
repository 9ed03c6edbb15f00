"""The plugin manager facade: built-ins via entry points, check_pending, third-party plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from guardrail import hookimpl
from guardrail.cli import main
from guardrail.errors import PluginError
from guardrail.plugin.manager import PluginManager

BUILTIN_STAGES = {
    "reformulators": {"visual_context", "plain"},
    "captioners": {"model", "ocr", "auto"},
    "risk_assessors": {"prototype_similarity", "mean_difference", "linear_probe", "mahalanobis", "pooled_probe"},
    "steering_controllers": {"prototype_interpolation", "refusal_direction"},
    "audit_sinks": {"jsonl"},
}


def test_builtins_are_registered_through_entry_points():
    pm = PluginManager(entry_points=False)
    known = pm.known_stages()
    for kind, names in BUILTIN_STAGES.items():
        assert names <= known[kind], kind
    listed = {p["name"]: p for p in pm.plugins()}
    assert listed["prototype_similarity"]["builtin"] is True
    assert listed["prototype_similarity"]["distribution"] == "guardrail"


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def guardrail_adit(self, record):  # noqa: D401 - the typo is the point
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        PluginManager(entry_points=False, plugins=[Typo()]).load()


def test_two_plugins_cannot_claim_the_same_stage_name():
    class Clash:
        @hookimpl
        def guardrail_register_risk_assessors(self, register):
            register("linear_probe", object)

    pm = PluginManager(entry_points=False, plugins=[Clash()])
    with pytest.raises(PluginError, match="'linear_probe' is registered by both"):
        pm.stages()


def test_unknown_stage_and_bad_parameters_are_clear():
    pm = PluginManager(entry_points=False)
    with pytest.raises(PluginError, match="no plugin provides the risk assessor 'nope'"):
        pm.create("risk_assessors", "nope")
    with pytest.raises(PluginError, match="bad parameters for risk assessor 'linear_probe'"):
        pm.create("risk_assessors", "linear_probe", {"colour": 1})


def test_plugins_command_lists_stages(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in data}
    assert {"visual_context", "hidden_state", "audit_jsonl"} <= names
    assert main(["plugins"]) == 0
    assert "risk_assessors: linear_probe, mahalanobis, mean_difference, pooled_probe" in capsys.readouterr().out


PLUGIN_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "guardrail-test-audit-shipper"
version = "1.2.3"

[project.entry-points.guardrail]
shipper = "audit_shipper"
"""

PLUGIN_MODULE = """\
import json, os
from guardrail import hookimpl

@hookimpl
def guardrail_audit(record):
    with open(os.environ["SHIPPER_OUT"], "a") as fh:
        fh.write(json.dumps(record) + "\\n")
"""


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """A real separate package, installed with pip (no build isolation: nothing is downloaded)."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "audit_shipper.py").write_text(PLUGIN_MODULE)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        check=True, capture_output=True,
    )
    return target


def test_a_separately_installed_plugin_receives_one_record_per_request(installed_plugin, tmp_path, art_root):
    from conftest import REPO, tiny_artifacts

    art = tiny_artifacts("llama", art_root)
    out = tmp_path / "shipped.jsonl"
    env = dict(os.environ, PYTHONPATH=str(installed_plugin), SHIPPER_OUT=str(out))
    listing = subprocess.run([sys.executable, "-m", "guardrail.cli", "plugins", "--json"], env=env,
                             capture_output=True, text=True, check=True)
    shipper = next(p for p in json.loads(listing.stdout) if p["name"] == "shipper")
    assert shipper["version"] == "1.2.3" and shipper["builtin"] is False and shipper["hooks"] == ["guardrail_audit"]
    for prompt in ("How do I bake bread?", "How do I make a bomb?"):
        subprocess.run(
            [sys.executable, "-m", "guardrail.cli", "generate", "--model", "tiny-random:llama", "--artifacts", str(art),
             "--policy", str(REPO / "policies" / "default.yaml"), "--prompt", prompt, "--max-new-tokens", "4", "--json"],
            env=env, capture_output=True, text=True, check=True,
        )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["event"] == "request" and r["policy"] == "default" for r in records)
    # GUARDRAIL_DISABLE_PLUGINS skips third-party entry points (built-ins stay)
    env["GUARDRAIL_DISABLE_PLUGINS"] = "1"
    listing = subprocess.run([sys.executable, "-m", "guardrail.cli", "plugins", "--json"], env=env,
                             capture_output=True, text=True, check=True)
    names = {p["name"] for p in json.loads(listing.stdout)}
    assert "shipper" not in names and "visual_context" in names


def test_a_plugin_that_fails_to_import_stops_the_guard(tmp_path):
    bad = tmp_path / "site"
    dist = bad / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[guardrail]\nbroken = broken_plugin_mod\n")
    (bad / "broken_plugin_mod.py").write_text("raise ImportError('missing dependency xyz')\n")
    env = dict(os.environ, PYTHONPATH=str(bad))
    proc = subprocess.run([sys.executable, "-m", "guardrail.cli", "plugins"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "plugin 'broken'" in proc.stderr and "missing dependency xyz" in proc.stderr
