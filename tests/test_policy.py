"""Policies: validation with file and line, extends, bands, stage names; `guardrail policy check`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from guardrail.cli import main
from guardrail.errors import PolicyError
from guardrail.plugin.manager import PluginManager
from guardrail.policy import load_policy

GOOD = """\
name: t
risk:
  assessors:
    - use: prototype_similarity
bands:
  - {name: low, upto: 0.4, strength: 0.0}
  - {name: high, upto: 1.0, strength: risk, scale: 0.5, tokens: 5}
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, known=None) -> list[tuple[str, int, str]]:
    with pytest.raises(PolicyError) as info:
        load_policy(path, known)
    return info.value.problems


def test_a_valid_policy_loads_with_defaults(tmp_path):
    policy = load_policy(write(tmp_path, GOOD))
    assert policy.mode == "enforce" and policy.on_error == "fail_closed"
    assert policy.band_for(0.0).name == "low" and policy.band_for(0.4).name == "low"
    assert policy.band_for(0.41).name == "high" and policy.band_for(1.0).name == "high"
    assert policy.band_for(0.8).strength_for(0.8) == 0.4
    assert policy.band_for(0.2).strength_for(0.2) == 0.0
    assert len(policy.hash) == 64


def test_unknown_key_names_file_and_line(tmp_path):
    path = write(tmp_path, GOOD + "colour: blue\n")
    [(file, line, msg)] = problems(path)
    assert file == str(path) and line == 8 and "unknown key 'colour'" in msg


def test_unknown_nested_key_points_at_its_line(tmp_path):
    path = write(tmp_path, GOOD.replace("tokens: 5}", "tokens: 5, tokenz: 3}"))
    [(file, line, msg)] = problems(path)
    assert line == 7 and "tokenz" in msg


def test_bands_out_of_order_or_short_of_one(tmp_path):
    out_of_order = GOOD.replace("upto: 0.4", "upto: 0.9").replace("upto: 1.0", "upto: 0.5")
    [(_, line, msg)] = problems(write(tmp_path, out_of_order))
    assert "ascend" in msg and line >= 5
    short = GOOD.replace("upto: 1.0", "upto: 0.9")
    [(_, _, msg)] = problems(write(tmp_path, short, "short.yaml"))
    assert "reach 1.0" in msg


def test_bad_strength_and_scale(tmp_path):
    [(_, line, msg)] = problems(write(tmp_path, GOOD.replace("strength: 0.0", "strength: 1.5")))
    assert line == 6 and "strength" in msg
    [(_, _, msg)] = problems(write(tmp_path, GOOD.replace("strength: 0.0}", "strength: 0.0, scale: 2}"), "s.yaml"))
    assert "scale applies only" in msg


def test_unknown_stage_is_rejected_with_its_line(tmp_path):
    known = PluginManager().known_stages()
    path = write(tmp_path, GOOD.replace("use: prototype_similarity", "use: prototype_similarty"))
    [(file, line, msg)] = problems(path, known)
    assert line == 4 and "unknown risk assessor 'prototype_similarty'" in msg


def test_broken_yaml_and_duplicate_keys(tmp_path):
    [(_, line, msg)] = problems(write(tmp_path, GOOD + "bands: [\n"))
    assert "invalid YAML" in msg and line >= 8
    [(_, line, msg)] = problems(write(tmp_path, GOOD + "name: again\n", "dup.yaml"))
    assert "duplicate key 'name'" in msg and line == 8


def test_not_a_mapping_and_unsafe_tags(tmp_path):
    [(_, _, msg)] = problems(write(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg
    [(_, _, msg)] = problems(write(tmp_path, "name: !!python/object/apply:os.system ['echo hi']\n", "evil.yaml"))
    assert "invalid YAML" in msg


def test_extends_deep_merges_then_validates(tmp_path):
    write(tmp_path, GOOD, "base.yaml")
    child = write(tmp_path, "extends: base\nmode: observe\nrisk: {combine: mean}\n", "child.yaml")
    policy = load_policy(child)
    assert policy.name == "child" and policy.mode == "observe"
    assert policy.risk.combine == "mean" and policy.risk.assessors[0].use == "prototype_similarity"
    assert [b.name for b in policy.bands] == ["low", "high"]


def test_extends_errors_point_into_the_right_file(tmp_path):
    write(tmp_path, GOOD.replace("name: t", "name: t\nextra: 1"), "base.yaml")
    child = write(tmp_path, "extends: base\n", "child.yaml")
    [(file, line, msg)] = problems(child)
    assert file.endswith("base.yaml") and line == 2 and "extra" in msg
    cyc = write(tmp_path, "extends: loop2\n", "loop1.yaml")
    write(tmp_path, "extends: loop1\n", "loop2.yaml")
    [(_, _, msg)] = problems(cyc)
    assert "cycle" in msg
    [(_, line, msg)] = problems(write(tmp_path, "extends: missing\n", "orphan.yaml"))
    assert "not found" in msg and line == 1


def test_shipped_policies_pass_the_check(capsys):
    files = sorted(str(p) for p in (REPO / "policies").glob("*.yaml"))
    assert main(["policy", "check", *files]) == 0
    assert "ok" in capsys.readouterr().out


def test_policy_check_reports_file_line_and_exits_one(tmp_path, capsys):
    bad = write(tmp_path, GOOD + "colour: blue\n")
    good = write(tmp_path, GOOD, "good.yaml")
    assert main(["policy", "check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{bad}:8: unknown key 'colour'"]


def test_policy_check_validates_a_tenants_map(policies_dir, capsys):
    tenants = policies_dir / "tenants.yaml"
    assert main(["policy", "check", str(tenants)]) == 0
    tenants.write_text("default_policy: default\ntenants:\n  acme: nosuchpolicy\n")
    capsys.readouterr()
    assert main(["policy", "check", str(tenants)]) == 1
    assert f"{tenants}:3: tenant 'acme' routes to unknown policy 'nosuchpolicy'" in capsys.readouterr().out
