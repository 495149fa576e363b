"""The plugin registry: entry-point discovery (built-ins included), env-var filters, broken plugins
reported and skipped, contract checks, the `adapterhub plugins` listing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import tiny_llama

import adapterhub as ah
from adapterhub.plugins import Registry, registry
from adapterhub.types.ia3 import IA3Type

BUILT_IN = {"lora", "ia3", "bottleneck", "prompt_tuning"}


def install_fake_distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A real (metadata-only) installed distribution on sys.path: dist-info + entry_points.txt + modules."""
    info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[adapterhub.adapter_types]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_built_in_types_come_through_entry_points():
    listing = {t.name: t for t in registry().listing()}
    assert set(listing) >= BUILT_IN
    for name in BUILT_IN:
        assert (listing[name].distribution, listing[name].version) == ("adapterhub", ah.__version__)
        assert "adapter_types" in listing[name].hooks
    assert listing["lora"].aliases == ("LORA",) and listing["ia3"].aliases == ("IA3",)
    assert "recognize_adapter" in listing["bottleneck"].hooks  # its format carries no peft_type
    assert registry().failures() == []


def test_env_vars_choose_and_block_plugins(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_PLUGINS", "lora, ia3")
    assert Registry().names() == ["ia3", "lora"]
    monkeypatch.delenv("ADAPTERHUB_PLUGINS")
    monkeypatch.setenv("ADAPTERHUB_DISABLE_PLUGINS", "ia3,prompt_tuning")
    only = Registry()
    assert "ia3" not in only.names() and "prompt_tuning" not in only.names() and "lora" in only.names()
    assert only.pm.is_blocked("ia3")
    with pytest.raises(ah.AdapterError, match=r"no adapter type named 'ia3' is installed"):
        only.get("ia3")


def test_broken_plugins_are_reported_and_skipped(tmp_path, monkeypatch, caplog):
    install_fake_distribution(
        tmp_path,
        "adapterhub-broken",
        {
            "missing": "adapterhub_no_such_module",
            "raises": "adapterhub_raises",
            "unknown_hook": "adapterhub_unknown_hook",
            "not_a_type": "adapterhub_not_a_type",
            "clash": "adapterhub_clash",
        },
        {
            "adapterhub_raises": "raise RuntimeError('boom at import')\n",
            "adapterhub_unknown_hook": """
            import adapterhub
            @adapterhub.hookimpl
            def adapter_typez():  # a typo: no such hook in the contract
                return []
        """,
            "adapterhub_not_a_type": """
            import adapterhub
            @adapterhub.hookimpl
            def adapter_types():
                return ["lora"]
        """,
            "adapterhub_clash": """
            import adapterhub
            from adapterhub.types.ia3 import IA3Type
            @adapterhub.hookimpl
            def adapter_types():
                return [IA3Type()]  # a second "ia3"
        """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("WARNING", logger="adapterhub"):
        reg = Registry()
    failures = {f.plugin: f for f in reg.failures()}
    assert set(failures) == {"missing", "raises", "unknown_hook", "not_a_type", "clash"}
    assert all(f.distribution == "adapterhub-broken 1.2.3" for f in failures.values())
    assert "ModuleNotFoundError" in failures["missing"].error
    assert "boom at import" in failures["raises"].error
    assert "adapter_typez" in failures["unknown_hook"].error
    assert "returned 'lora', not an AdapterType" in failures["not_a_type"].error
    assert "'ia3', which plugin 'ia3' already provides" in failures["clash"].error
    assert "skipped plugin 'raises' (adapterhub-broken 1.2.3)" in caplog.text
    assert set(reg.names()) >= BUILT_IN  # everything else keeps working
    assert type(reg.get("ia3")) is IA3Type and reg.pm.get_plugin("clash") is None


def test_types_that_break_the_contract_are_refused():
    class Nameless(ah.AdapterType):
        name = "not an identifier"

    class Lazy(ah.AdapterType):
        name = "lazy"

        def read(self, directory, *, allow_pickle=False):
            raise NotImplementedError

    for bad, message in ((Nameless(), "must be an identifier"), (Lazy(), r"does not implement \['write'")):
        plugin = type("Plugin", (), {"adapter_types": ah.hookimpl(lambda self, t=bad: [t])})()
        reg = Registry(load_entry_points=False)
        with pytest.raises(ah.AdapterError, match=message):
            reg.register(plugin)
        assert reg.names() == [] and reg.pm.get_plugins() == set()


def test_unknown_format_names_what_is_installed(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT"}))
    with pytest.raises(
        ah.AdapterError,
        match=r"no installed adapter type reads .* \(peft_type 'OFT'\); installed "
        r"types read \[.*'IA3'.*'LORA'.*\]: install the plugin",
    ):
        registry().recognize(tmp_path)


def test_cli_lists_types_as_text_and_json():
    command = [sys.executable, "-m", "adapterhub.cli", "plugins"]
    listing = json.loads(subprocess.run(command + ["--json"], check=True, capture_output=True, text=True).stdout)
    rows = {row["name"]: row for row in listing["types"]}
    assert set(rows) >= BUILT_IN and listing["failures"] == []
    assert rows["prompt_tuning"]["aliases"] == ["PROMPT_TUNING"] and rows["lora"]["distribution"] == "adapterhub"
    assert rows["lora"]["composition_methods"][:3] == ["cat", "linear", "ties"]  # the default first
    assert rows["ia3"]["composition_methods"] == ["linear"] and rows["prompt_tuning"]["composition_methods"] == []
    text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert "composes by: (cannot compose)" in text
    assert any(
        line.startswith("lora ") and "adapterhub" in line and "adapter_types" in line for line in text.splitlines()
    )


def test_a_plugin_cannot_take_a_format_another_type_reads():
    class FastLora(IA3Type):
        name, aliases = "fastlora", ("LORA",)

    reg = Registry(load_entry_points=False)
    reg.register(__import__("adapterhub.types.lora", fromlist=["x"]), name="lora")
    plugin = type("Plugin", (), {"adapter_types": ah.hookimpl(lambda self: [FastLora()])})()
    with pytest.raises(ah.AdapterError, match=r"claims format 'LORA', which type 'lora' \(plugin 'lora'\) already"):
        reg.register(plugin)
    assert reg.names() == ["lora"]


def test_hookimpl_with_specname_declares_types():
    plugin = type("Plugin", (), {"provide": ah.hookimpl(specname="adapter_types")(lambda self: [IA3Type()])})()
    reg = Registry(load_entry_points=False)
    reg.register(plugin, name="renamed")
    assert reg.names() == ["ia3"]


class _Unchecked(ah.AdapterType):
    """A type whose reader checks nothing: the Backbone checks its config_schema for it."""

    name = "unchecked"
    config_schema = {
        "type": "object",
        "required": ["target_modules"],
        "properties": {"target_modules": {"type": "array", "items": {"type": "string"}}},
    }

    def read(self, directory, *, allow_pickle=False):
        config = json.loads((directory / "adapter_config.json").read_text())
        return ah.Adapter(type=self.name, config=config, modules={}, source=str(directory))

    def write(self, adapter, directory):
        raise NotImplementedError

    def rank(self, adapter):
        return 0

    def check(self, adapter, model):
        pass

    def allocate(self, module, path, slots, max_rank):
        raise NotImplementedError

    def init(self, model, config):
        return ah.Adapter(type=self.name, config=config, modules={}, source="init")


def test_every_type_s_config_schema_is_checked_before_read_returns_and_before_init(tmp_path):
    reg = Registry(load_entry_points=False)
    reg.register(type("Plugin", (), {"adapter_types": ah.hookimpl(lambda self: [_Unchecked()])})())
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8, preallocate=(), types=reg)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": 5}))
    with pytest.raises(ah.AdapterError, match=rf"{tmp_path}: target_modules: 5 is not of type 'array'"):
        bb.load(tmp_path, name="bad", type="unchecked")
    with pytest.raises(ah.AdapterError, match=r"create\('x', 'unchecked'\) config: target_modules: 5 is not of"):
        bb.create("x", "unchecked", {"target_modules": 5})
    with pytest.raises(ah.AdapterError, match=r"init: 'target_modules' is a required property"):
        bb.create("x", "unchecked", {})  # a key init does not fill in: refused once init has run
    with pytest.raises(ah.AdapterError, match=r"create\('y', 'lora'\) config: modules_to_save: 5 is not valid"):
        ah.Backbone(tiny_llama(), max_adapters=2, max_rank=8).create("y", "lora", {"modules_to_save": 5})
    assert bb.names == []


def test_create_leaves_what_init_fills_in_to_init():
    """A type's schema may require a key its init defaults (bottleneck: "config" = "seq_bn")."""
    bb = ah.Backbone(tiny_llama(), max_adapters=2, max_rank=16, preallocate=())
    bb.create("b", "bottleneck")
    resolved = bb.info("b").config["config"]  # the seq_bn preset, resolved
    assert resolved["output_adapter"] and not resolved["mh_adapter"] and resolved["non_linearity"] == "relu"


def test_a_plugin_with_an_invalid_config_schema_is_refused_when_registered():
    class BadSchema(_Unchecked):
        name = "bad_schema"
        config_schema = {"type": "no such type"}

    reg = Registry(load_entry_points=False)
    plugin = type("Plugin", (), {"adapter_types": ah.hookimpl(lambda self: [BadSchema()])})()
    with pytest.raises(ah.AdapterError, match=r"bad_schema\.config_schema is not a valid JSON Schema"):
        reg.register(plugin)
