"""felix.cluster.store on a real PostgreSQL (one fresh database per test, tests/pg.py):
set-up and mismatches, registration and leases on the database's clock, compare-and-swap
moves under races, the placer lock and notifications."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import asyncpg
import pytest

from felix.cluster.placement import Move
from felix.cluster.store import ClusterStore
from felix.errors import ClusterMismatch, ClusterUnavailable, NodeIdInUse
from tests import pg
from tests.aio import run

L = 16


@pytest.fixture
def dsn() -> Iterator[str]:
    with pg.temporary_database("felix_cluster") as dsn:
        yield dsn


async def opened(dsn: str, name: str = "felix-cluster", **kw: float) -> ClusterStore:
    return await ClusterStore.open(dsn, logical_shards=L, region="eu1", application_name=name, **kw)


async def terminate_backends(dsn: str, application_name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1 AND datname = current_database()",
                application_name,
            )
        )
    finally:
        await conn.close()


def test_open_creates_once_and_refuses_another_shape(dsn: str) -> None:
    async def main() -> None:
        stores = await asyncio.gather(*(opened(dsn) for _ in range(4)))  # racing set-ups
        view = await stores[0].view()
        assert view.logical_shards == L and view.region == "eu1" and view.nodes == ()
        assert len(view.shards) == L and all(s.owner is None and s.epoch == 0 for s in view.shards)
        with pytest.raises(ClusterMismatch, match="16 logical shards"):
            await ClusterStore.open(dsn, logical_shards=32, region="eu1")
        with pytest.raises(ClusterMismatch, match="region 'eu1'"):
            await ClusterStore.open(dsn, logical_shards=L, region="us1")
        for store in stores:
            await store.close()

    run(main)


def test_an_unreachable_database_is_cluster_unavailable() -> None:
    async def main() -> None:
        with pytest.raises(ClusterUnavailable):
            await ClusterStore.open(
                "postgresql://postgres@127.0.0.1:1/x", logical_shards=L, region="eu1", timeout=1
            )

    run(main)


def test_one_node_id_is_held_by_one_incarnation(dsn: str) -> None:
    async def main() -> None:
        a, b = await opened(dsn), await opened(dsn)
        results = await asyncio.gather(
            a.register("n1", "h:1", "http://h:8", 5.0),
            b.register("n1", "h:2", "http://h:9", 5.0),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, int)]
        refused = [r for r in results if isinstance(r, NodeIdInUse)]
        assert len(won) == 1 and len(refused) == 1, results
        assert refused[0].node_id == "n1" and 4.0 < refused[0].seconds_left <= 5.0
        await a.close()
        await b.close()

    run(main)


def test_renewal_needs_an_unexpired_lease_of_its_own_incarnation(dsn: str) -> None:
    async def main() -> None:
        store = await opened(dsn)
        first = await store.register("n1", "h:1", "http://h:8", 0.3)
        assert await store.renew("n1", first, 0.3, [2, 1])
        view = await store.view(placer_grace=0.0)
        assert view.live == {"n1"} and view.durable_shards["n1"] == (1, 2)
        await asyncio.sleep(0.4)
        assert not await store.renew("n1", first, 5.0, [])  # ran out: presumed dead
        assert (await store.view(placer_grace=0.0)).live == frozenset()
        assert (await store.view(placer_grace=5.0)).live == {"n1"}  # within the grace
        second = await store.register("n1", "h:1", "http://h:8", 5.0)
        assert second > first
        assert not await store.renew("n1", first, 5.0, [])  # the old incarnation's is gone
        assert await store.renew("n1", second, 5.0, [])
        # Leaving ends the lease past the placer's grace at once, and for good.
        assert await store.leave("n1", second)
        view = await store.view()
        assert view.live == frozenset() and view.leaving == {"n1"}
        assert not await store.renew("n1", second, 5.0, [])
        assert await store.register("n1", "h:1", "http://h:8", 5.0) > second
        await store.close()

    run(main)


def test_moves_are_compare_and_swap_on_the_epoch(dsn: str) -> None:
    async def main() -> None:
        a, b = await opened(dsn), await opened(dsn)
        for node in ("n1", "n2", "n3"):
            await a.register(node, f"{node}:1", "http://x", 30.0)
        # Two placers race on the same plan: exactly one wins each shard.
        results = await asyncio.gather(
            *(
                store.apply(Move(shard, 0, "assign", to))
                for shard in range(L)
                for store, to in ((a, "n1"), (b, "n2"))
            )
        )
        assert sum(results) == L
        view = await a.view()
        assert all(s.epoch == 1 and s.owner in ("n1", "n2") for s in view.shards)
        # An assign never takes a shard from a live owner, whatever the epoch.
        assert not await a.apply(Move(0, 1, "assign", "n3"))
        # A stale epoch loses.
        assert not await a.apply(Move(0, 0, "handoff", "n3"))
        # Handoff: set once, only towards a live node; completed by the owner only.
        owner = view.shards[0].owner
        assert owner is not None
        assert not await a.apply(Move(0, 1, "handoff", "ghost"))
        got = await asyncio.gather(
            a.apply(Move(0, 1, "handoff", "n3")), b.apply(Move(0, 1, "handoff", "n3"))
        )
        assert sorted(got) == [False, True]
        assert not await a.complete_handoff(0, 1, "n3", "n3")  # not the owner
        # The owner completing races the placer clearing: exactly one wins.
        done, cleared = await asyncio.gather(
            a.complete_handoff(0, 1, owner, "n3"), b.apply(Move(0, 1, "clear_handoff", "n3"))
        )
        assert done != cleared
        s = (await a.view()).shards[0]
        if done:
            assert (s.owner, s.epoch, s.handoff_to) == ("n3", 2, None)
        else:
            assert (s.owner, s.epoch, s.handoff_to) == (owner, 1, None)
        await a.close()
        await b.close()

    run(main)


def test_a_dead_owners_shards_are_assigned_and_durable_pins_hold(dsn: str) -> None:
    async def main() -> None:
        store = await opened(dsn, placer_grace=0.1)
        inc = await store.register("n1", "n1:1", "http://x", 0.3)
        await store.register("n2", "n2:1", "http://x", 30.0)
        assert await store.apply(Move(0, 0, "assign", "n1"))
        assert await store.apply(Move(1, 0, "assign", "n1"))
        assert not await store.claim_durable(0, "n2")  # only the owner pins
        assert await store.claim_durable(0, "n1")
        assert not await store.claim_durable(0, "n1")  # once
        # A pinned shard is not handed elsewhere: no handoff is even set.
        assert not await store.apply(Move(0, 1, "handoff", "n2"))
        assert not await store.complete_handoff(0, 1, "n1", "n2")
        await asyncio.sleep(0.5)  # n1's lease and the grace run out
        assert not await store.renew("n1", inc, 0.3, [])
        assert await store.apply(Move(1, 1, "assign", "n2"))
        s = (await store.view()).shards[1]
        assert (s.owner, s.epoch) == ("n2", 2)
        await store.close()

    run(main)


def test_the_placer_lock_is_exclusive_and_dies_with_its_session(dsn: str) -> None:
    async def soon(store: ClusterStore) -> bool:
        """The lock, once the server has ended the previous holder's session (it does so
        asynchronously: the old backend exits a moment after it was told to)."""
        for _ in range(100):
            if await store.placer_lock():
                return True
            await asyncio.sleep(0.02)
        return False

    async def main() -> None:
        a, b = await opened(dsn, "store-a"), await opened(dsn, "store-b")
        assert await a.placer_lock() and a.held()
        assert not await b.placer_lock() and not b.held()
        assert await a.placer_lock()  # still held, checked with a round trip
        await a.release_placer()
        assert await soon(b)
        assert not await a.placer_lock()
        # The server ends the holder's session: the lock is free, and the holder knows.
        assert await terminate_backends(dsn, "store-b") >= 1
        assert await soon(a)
        assert not await b.placer_lock()
        assert b.placer_losses == 1 and not b.held()
        # A holder closed (or crashed: terminate) frees it too.
        await a.terminate()
        assert await soon(b)
        await b.close()

    run(main)


def test_a_frozen_placer_loses_the_lock_and_cannot_move_afterwards(dsn: str) -> None:
    """A placer that stops using its session (frozen: SIGSTOP keeps the TCP connection
    open) has it ended by the server after ``placer_idle`` seconds: another node takes
    the lock, and the frozen one, waking with its old plan, moves nothing."""

    async def main() -> None:
        frozen = await opened(dsn, "store-frozen", placer_idle=0.5)
        other = await opened(dsn, "store-other", placer_idle=0.5)
        await other.register("n1", "n1:1", "http://x", 30.0)
        await other.register("n2", "n2:1", "http://x", 30.0)
        assert await frozen.placer_lock()
        assert not await other.placer_lock()
        assert await frozen.place(Move(0, 0, "assign", "n1"))  # a working placer moves
        assert not await other.place(Move(1, 0, "assign", "n2"))  # a non-holder never does
        await asyncio.sleep(1.2)  # frozen: its lock session is idle past placer_idle
        for _ in range(100):
            if await other.placer_lock():
                break
            await asyncio.sleep(0.05)
        assert other.held()
        # The frozen placer wakes up with the move it had planned: refused, lock lost.
        assert not await frozen.place(Move(1, 0, "assign", "n1"))
        assert not frozen.held() and frozen.placer_losses == 1
        assert (await other.view()).shards[1].owner is None
        assert await other.place(Move(1, 0, "assign", "n2"))
        await frozen.close()
        await other.close()

    run(main)


def test_pins_bind_assigns_and_handoffs_and_addresses_are_unique(dsn: str) -> None:
    async def main() -> None:
        store = await opened(dsn, placer_grace=0.1)
        inc = await store.register("n1", "n1:1", "http://x", 0.4)
        await store.register("n2", "n2:1", "http://x", 30.0)
        await store.register("n3", "n3:1", "http://x", 30.0)
        # Another live node advertising the same address is refused, named.
        with pytest.raises(ClusterMismatch, match="n2 already advertises n2:1"):
            await store.register("n4", "n2:1", "http://x", 30.0)
        assert await store.apply(Move(0, 0, "assign", "n1"))
        assert await store.claim_durable(0, "n1")
        # A pinned shard is handed or assigned only to its durable node.
        assert not await store.apply(Move(0, 1, "handoff", "n2"))
        await asyncio.sleep(0.6)  # n1's lease and the grace run out
        assert not await store.apply(Move(0, 1, "assign", "n2"))
        assert (await store.view()).shards[0].owner == "n1"
        # An owner whose lease ran out cannot pin anything any more.
        assert await store.apply(Move(1, 0, "assign", "n2"))
        assert not await store.renew("n1", inc, 0.4, [])
        await store.close()

    run(main)


def test_an_operator_forgets_a_dead_node_and_unpins_its_shards(dsn: str) -> None:
    from felix.cluster.store import forget_node, unpin_shards
    from felix.cluster_cli import add_commands

    async def main() -> None:
        store = await opened(dsn, placer_grace=0.1)
        await store.register("gone", "gone:1", "http://x", 0.3)
        await store.register("alive", "alive:1", "http://x", 30.0)
        for shard, node in ((0, "gone"), (1, "gone"), (2, "alive")):
            assert await store.apply(Move(shard, 0, "assign", node))
            assert await store.claim_durable(shard, node)
        with pytest.raises(ClusterMismatch, match="alive"):
            await forget_node(dsn, "alive")
        with pytest.raises(ClusterMismatch, match="no node"):
            await forget_node(dsn, "ghost")
        await asyncio.sleep(0.5)  # gone's lease runs out
        # unpin leaves a live node's pins alone.
        assert await unpin_shards(dsn, [1, 2]) == [1]
        view = await store.view()
        assert [s.durable_node for s in view.shards[:3]] == ["gone", None, "alive"]
        assert await forget_node(dsn, "gone") == [0]
        view = await store.view()
        assert "gone" not in {n.node_id for n in view.nodes}
        # Unpinned, and no longer gone's (a new epoch): if gone came back it would not
        # serve its stale copy, and it may not be given the shard again.
        assert (view.shards[0].owner, view.shards[0].epoch, view.shards[0].durable_node) == (
            None,
            2,
            None,
        )
        assert view.stale == {0: frozenset({"gone"}), 1: frozenset({"gone"})}
        # Now the placer may give shard 0 (empty) to a live node.
        assert await store.apply(Move(0, 2, "assign", "alive"))
        await store.close()

    run(main)

    # The command refuses without --yes, and says what it did with it.
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["cluster", "unpin", "5", "--cluster", dsn])
    assert args.func(args) == 2
    args = parser.parse_args(["cluster", "unpin", "5", "--cluster", dsn, "--yes"])
    assert args.func(args) == 0


def test_an_operator_moves_a_durable_shard_to_the_node_holding_its_copy(dsn: str) -> None:
    from felix.cluster.placement import plan
    from felix.cluster.store import move_shard

    async def main() -> None:
        store = await opened(dsn, placer_grace=0.1)
        await store.register("old", "old:1", "http://x", 0.4)
        await store.register("new", "new:1", "http://x", 30.0)
        await store.register("other", "other:1", "http://x", 30.0)
        assert await store.apply(Move(3, 0, "assign", "old"))
        assert await store.claim_durable(3, "old")
        with pytest.raises(ClusterMismatch, match="pinned to node old, which is alive"):
            await move_shard(dsn, 3, "new")
        await asyncio.sleep(0.5)  # old's lease runs out: it serves nothing now
        with pytest.raises(ClusterMismatch, match="new does not report durable records of shard 3"):
            await move_shard(dsn, 3, "new")
        with pytest.raises(ClusterMismatch, match="no node 'ghost'"):
            await move_shard(dsn, 3, "ghost")
        view = await store.view()
        incarnation = next(n.incarnation for n in view.nodes if n.node_id == "new")
        # Its copy must come from the pinned node's data dir (review finding: any copy
        # was taken, a stale one of another node or a backup of another node's).
        assert await store.renew("new", incarnation, 30.0, [3])
        with pytest.raises(ClusterMismatch, match="new holds no import record of it"):
            await move_shard(dsn, 3, "new")
        assert await store.renew("new", incarnation, 30.0, [3], {3: ("other", "")})
        with pytest.raises(ClusterMismatch, match="a copy imported from node other"):
            await move_shard(dsn, 3, "new")
        assert await store.renew("new", incarnation, 30.0, [3], {3: ("old", "x")})
        with pytest.raises(ClusterMismatch, match=r"pinned to node old \(data dir \)"):
            await move_shard(dsn, 3, "new")  # another data dir of the same node id
        assert await store.renew("new", incarnation, 30.0, [3], {3: ("old", "")})
        assert await move_shard(dsn, 3, "new") == 2
        view = await store.view()
        assert view.shards[3] == type(view.shards[3])("new", 2, None, "new")
        with pytest.raises(ClusterMismatch, match="pinned to new already"):
            await move_shard(dsn, 3, "new")
        # The placer keeps it there: no move of shard 3, whoever is live.
        assert not [m for m in plan(view.shards, view.live) if m.shard == 3]
        # A live owner is never bypassed, pinned or not.
        assert await store.apply(Move(5, 0, "assign", "other"))
        incarnation = next(n.incarnation for n in view.nodes if n.node_id == "new")
        assert await store.renew("new", incarnation, 30.0, [3, 5])
        with pytest.raises(ClusterMismatch, match="owned by node other, which is alive"):
            await move_shard(dsn, 5, "new")
        await store.close()

    run(main)


def test_an_operator_may_move_an_unverified_copy_only_by_saying_so(dsn: str) -> None:
    from felix.cluster.store import move_shard

    async def main() -> None:
        store = await opened(dsn, placer_grace=0.1)
        await store.register("a", "a:1", "http://x", 0.3)
        inc = await store.register("b", "b:1", "http://x", 30.0)
        assert await store.apply(Move(1, 0, "assign", "a"))
        assert await store.claim_durable(1, "a")
        await asyncio.sleep(0.5)  # a is gone
        assert await store.renew("b", inc, 30.0, [1])  # restored from a backup, say
        with pytest.raises(ClusterMismatch, match="no import record"):
            await move_shard(dsn, 1, "b")
        assert await move_shard(dsn, 1, "b", verify_source=False) == 2
        await store.close()

    run(main)


def test_a_node_keeping_a_stale_copy_is_not_given_the_shard_back(dsn: str) -> None:
    """A node a shard was moved (or unpinned) away from still holds its old records: a
    move back to it would serve them and issue their offsets again. Refused until its
    reports show the copy gone; a fresh import after that may be moved there."""
    from felix.cluster.store import move_shard, unpin_shards

    async def main() -> None:
        store = await opened(dsn, placer_grace=0.1)

        async def inc(node: str) -> int:
            return next(n.incarnation for n in (await store.view()).nodes if n.node_id == node)

        await store.register("old", "old:1", "http://x", 0.3)
        await store.register("new", "new:1", "http://x", 30.0)
        assert await store.apply(Move(3, 0, "assign", "old"))
        assert await store.apply(Move(7, 0, "assign", "old"))
        assert await store.claim_durable(3, "old") and await store.claim_durable(7, "old")
        await asyncio.sleep(0.5)  # old is gone
        assert await store.renew("new", await inc("new"), 30.0, [3], {3: ("old", "")})
        assert await move_shard(dsn, 3, "new") == 2
        assert await unpin_shards(dsn, [7]) == [7]
        # old comes back with its copies of 3 and 7; new stops (3 waits for it).
        await store.register("old", "old:1", "http://x", 30.0)
        assert await store.renew("old", await inc("old"), 30.0, [3, 7])
        assert await store.leave("new", await inc("new"))
        for shard in (3, 7):
            with pytest.raises(ClusterMismatch, match=f"old holds a stale copy of shard {shard}"):
                await move_shard(dsn, shard, "old")
        # Nor does the placer give it 7 (unpinned: its owner, old, was cleared with a new
        # epoch), nor may old pin it (review findings: only move checked).
        view = await store.view()
        assert view.stale == {3: frozenset({"old"}), 7: frozenset({"old"})}
        assert (view.shards[7].owner, view.shards[7].epoch) == (None, 2)
        assert not await store.apply(Move(7, 2, "assign", "old"))
        assert not await store.claim_durable(7, "old")
        # Its operator removes the copies: the next renewal clears the marks; a fresh
        # import of 3 (reported again) may then be moved there.
        assert await store.renew("old", await inc("old"), 30.0, [])
        assert await store.renew("old", await inc("old"), 30.0, [3], {3: ("new", "")})
        assert await move_shard(dsn, 3, "old") == 3
        rows = await store._call(
            "read", lambda c: c.fetch("SELECT shard, stale_nodes FROM felix_cluster_shards")
        )
        stale = {r["shard"]: r["stale_nodes"] for r in rows if r["stale_nodes"]}
        assert stale == {3: ["new"]}  # new keeps its (now stale) copy of 3
        await store.close()

    run(main)


def test_a_node_id_with_pins_comes_back_only_with_its_data_dir(dsn: str) -> None:
    """The same pod name on a fresh volume would serve its pinned shards empty (and issue
    their offsets again): refused while shards are pinned to it, until forgotten."""
    from felix.cluster.store import forget_node

    async def main() -> None:
        store = await opened(dsn, placer_grace=0.1)
        await store.register("n1", "n1:1", "http://x", 0.3, "a" * 32)
        assert await store.apply(Move(0, 0, "assign", "n1"))
        await asyncio.sleep(0.4)  # its lease runs out: no pin yet, any data dir may take it
        await store.register("n1", "n1:1", "http://x", 0.3, "b" * 32)
        assert await store.claim_durable(0, "n1")  # durable records in data dir "b"
        await asyncio.sleep(0.4)
        with pytest.raises(ClusterMismatch, match=r"shards 0 in another data dir .*forget n1"):
            await store.register("n1", "n1:1", "http://x", 0.3, "c" * 32)
        await store.register("n1", "n1:1", "http://x", 0.3, "b" * 32)  # its own data dir
        await asyncio.sleep(0.4)
        assert await forget_node(dsn, "n1") == [0]
        await store.register("n1", "n1:1", "http://x", 30.0, "c" * 32)  # a new node now
        await store.close()

    run(main)


def test_a_data_dir_keeps_its_id(tmp_path: pathlib.Path) -> None:
    from felix.errors import ConfigError
    from felix.node.cluster import DATA_ID_FILE, data_dir_id

    first = data_dir_id(tmp_path / "d")
    assert len(first) == 32 and data_dir_id(tmp_path / "d") == first
    assert data_dir_id(tmp_path / "other") != first
    (tmp_path / "d" / DATA_ID_FILE).write_text("garbage")
    with pytest.raises(ConfigError, match="not a data dir id"):
        data_dir_id(tmp_path / "d")


def test_writes_notify_other_processes(dsn: str) -> None:
    async def main() -> None:
        a, b = await opened(dsn, "store-a"), await opened(dsn, "store-b")
        assert not await b.wait_change(0.2)
        await a.register("n1", "n1:1", "http://x", 30.0)
        assert await asyncio.wait_for(b.wait_change(5.0), 5.0)
        assert not await b.wait_change(0.2)
        # A cut listener reconnects (and reports a possible miss), then hears again.
        await terminate_backends(dsn, "store-b")
        assert await b.wait_change(2.0)
        await asyncio.sleep(0.1)
        await a.apply(Move(3, 0, "assign", "n1"))
        assert await b.wait_change(5.0)
        # The pool replaced its cut connections too.
        assert (await b.view()).shards[3].owner == "n1"
        await a.close()
        await b.close()

    run(main)


def test_cluster_status_opens_only_http_urls_and_follows_no_redirect() -> None:
    """Health URLs come from the cluster's database: never a file, never elsewhere."""
    import http.server
    import threading

    from felix.cluster_cli import Unreachable, fetch_cluster

    for url in ("file:///etc/passwd", "ftp://h/x", "/etc"):
        with pytest.raises(Unreachable, match="not an http"):
            fetch_cluster(url, 1.0)

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/cluster")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(Unreachable, match="HTTP 302"):
            fetch_cluster(f"http://127.0.0.1:{server.server_port}", 2.0)
    finally:
        server.shutdown()


def test_the_placer_removes_rows_of_nodes_long_gone_that_hold_nothing(dsn: str) -> None:
    """One statement, as the placer, that checks every condition itself: the lease ended
    more than ``after`` ago (database clock), no shard pinned to, owned by or being
    handed to the node. A node that registered again meanwhile is kept."""

    async def main() -> None:
        store = await opened(dsn, "store-placer", placer_grace=0.1)
        other = await opened(dsn, "store-other")
        for node, ttl in (("dead", 0.2), ("pinned", 0.2), ("owner", 0.2), ("back", 0.2)):
            await store.register(node, f"{node}:1", "http://x", ttl)
        await store.register("live", "live:1", "http://x", 30.0)
        assert await store.apply(Move(0, 0, "assign", "pinned"))
        assert await store.claim_durable(0, "pinned")
        assert await store.apply(Move(1, 0, "assign", "owner"))
        everyone = ["back", "dead", "live", "owner", "pinned"]
        await asyncio.sleep(0.6)  # the short leases have ended ~0.4 s ago
        assert await store.expire_nodes(everyone, 0.1) == []  # not the placer
        assert await store.placer_lock()
        assert await store.expire_nodes(everyone, 5.0) == []  # not long enough ago
        await store.register("back", "back:1", "http://x", 30.0)  # came back meanwhile
        while await other.wait_change(0.2):  # the notices so far
            pass
        assert await store.expire_nodes(everyone, 0.1) == ["dead"]
        assert await other.wait_change(5.0)  # notified
        view = await store.view()
        assert [n.node_id for n in view.nodes] == ["back", "live", "owner", "pinned"]
        # Once its shard is given away, the owner's row goes too; the pinned one never.
        assert await store.apply(Move(1, 1, "assign", "live"))
        assert await store.expire_nodes(everyone, 0.1) == ["owner"]
        assert await store.expire_nodes(everyone, 0.1) == []
        assert (await store.view()).shards[0].durable_node == "pinned"
        await store.close()
        await other.close()

    run(main)


def test_every_node_of_a_cluster_runs_with_its_lease(dsn: str) -> None:
    """The first node to register records its lease; a node with another one is refused
    (naming both) while a node of the recorded lease is live, and may change it once none
    is. A cluster created before the lease was recorded (schema 2) gets it from its first
    node after the upgrade, checked against the leases the live nodes renew with."""

    async def lease_of(conn: asyncpg.Connection) -> float | None:
        value = await conn.fetchval("SELECT lease_seconds FROM felix_cluster_meta")
        return None if value is None else float(value)

    async def main() -> None:
        ten = await opened(dsn, lease=10.0)
        three = await opened(dsn, lease=3.0)
        conn = await asyncpg.connect(dsn)
        assert await lease_of(conn) is None  # nobody registered yet
        n1 = await ten.register("n1", "n1:1", "http://x", 10.0)
        assert await lease_of(conn) == 10.0
        await ten.register("n2", "n2:1", "http://x", 10.0)
        with pytest.raises(ClusterMismatch, match=r"runs with a 10s lease; .* started with 3s"):
            await three.register("n3", "n3:1", "http://x", 3.0)
        assert [n.node_id for n in (await ten.view()).nodes] == ["n1", "n2"]  # not added
        # The whole cluster stopped: a node with another lease changes it.
        assert await ten.leave("n1", n1)
        await conn.execute("UPDATE felix_cluster_nodes SET lease_until = now() - interval '1s'")
        await three.register("n3", "n3:1", "http://x", 3.0)
        assert await lease_of(conn) == 3.0
        with pytest.raises(ClusterMismatch, match=r"3s lease; .* started with 10s"):
            await ten.register("n1", "n1:1", "http://x", 10.0)

        # A cluster of schema 2 (before the lease was recorded) with n3 live on 3 s.
        await conn.execute(
            "ALTER TABLE felix_cluster_meta DROP COLUMN lease_seconds;"
            " DELETE FROM felix_cluster_schema WHERE version = 3"
        )
        upgraded = await opened(dsn, lease=10.0)  # applies migration 3
        assert await lease_of(conn) is None
        with pytest.raises(ClusterMismatch, match=r"node n3 .* 3s lease; .* started with 10s"):
            await upgraded.register("n4", "n4:1", "http://x", 10.0)
        assert await lease_of(conn) is None  # the refusal recorded nothing
        await three.register("n4", "n4:1", "http://x", 3.0)
        assert await lease_of(conn) == 3.0
        # Stores that do not say their lease (inspectors) neither check nor record.
        await (await opened(dsn)).register("n5", "n5:1", "http://x", 7.0)
        assert await lease_of(conn) == 3.0
        await conn.close()
        for store in (ten, three, upgraded):
            await store.close()

    run(main)


def test_felix_up_with_another_lease_exits_2_naming_both(dsn: str, tmp_path: pathlib.Path) -> None:
    import os
    import subprocess
    import sys

    async def live_node() -> None:
        store = await opened(dsn, lease=30.0)
        await store.register("n0", "n0:1", "http://x", 30.0)  # live for 30 s
        await store.terminate()

    asyncio.run(live_node())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
    got = subprocess.run(
        [
            sys.executable, "-m", "felix.cli", "up", "--cluster", dsn, "--node-id", "n1",
            "--cluster-lease", "3s", "--logical-shards", str(L), "--region", "eu1",
            "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--control", "127.0.0.1:0",
            "--topology", "embedded", "--data-dir", str(tmp_path / "n1"),
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr[-3000:]
    assert "30s lease" in got.stderr and "started with 3s" in got.stderr, got.stderr[-3000:]
