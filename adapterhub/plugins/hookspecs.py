"""The plugin contract: two pluggy hooks, project name "adapterhub".

A plugin is a module (or object) with `@adapterhub.hookimpl` functions, published under the
entry-point group `adapterhub.adapter_types`; the built-in types are found the same way.

    # my_plugin.py                      pyproject.toml:
    import adapterhub                   [project.entry-points."adapterhub.adapter_types"]
                                        mytype = "my_plugin"
    @adapterhub.hookimpl
    def adapter_types():
        return [MyType()]               # MyType subclasses adapterhub.AdapterType
"""

from __future__ import annotations

from pathlib import Path

import pluggy

PROJECT = "adapterhub"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def adapter_types() -> list:
    """The adapter types this plugin provides: a list of `adapterhub.AdapterType` instances.

    @hookimpl
    def adapter_types():
        return [VeraType()]
    """


@hookspec(firstresult=True)
def recognize_adapter(directory: Path, config: dict | None) -> str | None:
    """The name of the type that reads `directory`, or None if this plugin does not know it.

    `config` is the directory's adapter_config.json parsed (None if there is none). Types whose
    config carries PEFT's `peft_type` need not implement this: their `aliases` are matched first.

        @hookimpl
        def recognize_adapter(directory, config):
            if config and config.get("config", {}).get("architecture") == "bottleneck":
                return "bottleneck"
    """
