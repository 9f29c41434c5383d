"""The pin window is closed: a durable publish is acknowledged only once its logical
shard is pinned to the node holding its records (felix/shard/cluster.py ``PinWaits``).

Two real `felix up --cluster` nodes on one fresh PostgreSQL database: n0 runs shard
processes (the split topology: the shard process reports the pin it wants to the
supervisor), n1 runs its shard cores inside the gateway (embedded). For a durable stream
on each, never written before:

- when its first publish is acknowledged, the cluster's table already pins its logical
  shard to its node (before, the pin came with the next scan of the data dir, up to
  about two seconds later, and a node killed in between lost the shard to another node,
  which served it empty and issued its offsets again);
- kill -9 of n0 right after that ack: its shard does not move to n1 (Unavailable naming
  n0 there), and n0 restarted serves the acknowledged record at its offset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import felix
from felix.cluster.ownership import logical_shard
from tests import clusterproc as cp
from tests import pg
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(150)

LEASE = 2.0
GRACE = LEASE / 5
IDS = ["n0", "n1"]


def _name_on(owners: list[str | None], node_id: str, prefix: str) -> str:
    for i in range(100_000):
        name = f"{prefix}{i}"
        shard = logical_shard(f"{cp.TENANT}/{cp.NAMESPACE}/{name}", cp.LOGICAL_SHARDS)
        if owners[shard] == node_id:
            return name
    raise AssertionError(f"no name on {node_id}")


def _shard(name: str) -> int:
    return logical_shard(f"{cp.TENANT}/{cp.NAMESPACE}/{name}", cp.LOGICAL_SHARDS)


async def _row(dsn: str, shard: int) -> tuple[str | None, str | None]:
    """(owner, durable_node) of ``shard`` in the cluster's table, read directly."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT owner, durable_node FROM felix_cluster_shards WHERE shard = $1", shard
        )
    finally:
        await conn.close()
    assert row is not None
    return row["owner"], row["durable_node"]


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, Path, str, list[NodeProcess]]]:
    root = tmp_path_factory.mktemp("cluster_pin")
    ca = cp.make_ca(root)
    with pg.temporary_database("felix_cluster_pin") as dsn:
        started = [
            cp.start_node(root, ca, dsn, "n0", LEASE, "--topology", "split"),
            cp.start_node(root, ca, dsn, "n1", LEASE),
        ]
        try:
            yield root, ca, dsn, started
        finally:
            for n in started:
                n.stop()


def test_a_first_durable_ack_means_the_shard_is_pinned(
    nodes: tuple[Path, Path, str, list[NodeProcess]],
) -> None:
    root, ca, dsn, started = nodes
    owners = cp.owners(cp.wait_settled(started))
    names = {node_id: _name_on(owners, node_id, f"first-{node_id}-") for node_id in IDS}
    cp.define(started[0], durable=list(names.values()), memory=[])
    state: dict[str, Any] = {}

    async def main() -> None:
        for node, node_id in zip(started, IDS, strict=True):
            name = names[node_id]
            async with await cp.connect(node, ca) as client:
                # The definition reaches the owner's shards through the feed.
                async with asyncio.timeout(20):
                    while True:
                        try:
                            offset = await client.publish(name, b"first")
                            break
                        except felix.NotFound:
                            await asyncio.sleep(0.1)
                assert offset is not None and offset.offset == 0
                # Acknowledged: the pin is in the table already, not a scan later.
                assert await _row(dsn, _shard(name)) == (node_id, node_id), name
                if node_id == "n0":
                    started[0].kill_all()
                    state["killed"] = time.monotonic()

    run(main, timeout=60)
    # Counted (children report their counters every second).
    cp.wait_for(
        "the pin wait counted",
        lambda: started[1].metric("felix_cluster_pin_waits_total") >= 1,
        10,
    )
    # n0's shard waits for it: after its lease and the grace it is still n0's.
    name0 = names["n0"]
    time.sleep(max(0.0, state["killed"] + LEASE + GRACE + 2.0 - time.monotonic()))

    async def while_down() -> None:
        assert await _row(dsn, _shard(name0)) == ("n0", "n0")
        async with await cp.connect(started[1], ca) as client:
            with pytest.raises(felix.Unavailable, match=r"\bn0\b"):
                await client.publish(name0, b"while down")

    run(while_down, timeout=30)
    started[0] = cp.start_node(root, ca, dsn, "n0", LEASE, "--topology", "split")
    cp.wait_settled(started)

    async def after() -> None:
        async with await cp.connect(started[1], ca) as client:
            got = await cp.read_all(client, name0, 0)
            assert got == {0: b"first"}
            # After a crash a stream goes on above the offsets it had reserved: never back.
            ack = await client.publish(name0, b"second")
            assert ack is not None and ack.offset > 0

    run(after, timeout=30)
