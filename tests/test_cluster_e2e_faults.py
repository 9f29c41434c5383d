"""Three real `felix up --cluster` nodes reaching their PostgreSQL database through a TCP
proxy that can be cut (tests/clusterproc.py), used through felix's own client.

In order, on the module's nodes (lease 4 s: fence margin and placer grace 0.8 s, a
renewal every 1.33 s), while a sampler reads every node's /cluster all along:

- the database cut for a second under traffic: every node keeps serving what it owns,
  no call fails; cut for longer than the lease: the nodes stop serving (Unavailable)
  rather than serve on a map nobody vouches for; restored: everything recovers. No
  shard ever had two serving owners (per sampling round, and per shard and epoch);
- a fourth node joins under load (publishes with acks to durable and in-memory streams,
  a subscriber on each): about a quarter of the shards that hold no durable data move
  to it, one handoff at a time, the durable ones stay; nothing acknowledged on a durable
  stream is lost and no subscriber gets a record twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import felix
from felix.client import Client
from felix.cluster.ownership import logical_shard
from tests import clusterproc as cp
from tests import pg
from tests.aio import run
from tests.nodeproc import NodeProcess

# serial: its failover bounds are timed; it runs alone, not beside another xdist worker.
pytestmark = [pytest.mark.timeout(150), pytest.mark.serial]

LEASE = 4.0
MARGIN = LEASE / 5  # the fence margin, and the placer's grace
IDS = ["n0", "n1", "n2"]
#: Streams (durable and in memory) and cache keys, spread over the logical shards.
DURABLE = [f"d{i}" for i in range(12)]
MEMORY = [f"m{i}" for i in range(12)]
KEYS = [f"k{i}" for i in range(12)]
BASE = f"{cp.TENANT}/{cp.NAMESPACE}/"
SHARD = {
    **{s: logical_shard(BASE + s, cp.LOGICAL_SHARDS) for s in DURABLE + MEMORY},
    **{k: logical_shard(f"{BASE}c/{k}", cp.LOGICAL_SHARDS) for k in KEYS},
}


@dataclass
class Cluster:
    root: Path
    ca: Path
    dsn: str
    proxy: cp.DbProxy
    nodes: list[NodeProcess]
    sampler: cp.Sampler = field(init=False)

    def logs(self) -> str:
        return "\n".join(n.log()[-3000:] for n in self.nodes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster_faults")
    ca = cp.make_ca(root)
    with pg.temporary_database("felix_cluster_faults") as direct:
        proxy = cp.DbProxy(direct)
        dsn = proxy.start()
        c = Cluster(root, ca, dsn, proxy, [])
        try:
            c.nodes = cp.start_nodes(root, ca, dsn, IDS, LEASE)
            cp.wait_settled(c.nodes)
            cp.define(c.nodes[0], DURABLE, MEMORY, ["c"])
            with cp.Sampler(lambda: list(c.nodes)) as c.sampler:
                yield c
        finally:
            for n in c.nodes:
                n.stop()
            proxy.close()


async def _connect(node: NodeProcess, ca: Path, **options: Any) -> Client:
    client: Client = await cp.connect(node, ca, **{"request_timeout": 2.0, **options})
    # Warm it: every stream and key once (also waits for the definitions to arrive).
    async with asyncio.timeout(20):
        for name in DURABLE + MEMORY + KEYS:
            while True:
                try:
                    if name in KEYS:
                        await client.cache("c").set(name, b"warm")
                    else:
                        await client.publish(name, b"warm")
                    break
                except (felix.NotFound, felix.Unavailable):
                    await asyncio.sleep(0.1)
    return client


def _wait_pinned(cluster: Cluster) -> None:
    """Until every durable stream's shard is pinned to its owner (nodes report the shards
    they hold durable records for every few seconds)."""

    def pinned() -> bool:
        rows = cp.cluster_doc(cluster.nodes[0])["shards"]
        return all(rows[SHARD[s]][3] is not None for s in DURABLE)

    cp.wait_for("durable shards pinned", pinned, 20, cluster.logs())


def _all_working(traffic: cp.Traffic, since: float) -> bool:
    return all(traffic.successes(k, since) > 0 for k in SHARD) and not traffic.errors(after=since)


def test_database_outages_short_and_longer_than_the_lease(cluster: Cluster) -> None:
    state: dict[str, Any] = {}
    proxy = cluster.proxy

    async def main() -> None:
        client = await _connect(cluster.nodes[0], cluster.ca)
        try:
            await asyncio.to_thread(_wait_pinned, cluster)
            async with cp.Traffic(client, DURABLE + MEMORY, "c", KEYS) as traffic:
                await asyncio.sleep(1.0)
                assert not traffic.errors(), traffic.errors()[:3]

                # Shorter than the lease minus the margin and a renewal period.
                short = 1.0
                cut = time.monotonic()
                proxy.set_cut()
                await asyncio.sleep(short)
                await asyncio.to_thread(proxy.heal)
                await asyncio.sleep(LEASE)  # past where a fence would have been
                state["short"] = (cut, time.monotonic())
                assert not traffic.errors(after=cut), cp_errors(traffic, cut)

                # Longer than the lease: every node fences itself.
                long = LEASE + 2.0
                cut = time.monotonic()
                proxy.set_cut()
                await asyncio.sleep(long)
                healed = time.monotonic()
                await asyncio.to_thread(proxy.heal)
                state["long"] = (cut, healed)
                # Everything recovers.
                async with asyncio.timeout(60):
                    while not _all_working(traffic, time.monotonic() - 1.5):
                        await asyncio.sleep(0.25)
                state["recovered"] = time.monotonic()
            state["traffic"] = traffic
        finally:
            await client.close()

    run(main, timeout=100)
    traffic: cp.Traffic = state["traffic"]
    cut, healed = state["long"]
    # While fenced (past the lease after the cut, until the heal) nothing was served.
    fenced = [o for o in traffic.outcomes if cut + LEASE < o.began and o.ended < healed]
    assert fenced, "no call while fenced"
    served = [o for o in fenced if o.error is None]
    assert not served, served[:5]
    kinds = {type(o.error).__name__ for o in fenced}
    assert kinds <= {"Unavailable", "FelixTimeoutError", "ConnectionLost"}, kinds
    assert any(isinstance(o.error, felix.Unavailable) for o in fenced)
    first_error = min(o.ended for o in traffic.errors(after=cut)) - cut
    print(f"\nshort cut ({state['short'][1] - state['short'][0] - LEASE:.1f} s): no failed call;"
          f" long cut ({healed - cut:.1f} s): first failure {first_error:.2f} s after the cut, "
          f"{len(fenced)} calls refused while fenced, all working again "
          f"{state['recovered'] - healed:.1f} s after the heal")  # fmt: skip
    assert first_error > LEASE - 2 * MARGIN - LEASE / 3, first_error  # kept serving a while
    cluster.sampler.check_single_owner()
    # The sampler saw each node fenced, then serving again under a new incarnation.
    for node in cluster.nodes:
        samples = [s for s in cluster.sampler.samples if s.node_id == node.data_dir.name]
        assert any(not s.serving and cut < s.at < healed for s in samples)
        assert len({s.incarnation for s in samples}) >= 2
    print(f"{cluster.sampler.rounds} sampling rounds: never two serving owners")


def cp_errors(traffic: cp.Traffic, since: float) -> list[str]:
    return [f"{o.key} {o.ended - since:.2f}s {o.error!r}" for o in traffic.errors(after=since)][:10]


def test_a_fourth_node_joins_under_load(cluster: Cluster) -> None:
    before = cp.wait_settled(cluster.nodes, timeout=60)
    durable_shards = {i for i, row in enumerate(before["shards"]) if row[3] is not None}
    assert {SHARD[s] for s in DURABLE} <= durable_shards
    state: dict[str, Any] = {}

    async def main() -> None:
        client = await _connect(cluster.nodes[0], cluster.ca)
        received: dict[str, list[tuple[int, bytes]]] = {s: [] for s in DURABLE + MEMORY}

        async def read(stream: str, start: Any) -> None:
            async with client.subscribe(stream, start=start) as sub:
                while True:
                    m = await sub.next()
                    received[stream].append((m.offset, m.data))

        try:
            marks = {}
            for s in DURABLE:
                ack = await client.publish(s, b"mark")
                assert ack is not None
                marks[s] = ack.offset
            readers = [asyncio.create_task(read(s, marks[s])) for s in DURABLE]
            readers += [asyncio.create_task(read(s, "latest")) for s in MEMORY]
            async with cp.Traffic(client, DURABLE + MEMORY, "c", KEYS) as traffic:
                await asyncio.sleep(1.0)
                began = time.monotonic()
                new = await asyncio.to_thread(
                    cp.start_node, cluster.root, cluster.ca, cluster.dsn, "n3", LEASE
                )
                cluster.nodes.append(new)
                after = await asyncio.to_thread(cp.wait_settled, cluster.nodes, 60)
                state["took"] = time.monotonic() - began
                await asyncio.sleep(1.0)
            await asyncio.sleep(1.0)  # the subscribers catch up
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            state.update(after=after, traffic=traffic, received=received, marks=marks)
            # Nothing acknowledged on a durable stream is lost: read each back whole.
            for s in DURABLE:
                acked = traffic.acked[s]
                got = await cp.read_all(client, s, acked[-1][0])
                missing = [(o, p) for o, p in acked if got.get(o) != p]
                assert not missing, (s, missing[:5])
        finally:
            await client.close()

    run(main, timeout=110)
    after, traffic, received = state["after"], state["traffic"], state["received"]
    moved = [i for i in range(cp.LOGICAL_SHARDS) if after["shards"][i][0] != before["shards"][i][0]]
    print(f"\n4th node: {len(moved)} of {cp.LOGICAL_SHARDS} shards moved in {state['took']:.1f} s "
          f"({len(durable_shards)} durable-pinned stayed); {len(traffic.outcomes)} calls, "
          f"{len(traffic.errors())} failed")  # fmt: skip
    assert all(after["shards"][i][0] == "n3" for i in moved)
    assert not durable_shards & set(moved)
    for i in durable_shards:
        assert after["shards"][i][:2] == before["shards"][i][:2]
    assert 0.15 * cp.LOGICAL_SHARDS <= len(moved) <= 0.35 * cp.LOGICAL_SHARDS, len(moved)
    # Durable streams: every acknowledged record delivered to its subscriber, once.
    for s in DURABLE:
        offsets = [o for o, _ in received[s]]
        assert offsets == sorted(set(offsets)), f"{s}: duplicate or out of order"
        delivered = dict(received[s])
        assert all(delivered.get(o) == p for o, p in traffic.acked[s]), s
    # In-memory streams (whose shard may have moved and started empty): no record twice.
    for s in MEMORY:
        payloads = [p for _, p in received[s]]
        assert len(payloads) == len(set(payloads)), f"{s}: a record delivered twice"
        assert payloads, s
    # Only shards being handed off refused calls, and only while they moved.
    errors = traffic.errors()
    assert all(isinstance(o.error, felix.Unavailable) for o in errors), errors[:5]
    cluster.sampler.check_single_owner()
