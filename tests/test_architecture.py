"""docs/architecture.md's import rules hold: each part of adapterhub imports only the parts its row
of the table allows and none it must never import (lazy imports inside functions included), no
part imports the package root, and outside plugins import only the plugin API."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import adapterhub
import adapterhub.formats

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "adapterhub"
DOC = ROOT / "docs" / "architecture.md"
PLUGIN_API = {"adapterhub", "adapterhub.formats", "adapterhub.ops"}


def rules() -> dict[str, tuple[set[str], set[str]]]:
    """part -> (may import, never imports), from the table of docs/architecture.md."""
    table = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]):
            names = [set(re.findall(r"`(\w+)`", cell)) for cell in (cells[2], cells[3])]
            table[cells[0].strip("`")] = (names[0], names[1])
    return table


def parts() -> set[str]:
    """The names directly under adapterhub/: modules, packages, and the extension _C, built or not."""
    return {p.name.split(".")[0] for p in PACKAGE.iterdir()} | {"_C"}


def part_of(module: str) -> str:
    """ "adapterhub.serve.engine" -> "serve"; the package root -> "adapterhub"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "adapterhub"


def module_name(file: Path) -> str:
    relative = file.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imported(module: str, source: str, is_package: bool) -> set[str]:
    """The modules `source` (module `module`) imports: absolute names, for adapterhub ones the
    submodule when `from X import name` names one, else X; third-party ones by top-level name."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin == "adapterhub":  # `from adapterhub import ops` imports a part; `import Backbone` the root
                found |= {f"adapterhub.{a.name}" if a.name in parts() else "adapterhub" for a in node.names}
            else:
                found.add(origin)
    return found


def violations(module: str, targets: set[str], table: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    own = part_of(module)
    if own == "adapterhub":  # the root re-exports the public API from the parts
        return []
    may, never = table[own]
    found = []
    for target in sorted(targets):
        if target == "adapterhub" or target.startswith("adapterhub."):
            other = part_of(target)
            if target == "adapterhub" and own != "adapterhub":
                found.append(f"{module} imports the package root (import the part instead)")
            elif other != own and (other in never or other not in may):
                found.append(f"{module} ({own}) imports {target} ({other}): {own} may import {sorted(may)}")
        elif target.split(".")[0] in never - parts():  # a third-party name (not stdlib `types`)
            found.append(f"{module} ({own}) imports {target}, which {own} never imports")
    return found


def sources() -> list[tuple[str, str, bool]]:
    return [(module_name(f), f.read_text(), f.name == "__init__.py") for f in sorted(PACKAGE.rglob("*.py"))]


def test_the_table_names_every_part_and_nothing_else():
    table = rules()
    parts = {
        p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert set(table) == parts - {"__init__"}


def test_every_part_imports_only_what_its_row_allows():
    table = rules()
    found = [
        v
        for module, source, is_package in sources()
        for v in violations(module, imported(module, source, is_package), table)
    ]
    assert found == []


def test_outside_plugins_import_only_the_plugin_api():
    files = sorted((ROOT / "plugins").glob("*/src/**/*.py"))
    assert files, "the outside plugins are missing"
    found = []
    for file in files:
        for target in imported(module_name(file), file.read_text(), file.name == "__init__.py"):
            if target.startswith("adapterhub") and target.split(".")[0] == "adapterhub" and target not in PLUGIN_API:
                found.append(f"{file.relative_to(ROOT)} imports {target}")
    assert found == []


def test_the_public_api_exports_what_it_lists():
    for module in (adapterhub, adapterhub.formats):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], f"{module.__name__}.__all__ lists {missing}"


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("adapterhub.backbone.backbone", "from ..serve import engine", r"imports adapterhub\.serve \(serve\)"),
        ("adapterhub.ops.meta", "def f():\n    import transformers", "imports transformers, which ops never"),
        ("adapterhub.types.lora", "from .. import Backbone", "imports the package root"),
        ("adapterhub.formats.peft", "from adapterhub import ops", r"imports adapterhub\.ops \(ops\)"),
        ("adapterhub.backbone.routing", "from types import MappingProxyType\nimport peft", "imports peft, which"),
    ],
)
def test_the_check_catches_what_the_table_forbids(module, source, message):
    found = violations(module, imported(module, source, False), rules())
    assert len(found) == 1 and re.search(message, found[0]), found
