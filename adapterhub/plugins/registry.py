"""The registry of adapter types: entry-point plugins (built-ins too), filtered by env vars.

    ADAPTERHUB_PLUGINS=lora,ia3          load only these entry points
    ADAPTERHUB_DISABLE_PLUGINS=vera      block these

A plugin that fails to import, has a hook the contract does not know (`check_pending`), or
declares an invalid type is reported in `failures()` (and logged) and skipped; the others work.
Tests add plugins with `register(module_or_object)` and take them out with `unregister`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import jsonschema
import pluggy

from ..errors import AdapterError
from ..formats.files import CONFIG_FILE
from . import hookspecs
from .contract import AdapterType

log = logging.getLogger("adapterhub")

GROUP = "adapterhub.adapter_types"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why."""

    plugin: str
    distribution: str
    error: str


@dataclass(frozen=True)
class TypeListing:
    """One row of `adapterhub plugins`."""

    name: str
    plugin: str
    distribution: str
    version: str
    aliases: tuple[str, ...]
    hooks: tuple[str, ...]
    description: str
    composition_methods: tuple[str, ...] = ()  # AdapterType.composition_methods: the default first


class Registry:
    """A pluggy PluginManager plus the adapter types its plugins declared."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._failures: list[PluginFailure] = []
        self._types: dict[str, tuple[AdapterType, str]] = {}  # name -> (type, plugin name)
        self._dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._lock = threading.RLock()
        if load_entry_points:
            self._load_entry_points()

    # ---- plugins --------------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None, distribution: tuple[str, str] = ("", "")) -> str:
        """Registers a plugin (a module or object with hookimpls); returns its name. A plugin that
        violates the contract is unregistered again and its error raised as an AdapterError."""
        with self._lock:
            name = self.pm.register(plugin, name=name)
            self._dists[name] = distribution
            try:
                self.pm.check_pending()
                self._collect(name)
            except Exception:
                self.unregister(name)
                raise
            return name

    def unregister(self, name: str) -> None:
        with self._lock:
            plugin = self.pm.get_plugin(name)
            if plugin is not None:
                self.pm.unregister(plugin)
            self._types = {t: v for t, v in self._types.items() if v[1] != name}
            self._dists.pop(name, None)

    def failures(self) -> list[PluginFailure]:
        return list(self._failures)

    # ---- types ----------------------------------------------------------------------------
    def get(self, name: str) -> AdapterType:
        with self._lock:
            if name not in self._types:
                blocked = (
                    " (it is blocked by ADAPTERHUB_DISABLE_PLUGINS or left out by ADAPTERHUB_PLUGINS)"
                    if self.pm.is_blocked(name) or "ADAPTERHUB_PLUGINS" in os.environ
                    else ""
                )
                raise AdapterError(
                    f"no adapter type named {name!r} is installed{blocked}; installed: "
                    f"{sorted(self._types)}{self._failure_hint()}; install the plugin that provides it"
                )
            return self._types[name][0]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._types)

    def recognize(self, directory: Path) -> AdapterType:
        """The type that reads `directory`: by its config's peft_type among the types' aliases, else
        by asking the plugins' recognize_adapter hooks."""
        config = _read_json(directory / CONFIG_FILE)
        tag = config.get("peft_type") if isinstance(config, dict) else None
        with self._lock:
            by_alias = {alias: t for t, _ in self._types.values() for alias in t.aliases}
        if tag in by_alias:
            return by_alias[tag]
        name = self.pm.hook.recognize_adapter(directory=directory, config=config if isinstance(config, dict) else None)
        if name is not None:
            return self.get(name)
        what = f"peft_type {tag!r}" if tag else f"no {CONFIG_FILE}" if config is None else "its config"
        raise AdapterError(
            f"no installed adapter type reads {directory} ({what}); installed types read "
            f"{sorted(by_alias)}{self._failure_hint()}: install the plugin for this format, or pass "
            "type= to Backbone.load"
        )

    def listing(self) -> list[TypeListing]:
        with self._lock:
            rows = []
            for name, (adapter_type, plugin) in sorted(self._types.items()):
                hooks = sorted(c.name for c in self.pm.get_hookcallers(self.pm.get_plugin(plugin)) or ())
                dist, version = self._dists.get(plugin, ("", ""))
                rows.append(
                    TypeListing(
                        name=name,
                        plugin=plugin,
                        distribution=dist,
                        version=version,
                        aliases=tuple(adapter_type.aliases),
                        hooks=tuple(hooks),
                        description=adapter_type.description,
                        composition_methods=tuple(adapter_type.composition_methods()),
                    )
                )
            return rows

    # ---- internals ------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        only = _env_list("ADAPTERHUB_PLUGINS")
        blocked = _env_list("ADAPTERHUB_DISABLE_PLUGINS")
        # The built-ins first, so that an outside plugin cannot take a built-in type's name.
        for ep in sorted(
            entry_points(group=GROUP), key=lambda e: (e.dist is None or e.dist.name != "adapterhub", e.name)
        ):
            if (only is not None and ep.name not in only) or (blocked and ep.name in blocked):
                if blocked and ep.name in blocked:
                    self.pm.set_blocked(ep.name)
                continue
            dist = (ep.dist.name, ep.dist.version) if ep.dist else ("", "")
            try:
                self.register(ep.load(), name=ep.name, distribution=dist)
            except Exception as e:  # a broken plugin must not take the others down
                self._fail(ep, dist, e)

    def _fail(self, ep: EntryPoint, dist: tuple[str, str], error: Exception) -> None:
        failure = PluginFailure(
            plugin=ep.name, distribution=" ".join(filter(None, dist)), error=f"{type(error).__name__}: {error}"
        )
        self._failures.append(failure)
        log.warning(
            "adapterhub: skipped plugin %r (%s): %s", failure.plugin, failure.distribution or ep.value, failure.error
        )

    def _collect(self, plugin_name: str) -> None:
        """Checks and records the types one plugin declares."""
        impls = [i for i in self.pm.hook.adapter_types.get_hookimpls() if i.plugin_name == plugin_name]
        declared = impls[0].function() if impls else []
        if not isinstance(declared, (list, tuple)):
            raise AdapterError(
                f"plugin {plugin_name!r}: adapter_types() must return a list of AdapterType, "
                f"got {type(declared).__name__}"
            )
        found = {}
        for adapter_type in declared:
            _check_type(plugin_name, adapter_type)
            taken = self._types.get(adapter_type.name) or found.get(adapter_type.name)
            if taken:
                raise AdapterError(
                    f"plugin {plugin_name!r} declares adapter type {adapter_type.name!r}, which plugin "
                    f"{taken[1]!r} already provides; disable one with ADAPTERHUB_DISABLE_PLUGINS"
                )
            readers = {alias: (t.name, p) for t, p in [*self._types.values(), *found.values()] for alias in t.aliases}
            clash = next((a for a in adapter_type.aliases if a in readers), None)
            if clash:
                raise AdapterError(
                    f"plugin {plugin_name!r}: type {adapter_type.name!r} claims format {clash!r}, which "
                    f"type {readers[clash][0]!r} (plugin {readers[clash][1]!r}) already reads; "
                    "disable one with ADAPTERHUB_DISABLE_PLUGINS"
                )
            found[adapter_type.name] = (adapter_type, plugin_name)
        self._types.update(found)

    def _failure_hint(self) -> str:
        return f" (skipped plugins: {[f.plugin for f in self._failures]})" if self._failures else ""


_REQUIRED = ("read", "write", "rank", "check", "allocate", "init")


def _check_type(plugin: str, adapter_type: Any) -> None:
    """Names the first way `adapter_type` breaks the contract."""
    if not isinstance(adapter_type, AdapterType):
        raise AdapterError(f"plugin {plugin!r}: adapter_types() returned {adapter_type!r}, not an AdapterType")
    name = getattr(adapter_type, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterError(f"plugin {plugin!r}: {type(adapter_type).__name__}.name must be an identifier, got {name!r}")
    missing = [m for m in _REQUIRED if getattr(type(adapter_type), m) is getattr(AdapterType, m)]
    if missing:
        raise AdapterError(f"plugin {plugin!r}: adapter type {name!r} does not implement {missing}")
    if not isinstance(adapter_type.aliases, tuple) or not all(isinstance(a, str) for a in adapter_type.aliases):
        raise AdapterError(f"plugin {plugin!r}: {name}.aliases must be a tuple of strings")
    try:
        jsonschema.Draft202012Validator.check_schema(adapter_type.config_schema)
    except jsonschema.exceptions.SchemaError as error:
        raise AdapterError(
            f"plugin {plugin!r}: {name}.config_schema is not a valid JSON Schema ({error.message}); fix the plugin"
        ) from None


def _env_list(var: str) -> set[str] | None:
    value = os.environ.get(var)
    return None if value is None else {v.strip() for v in value.split(",") if v.strip()}


def _read_json(file: Path) -> Any:
    """The parsed file, or None if it is missing or not JSON (the type's own reader reports that)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_registry: Registry | None = None
_registry_lock = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, built from the installed entry points on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def get_type(name: str) -> AdapterType:
    return registry().get(name)
