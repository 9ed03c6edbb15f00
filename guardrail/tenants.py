"""The tenant registry: tenant id -> policy, loaded from a policies directory, swappable live.

A policies directory holds policy files (`*.yaml`; files starting with `_` are bases for `extends:`
only) and a tenants map `tenants.yaml`:

    default_policy: default      # for tenants not listed; leave out (or null) to refuse them
    tenants:
      acme: strict
      research: permissive
    api_keys:                    # optional, for the HTTP server: sha256 of a key -> tenant
      3f1e...: acme

Tenant ids are compared normalised (`normalise_tenant`: Unicode NFKC, surrounding whitespace
stripped, case folded), so `Acme-Kids` and ` acme-kids` are the listed tenant `acme-kids` and never
a stranger who falls through to `default_policy`; two keys of `tenants:` that are equal once
normalised are refused. A tenant that is not listed at all gets `default_policy`, and `resolve()`
says so (`Resolution.by_default`).

`reload()` validates every file first and swaps the whole set in one assignment, so a request sees
either the old set or the new one, never a mix; when anything is invalid the old set stays.
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.errors import GuardrailError, InputError, PolicyError
from guardrail.policy import Policy, load_policy, problems_from
from guardrail.yaml_lines import load_yaml

TENANTS_FILE = "tenants.yaml"
MAX_TENANT_ID = 256  # characters; a tenant id is a name, and (listed) it becomes a metrics label


def normalise_tenant(tenant: str) -> str:
    """The form tenant ids are compared in: `Acme-Kids `, `ACME-KIDS` and full-width letters are
    all `acme-kids`. Inner characters are the id's own and stay as they are."""
    return unicodedata.normalize("NFKC", tenant).strip().casefold()


class TenantsMap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_policy: str | None = None
    tenants: dict[str, str] = Field(default_factory=dict)
    api_keys: dict[str, str] = Field(default_factory=dict)


class UnknownTenantError(InputError):
    pass


class Resolution(tuple):
    """What `resolve()` returns: the `(tenant, policy)` pair it always returned (it unpacks and
    compares as that tuple), plus `by_default`: True when the tenant is not listed and was given
    `default_policy`, which the audit record and the HTTP verdict report."""

    by_default: bool

    def __new__(cls, tenant: str, policy: Policy, by_default: bool) -> "Resolution":
        self = super().__new__(cls, (tenant, policy))
        self.by_default = by_default
        return self

    @property
    def tenant(self) -> str:
        return self[0]

    @property
    def policy(self) -> Policy:
        return self[1]


@dataclass(frozen=True)
class PolicySet:
    """An immutable, validated set of policies and the tenant map that routes to them."""

    policies: dict[str, Policy]
    tenants: TenantsMap
    file_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        blob = json.dumps(sorted(self.file_hashes.items())).encode()
        return hashlib.sha256(blob).hexdigest()

    @cached_property
    def _listed(self) -> dict[str, str]:
        """normalised id -> the id as tenants.yaml spells it (computed once per immutable set)."""
        return {normalise_tenant(t): t for t in self.tenants.tenants}

    def listed_tenant(self, tenant: str | None) -> str | None:
        """The listed id a tenant string names (in tenants.yaml's spelling), or None."""
        return self._listed.get(normalise_tenant(tenant)) if isinstance(tenant, str) else None

    def is_listed(self, tenant: str | None) -> bool:
        return self.listed_tenant(tenant) is not None

    def resolve(self, tenant: str | None) -> Resolution:
        tenant_id = tenant or "default"
        listed = self.listed_tenant(tenant_id)
        if listed is not None:
            return Resolution(listed, self.policies[self.tenants.tenants[listed]], by_default=False)
        name = self.tenants.default_policy
        if name is None:
            raise UnknownTenantError(f"unknown tenant {tenant_id!r} and no default_policy is configured")
        return Resolution(tenant_id, self.policies[name], by_default=True)

    def tenant_for_api_key(self, key: str) -> str | None:
        tenant = self.tenants.api_keys.get(hashlib.sha256(key.encode()).hexdigest())
        return self.listed_tenant(tenant) or tenant


def load_tenants_map(path: Path) -> TenantsMap:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([(str(path), 1, f"cannot read: {exc}")]) from None
    data, lines = load_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([(str(path), 1, "a tenants map must be a YAML mapping")])
    try:
        return TenantsMap.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(problems_from(exc, lines)) from None


def _check_routes(tmap: TenantsMap, names: set[str], path: Path) -> list[tuple[str, int, str]]:
    problems = []
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    _, lines = load_yaml(text, str(path)) if text else (None, None)

    def line(loc: tuple[Any, ...]) -> int:
        return lines.line_for(loc)[1] if lines else 1

    if tmap.default_policy is not None and tmap.default_policy not in names:
        problems.append((str(path), line(("default_policy",)), f"default_policy {tmap.default_policy!r} is not a policy in {path.parent}"))
    seen: dict[str, str] = {}
    for tenant, name in tmap.tenants.items():
        where = line(("tenants", tenant))
        problems.extend((str(path), where, m) for m in _tenant_id_problems(tenant, seen, lambda t: line(("tenants", t))))
        if name not in names:
            problems.append((str(path), where, f"tenant {tenant!r} routes to unknown policy {name!r}"))
    for key, tenant in tmap.api_keys.items():
        if normalise_tenant(tenant) not in seen and tmap.default_policy is None:
            problems.append((str(path), line(("api_keys", key)), f"api key maps to unknown tenant {tenant!r}"))
    return problems


def _tenant_id_problems(tenant: str, seen: dict[str, str], line: Callable[[str], int]) -> list[str]:
    """What is wrong with one key of `tenants:`; `seen` collects the normalised ids so far."""
    key = normalise_tenant(tenant)
    if not key:
        return [f"tenant id {tenant!r} is empty once surrounding whitespace is stripped"]
    if len(tenant) > MAX_TENANT_ID:
        return [f"tenant id {tenant[:32]!r}... is longer than {MAX_TENANT_ID} characters"]
    if key in seen:
        first = seen[key]
        return [f"tenant {tenant!r} is the same id as {first!r} (line {line(first)}): ids are compared "
                "without case and surrounding whitespace"]
    seen[key] = tenant
    return []


def load_policy_set(directory: str | Path, known_stages: Mapping[str, set[str]] | None = None,
                    default_stage: Callable[[str], str] | None = None) -> PolicySet:
    """Load and validate a whole policies directory; all problems are reported together."""
    folder = Path(directory)
    if not folder.is_dir():
        raise PolicyError([(str(folder), 1, "policies directory not found")])
    problems: list[tuple[str, int, str]] = []
    policies: dict[str, Policy] = {}
    hashes: dict[str, str] = {}
    origin: dict[str, str] = {}
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    for path in files:
        try:
            hashes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            problems.append((str(path), 1, f"cannot read: {exc}"))
            continue
        if path.name == TENANTS_FILE or path.name.startswith("_"):
            continue
        try:
            policy = load_policy(path, known_stages, default_stage)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        if policy.name in policies:
            problems.append((str(path), 1, f"policy name {policy.name!r} is also used by {origin[policy.name]}"))
            continue
        policies[policy.name] = policy
        origin[policy.name] = path.name
    tenants_path = folder / TENANTS_FILE
    tmap = TenantsMap(default_policy="default" if "default" in policies else None)
    if tenants_path.is_file():
        try:
            tmap = load_tenants_map(tenants_path)
            problems.extend(_check_routes(tmap, set(policies), tenants_path))
        except PolicyError as exc:
            problems.extend(exc.problems)
    if problems:
        raise PolicyError(problems)
    return PolicySet(policies=policies, tenants=tmap, file_hashes=hashes)


def single_policy_set(path: str | Path, known_stages: Mapping[str, set[str]] | None = None,
                      default_stage: Callable[[str], str] | None = None) -> PolicySet:
    """A set with one policy that serves every tenant."""
    path = Path(path)
    policy = load_policy(path, known_stages, default_stage)
    return PolicySet(
        policies={policy.name: policy},
        tenants=TenantsMap(default_policy=policy.name),
        file_hashes={path.name: hashlib.sha256(path.read_bytes()).hexdigest()},
    )


class TenantRegistry:
    """Holds the current PolicySet; `reload()` swaps it atomically or keeps the last good one."""

    def __init__(
        self,
        source: str | Path,
        known_stages: Mapping[str, set[str]] | None = None,
        on_reload: Callable[[dict[str, Any]], None] | None = None,
        single_file: bool | None = None,
        prepare: Callable[[PolicySet], Any] | None = None,
        default_stage: Callable[[str], str] | None = None,
    ):
        self.source = Path(source)
        self.known_stages = known_stages
        self.default_stage = default_stage
        self.on_reload = on_reload
        self.prepare = prepare
        self.single_file = self.source.is_file() if single_file is None else single_file
        self._lock = threading.Lock()  # one reload at a time; readers never wait
        # (policy set, what `prepare` built from it), swapped as one reference.
        self._current: tuple[PolicySet, Any] = self._load()

    def _load(self) -> tuple[PolicySet, Any]:
        if self.single_file:
            policy_set = single_policy_set(self.source, self.known_stages, self.default_stage)
        else:
            policy_set = load_policy_set(self.source, self.known_stages, self.default_stage)
        return policy_set, (self.prepare(policy_set) if self.prepare else None)

    @property
    def current(self) -> PolicySet:
        return self._current[0]

    def snapshot(self) -> tuple[PolicySet, Any]:
        """The policy set and its prepared runtime, consistent with each other."""
        return self._current

    def resolve(self, tenant: str | None) -> Resolution:
        return self._current[0].resolve(tenant)

    def reload(self) -> dict[str, Any]:
        """Validate everything, then swap. Returns (and hands to on_reload) an audit record."""
        with self._lock:
            old = self._current[0]
            record: dict[str, Any] = {"event": "policy_reload", "source": str(self.source), "old_hash": old.hash}
            try:
                new = self._load()
            except PolicyError as exc:
                record.update(ok=False, new_hash=None, kept_hash=old.hash, problems=[f"{f}:{l}: {m}" for f, l, m in exc.problems])
            except GuardrailError as exc:  # a stage could not be built for the new policies
                record.update(ok=False, new_hash=None, kept_hash=old.hash, problems=[str(exc)])
            else:
                self._current = new
                record.update(ok=True, new_hash=new[0].hash, policies=sorted(new[0].policies))
        if self.on_reload is not None:
            self.on_reload(record)
        return record
