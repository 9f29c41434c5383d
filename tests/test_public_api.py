"""felix, felix.client and felix.wire export exactly the names docs/api.md documents.

A name added to a module's ``__all__`` without documenting it, or documented but
not exported (or not importable), fails here; so does a stale docs entry.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
MODULES = ("felix", "felix.client", "felix.wire")


def documented(module: str) -> list[str]:
    """The names listed under ``## `module` ``: backticked names before each item's colon."""
    text = API_DOC.read_text()
    match = re.search(rf"^## `{re.escape(module)}`\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/api.md has no section for {module}"
    names: list[str] = []
    for line in match.group(1).splitlines():
        if line.startswith("- "):
            head = line[2:].split(": ", 1)[0]
            names += re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", head)
    return names


@pytest.mark.parametrize("module", MODULES)
def test_all_is_exactly_the_documented_names(module: str) -> None:
    names = documented(module)
    assert len(names) == len(set(names)), (
        f"listed twice: {sorted(n for n in names if names.count(n) > 1)}"
    )
    exported = importlib.import_module(module).__all__
    assert len(exported) == len(set(exported))
    assert sorted(names) == sorted(exported)


@pytest.mark.parametrize("module", MODULES)
def test_every_exported_name_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name


def test_felix_reexports_are_the_same_objects() -> None:
    import felix
    import felix.client
    import felix.errors

    for name in felix.__all__:
        if name in felix.client.__all__:
            assert getattr(felix, name) is getattr(felix.client, name)
        elif name != "__version__":
            assert getattr(felix, name) is getattr(felix.errors, name)


def test_star_import_gives_the_documented_names() -> None:
    namespace: dict[str, object] = {}
    exec("from felix import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(documented("felix"))
