"""A typed facade over pluggy: loads plugins, collects named stages, builds them for policies.

Loading order: guardrail's own built-ins (the entry points of the `guardrail` distribution) first,
then every other entry point in the group `guardrail` (skipped when GUARDRAIL_DISABLE_PLUGINS=1),
then `check_pending()`, so a misspelled hook name fails loudly instead of never being called.
Loading is lazy and idempotent; a plugin that fails to import stops loading with an error naming it
(a guard must not start without a plugin it may need).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from guardrail.plugin import hookspecs
from guardrail.errors import PluginError

GROUP = "guardrail"
DISABLE_ENV = "GUARDRAIL_DISABLE_PLUGINS"
OWN_DISTRIBUTION = "guardrail"

STAGE_KINDS = {
    "reformulators": "guardrail_register_reformulators",
    "captioners": "guardrail_register_captioners",
    "risk_assessors": "guardrail_register_risk_assessors",
    "steering_controllers": "guardrail_register_steering_controllers",
    "calibrators": "guardrail_register_calibrators",
    "audit_sinks": "guardrail_register_audit_sinks",
    "judges": "guardrail_register_judges",
    "baselines": "guardrail_register_baselines",
}


@dataclass(frozen=True)
class StageEntry:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    default: bool = False


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool


class PluginManager:
    """One per Guardrail (no global registry), so tests and tenants never share plugin state."""

    def __init__(self, entry_points: bool | None = None, plugins: Iterable[object] = ()):
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._entry_points = (os.environ.get(DISABLE_ENV, "") not in ("1", "true", "yes")) if entry_points is None else entry_points
        self._extra = list(plugins)
        self._infos: dict[str, PluginInfo] = {}
        self._stages: dict[str, dict[str, StageEntry]] | None = None
        self._lock = threading.Lock()
        self._loaded = False

    # ----- loading ------------------------------------------------------------------------------
    def load(self) -> "PluginManager":
        with self._lock:
            if self._loaded:
                return self
            eps = sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)
            builtins = [ep for ep in eps if _dist_name(ep) == OWN_DISTRIBUTION]
            others = [ep for ep in eps if _dist_name(ep) != OWN_DISTRIBUTION]
            for ep in builtins:
                self._register_entry_point(ep, builtin=True)
            if self._entry_points:
                for ep in others:
                    self._register_entry_point(ep, builtin=False)
            for plugin in self._extra:
                name = getattr(plugin, "__name__", None) or type(plugin).__name__
                self._pm.register(plugin, name=name)
                self._infos[name] = PluginInfo(name, None, None, builtin=False)
            try:
                self._pm.check_pending()
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
            self._loaded = True
        return self

    def _register_entry_point(self, ep: metadata.EntryPoint, builtin: bool) -> None:
        dist = ep.dist
        try:
            plugin = ep.load()
        except Exception as exc:  # a plugin's import can raise anything
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}, from {dist.name if dist else 'unknown package'}) failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if self._pm.is_registered(plugin) or self._pm.get_plugin(ep.name) is not None:
            return
        try:
            self._pm.register(plugin, name=ep.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {ep.name!r} is invalid: {exc}") from exc
        self._infos[ep.name] = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, builtin)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object at run time (e.g. a test's, or an audit sink instance)."""
        self.load()
        with self._lock:
            self._pm.register(plugin, name=name)
            self._pm.check_pending()
            label = name or self._pm.get_name(plugin) or type(plugin).__name__
            self._infos[label] = PluginInfo(label, None, None, builtin=False)
            self._stages = None

    def unregister(self, plugin: object) -> None:
        with self._lock:
            self._pm.unregister(plugin)
            self._stages = None

    @property
    def hook(self) -> Any:
        self.load()
        return self._pm.hook

    # ----- stages -------------------------------------------------------------------------------
    def stages(self) -> dict[str, dict[str, StageEntry]]:
        """kind -> name -> entry. Two plugins registering the same name is an error."""
        self.load()
        with self._lock:
            if self._stages is not None:
                return self._stages
            table: dict[str, dict[str, StageEntry]] = {kind: {} for kind in STAGE_KINDS}
            for kind, hook_name in STAGE_KINDS.items():
                caller = getattr(self._pm.hook, hook_name)
                for impl in reversed(caller.get_hookimpls()):  # registration order
                    def register(name: str, factory: Callable[..., Any], default: bool = False, _kind=kind,
                                 _plugin=impl.plugin_name) -> None:
                        if not isinstance(name, str) or not name:
                            raise PluginError(f"plugin {_plugin!r} registered a {_kind} stage without a name")
                        if name in table[_kind]:
                            other = table[_kind][name].plugin
                            raise PluginError(f"{_kind} stage {name!r} is registered by both {other!r} and {_plugin!r}")
                        table[_kind][name] = StageEntry(_kind, name, factory, _plugin, bool(default))

                    impl.function(register=register)
            self._stages = table
            return table

    def known_stages(self) -> dict[str, set[str]]:
        return {kind: set(entries) for kind, entries in self.stages().items()}

    def default_stage(self, kind: str) -> str:
        """The stage a policy gets when it names none of this kind: the one a plugin registered with
        `default=True`. None, or two, is an error only when a policy relies on it (so installing a
        plugin can never silently change what an explicit policy runs)."""
        entries = self.stages().get(kind, {})
        defaults = [e for e in entries.values() if e.default]
        label = kind[:-1].replace("_", " ")
        if not defaults:
            raise PluginError(f"no installed plugin declares a default {label}; name one in the policy "
                              f"(known: {', '.join(sorted(entries)) or 'none'})")
        if len(defaults) > 1:
            named = ", ".join(f"{e.name!r} ({e.plugin})" for e in sorted(defaults, key=lambda e: e.name))
            raise PluginError(f"several plugins declare a default {label}: {named}; name one in the policy")
        return defaults[0].name

    def default_stages(self) -> dict[str, str]:
        """kind -> default stage name, for the kinds where exactly one plugin declares one."""
        out = {}
        for kind in STAGE_KINDS:
            try:
                out[kind] = self.default_stage(kind)
            except PluginError:
                continue
        return out

    def create(self, kind: str, name: str, params: dict[str, Any] | None = None) -> Any:
        entry = self.stages().get(kind, {}).get(name)
        if entry is None:
            known = ", ".join(sorted(self.stages().get(kind, {}))) or "none"
            raise PluginError(f"no plugin provides the {kind[:-1].replace('_', ' ')} {name!r} (known: {known})")
        try:
            return entry.factory(**(params or {}))
        except TypeError as exc:
            raise PluginError(f"bad parameters for {kind[:-1].replace('_', ' ')} {name!r}: {exc}") from exc

    def plugins(self) -> list[dict[str, Any]]:
        """What `guardrail plugins` lists: each plugin, its version, and the stages it provides."""
        stages = self.stages()
        out = []
        for name, info in sorted(self._infos.items(), key=lambda kv: (not kv[1].builtin, kv[0])):
            provided = {
                kind: sorted(e.name for e in entries.values() if e.plugin == name)
                for kind, entries in stages.items()
            }
            hooks = sorted(
                h.name for h in self._pm.get_hookcallers(self._pm.get_plugin(name)) or []
            ) if self._pm.get_plugin(name) is not None else []
            out.append(
                {
                    "name": name,
                    "distribution": info.distribution,
                    "version": info.version,
                    "builtin": info.builtin,
                    "stages": {k: v for k, v in provided.items() if v},
                    "defaults": {kind: e.name for kind, entries in stages.items() for e in entries.values()
                                 if e.plugin == name and e.default},
                    "hooks": hooks,
                }
            )
        return out


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    dist = ep.dist
    return dist.name.lower().replace("_", "-") if dist is not None else None
