"""Tenant ids that differ from a listed one only in case or surrounding whitespace (issue 13, bug 2).

The rule: tenant ids are normalised (Unicode NFKC, surrounding whitespace stripped, case folded)
wherever they are compared: tenants.yaml keys (which must stay distinct after normalisation), the
API-key map, lookups, and the server's key-versus-header check. `Acme-Kids` is `acme-kids`, never a
stranger who falls through to the default policy. A tenant that is not listed at all still gets
`default_policy` (or 403 without one), and `resolve()` says when that happened."""

from __future__ import annotations

import httpx
import pytest

from guardrail.errors import PolicyError
from guardrail.plugin.manager import PluginManager
from guardrail.serve import ServeConfig, create_app
from guardrail.serve.server import ServerThread
from guardrail.tenants import UnknownTenantError, load_policy_set
from guardrail import tenants as _tenants
from serving_support import make_guard, write_policies


@pytest.mark.parametrize("given", ["Acme-Kids", " acme-kids", "acme-kids\n", "ACME-KIDS", "\tAcme-kids "])
def test_near_miss_ids_reach_the_listed_tenant_and_its_policy(policies_dir, given):
    ps = load_policy_set(policies_dir, PluginManager().known_stages())
    tenant, policy = resolved = ps.resolve(given)
    assert (tenant, policy.name) == ("acme-kids", "strict")
    assert resolved.by_default is False


def test_resolve_says_when_the_default_policy_was_used(policies_dir):
    ps = load_policy_set(policies_dir, PluginManager().known_stages())
    stranger = ps.resolve("someone-new")
    assert tuple(stranger) == ("someone-new", ps.policies["default"]) and stranger.by_default is True
    assert ps.resolve(None).by_default is True
    assert ps.is_listed("Research-Lab") and not ps.is_listed("someone-new") and not ps.is_listed(None)


def test_normalisation_folds_case_width_and_surrounding_space_only():
    assert _tenants.normalise_tenant("  Acme-Kids\t") == "acme-kids"
    assert _tenants.normalise_tenant("ＡＣＭＥ") == "acme"  # full-width letters (NFKC)
    assert _tenants.normalise_tenant("Straße") == "strasse"  # casefold, not lower
    assert _tenants.normalise_tenant("acme kids") == "acme kids"  # inner characters are the id's own


def test_tenants_that_collide_after_normalisation_are_refused_with_their_lines(policies_dir):
    (policies_dir / "tenants.yaml").write_text('tenants:\n  acme: strict\n  research: permissive\n  "ACME ": default\n')
    with pytest.raises(PolicyError) as info:
        load_policy_set(policies_dir)
    path = str(policies_dir / "tenants.yaml")
    assert any(f == path and line == 4 and "'ACME '" in m and "'acme'" in m and "line 2" in m
               for f, line, m in info.value.problems), info.value.problems


def test_empty_or_overlong_tenant_ids_are_refused(policies_dir):
    (policies_dir / "tenants.yaml").write_text(f"tenants:\n  '  ': strict\n  {'t' * 300}: strict\n")
    with pytest.raises(PolicyError) as info:
        load_policy_set(policies_dir)
    messages = " | ".join(m for _, _, m in info.value.problems)
    assert "is empty once surrounding whitespace is stripped" in messages and "longer than 256 characters" in messages


def test_api_keys_route_to_the_listed_spelling(policies_dir):
    import hashlib

    digest = hashlib.sha256(b"kid-key").hexdigest()
    (policies_dir / "tenants.yaml").write_text(f"tenants:\n  Acme-Kids: strict\napi_keys:\n  {digest}: ACME-KIDS\n")
    ps = load_policy_set(policies_dir)
    assert ps.tenant_for_api_key("kid-key") == "Acme-Kids"
    assert ps.resolve("acme-kids")[0] == "Acme-Kids"
    (policies_dir / "tenants.yaml").write_text(f"tenants:\n  acme: strict\napi_keys:\n  {digest}: nobody\n")
    with pytest.raises(PolicyError, match="api key maps to unknown tenant 'nobody'"):
        load_policy_set(policies_dir)


def test_an_unlisted_tenant_without_a_default_is_still_refused(policies_dir):
    (policies_dir / "tenants.yaml").write_text("tenants:\n  acme-kids: strict\n")
    ps = load_policy_set(policies_dir)
    assert ps.resolve("ACME-KIDS")[1].name == "strict"
    with pytest.raises(UnknownTenantError, match="unknown tenant 'acme-kid'"):
        ps.resolve("acme-kid")


def test_over_http_a_near_miss_header_gets_the_tenants_policy_and_the_verdict_says_so(art_root, tmp_path):
    folder = write_policies(tmp_path / "policies")
    (folder / "tenants.yaml").write_text("default_policy: zero\n" + (folder / "tenants.yaml").read_text())
    guard = make_guard(art_root, folder)
    try:
        with ServerThread(create_app(guard, ServeConfig())) as server:
            def post(headers):
                return httpx.post(f"{server.url}/v1/chat/completions", headers=headers,
                                  json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})

            near = post({"X-Guardrail-Tenant": "Beta"})  # (HTTP strips surrounding whitespace itself)
            assert near.status_code == 200, near.text
            verdict = near.json()["guardrail"]
            assert (verdict["tenant"], verdict["policy"], verdict["strength"]) == ("beta", "one", 1.0)
            assert verdict["default_policy"] is False
            stranger = post({"X-Guardrail-Tenant": "gamma"}).json()["guardrail"]
            assert (stranger["policy"], stranger["default_policy"]) == ("zero", True)
            # A listed key and a header that names its tenant in other case agree.
            both = post({"X-Guardrail-Tenant": "BETA", "Authorization": "Bearer key-beta"})
            assert both.status_code == 200 and both.json()["guardrail"]["tenant"] == "beta"
    finally:
        guard.close()
