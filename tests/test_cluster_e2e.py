"""Three real `felix up --cluster` nodes on one fresh PostgreSQL database, used through
felix's own client given ONE node's address (tests/clusterproc.py).

In order, on the module's nodes (lease 3 s: fence margin and placer grace 0.6 s):

- the client reaches streams (publish with acks, subscribe), queue groups (consume and
  ack on durable streams) and cache keys owned by every node, through redirects; once
  it has the map, a second round of the same keys goes straight to the owners: neither
  the client's redirect counter nor any node's ``felix_cluster_redirects_total`` rises;
- kill -9 of one node under steady traffic (publishes with acks to durable and in-memory
  streams of every node, cache sets and gets): the client goes on; its errors stay
  within a bounded window after the kill; then every key not pinned to the dead node
  works again; nothing acknowledged on the survivors' durable streams is lost; the dead
  node's durable shards answer Unavailable naming it (they wait for it), and restarted
  (same node id, same data dir) it serves every record acknowledged before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

LEASE = 3.0
#: The fence margin and the placer's grace at this lease (felix/node/cluster.py).
GRACE = LEASE / 5
IDS = ["n0", "n1", "n2"]
#: Per node: durable streams (each with queue group "g"), in-memory streams, cache keys.
PER_NODE = 3


@dataclass
class Cluster:
    root: Path
    ca: Path
    dsn: str
    nodes: list[NodeProcess]
    #: node id -> names of its durable streams, in-memory streams, cache keys.
    durable: dict[str, list[str]]
    memory: dict[str, list[str]]
    keys: dict[str, list[str]]

    def node(self, node_id: str) -> NodeProcess:
        return next(n for n in self.nodes if n.data_dir.name == node_id)

    def logs(self) -> str:
        return "\n".join(n.log()[-3000:] for n in self.nodes)


def _named(
    owners: list[str | None], prefix: str, route: str, per_node: int
) -> dict[str, list[str]]:
    """``per_node`` names ``prefix<i>`` per node whose routing key (``route`` formatted
    with the name) falls on a logical shard it owns."""
    out: dict[str, list[str]] = {i: [] for i in IDS}
    for i in range(100_000):
        name = f"{prefix}{i}"
        owner = owners[logical_shard(route.format(name), cp.LOGICAL_SHARDS)]
        if owner is not None and len(out[owner]) < per_node:
            out[owner].append(name)
        if all(len(v) == per_node for v in out.values()):
            return out
    raise AssertionError("not enough names")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster_e2e")
    ca = cp.make_ca(root)
    with pg.temporary_database("felix_cluster_e2e") as dsn:
        nodes = cp.start_nodes(root, ca, dsn, IDS, LEASE)
        try:
            doc = cp.wait_settled(nodes)
            owners = cp.owners(doc)
            base = f"{cp.TENANT}/{cp.NAMESPACE}/"
            c = Cluster(
                root,
                ca,
                dsn,
                nodes,
                durable=_named(owners, "d", base + "{}", PER_NODE),
                memory=_named(owners, "m", base + "{}", PER_NODE),
                keys=_named(owners, "k", base + "c/{}", PER_NODE),
            )
            cp.define(
                nodes[0],
                durable=[s for v in c.durable.values() for s in v],
                memory=[s for v in c.memory.values() for s in v],
                caches=["c"],
                groups=[(s, "g") for v in c.durable.values() for s in v],
            )
            yield c
        finally:
            for n in c.nodes if "c" in locals() else nodes:
                n.stop()


async def _until_defined(client: Client, key: str) -> None:
    """Wait until cache "c"'s definition reached the node owning ``key`` (NotFound before)."""
    async with asyncio.timeout(15):
        while True:
            try:
                await client.cache("c").get(key)
                return
            except felix.NotFound:
                await asyncio.sleep(0.1)


def _last_errors(traffic: cp.Traffic, since: float) -> dict[str, str]:
    """The last error of each key that failed since ``since`` (for a failure's message)."""
    return {o.key: f"{o.ended - since:.2f}s {o.error!r}" for o in traffic.errors(after=since)}


def test_one_address_reaches_every_node_then_goes_straight_to_owners(cluster: Cluster) -> None:
    streams = [(node_id, s) for node_id in IDS for s in cluster.durable[node_id][:1]]
    memory = [(node_id, s) for node_id in IDS for s in cluster.memory[node_id][:1]]
    keys = [(node_id, k) for node_id in IDS for k in cluster.keys[node_id][:1]]

    async def round_(client: Client, n: int) -> None:
        cache = client.cache("c")
        for _owner, key in keys:
            assert await cache.set(key, b"v%d" % n)
            assert await cache.get(key) == b"v%d" % n
        for _owner, stream in memory:
            async with client.subscribe(stream) as sub:
                ack = await client.publish(stream, b"m%d" % n)
                assert ack is not None and ack.durability == "memory"
                got = await sub.next(timeout=5)
                assert (got.offset, got.data) == (ack.offset, b"m%d" % n)
        for _owner, stream in streams:
            ack = await client.publish(stream, b"d%d" % n)
            assert ack is not None and ack.durability == "synced"
            async with client.subscribe(stream, start=ack.offset) as sub:
                got = await sub.next(timeout=5)
                assert (got.offset, got.data) == (ack.offset, b"d%d" % n)
            async with client.consume(stream, "g") as consumer:
                message = await consumer.next(timeout=5)
                assert message.data == b"d%d" % n
                await message.ack()

    async def main() -> None:
        n0 = cluster.nodes[0]
        async with await cp.connect(n0, cluster.ca) as client:
            await _until_defined(client, cluster.keys["n0"][0])
            assert client.shard_map is None
            await round_(client, 1)
            # Keys of n1 and n2 were redirected at first; the map came meanwhile.
            assert client.redirects >= 1
            async with asyncio.timeout(5):
                while client.shard_map is None:
                    await asyncio.sleep(0.05)
            assert client.connected >= 3  # a connection per node
            # Gateways report their counters about every second.
            await asyncio.sleep(1.5)
            client_before = client.redirects
            nodes_before = cp.redirects_total(cluster.nodes)
            assert nodes_before >= client_before
            await round_(client, 2)
            await asyncio.sleep(1.5)
            assert client.redirects == client_before
            assert cp.redirects_total(cluster.nodes) == nodes_before
            print(f"\nredirects while warming: client {client_before}, nodes {nodes_before:g}; "
                  "none after")  # fmt: skip

    run(main, timeout=60)


def test_kill_9_of_a_node_under_traffic(cluster: Cluster) -> None:
    victim_id = "n2"
    victim = cluster.node(victim_id)
    survivors = [n for n in cluster.nodes if n is not victim]
    durable = [s for v in cluster.durable.values() for s in v]
    memory = [s for v in cluster.memory.values() for s in v]
    keys = [k for v in cluster.keys.values() for k in v]
    base = f"{cp.TENANT}/{cp.NAMESPACE}/"
    shard_of = {
        **{s: logical_shard(base + s, cp.LOGICAL_SHARDS) for s in durable + memory},
        **{k: logical_shard(f"{base}c/{k}", cp.LOGICAL_SHARDS) for k in keys},
    }
    state: dict[str, Any] = {}

    def all_pinned() -> dict[str, Any] | None:
        """The settled map once every durable stream's shard is pinned to its owner
        (nodes report the shards they hold durable records for every few seconds)."""
        doc = cp.settled(cluster.nodes[0], IDS)
        if doc is None:
            return None
        rows = doc["shards"]
        return doc if all(rows[shard_of[s]][3] == rows[shard_of[s]][0] for s in durable) else None

    async def main() -> None:
        async with await cp.connect(cluster.nodes[0], cluster.ca, request_timeout=2.0) as client:
            await _until_defined(client, cluster.keys["n0"][0])
            async with cp.Traffic(client, durable + memory, "c", keys) as traffic:
                await asyncio.sleep(1.0)
                # Every durable stream has records now; wait until their shards are
                # pinned to their nodes (else a durable shard would move without its data).
                before = await asyncio.to_thread(
                    cp.wait_for, "durable shards pinned", all_pinned, 15, cluster.logs()
                )
                owners = cp.owners(before)
                # Keys on shards pinned to the victim (its durable streams, and whatever
                # shares their logical shards) wait for it; the others move.
                pinned = {
                    k for k, shard in shard_of.items() if before["shards"][shard][3] == victim_id
                }
                others = set(shard_of) - pinned
                state.update(before=before, owners=owners, pinned=pinned, others=others)
                assert not traffic.errors(), traffic.errors()[:3]
                killed = time.monotonic()
                await asyncio.to_thread(victim.kill_all)
                # The dead node's non-durable shards go to the survivors after its lease
                # and the grace; wait until its keys have worked for a while again.
                deadline = killed + LEASE + GRACE + 15
                while True:
                    await asyncio.sleep(0.5)
                    recent = time.monotonic() - 1.5
                    if (
                        time.monotonic() - killed > LEASE + GRACE
                        and all(traffic.successes(k, recent) > 0 for k in others)
                        and not traffic.errors(others, recent)
                    ):
                        break
                    assert time.monotonic() < deadline, _last_errors(traffic, killed)
                await asyncio.sleep(1.0)
            state["killed"] = killed
            state["traffic"] = traffic

            # What the survivors acknowledged on their durable streams is all there.
            for stream in durable:
                if stream in pinned:
                    continue
                acked = traffic.acked[stream]
                assert acked, stream
                got = await cp.read_all(client, stream, acked[-1][0])
                missing = [(o, p) for o, p in acked if got.get(o) != p]
                assert not missing, (stream, missing[:5])
            # The dead node's durable shards wait for it: Unavailable naming it.
            for name in pinned:
                with pytest.raises(felix.Unavailable, match=rf"\b{victim_id}\b"):
                    if name in keys:
                        await client.cache("c").get(name)
                    else:
                        await client.publish(name, b"while down")
            # Every other key works again.
            for name in others:
                if name in keys:
                    assert await client.cache("c").set(name, b"after")
                    assert await client.cache("c").get(name) == b"after"
                else:
                    assert await client.publish(name, b"after") is not None

    run(main, timeout=80)
    traffic: cp.Traffic = state["traffic"]
    killed: float = state["killed"]
    before, owners, pinned = state["before"], state["owners"], state["pinned"]
    errors = traffic.errors(keys=state["others"])
    window = max((o.ended for o in errors), default=killed) - killed
    kinds = sorted({type(o.error).__name__ for o in errors})
    print(f"\nkill -9 {victim_id}: {len(errors)} failed calls on the {len(state['others'])} keys "
          f"not pinned to it, "
          f"the last {window:.2f} s after the kill ({kinds}); "
          f"{len(traffic.outcomes)} calls in all")  # fmt: skip
    assert window <= LEASE + GRACE + 5.0, "\n".join(
        f"{o.key} {o.began - killed:.2f}..{o.ended - killed:.2f} {o.error!r}" for o in errors
    )
    assert all(o.ended >= killed for o in errors)
    # Keys the survivors owned all along never failed.
    theirs = {k for k in state["others"] if owners[shard_of[k]] != victim_id}
    assert not traffic.errors(keys=theirs), traffic.errors(keys=theirs)[:5]
    # The dead node's shards moved to the survivors (higher epochs); its durable ones not.
    after = cp.wait_settled(survivors)
    for shard, (owner, epoch, _h, durable_node) in enumerate(after["shards"]):
        if owners[shard] == victim_id:
            if durable_node == victim_id:
                assert owner == victim_id and epoch == before["shards"][shard][1]
            else:
                assert owner != victim_id and epoch > before["shards"][shard][1]

    # Restarted with the same id and data dir: its durable records are all there.
    restarted = cp.start_node(cluster.root, cluster.ca, cluster.dsn, victim_id, LEASE)
    cluster.nodes[cluster.nodes.index(victim)] = restarted
    cp.wait_for("n2 rejoined", lambda: restarted.http("/readyz")[0] == 200, 30, restarted.log)

    async def read_back() -> None:
        async with await cp.connect(cluster.nodes[0], cluster.ca) as client:
            for stream in pinned & set(durable):
                acked = traffic.acked[stream]
                assert acked, stream
                async with asyncio.timeout(20):
                    while True:  # Unavailable until the map reaches every node
                        try:
                            got = await cp.read_all(client, stream, acked[-1][0])
                            break
                        except felix.Unavailable:
                            await asyncio.sleep(0.2)
                missing = [(o, p) for o, p in acked if got.get(o) != p]
                assert not missing, (stream, missing[:5])
                ack = await client.publish(stream, b"back")
                assert ack is not None and ack.offset > acked[-1][0]
        print(f"restarted {victim_id}: {sum(len(traffic.acked[s]) for s in pinned & set(durable))} "
              f"acked records of its durable streams all read back")  # fmt: skip

    run(read_back, timeout=60)
