"""Test-run switches, and every test's isolation from the user's felix settings.

``FELIX_TEST_TOPOLOGY=embedded`` runs the node tests (tests/nodeproc.py) on the topology
`felix up` picks on small machines (the shards inside the one gateway process); tests
marked ``split_topology`` need shard processes or two gateways and are skipped then.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import felix.context

# The suite starts thousands of Python processes (the `felix up` trees of the node tests,
# one per child, and the CLI calls): let them cache felix's bytecode, and pytest its
# rewritten test modules, even where the environment says PYTHONDONTWRITEBYTECODE (each
# process would otherwise compile felix again, ~0.3 s of CPU). The caches go to the
# __pycache__ directories .gitignore leaves out.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    sys.dont_write_bytecode = False


@pytest.fixture(autouse=True)
def _no_local_felix_settings(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The CLI's defaults (felix/context.py) come from the test, never from the user's
    contexts, environment or a ./data node of a `make up` in the checkout."""
    monkeypatch.setenv("FELIX_CONFIG_DIR", str(tmp_path_factory.mktemp("felix-config")))
    for name in ("FELIX_CONTEXT", "FELIX_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(felix.context, "LOCAL_DATA_DIR", Path("/nonexistent/felix-data"))
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FELIX_TEST_TOPOLOGY") != "embedded":
        return
    skip = pytest.mark.skip(reason="needs shard processes or two gateways (split topology)")
    for item in items:
        if item.get_closest_marker("split_topology") is not None:
            item.add_marker(skip)
