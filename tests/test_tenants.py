"""Tenant registry: routing, atomic reload that keeps the last good set, audited reloads."""

from __future__ import annotations

import pytest

from guardrail.errors import PolicyError
from guardrail.plugin.manager import PluginManager
from guardrail.tenants import TenantRegistry, UnknownTenantError, load_policy_set


def test_tenants_route_to_their_policies(policies_dir):
    ps = load_policy_set(policies_dir, PluginManager().known_stages())
    assert ps.resolve("acme-kids")[1].name == "strict"
    assert ps.resolve("research-lab")[1].name == "permissive"
    assert ps.resolve("someone-new") == ("someone-new", ps.policies["default"])
    assert ps.resolve(None)[0] == "default"
    strict, permissive = ps.policies["strict"], ps.policies["permissive"]
    assert strict.band_for(0.9).action == "refuse"
    assert permissive.band_for(0.9).strength_for(0.9) == 0.0
    assert strict.hash != permissive.hash


def test_unknown_tenant_is_refused_without_a_default(policies_dir):
    (policies_dir / "tenants.yaml").write_text("tenants:\n  acme-kids: strict\n")
    ps = load_policy_set(policies_dir)
    with pytest.raises(UnknownTenantError, match="unknown tenant 'stranger'"):
        ps.resolve("stranger")


def test_reload_with_a_broken_file_keeps_the_previous_set_and_audits(policies_dir):
    events = []
    reg = TenantRegistry(policies_dir, PluginManager().known_stages(), on_reload=events.append)
    before = reg.current
    strict_text = (policies_dir / "strict.yaml").read_text()
    (policies_dir / "strict.yaml").write_text(strict_text.replace("upto: 0.7", "upto: 0.2"))  # out of order
    record = reg.reload()
    assert record["ok"] is False and reg.current is before
    assert record["old_hash"] == before.hash and record["kept_hash"] == before.hash
    assert any("strict.yaml" in p and "ascend" in p for p in record["problems"])
    assert events == [record]
    # fix it and change something real: the swap happens and is audited with both hashes
    (policies_dir / "strict.yaml").write_text(strict_text.replace("upto: 0.7", "upto: 0.6"))
    record = reg.reload()
    assert record["ok"] is True and reg.current is not before
    assert record["old_hash"] == before.hash and record["new_hash"] == reg.current.hash != before.hash
    assert reg.resolve("acme-kids")[1].bands[1].upto == 0.6


def test_reload_rejects_a_set_whose_stages_cannot_be_built(policies_dir):
    calls = []

    def prepare(policy_set):
        calls.append(policy_set)
        if len(calls) > 1:
            raise PolicyError([("policy default", 1, "cannot build stage")])
        return {"built": True}

    reg = TenantRegistry(policies_dir, prepare=prepare)
    first = reg.snapshot()
    record = reg.reload()
    assert record["ok"] is False and reg.snapshot() is first


def test_tenants_map_errors_name_file_and_line(policies_dir):
    (policies_dir / "tenants.yaml").write_text("default_policy: default\ntenants:\n  acme: strict\nowner: me\n")
    with pytest.raises(PolicyError) as info:
        load_policy_set(policies_dir)
    assert (str(policies_dir / "tenants.yaml"), 4, "unknown key 'owner'") in info.value.problems


def test_duplicate_policy_names_in_a_folder_are_rejected(policies_dir):
    (policies_dir / "copy.yaml").write_text((policies_dir / "strict.yaml").read_text())
    with pytest.raises(PolicyError, match="policy name 'strict' is also used by (copy|strict).yaml"):
        load_policy_set(policies_dir)
