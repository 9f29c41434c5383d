"""A node follows the control plane: seed, changes, deletes, re-snapshot, replay to a shard."""

from __future__ import annotations

import asyncio
from typing import Any

from felix import ipc
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.node.control import ControlFollower, StoreFeed
from felix.node.messages import ApplyResource
from tests.aio import run

SHARDS = 3


async def _store(**kw: Any) -> MemoryStore:
    store = MemoryStore(**kw)
    await store.open()
    await store.create(ResourceKind.TENANT, ("acme",), {})
    await store.create(ResourceKind.NAMESPACE, ("acme", "prod"), {})
    return store


def _follower(
    store: MemoryStore, tenants: list[tuple[int, dict[str, Any]]] | None = None
) -> tuple[ControlFollower, list[tuple[int, dict[str, Any]]]]:
    """A follower, and what it sends about streams and caches (tenants: to ``tenants``)."""
    sent: list[tuple[int, dict[str, Any]]] = []

    def send(m: ApplyResource) -> None:
        cmd = {"cmd": m.op, "kind": m.kind, "path": m.path, "spec": m.spec}
        if m.kind == "tenant":
            if tenants is not None:
                tenants.append((m.shard, cmd))
        else:
            sent.append((m.shard, cmd))

    return ControlFollower(StoreFeed(store), SHARDS, send), sent


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.01)


def test_seed_then_follow_streams_and_caches_to_their_shards() -> None:
    async def main() -> None:
        store = await _store()
        await store.create(
            ResourceKind.STREAM, ("acme", "prod", "orders"), {"replay_max_records": 10}
        )
        follower, sent = _follower(store)
        task = asyncio.create_task(follower.run())
        await follower.seeded.wait()
        owner = ipc.shard_for("acme/prod/orders", SHARDS)
        assert [(s, c["cmd"], c["path"]) for s, c in sent] == [
            (owner, "define", ["acme", "prod", "orders"])
        ]
        assert sent[0][1]["spec"]["replay_max_records"] == 10
        sent.clear()
        # A cache goes to every shard; an update is a new define; a delete follows.
        await store.create(
            ResourceKind.CACHE, ("acme", "prod", "sessions"), {"budget_bytes": 1 << 20}
        )
        await _until(lambda: len(sent) == SHARDS)
        assert sorted(s for s, _ in sent) == list(range(SHARDS))
        sent.clear()
        await store.update(
            ResourceKind.STREAM, ("acme", "prod", "orders"), {"replay_max_records": 99}
        )
        await _until(lambda: len(sent) == 1)
        assert sent[0][1]["spec"]["replay_max_records"] == 99
        sent.clear()
        await store.delete(ResourceKind.NAMESPACE, ("acme", "prod"), cascade=True)
        await _until(lambda: len(sent) == 1 + SHARDS)
        assert {c["cmd"] for _, c in sent} == {"delete"}
        assert set(follower.resources) == {(ResourceKind.TENANT, ("acme",))}
        task.cancel()

    run(main)


def test_resnapshot_when_the_feed_moved_past_the_follower() -> None:
    async def main() -> None:
        store = await _store(feed_retention=5)
        follower, sent = _follower(store)
        await follower.seed()
        sent.clear()
        # Many changes while the follower is not following: its position is trimmed away.
        for i in range(10):
            await store.create(ResourceKind.STREAM, ("acme", "prod", f"s{i}"), {})
        for i in range(9):
            await store.delete(ResourceKind.STREAM, ("acme", "prod", f"s{i}"))
        task = asyncio.create_task(follower.run())
        await _until(
            lambda: (
                set(follower.resources)
                == {(ResourceKind.TENANT, ("acme",)), (ResourceKind.STREAM, ("acme", "prod", "s9"))}
            )
        )
        # The difference was applied: only s9 defined (deleted ones never reached shards).
        assert [c["path"][-1] for _, c in sent if c["cmd"] == "define"] == ["s9"]
        task.cancel()

    run(main)


def test_replay_defines_what_a_restarted_shard_owns() -> None:
    async def main() -> None:
        store = await _store()
        for i in range(12):
            await store.create(ResourceKind.STREAM, ("acme", "prod", f"s{i}"), {})
        await store.create(ResourceKind.CACHE, ("acme", "prod", "c"), {})
        follower, sent = _follower(store)
        await follower.seed()
        sent.clear()
        follower.replay(1)
        owned = {f"s{i}" for i in range(12) if ipc.shard_for(f"acme/prod/s{i}", SHARDS) == 1}
        assert {c["path"][-1] for s, c in sent} == owned | {"c"}
        assert {s for s, _ in sent} == {1}

    run(main)


def test_follower_keeps_retrying_while_the_control_plane_is_away() -> None:
    class Flaky(StoreFeed):
        def __init__(self, store: MemoryStore) -> None:
            super().__init__(store)
            self.failures = 3

        async def snapshot(self) -> Any:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("control plane down")
            return await super().snapshot()

    async def main() -> None:
        store = await _store()
        await store.create(ResourceKind.STREAM, ("acme", "prod", "s"), {})
        sent: list[Any] = []
        follower = ControlFollower(Flaky(store), SHARDS, sent.append)
        task = asyncio.create_task(follower.run())
        await asyncio.wait_for(follower.seeded.wait(), 10)
        assert [m.kind for m in sent].count("stream") == 1
        task.cancel()

    run(main, timeout=20)


def test_a_follower_cancelled_as_its_reply_fails_stops() -> None:
    """asyncio.wait_for (Python 3.11) gives a cancelled caller the inner future's error
    when both come together: the follower took it for an outage and retried forever,
    so felix up hung at exit after a refused start (the control process killed and the
    tasks cancelled in one loop iteration)."""

    class Dying(StoreFeed):
        def __init__(self, store: MemoryStore) -> None:
            super().__init__(store)
            self.reply: asyncio.Future[Any] | None = None

        async def changes(self, since: int, limit: int, wait: float) -> Any:
            self.reply = asyncio.get_running_loop().create_future()
            return await asyncio.wait_for(self.reply, 30)

    async def main() -> None:
        store = await _store()
        feed = Dying(store)
        follower = ControlFollower(feed, SHARDS, lambda _m: None)
        task = asyncio.create_task(follower.run())
        await asyncio.wait_for(follower.seeded.wait(), 10)
        while feed.reply is None:
            await asyncio.sleep(0.01)
        task.cancel()
        feed.reply.set_exception(ConnectionError("the control process exited"))
        done, _ = await asyncio.wait([task], timeout=2)
        assert done == {task} and task.cancelled()

    run(main, timeout=20)


def test_tenant_quotas_and_deletions_reach_the_shards() -> None:
    """Issue 11: a tenant's quotas go to every shard; a restarted shard hears of deletions."""

    async def main() -> None:
        store = await _store()
        await store.update(ResourceKind.TENANT, ("acme",), {"memory_quota_bytes": 1 << 20})
        await store.create(ResourceKind.STREAM, ("acme", "prod", "gone"), {})
        tenants: list[tuple[int, dict[str, Any]]] = []
        follower, sent = _follower(store, tenants)
        task = asyncio.create_task(follower.run())
        await follower.seeded.wait()
        assert sorted(s for s, _ in tenants) == list(range(SHARDS))
        assert all(c["spec"]["memory_quota_bytes"] == 1 << 20 for _, c in tenants)
        await store.delete(ResourceKind.STREAM, ("acme", "prod", "gone"))
        await _until(lambda: any(c["cmd"] == "delete" for _, c in sent))
        sent.clear()
        owner = ipc.shard_for("acme/prod/gone", SHARDS)
        follower.replay(owner)
        assert [(c["cmd"], c["path"]) for _, c in sent] == [("delete", ["acme", "prod", "gone"])]
        task.cancel()

    run(main)


def test_groups_go_to_their_streams_shard_after_the_stream() -> None:
    async def main() -> None:
        store = await _store()
        await store.create(ResourceKind.STREAM, ("acme", "prod", "orders"), {"durable": True})
        await store.create(ResourceKind.GROUP, ("acme", "prod", "orders", "workers"), {})
        follower, sent = _follower(store)
        task = asyncio.create_task(follower.run())
        await follower.seeded.wait()
        owner = ipc.shard_for("acme/prod/orders", SHARDS)
        assert [(s, c["cmd"], c["kind"], c["path"]) for s, c in sent] == [
            (owner, "define", "stream", ["acme", "prod", "orders"]),
            (owner, "define", "group", ["acme", "prod", "orders", "workers"]),
        ]
        sent.clear()
        group = await store.update(
            ResourceKind.GROUP, ("acme", "prod", "orders", "workers"), {"lease_ms": 2000}
        )
        await _until(lambda: len(sent) == 1)
        assert sent == [
            (
                owner,
                {"cmd": "define", "kind": "group", "path": list(group.path), "spec": group.spec},
            )
        ]
        sent.clear()
        # A restarted shard gets the stream, then its group.
        follower.replay(owner)
        assert [(c["cmd"], c["kind"]) for _, c in sent] == [
            ("define", "stream"),
            ("define", "group"),
        ]
        sent.clear()
        await store.delete(ResourceKind.STREAM, ("acme", "prod", "orders"), cascade=True)
        await _until(lambda: len(sent) == 2)
        assert [(s, c["cmd"], c["kind"]) for s, c in sent] == [
            (owner, "delete", "group"),
            (owner, "delete", "stream"),
        ]
        # Deleted groups are not replayed (a shard starts without any).
        sent.clear()
        follower.replay(owner)
        assert [(c["cmd"], c["kind"]) for _, c in sent] == [("delete", "stream")]
        task.cancel()

    run(main)
