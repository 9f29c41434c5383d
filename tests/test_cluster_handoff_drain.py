"""A handoff never completes while the old owner's gateways may still admit or apply
writes for the shard: when ``handoff_drained`` raises (felix/node/cluster.py: not every
running gateway acknowledged the map in time), the agent leaves the shard where it is
and tries again later. Two in-process agents on a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pg
from tests.aio import run
from tests.test_cluster_agent import Node, inspector_for, settle, until


@pytest.fixture
def dsn() -> Iterator[str]:
    with pg.temporary_database("felix_cluster") as dsn:
        yield dsn


def test_a_handoff_whose_gateways_did_not_drain_is_not_completed(dsn: str) -> None:
    async def main() -> None:
        failed: list[int] = []  # shards whose first drain failed
        drained: list[int] = []  # shards whose (second) drain succeeded

        async def drain(node: Node, version: int) -> None:
            m = next(m for _, m in node.maps if m.version == version)
            if m.serve_until == 0:
                return  # leaving
            (shard,) = [i for i in m.owned() if m.shards[i].handoff_to is not None]
            if shard not in failed:
                failed.append(shard)
                # The shard is still this node's when its drain fails...
                raise TimeoutError(f"gateway-0 did not acknowledge map {version}")
            drained.append(shard)

        first = Node(dsn, "n1", drain)
        await first.start()
        inspector = await inspector_for(dsn)
        await settle(inspector, [first])
        second = Node(dsn, "n2", drain)
        await second.start()

        async def three_moved() -> bool:
            return len(drained) >= 3

        await until(three_moved, 30.0, "three handoffs")
        view = await inspector.view()
        for shard in failed[:3]:
            # ...and it moved only after a drain that succeeded, with one epoch bump.
            assert shard in drained
            assert view.shards[shard].owner == "n2", shard
        assert drained[:3] == failed[:3]  # the failed one was retried before the next
        for n in (second, first):
            await n.stop()
        await inspector.close()

    run(main, timeout=60)
