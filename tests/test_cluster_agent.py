"""felix.cluster.agent: several in-process agents on one real PostgreSQL database (a fresh
one per test, tests/pg.py) with a short lease: placement and balance, failover of a
crashed node, fencing of a node cut off from the database, and scale-out by handoffs.

Times are asserted on the one monotonic clock every agent here shares, which is the
point of the design: a cut-off node must have stopped serving before any other node
is given its shards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import pytest

from felix.cluster.agent import ClusterAgent, ClusterSettings
from felix.cluster.lease import LeaseSettings
from felix.cluster.ownership import OwnershipMap, Refuse, Serve
from felix.cluster.placement import balance, plan, rendezvous_owner
from felix.cluster.store import ClusterStore, ClusterView
from felix.cluster_cli import gather, render
from felix.errors import NodeIdInUse
from tests import pg
from tests.aio import run
from tests.clusterproc import DbProxy

# serial: lease and failover bounds are timed; it runs alone, not beside another
# xdist worker.
pytestmark = pytest.mark.serial

L = 256
LEASE = LeaseSettings(ttl=1.5, fence_margin=0.5, placer_grace=0.5)
POLL = 0.2
#: A fresh cluster's first placement waits for the nodes to stop joining this long.
SETTLE = 0.4


@pytest.fixture
def dsn() -> Iterator[str]:
    with pg.temporary_database("felix_cluster") as dsn:
        yield dsn


class Node:
    """One agent, with every map it published and when."""

    def __init__(
        self,
        dsn: str,
        node_id: str,
        drained: Callable[[Node, int], Awaitable[None]] | None = None,
        *,
        settle: float = SETTLE,
        node_expiry: float = 24 * 3600.0,
    ) -> None:
        self.node_id = node_id
        self.maps: list[tuple[float, OwnershipMap]] = []
        self.durable: set[int] = set()

        async def handoff_drained(version: int) -> None:
            assert drained is not None
            await drained(self, version)

        self.agent = ClusterAgent(
            ClusterSettings(
                dsn=dsn,
                node_id=node_id,
                address=f"{node_id}.felix:5000",
                health_url=f"http://{node_id}.felix:8080",
                region="eu1",
                logical_shards=L,
                lease=LEASE,
                poll_interval=POLL,
                db_timeout=0.5,
                settle=settle,
                node_expiry=node_expiry,
            ),
            publish=lambda m: self.maps.append((time.monotonic(), m)),
            durable_shards=lambda: self.durable,
            handoff_drained=None if drained is None else handoff_drained,
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self, placed: bool = True) -> None:
        """Join; with ``placed``, also wait for the cluster's first placement (as
        felix/node/cluster.py does before the node reports ready)."""
        await self.agent.start(timeout=10)
        self.task = asyncio.create_task(self.agent.run())
        if placed:
            await asyncio.wait_for(self.agent.placed(), 10)

    async def stop(self, leave: bool = True) -> None:
        await self.agent.stop(leave=leave)
        assert self.task is not None
        await self.task

    async def crash(self) -> None:
        await self.agent.abort()
        assert self.task is not None
        await self.task

    @property
    def map(self) -> OwnershipMap:
        assert self.agent.map is not None
        return self.agent.map


async def terminate_backends(dsn: str, application_name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            application_name,
        )
    finally:
        await conn.close()


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05
) -> float:
    """Wait for ``check()``; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def settled(view: ClusterView, nodes: set[str]) -> bool:
    """Every shard owned by its desired live node, nothing in flight."""
    return (
        view.live == nodes
        and all(
            (s.owner in nodes or s.durable_node not in (None, *nodes)) and s.handoff_to is None
            for s in view.shards
        )
        and plan(view.shards, view.live) == []
    )


async def settle(inspector: ClusterStore, nodes: list[Node], timeout: float = 15.0) -> ClusterView:
    ids = {n.node_id for n in nodes}
    latest: list[ClusterView] = []

    async def check() -> bool:
        view = await inspector.view()
        latest[:] = [view]
        # Settled in the database, and every agent's map shows it.
        return settled(view, ids) and all(
            n.agent.map is not None and n.agent.map.shards == view.shards and n.agent.serving()
            for n in nodes
        )

    await until(check, timeout, f"the shards to settle on {sorted(ids)}")
    return latest[0]


async def inspector_for(dsn: str) -> ClusterStore:
    return await ClusterStore.open(
        dsn, logical_shards=L, region="eu1", placer_grace=LEASE.placer_grace
    )


def owned_by(view: ClusterView, node_id: str) -> dict[int, int]:
    """shard -> epoch of the shards ``node_id`` owns."""
    return {i: s.epoch for i, s in enumerate(view.shards) if s.owner == node_id}


def test_three_agents_share_the_shards_and_take_over_from_a_crashed_one(dsn: str) -> None:
    async def main() -> None:
        nodes = [Node(dsn, f"n{i}") for i in (1, 2, 3)]
        await asyncio.gather(*(n.start() for n in nodes))
        inspector = await inspector_for(dsn)
        view = await settle(inspector, nodes)
        b = balance(view.shards, view.live)
        assert b["unowned"] == 0 and b["min"] >= 65 and b["spread"] <= 30, b
        assert sum(n.agent.store.held() for n in nodes if n.agent.store) == 1  # one placer
        for n in nodes:
            assert [m.version for _, m in n.maps] == list(range(1, len(n.maps) + 1))
            assert n.map.owned() == sorted(owned_by(view, n.node_id))

        # n3 crashes: no leave, connections dropped.
        lost = owned_by(view, "n3")
        crashed = time.monotonic()
        await nodes[2].crash()

        async def taken_over() -> bool:
            v = await inspector.view()
            return all(v.shards[i].owner in ("n1", "n2") for i in lost)

        done = await until(taken_over, 5.0, "n3's shards to be reassigned")
        # Not before its lease and the grace ran out; soon after (plus a poll).
        limit = LEASE.ttl + LEASE.placer_grace + POLL + 1.0
        assert LEASE.fence_margin + LEASE.placer_grace <= done - crashed < limit
        view = await settle(inspector, nodes[:2])
        assert all(view.shards[i].epoch == epoch + 1 for i, epoch in lost.items())
        assert sum(n.agent.counters["ownership_changes"] for n in nodes[:2]) >= len(lost)

        # n2 leaves on purpose: its shards move at once, not after its lease.
        lost = owned_by(view, "n2")
        leaving = time.monotonic()
        await nodes[1].stop(leave=True)
        view = await settle(inspector, nodes[:1])
        assert time.monotonic() - leaving < LEASE.ttl
        assert all(view.shards[i].epoch == epoch + 1 for i, epoch in lost.items())
        assert nodes[1].maps[-1][1].serve_until == 0.0  # it stopped serving first
        await nodes[0].stop()
        await inspector.close()

    run(main, timeout=40)


def test_a_cut_off_agent_stops_serving_before_its_shards_move_and_rejoins(dsn: str) -> None:
    async def main() -> None:
        proxy = DbProxy(dsn)  # on a thread of its own: its calls block only briefly
        nodes = [Node(dsn, "n1"), Node(dsn, "n2"), Node(proxy.start(), "n3")]
        await asyncio.gather(*(n.start() for n in nodes))
        inspector = await inspector_for(dsn)
        view = await settle(inspector, nodes)
        lost = owned_by(view, "n3")
        assert lost

        # Partition n3 from the database; its sessions end on the server side.
        proxy.set_cut()
        cut = time.monotonic()
        await terminate_backends(dsn, "felix-cluster n3")
        cut_off = nodes[2]

        def moved_at(node: Node) -> float | None:
            for at, m in node.maps:
                if at > cut and any(m.shards[i].owner not in ("n3", None) for i in lost):
                    return at
            return None

        async def others_took_over() -> bool:
            return all(moved_at(n) is not None for n in nodes[:2])

        await until(others_took_over, 6.0, "n1 and n2 to take n3's shards")
        first_moved = min(t for t in map(moved_at, nodes[:2]) if t is not None)
        serve_until = cut_off.map.serve_until
        # It fenced itself: its deadline passed before anyone else was given a shard,
        # by about fence_margin + placer_grace.
        assert serve_until < first_moved
        assert first_moved - serve_until > 0.8 * (LEASE.fence_margin + LEASE.placer_grace)
        assert not cut_off.agent.serving()
        assert cut_off.agent.counters["renewals_failed"] >= 1
        view = await settle(inspector, nodes[:2])

        # Healed: its old lease is gone, so it re-registers, reads the map, serves again.
        proxy.heal()
        view = await settle(inspector, nodes, timeout=15.0)
        assert cut_off.agent.counters["renewals_lost"] == 1
        assert cut_off.agent.counters["registrations"] == 2
        assert owned_by(view, "n3")
        # The first map it served with after rejoining already had the new epochs.
        after = [m for at, m in cut_off.maps if at > cut]
        stopped = next(i for i, m in enumerate(after) if m.serve_until == 0)  # on the loss
        first_serving = next(m for m in after[stopped:] if m.serve_until > 0)
        assert all(first_serving.shards[i].epoch > epoch for i, epoch in lost.items())
        for n in nodes:
            await n.stop()
        await inspector.close()
        proxy.close()

    run(main, timeout=50)


def test_a_fourth_agent_takes_a_quarter_by_handoffs_one_at_a_time(dsn: str) -> None:
    async def main() -> None:
        drained: list[tuple[str, int, int]] = []

        async def drain(node: Node, version: int) -> None:
            # The supervisor resolves this once the gateways applied map ``version``: it
            # must already refuse the shard (its handoff_to is set).
            m = next(m for _, m in node.maps if m.version == version)
            if m.serve_until == 0:
                return  # leaving: the map refuses everything
            moving = [i for i in m.owned() if m.shards[i].handoff_to is not None]
            assert len(moving) == 1
            drained.append((node.node_id, version, moving[0]))
            await asyncio.sleep(0.005)

        nodes = [Node(dsn, f"n{i}", drain) for i in (1, 2, 3)]
        await asyncio.gather(*(n.start() for n in nodes))
        inspector = await inspector_for(dsn)
        before = await settle(inspector, nodes)
        completed = sum(n.agent.counters["handoffs_completed"] for n in nodes)
        drained.clear()
        added = time.monotonic()
        nodes.append(Node(dsn, "n4", drain))
        await nodes[-1].start()
        after = await settle(inspector, nodes, timeout=20.0)
        print(f"{time.monotonic() - added:.2f}s to settle on 4 nodes")

        moved = [i for i in range(L) if after.shards[i].owner != before.shards[i].owner]
        assert all(after.shards[i].owner == "n4" for i in moved)
        assert 40 <= len(moved) <= 90, len(moved)  # ~L/4
        for i in range(L):
            bump = 1 if i in moved else 0
            assert after.shards[i].epoch == before.shards[i].epoch + bump
        # One at a time: no map any node published had two shards in flight.
        for n in nodes:
            for _, m in n.maps:
                assert sum(s.handoff_to is not None for s in m.shards) <= 1
        assert sorted(i for _, _, i in drained) == sorted(moved)  # each drained once
        assert sum(n.agent.counters["handoffs_completed"] for n in nodes) - completed == len(moved)
        snap = nodes[0].agent.snapshot()
        assert snap["balance"]["spread"] <= 30 and snap["handoffs"] == []
        assert 0 < snap["lease_seconds_left"] <= LEASE.ttl - LEASE.fence_margin
        assert sum(n.agent.snapshot()["placer"] for n in nodes) == 1
        for n in nodes:
            await n.stop()
        await inspector.close()

    run(main, timeout=50)


def test_a_restarted_node_waits_out_its_old_lease_and_keeps_its_durable_shards(
    dsn: str,
) -> None:
    async def main() -> None:
        nodes = [Node(dsn, "n1"), Node(dsn, "n2")]
        await asyncio.gather(*(n.start() for n in nodes))
        inspector = await inspector_for(dsn)
        view = await settle(inspector, nodes)
        durable = set(sorted(owned_by(view, "n2"))[:3])
        nodes[1].durable = durable

        async def pinned() -> bool:
            v = await inspector.view()
            # Pinned by the owner, and reported with its lease (shown by status).
            return all(v.shards[i].durable_node == "n2" for i in durable) and v.durable_shards[
                "n2"
            ] == tuple(sorted(durable))

        await until(pinned, 3.0, "n2's durable shards to be pinned")

        # A second process under the same id is refused while the first holds the lease.
        twin = Node(dsn, "n2")
        with pytest.raises(NodeIdInUse):
            await twin.agent.start(timeout=0.3)
        await twin.agent.stop(leave=False)

        # n2 dies: its other shards move, its durable ones wait for it (refused on n1).
        await nodes[1].crash()
        view = await settle(inspector, nodes[:1])
        assert all(view.shards[i].owner == "n2" for i in durable)
        shard = min(durable)
        key = next(
            k for k in (f"t/ns/s{j}" for j in range(100_000)) if nodes[0].map.shard_of(k) == shard
        )
        verdict = nodes[0].map.verdict(key, time.monotonic())
        assert isinstance(verdict, Refuse) and "down" in verdict.reason

        # Restarted (same id, as a StatefulSet pod): it serves its durable shards again,
        # at the same epochs (they never moved), and takes its share back.
        restarted = Node(dsn, "n2")
        restarted.durable = durable
        await restarted.start()
        view = await settle(inspector, [nodes[0], restarted])
        assert all(view.shards[i].owner == "n2" for i in durable)
        assert isinstance(restarted.map.verdict(key, time.monotonic()), Serve)
        await restarted.stop()
        await nodes[0].stop()
        await inspector.close()

    run(main, timeout=40)


def test_a_restarted_node_waits_at_most_one_lease_for_its_id(dsn: str) -> None:
    async def main() -> None:
        first = Node(dsn, "n1")
        await first.start()
        await first.crash()  # its lease is still live in the database
        second = Node(dsn, "n1")
        started = time.monotonic()
        await second.start()
        waited = time.monotonic() - started
        assert 0.5 < waited < LEASE.ttl + 1.0
        assert second.agent.serving()
        await second.stop()

    run(main, timeout=20)


def test_the_placer_waits_for_its_own_clock_before_calling_a_node_dead() -> None:
    """The database's clock says every lease ran out (it was stepped forward): a node
    whose lease row kept changing within a lease and the grace, on the placer's own
    clock, is still treated as alive; one whose row stood still that long is dead; one
    that left on purpose is not waited for."""
    from felix.cluster.ownership import ClusterNode, ShardState

    now = [100.0]
    agent = ClusterAgent(
        ClusterSettings(
            dsn="postgresql://unused", node_id="n0", address="h:1", health_url="", region="r",
            logical_shards=4, lease=LEASE, poll_interval=POLL,
        ),
        publish=lambda _map: None,
        durable_shards=frozenset,
        clock=lambda: now[0],
    )  # fmt: skip

    def view(rows: dict[str, float], leaving: frozenset[str] = frozenset()) -> ClusterView:
        nodes = tuple(ClusterNode(n, f"{n}:1", "", False, 1, until) for n, until in rows.items())
        return ClusterView(4, "r", 0.0, nodes, (ShardState(None, 0),) * 4, {}, leaving)

    window = LEASE.ttl + LEASE.placer_grace
    assert agent._renewing_lately(view({"a": 1.0, "b": 1.0})) == {"a", "b"}  # first sight
    now[0] += window * 0.6
    assert agent._renewing_lately(view({"a": 2.0, "b": 1.0})) == {"a", "b"}  # a renewed
    now[0] += window * 0.6
    # b's row has stood still for longer than the window: dead by both clocks now.
    assert agent._renewing_lately(view({"a": 3.0, "b": 1.0})) == {"a"}
    now[0] += 0.1
    assert agent._renewing_lately(view({"a": 4.0, "b": 1.0}, frozenset({"a"}))) == frozenset()


def test_agents_started_together_get_an_even_first_placement_without_handoffs(
    dsn: str,
) -> None:
    """Nodes joining a fresh cluster within the settling window each get their share by
    the first placement itself: every shard is assigned once (epoch 1), to its
    rendezvous owner among all three, and nothing is handed off. Not before the window
    has passed since the last join; a node joining the placed cluster later is not
    delayed (it waits for no window)."""

    async def main() -> None:
        window = 1.0
        nodes = [Node(dsn, f"n{i}", settle=window) for i in (1, 2, 3)]
        joined = []
        for n in nodes:  # one after the other, each within the window of the previous one
            await n.start(placed=False)
            joined.append(time.monotonic())
            await asyncio.sleep(window / 3)
        assert all(s.owner is None for s in nodes[0].map.shards)  # still settling
        await asyncio.gather(*(asyncio.wait_for(n.agent.placed(), 10) for n in nodes))
        inspector = await inspector_for(dsn)
        view = await settle(inspector, nodes)
        ids = {"n1", "n2", "n3"}
        assert all(s.epoch == 1 for s in view.shards)  # assigned once, never moved
        assert all(
            s.owner == rendezvous_owner(i, ids) and s.handoff_to is None
            for i, s in enumerate(view.shards)
        )
        b = balance(view.shards, view.live)
        assert b["unowned"] == 0 and b["min"] >= 65 and b["spread"] <= 30, b
        assert sum(n.agent.counters["handoffs_completed"] for n in nodes) == 0
        for n in nodes:
            assert all(s.handoff_to is None for _, m in n.maps for s in m.shards)
        # The first placement came once the last node had been there for the window.
        first = min(at for n in nodes for at, m in n.maps if any(s.owner for s in m.shards))
        assert first - joined[-1] >= window * 0.9

        # Later moves are not delayed: a crashed node's shards move after its lease.
        lost = owned_by(view, "n3")
        crashed = time.monotonic()
        await nodes[2].crash()
        view = await settle(inspector, nodes[:2])
        assert all(view.shards[i].owner in ("n1", "n2") for i in lost)
        assert time.monotonic() - crashed < LEASE.ttl + LEASE.placer_grace + window
        for n in nodes[:2]:
            await n.stop()
        await inspector.close()

    run(main, timeout=40)


def test_a_lone_agent_is_placed_after_the_window_only(dsn: str) -> None:
    async def main() -> None:
        window = 0.5
        node = Node(dsn, "n1", settle=window)
        started = time.monotonic()
        await node.start()  # waits for the first placement
        took = time.monotonic() - started
        assert window * 0.9 <= took < window + 3 * POLL + 1.0, took
        assert node.map.owned() == list(range(L))
        await node.stop()

    run(main, timeout=20)


def test_the_placer_removes_rows_of_nodes_long_gone_unless_pinned(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node down for longer than node_expiry that holds nothing goes from the table;
    one with shards pinned to its durable data stays (said once); live ones stay."""

    async def main() -> None:
        expiry = 1.0
        nodes = [Node(dsn, f"n{i}", node_expiry=expiry) for i in (1, 2, 3)]
        await asyncio.gather(*(n.start() for n in nodes))
        inspector = await inspector_for(dsn)
        view = await settle(inspector, nodes)
        durable = set(sorted(owned_by(view, "n2"))[:2])
        nodes[1].durable = durable

        async def pinned() -> bool:
            v = await inspector.view()
            return all(v.shards[i].durable_node == "n2" for i in durable)

        await until(pinned, 3.0, "n2's durable shards to be pinned")
        crashed = time.monotonic()
        await asyncio.gather(nodes[1].crash(), nodes[2].crash())

        # felix cluster status says what becomes of each down node's row.
        async def both_down() -> bool:
            return set(nodes[0].agent.snapshot()["rows"]) == {"n2", "n3"}

        await until(both_down, 5.0, "n1 to see n2 and n3 down")
        doc = nodes[0].agent.snapshot()
        assert doc["node_expiry"] == expiry
        assert doc["rows"]["n2"] == {"pinned": 2, "expires_in": None}
        assert doc["rows"]["n3"]["pinned"] == 0
        assert 0 <= doc["rows"]["n3"]["expires_in"] <= expiry
        doc["nodes"] = [[*row[:2], "", *row[3:]] for row in doc["nodes"]]  # ask no one
        shown = render(gather(doc, 1.0), shards=False)
        lines = {line.split()[0]: line for line in shown.splitlines()[2:5]}
        assert "kept: 2 shard(s) pinned to its data" in lines["n2"], shown
        assert "removed in" in lines["n3"] or "removed soon" in lines["n3"], shown
        assert "removed" not in lines["n1"] and "kept" not in lines["n1"], shown

        async def n3_gone() -> bool:
            v = await inspector.view()
            return "n3" not in {n.node_id for n in v.nodes}

        gone = await until(n3_gone, 10.0, "n3's row to be removed")
        # Not before its lease (renewed at most a renew interval before the crash) and
        # the expiry have passed.
        assert gone - crashed >= LEASE.ttl - LEASE.renew_interval + expiry
        await asyncio.sleep(4 * POLL)
        view = await inspector.view()
        assert [n.node_id for n in view.nodes] == ["n1", "n2"]  # pinned n2 is kept
        assert all(view.shards[i].durable_node == "n2" for i in durable)
        assert nodes[0].agent.counters["nodes_expired"] == 1
        kept = [r for r in caplog.records if "is kept in the cluster" in r.getMessage()]
        assert len(kept) == 1 and "n2" in kept[0].getMessage()
        await nodes[0].stop()
        await inspector.close()

    with caplog.at_level(logging.INFO, logger="felix.cluster.agent"):
        run(main, timeout=40)
