"""Test-run switches.

``FELIX_TEST_TOPOLOGY=embedded`` runs the node tests (tests/nodeproc.py) on the topology
`felix up` picks on small machines (the shards inside the one gateway process); tests
marked ``split_topology`` need shard processes or two gateways and are skipped then.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FELIX_TEST_TOPOLOGY") != "embedded":
        return
    skip = pytest.mark.skip(reason="needs shard processes or two gateways (split topology)")
    for item in items:
        if item.get_closest_marker("split_topology") is not None:
            item.add_marker(skip)
