"""The package layering docs/architecture.md describes, checked on the imports.

Protocol layers must not reach into the layers that host them: the gateway knows
shards only through felix.gateway.links.ShardLinks, felix/auth knows nothing of
the control plane that serves it, and the client nothing server-side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "felix"

#: package -> packages it must not import (at module level or inside functions).
FORBIDDEN = {
    "gateway": ("felix.shard", "felix.node", "felix.control"),
    "auth": ("felix.control", "felix.node", "felix.gateway", "felix.shard"),
    "client": (
        "felix.auth",
        "felix.control",
        "felix.gateway",
        "felix.node",
        "felix.shard",
    ),
    "shard": ("felix.gateway", "felix.node", "felix.control", "felix.client"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_nothing_of_the_layers_above_them(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imported_modules(path)):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert offenders == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from felix.shard.core import ShardCore\n")
    assert "felix.shard.core" in imported_modules(module)
