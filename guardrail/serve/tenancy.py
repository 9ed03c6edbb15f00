"""Who is asking: the tenant of an HTTP request, and the admin check.

Two ways to name a tenant, and the rules between them:

* an API key (`Authorization: Bearer KEY`) listed in the policies directory's `tenants.yaml` under
  `api_keys` (sha256 of the key -> tenant). A listed key decides the tenant; a header naming another
  tenant is then refused (403).
* the `X-Guardrail-Tenant` header, for deployments behind a gateway that authenticates clients and
  sets the header itself. The header is trusted as it is, so an unlisted key next to it is ignored
  (OpenAI clients always send some key). With `require_api_key` the header is never enough: only a
  listed key is accepted (401 otherwise).

Neither a listed key nor a header: an unlisted key is refused (401) while `api_keys` is non-empty,
so a mistyped key never falls through to the default policy; with no key at all the tenant is
`None`, which the policy set routes to its `default_policy` (or refuses, 403, when it has none).
Tenant ids are compared as the policy set normalises them (case and surrounding whitespace do
not matter): `Acme-Kids` is the listed `acme-kids`. A tenant that is not listed gets the set's
`default_policy`, or 403 when it has none.

Header lengths are capped before anything looks them up (431): a tenant id is a short name, a key
a short secret, and neither should cost the server more than a few hundred bytes per request.
"""

from __future__ import annotations

import hmac
from typing import Mapping

from guardrail.serve.openai_format import BadRequest
from guardrail.tenants import MAX_TENANT_ID, PolicySet, normalise_tenant

TENANT_HEADER = "x-guardrail-tenant"
ADMIN_HEADER = "x-guardrail-admin-token"
MAX_KEY_HEADER = 1024  # characters of `Authorization` or the admin-token header


def capped(headers: Mapping[str, str], name: str, limit: int) -> str | None:
    """A header's value, refused (431) when it is longer than `limit` characters."""
    value = headers.get(name)
    if value is not None and len(value) > limit:
        raise BadRequest(f"the {name} header is longer than {limit} characters", status=431, kind="invalid_request_error")
    return value


def bearer(headers: Mapping[str, str]) -> str | None:
    value = capped(headers, "authorization", MAX_KEY_HEADER)
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise BadRequest("the Authorization header must be 'Bearer <key>'", status=401, kind="authentication_error")
    return token.strip()


def tenant_for(headers: Mapping[str, str], policy_set: PolicySet, require_api_key: bool) -> str | None:
    named = capped(headers, TENANT_HEADER, MAX_TENANT_ID) or None
    key = bearer(headers)
    from_key = policy_set.tenant_for_api_key(key) if key else None
    if from_key is not None:
        if named is not None and normalise_tenant(named) != normalise_tenant(from_key):
            raise BadRequest(
                f"the API key belongs to tenant {from_key!r}, but {TENANT_HEADER} names {named!r}",
                status=403, kind="permission_error",
            )
        return from_key
    if require_api_key:
        message = "unknown API key" if key else "an API key is required (Authorization: Bearer <key>)"
        raise BadRequest(message, status=401, kind="authentication_error")
    if named is not None:
        return named
    if key is not None and policy_set.tenants.api_keys:
        raise BadRequest("unknown API key", status=401, kind="authentication_error")
    return None


def check_admin(headers: Mapping[str, str], admin_token: str | None) -> None:
    if not admin_token:
        raise BadRequest("the admin endpoint is disabled: start the server with an admin token", status=404, kind="not_found_error")
    if not _is_admin(headers, admin_token):
        raise BadRequest("a valid admin token is required", status=401, kind="authentication_error")


def _is_admin(headers: Mapping[str, str], admin_token: str | None) -> bool:
    if not admin_token:
        return False
    given = capped(headers, ADMIN_HEADER, MAX_KEY_HEADER)
    if given is None:
        try:
            given = bearer(headers)
        except BadRequest:
            given = None
    return bool(given) and hmac.compare_digest(given.encode(), admin_token.encode())


def check_probe(headers: Mapping[str, str], policy_set: PolicySet, admin_token: str | None) -> None:
    """`/healthz` and `/metrics` when they are protected: a listed API key or the admin token.
    (`/metrics` names the listed tenants and `/healthz` the policies; a server that demands keys
    for requests should not hand either to anyone who asks.)"""
    if _is_admin(headers, admin_token):
        return
    key = bearer(headers)
    if key is None or policy_set.tenant_for_api_key(key) is None:
        message = "unknown API key" if key else "an API key is required (Authorization: Bearer <key>)"
        raise BadRequest(message, status=401, kind="authentication_error")
