"""The store contract (felix/control/store.py), run against every backend.

Memory, SQLite (a file in tmp_path) and PostgreSQL (a database on the local
server, created for the session and emptied before each test) must behave the
same. The PostgreSQL-only tests at the end use real OS processes as concurrent
writers.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from felix.control.model import PARENT, Change, Op, Resource, ResourceKind, ancestors, validate_spec
from felix.control.store import (
    AlreadyExists,
    CursorTooOld,
    HasChildren,
    NotFound,
    Store,
    VersionConflict,
)
from felix.control.stores import MemoryStore, open_store
from felix.control.stores.postgres import MIGRATIONS as PG_MIGRATIONS
from felix.control.stores.postgres import PostgresStore
from felix.control.stores.sqlite import SQLiteStore
from felix.errors import BadRequest, ConfigError, Overloaded, SettingConflict
from felix.shard.queue.settings import MAX_GROUPS_PER_STREAM, GroupSettings
from tests import pg
from tests.aio import run

T, NS, ST, CA = ResourceKind.TENANT, ResourceKind.NAMESPACE, ResourceKind.STREAM, ResourceKind.CACHE
IS, PO, BI = ResourceKind.ISSUER, ResourceKind.POLICY, ResourceKind.BINDING
GR = ResourceKind.GROUP
State = dict[tuple[ResourceKind, tuple[str, ...]], Resource]


@dataclass
class Backend:
    """Makes stores of one backend; every store made in one test shares the same data."""

    name: str
    factory: Callable[..., Store]

    @asynccontextmanager
    async def open(self, **options: Any) -> AsyncIterator[Store]:
        store = self.factory(**options)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    with pg.temporary_database() as dsn:
        yield dsn


def _backend(name: str, request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    if name == "memory":
        return Backend(name, MemoryStore)
    if name == "sqlite":
        path = tmp_path / "felix.db"
        return Backend(name, lambda **kw: SQLiteStore(path, **kw))
    dsn = request.getfixturevalue("pg_dsn")
    asyncio.run(pg.reset(dsn))
    # A short poll interval keeps the notification-less fallback exercised in tests too.
    return Backend(name, lambda **kw: PostgresStore(dsn, **{"poll_interval": 0.5, **kw}))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    return _backend(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    return _backend(request.param, request, tmp_path)


class Clock:
    """A clock the test moves: every reading is one second after the previous one."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


async def tree(store: Store) -> None:
    """Tenants a and ab (ab's name starts like a's), each with namespaces and leaves."""
    for t in ("a", "ab"):
        await store.create(T, (t,), {})
        for ns in ("prod", "dev"):
            await store.create(NS, (t, ns), {})
            await store.create(ST, (t, ns, "orders"), {})
            await store.create(CA, (t, ns, "orders"), {})
            await store.create(ST, (t, ns, "audit"), {})


async def read_all(store: Store, since: int = 0, limit: int = 5) -> list[Change]:
    """Every change after ``since``, paged, checking each page's contract."""
    out: list[Change] = []
    while True:
        page, nxt = await store.changes(since, limit)
        assert len(page) <= limit
        assert [ch.position for ch in page] == list(range(since + 1, since + 1 + len(page)))
        assert nxt == (page[-1].position if page else since)
        if not page:
            return out
        out += page
        since = nxt


def apply(state: State, change: Change) -> None:
    """Apply one change as a follower would, checking it makes sense where it lands."""
    res = change.resource
    key = (res.kind, res.path)
    parent_kind = PARENT[res.kind]
    if change.op is Op.CREATE:
        assert key not in state, change
        assert parent_kind is None or (parent_kind, res.path[:-1]) in state, change
        assert res.version == 1
        state[key] = res
    elif change.op is Op.UPDATE:
        assert state[key].version + 1 == res.version, change
        state[key] = res
    else:
        assert state.pop(key) == res, change
        # Children are deleted first: a follower never holds an orphan.
        below = [k for k in state if key in ancestors(*k)]
        assert not below, change


def as_state(resources: list[Resource]) -> State:
    return {(r.kind, r.path): r for r in resources}


# --- create, get, list ----------------------------------------------------------------------


def test_create_get_list(backend: Backend) -> None:
    async def main() -> None:
        clock = Clock()
        async with backend.open(clock=clock) as store:
            assert await store.position() == 0
            assert await store.snapshot() == (0, [])
            tenant = await store.create(T, ("acme",), {"description": "Acme"})
            assert tenant.path == ("acme",)
            assert tenant.spec == validate_spec(T, {"description": "Acme"})
            assert tenant.spec["description"] == "Acme"
            assert tenant.version == 1
            assert tenant.created_at == tenant.updated_at == clock.now
            assert tenant.created_at.utcoffset() == timedelta(0)
            await store.create(NS, ("acme", "prod"), {})
            stream = await store.create(ST, ("acme", "prod", "orders"), {"durable": True})
            # Defaults are filled in and stored.
            assert stream.spec == validate_spec(ST, {"durable": True})
            # A cache may share a stream's name: resources are keyed by kind and path.
            cache = await store.create(CA, ("acme", "prod", "orders"), {})
            await store.create(ST, ("acme", "prod", "Audit"), {})
            await store.create(ST, ("acme", "prod", "audit-2"), {})

            assert await store.get(T, ("acme",)) == tenant
            assert await store.get(ST, ("acme", "prod", "orders")) == stream
            assert await store.get(CA, ("acme", "prod", "orders")) == cache
            assert await store.get(ST, ("acme", "prod", "nope")) is None
            assert await store.get(NS, ("acme", "nope")) is None

            streams = await store.list_resources(ST, ("acme", "prod"))
            # By name, bytewise (uppercase sorts first), streams only.
            assert [r.name for r in streams] == ["Audit", "audit-2", "orders"]
            assert [r.name for r in await store.list_resources(CA, ("acme", "prod"))] == ["orders"]
            assert await store.list_resources(T, ()) == [tenant]
            assert await store.list_resources(CA, ("acme", "prod")) == [cache]
            assert await store.position() == 6

    run(main)


def test_parent_must_exist(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open() as store:
            with pytest.raises(NotFound):
                await store.create(NS, ("acme", "prod"), {})
            await store.create(T, ("acme",), {})
            with pytest.raises(NotFound):
                await store.create(ST, ("acme", "prod", "orders"), {})
            with pytest.raises(NotFound):
                await store.create(CA, ("acme", "prod", "orders"), {})
            with pytest.raises(NotFound):
                await store.list_resources(ST, ("acme", "prod"))
            with pytest.raises(NotFound):
                await store.list_resources(NS, ("other",))
            assert await store.list_resources(NS, ("acme",)) == []
            assert await store.position() == 1

    run(main)


def test_duplicate_create(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open() as store:
            first = await store.create(T, ("acme",), {"description": "first"})
            with pytest.raises(AlreadyExists):
                await store.create(T, ("acme",), {"description": "second"})
            assert await store.get(T, ("acme",)) == first
            assert await store.position() == 1

    run(main)


@pytest.mark.parametrize(
    ("kind", "path", "spec"),
    [
        (T, ("",), {}),
        (T, ("a/b",), {}),
        (T, ("..",), {}),
        (T, ("-x",), {}),
        (T, ("x" * 65,), {}),
        (T, ("é",), {}),
        (T, ("a", "b"), {}),
        (NS, ("a",), {}),
        (ST, ("a", "b"), {}),
        (T, ("a",), {"unknown": 1}),
        (T, ("a",), {"description": "x" * 1025}),
        (ST, ("a", "b", "c"), {"fsync": "sometimes"}),
        (ST, ("a", "b", "c"), {"queue": {"max_deliveries": 0}}),
        (CA, ("a", "b", "c"), {"budget_bytes": 1}),
    ],
)
def test_invalid_names_and_specs(
    backend: Backend, kind: ResourceKind, path: tuple[str, ...], spec: dict[str, Any]
) -> None:
    async def main() -> None:
        async with backend.open() as store:
            await store.create(T, ("a",), {})
            await store.create(NS, ("a", "b"), {})
            with pytest.raises(BadRequest):
                await store.create(kind, path, spec)
            assert await store.position() == 2

    run(main)


def test_list_refuses_bad_parent(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open() as store:
            with pytest.raises(BadRequest):
                await store.list_resources(T, ("a",))
            with pytest.raises(BadRequest):
                await store.list_resources(ST, ("a",))
            with pytest.raises(BadRequest):
                await store.list_resources(NS, ("a/b",))

    run(main)


def test_max_children(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open(max_children=3) as store:
            for name in ("t1", "t2", "t3"):
                await store.create(T, (name,), {})
            with pytest.raises(Overloaded):
                await store.create(T, ("t4",), {})
            await store.create(NS, ("t1", "n"), {})
            # Streams and caches share their namespace's bound.
            await store.create(ST, ("t1", "n", "s1"), {})
            await store.create(CA, ("t1", "n", "c1"), {})
            await store.create(ST, ("t1", "n", "s2"), {})
            with pytest.raises(Overloaded):
                await store.create(CA, ("t1", "n", "c2"), {})
            await store.delete(T, ("t3",))
            await store.create(T, ("t4",), {})

    run(main)


# --- update ---------------------------------------------------------------------------------


def test_update_merges_and_versions(backend: Backend) -> None:
    async def main() -> None:
        clock = Clock()
        async with backend.open(clock=clock) as store:
            await store.create(T, ("a",), {})
            await store.create(NS, ("a", "b"), {})
            created = await store.create(
                ST, ("a", "b", "s"), {"durable": True, "queue": {"max_deliveries": 9}}
            )
            updated = await store.update(
                ST, ("a", "b", "s"), {"fsync": "interval", "queue": {"ack_deadline_s": 5}}
            )
            # Top-level keys replace, the nested queue object merges one level.
            assert updated.spec == validate_spec(
                ST,
                {
                    "durable": True,
                    "fsync": "interval",
                    "queue": {"max_deliveries": 9, "ack_deadline_s": 5},
                },
            )
            assert updated.version == 2
            assert updated.created_at == created.created_at
            assert updated.updated_at == clock.now > created.updated_at
            assert await store.get(ST, ("a", "b", "s")) == updated

            # If-Match: the stored version passes, any other conflicts and changes nothing.
            third = await store.update(ST, ("a", "b", "s"), {"durable": False}, if_version=2)
            assert third.version == 3
            with pytest.raises(VersionConflict):
                await store.update(ST, ("a", "b", "s"), {"durable": True}, if_version=2)
            # An empty patch still records a new version.
            assert (await store.update(ST, ("a", "b", "s"), {})).version == 4

            with pytest.raises(BadRequest):
                await store.update(ST, ("a", "b", "s"), {"fsync": "never"})
            with pytest.raises(BadRequest):
                await store.update(ST, ("a", "b", "s"), {"queue": {"bogus": 1}})
            with pytest.raises(BadRequest):
                await store.update(ST, ("a", "b", "s"), {"nope": 1})
            with pytest.raises(NotFound):
                await store.update(ST, ("a", "b", "missing"), {})
            assert (await store.get(ST, ("a", "b", "s"))).version == 4  # type: ignore[union-attr]

            feed = await read_all(store)
            assert [ch.op for ch in feed] == [Op.CREATE] * 3 + [Op.UPDATE] * 3
            assert feed[3].resource == updated
            assert feed[-1].resource == await store.get(ST, ("a", "b", "s"))

    run(main)


# --- delete ---------------------------------------------------------------------------------


def test_delete_has_children_and_cascade(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open() as store:
            await tree(store)
            before = await store.snapshot()
            with pytest.raises(HasChildren):
                await store.delete(T, ("a",))
            with pytest.raises(HasChildren):
                await store.delete(NS, ("a", "prod"))
            with pytest.raises(VersionConflict):
                await store.delete(T, ("a",), cascade=True, if_version=7)
            with pytest.raises(NotFound):
                await store.delete(T, ("zz",))
            assert await store.snapshot() == before

            leaf = await store.get(ST, ("a", "dev", "audit"))
            [change] = await store.delete(ST, ("a", "dev", "audit"), if_version=1)
            assert (change.op, change.resource, change.position) == (Op.DELETE, leaf, 19)

            doomed = {(r.kind, r.path): r for r in before[1] if r.path[0] == "a"}
            del doomed[(ST, ("a", "dev", "audit"))]
            changes = await store.delete(T, ("a",), cascade=True, if_version=1)
            assert [ch.position for ch in changes] == list(range(20, 20 + len(doomed)))
            assert all(ch.op is Op.DELETE for ch in changes)
            # The state just before, each resource once, deepest first.
            assert as_state([ch.resource for ch in changes]) == doomed
            depths = [len(ch.resource.path) for ch in changes]
            assert depths == sorted(depths, reverse=True)
            assert changes == (await store.changes(19, 100))[0]

            # Tenant "ab" shares a's first letter but none of its subtree.
            position, left = await store.snapshot()
            assert position == 19 + len(doomed) == 27
            assert {r.path[0] for r in left} == {"ab"}
            assert len(left) == 9
            assert await store.get(T, ("a",)) is None
            with pytest.raises(NotFound):
                await store.list_resources(NS, ("a",))
            # The name is free again.
            assert (await store.create(T, ("a",), {})).version == 1

    run(main)


def test_issuers_policies_bindings(backend: Backend) -> None:
    """The tenant's auth kinds: CRUD, path sharing with a namespace, validation, cascade, feed."""

    async def main() -> None:
        async with backend.open() as store:
            await store.create(T, ("acme",), {})
            await store.create(T, ("other",), {})
            # Namespace "okta" with a stream, and an issuer, policy and binding also named
            # "okta": same path, other kinds, no relation between them.
            await store.create(NS, ("acme", "okta"), {})
            await store.create(ST, ("acme", "okta", "orders"), {})
            made = {
                k: await store.create(k, ("acme", "okta"), auth_spec(k, "acme"))
                for k in (IS, PO, BI)
            }
            await store.create(
                PO, ("acme", "admins"), {"permissions": ["tenant.manage:tenant:acme"]}
            )
            for kind, res in made.items():
                assert res.version == 1 and res.path == ("acme", "okta")
                assert await store.get(kind, ("acme", "okta")) == res
            issuer = made[IS].spec
            assert issuer["groups_claim"] == "groups" and issuer["jwks"] is None
            assert made[BI].spec == {
                "subject": "group:eng",
                "policies": ["publishers"],
                "issuer": None,
            }
            assert [r.name for r in await store.list_resources(PO, ("acme",))] == ["admins", "okta"]
            assert [r.name for r in await store.list_resources(IS, ("acme",))] == ["okta"]
            assert [r.name for r in await store.list_resources(NS, ("acme",))] == ["okta"]
            assert await store.list_resources(BI, ("other",)) == []
            with pytest.raises(NotFound):
                await store.list_resources(IS, ("nobody",))
            with pytest.raises(NotFound):
                await store.create(PO, ("nobody", "p"), auth_spec(PO, "nobody"))
            with pytest.raises(AlreadyExists):
                await store.create(IS, ("acme", "okta"), auth_spec(IS, "acme"))

            # A policy only names its own tenant, on create and on update.
            with pytest.raises(BadRequest, match="names tenant 'other'"):
                await store.create(PO, ("acme", "x"), auth_spec(PO, "other"))
            with pytest.raises(BadRequest):
                await store.update(
                    PO, ("acme", "okta"), {"permissions": ["stream.publish:stream:other/a/b"]}
                )
            with pytest.raises(BadRequest):
                await store.create(PO, ("acme", "x"), {"permissions": ["fly:stream:acme/a/b"]})
            # What the verifier refuses, the store refuses.
            bad_issuers = [
                {**issuer, "algorithms": ["HS256"]},
                {**issuer, "jwks_url": None},
                {**issuer, "jwks_url": "http://idp.example/jwks"},
                {**issuer, "jwks": {"keys": []}},
            ]
            for spec in bad_issuers:
                with pytest.raises(BadRequest):
                    await store.create(IS, ("acme", "x"), spec)
            with pytest.raises(BadRequest):
                await store.create(BI, ("acme", "x"), {"subject": "group:", "policies": ["a"]})
            with pytest.raises(BadRequest):
                await store.create(BI, ("acme", "x"), {"subject": "bob", "policies": []})
            updated = await store.update(BI, ("acme", "okta"), {"issuer": "https://idp.example"})
            assert updated.version == 2 and updated.spec["issuer"] == "https://idp.example"

            # Deleting the issuer leaves the namespace of the same name and its stream alone.
            [change] = await store.delete(IS, ("acme", "okta"))
            assert (change.op, change.resource) == (Op.DELETE, made[IS])
            assert await store.get(ST, ("acme", "okta", "orders")) is not None
            await store.create(IS, ("acme", "okta"), auth_spec(IS, "acme"))
            # And a cascade of the namespace leaves the issuer alone.
            deleted = await store.delete(NS, ("acme", "okta"), cascade=True)
            assert [(ch.resource.kind, ch.resource.path) for ch in deleted] == [
                (ST, ("acme", "okta", "orders")),
                (NS, ("acme", "okta")),
            ]
            assert await store.get(IS, ("acme", "okta")) is not None
            with pytest.raises(NotFound):
                await store.list_resources(ST, ("acme", "okta"))

            # A tenant holding them refuses a plain delete; a cascade removes them first.
            with pytest.raises(HasChildren):
                await store.delete(T, ("acme",))
            deleted = await store.delete(T, ("acme",), cascade=True)
            assert {(ch.resource.kind, ch.resource.name) for ch in deleted[:-1]} == {
                (IS, "okta"),
                (PO, "okta"),
                (PO, "admins"),
                (BI, "okta"),
            }
            assert deleted[-1].resource.path == ("acme",)

            # The feed carries every one of them: a follower ends with the store's state.
            state: State = {}
            for change in await read_all(store):
                apply(state, change)
            kinds = {ch.resource.kind for ch in await read_all(store)}
            assert {IS, PO, BI} <= kinds
            assert state == as_state((await store.snapshot())[1])
            assert list(state) == [(T, ("other",))]

    run(main)


# --- feed -----------------------------------------------------------------------------------


def test_changes_paging_never_skips(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open() as store:
            await tree(store)
            await store.delete(T, ("ab",), cascade=True)
            position = await store.position()
            assert position == 27
            everything = await read_all(store, limit=100)
            assert len(everything) == 27
            for limit in range(1, 8):
                assert await read_all(store, limit=limit) == everything
            # From the middle, and past the end.
            assert await read_all(store, since=17, limit=4) == everything[17:]
            assert await store.changes(27, 10) == ([], 27)
            assert await store.changes(1000, 10) == ([], 1000)
            with pytest.raises(BadRequest):
                await store.changes(0, 0)
            with pytest.raises(BadRequest):
                await store.changes(-1, 10)

    run(main)


def test_cursor_too_old_after_trimming(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open(feed_retention=5) as store:
            await store.create(T, ("a",), {})
            assert len(await read_all(store)) == 1  # 0 is fine while nothing is trimmed
            for i in range(11):
                await store.update(T, ("a",), {"description": str(i)})
            assert await store.position() == 12
            # Positions 8..12 are retained: 7 is the oldest cursor that loses nothing.
            for since in (0, 1, 6):
                with pytest.raises(CursorTooOld) as info:
                    await store.changes(since, 3)
                assert (info.value.since, info.value.oldest) == (since, 8)
            page, nxt = await store.changes(7, 3)
            assert [ch.position for ch in page] == [8, 9, 10]
            assert nxt == 10
            assert [ch.position for ch in await read_all(store, 7)] == [8, 9, 10, 11, 12]
            # A cascade bigger than the retention keeps only its newest changes.
            await store.create(NS, ("a", "n"), {})
            for s in range(6):
                await store.create(ST, ("a", "n", f"s{s}"), {})
            await store.delete(T, ("a",), cascade=True)
            assert await store.position() == 27
            with pytest.raises(CursorTooOld):
                await store.changes(21, 10)
            assert [ch.resource.kind for ch in await read_all(store, 22)] == [ST, ST, ST, NS, T]

    run(main)


def test_positions_survive_reopen(durable: Backend) -> None:
    async def main() -> None:
        async with durable.open(feed_retention=2) as store:
            await tree(store)
            snapshot = await store.snapshot()
        async with durable.open(feed_retention=2) as store:
            assert await store.snapshot() == snapshot
            # Never reused, even though the feed was trimmed to two changes.
            created = await store.create(T, ("c",), {})
            assert [ch.position for ch in await read_all(store, 17)] == [18, 19]
            assert (await store.changes(18, 1))[0][0].resource == created
            with pytest.raises(CursorTooOld):
                await store.changes(16, 1)

    run(main)


def test_wait(backend: Backend) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with backend.open() as store:
            started = loop.time()
            await store.wait(0, 0.3)
            assert loop.time() - started >= 0.29  # timed out

            async def write_later() -> None:
                await asyncio.sleep(0.1)
                await store.create(T, ("a",), {})

            writer = asyncio.create_task(write_later())
            started = loop.time()
            await store.wait(0, 10)
            # Woken by the write, long before the timeout (and before PG's fallback poll).
            assert loop.time() - started < 0.45
            assert await store.position() == 1
            await writer

            started = loop.time()
            await store.wait(0, 10)  # already past: no waiting
            assert loop.time() - started < 0.2

    run(main)


def test_snapshot_matches_feed_at_its_position(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open() as store:
            await store.create(T, ("a",), {})
            await store.create(NS, ("a", "n"), {})
            snapshots: list[tuple[int, list[Resource]]] = []
            done = False

            async def write() -> None:
                nonlocal done
                for i in range(60):
                    await asyncio.sleep(0)  # the memory store never yields by itself
                    await store.create(ST, ("a", "n", f"s{i}"), {})
                    await store.update(ST, ("a", "n", f"s{i}"), {"durable": True})
                    if i % 10:
                        await store.update(ST, ("a", "n", f"s{i - 1}"), {"fsync": "none"})
                    if i % 10 == 9:
                        for j in range(i - 9, i - 4):
                            await store.delete(ST, ("a", "n", f"s{j}"))
                done = True

            async def snap() -> None:
                while not done:
                    snapshots.append(await store.snapshot())
                    await asyncio.sleep(0)

            await asyncio.gather(write(), snap())
            snapshots.append(await store.snapshot())
            assert len(snapshots) > 3
            feed = await read_all(store, limit=50)
            assert snapshots[-1][0] == len(feed) == await store.position()
            # Each snapshot is exactly the feed replayed up to the position it reports.
            state: State = {}
            applied = 0
            for position, resources in sorted(snapshots, key=lambda s: s[0]):
                while applied < position:
                    apply(state, feed[applied])
                    applied += 1
                assert state == as_state(resources), position

    run(main)


# --- queue groups ---------------------------------------------------------------------------


def test_groups_live_under_durable_streams(backend: Backend) -> None:
    """A stream's queue groups: full normalized spec, the shard's rules, durable streams
    only, start fixed at creation, children of the stream (cascade), in the feed."""

    async def main() -> None:
        async with backend.open() as store:
            await store.create(T, ("acme",), {})
            await store.create(NS, ("acme", "prod"), {})
            await store.create(ST, ("acme", "prod", "orders"), {"durable": True})
            await store.create(ST, ("acme", "prod", "memory"), {})
            # A cache may share the stream's path; it holds no groups.
            await store.create(CA, ("acme", "prod", "orders"), {})

            group = await store.create(
                GR, ("acme", "prod", "orders", "workers"), {"start": {"offset": 7}}
            )
            assert group.spec == {
                **GroupSettings().to_spec(),
                "start": {"offset": 7},
            }
            assert GroupSettings.from_spec(group.spec).start == 7
            assert await store.get(GR, ("acme", "prod", "orders", "workers")) == group
            assert [r.name for r in await store.list_resources(GR, ("acme", "prod", "orders"))] == [
                "workers"
            ]
            # The shard's rules, through GroupSettings.from_spec.
            refused: list[tuple[dict[str, Any], str]] = [
                ({"lease_ms": 5}, "lease_ms"),
                ({"max_ack_pending": 10, "max_span": 5}, "max_span"),
                ({"start": "middle"}, "start"),
                ({"start": {"offset": -1}}, "start"),
                ({"backoff_ms": []}, "backoff_ms"),
                ({"dead_letter": "bad name"}, "stream"),
                ({"dead_letter": "orders"}, "its own stream"),
                ({"no_such": 1}, "no_such"),
            ]
            for spec, text in refused:
                with pytest.raises(BadRequest, match=text):
                    await store.create(GR, ("acme", "prod", "orders", "bad"), spec)
            with pytest.raises(BadRequest):
                await store.create(GR, ("acme", "prod", "orders", "bad name"), {})
            # A group needs its stream, and a durable one.
            with pytest.raises(NotFound):
                await store.create(GR, ("acme", "prod", "missing", "workers"), {})
            with pytest.raises(SettingConflict, match="durable"):
                await store.create(GR, ("acme", "prod", "memory", "workers"), {})
            with pytest.raises(AlreadyExists):
                await store.create(GR, ("acme", "prod", "orders", "workers"), {})

            # Updates: anything but start; start sent unchanged is no change.
            res = await store.update(
                GR,
                ("acme", "prod", "orders", "workers"),
                {"lease_ms": 2000, "backoff_ms": [10, 20], "start": {"offset": 7}},
                if_version=1,
            )
            assert (res.version, res.spec["lease_ms"], res.spec["backoff_ms"]) == (
                2,
                2000,
                [10, 20],
            )
            for start in ("latest", "earliest", {"offset": 8}):
                with pytest.raises(SettingConflict, match="start"):
                    await store.update(GR, ("acme", "prod", "orders", "workers"), {"start": start})
            with pytest.raises(BadRequest, match="max_deliveries"):
                await store.update(GR, ("acme", "prod", "orders", "workers"), {"max_deliveries": 0})
            with pytest.raises(VersionConflict):
                await store.update(
                    GR, ("acme", "prod", "orders", "workers"), {"lease_ms": 3000}, if_version=1
                )

            # The stream keeps durable while it has groups; other changes go through.
            with pytest.raises(SettingConflict, match="group"):
                await store.update(ST, ("acme", "prod", "orders"), {"durable": False})
            stream = await store.update(ST, ("acme", "prod", "orders"), {"fsync": "interval"})
            assert stream.spec["durable"] is True
            # Deleting the stream: refused while it has groups, or cascades, groups first.
            with pytest.raises(HasChildren):
                await store.delete(ST, ("acme", "prod", "orders"))
            # The cache at the same path is no parent of the groups.
            [gone] = await store.delete(CA, ("acme", "prod", "orders"))
            assert gone.resource.kind is CA
            await store.create(GR, ("acme", "prod", "orders", "audit"), {"exclusive": True})
            changes = await store.delete(ST, ("acme", "prod", "orders"), cascade=True)
            assert [(c.resource.kind, c.resource.name) for c in changes] == [
                (GR, "audit"),
                (GR, "workers"),
                (ST, "orders"),
            ]
            # The feed replays to the store's state (groups after their stream).
            state: State = {}
            for change in await read_all(store):
                apply(state, change)
            assert state == as_state((await store.snapshot())[1])
            # A stream holds as many groups as a shard keeps for it.
            await store.create(ST, ("acme", "prod", "many"), {"durable": True})
            for i in range(MAX_GROUPS_PER_STREAM):
                await store.create(GR, ("acme", "prod", "many", f"g{i}"), {})
            with pytest.raises(Overloaded, match="queue groups"):
                await store.create(GR, ("acme", "prod", "many", "one-more"), {})
            await store.delete(ST, ("acme", "prod", "many"), cascade=True)
            # Once it has no groups, the stream may stop being durable.
            await store.create(ST, ("acme", "prod", "orders"), {"durable": True})
            await store.create(GR, ("acme", "prod", "orders", "workers"), {})
            await store.delete(GR, ("acme", "prod", "orders", "workers"))
            res = await store.update(ST, ("acme", "prod", "orders"), {"durable": False})
            assert res.spec["durable"] is False

    run(main)


# --- followers ------------------------------------------------------------------------------

TENANTS = ("t0", "t1", "t2")
NAMESPACES = ("n0", "n1", "n2")
LEAVES = ("x0", "x1", "x2", "x3")


def auth_spec(kind: ResourceKind, tenant: str) -> dict[str, Any]:
    """A valid spec of an issuer, policy or binding of ``tenant``."""
    if kind is IS:
        return {
            "issuer": "https://idp.example",
            "audience": "felix",
            "algorithms": ["RS256", "ES256"],
            "jwks_url": "https://idp.example/jwks",
        }
    if kind is PO:
        return {"permissions": [f"stream.publish:stream:{tenant}/prod/*"]}
    return {"subject": "group:eng", "policies": ["publishers"]}


def random_patch(rng: random.Random, kind: ResourceKind) -> dict[str, Any]:
    if rng.random() < 0.05:
        return {"no_such_setting": 1}  # refused: BadRequest
    if kind in (T, NS, PO):
        return {"description": "d" * rng.randrange(5)}
    if kind is IS:
        return {"audience": "aud" * rng.randrange(1, 5)}
    if kind is BI:
        return {"subject": rng.choice(["group:eng", "user:alice", "bob"])}
    if kind is CA:
        return {"budget_bytes": rng.randrange(4096, 1 << 30)}
    if kind is GR:
        return rng.choice(
            [
                {"lease_ms": rng.randrange(1000, 5000)},
                {"start": rng.choice(["earliest", "latest"])},  # refused on update
                {"exclusive": rng.random() < 0.5},
            ]
        )
    return rng.choice(
        [
            {"durable": rng.random() < 0.5},
            {"queue": {"max_deliveries": rng.randrange(1, 100)}},
            {"retention_age_s": rng.random() * 1000 or None},
            {"fsync": rng.choice(["none", "batch", "always"])},
        ]
    )


async def random_writes(store: Store, rng: random.Random, ops: int) -> int:
    """``ops`` random creates, updates and deletes (many of them refused); changes recorded."""
    recorded = 0
    for _ in range(ops):
        kind = rng.choice([T, NS, NS, ST, ST, ST, CA, CA, IS, PO, BI, GR])
        names = (
            rng.choice(TENANTS),
            rng.choice(NAMESPACES),
            rng.choice(LEAVES),
            rng.choice(("g0", "g1")),
        )
        # Issuers, policies and bindings take namespace names: same paths, other kinds.
        path = names[: {T: 1, NS: 2, ST: 3, CA: 3, IS: 2, PO: 2, BI: 2, GR: 4}[kind]]
        action = rng.random()
        try:
            if action < 0.45:
                if kind in (IS, PO, BI):
                    spec = auth_spec(kind, path[0])
                elif kind is ST and rng.random() < 0.5:
                    spec = {"durable": True}  # one that may hold groups
                else:
                    spec = random_patch(rng, kind) if kind is not T else {}
                await store.create(kind, path, spec)
                recorded += 1
            elif action < 0.85:
                version = rng.choice([None, None, 1, 2, 3])
                await store.update(kind, path, random_patch(rng, kind), if_version=version)
                recorded += 1
            else:
                cascade = rng.random() < 0.3
                recorded += len(await store.delete(kind, path, cascade=cascade))
        except (AlreadyExists, NotFound, HasChildren, VersionConflict, BadRequest):
            pass
    return recorded


async def follow(store: Store, rng: random.Random, stop: asyncio.Event) -> tuple[int, State]:
    """Apply the feed in pages of 3-7 until ``stop`` is set and the feed is drained."""
    state: State = {}
    position = 0
    while True:
        stopping = stop.is_set()
        page, nxt = await store.changes(position, rng.randint(3, 7))
        assert [ch.position for ch in page] == list(range(position + 1, nxt + 1))
        for change in page:
            apply(state, change)
        position = nxt
        if not page:
            if stopping:
                return position, state
            await store.wait(position, 0.2)


def test_follower_ends_with_the_store_state(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open() as store:
            stop = asyncio.Event()
            follower = asyncio.create_task(follow(store, random.Random(1), stop))
            recorded = await asyncio.gather(
                random_writes(store, random.Random(2), 1000),
                random_writes(store, random.Random(3), 1000),
            )
            stop.set()
            position, state = await follower
            snapshot_position, resources = await store.snapshot()
            assert position == snapshot_position == sum(recorded)
            assert sum(recorded) > 600  # enough actually happened
            assert state == as_state(resources)

    run(main, timeout=60)


# --- open_store and migrations --------------------------------------------------------------


def test_open_store_urls(tmp_path: Any) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    # SQLAlchemy's convention: the path follows the third slash, so four mean absolute
    # (what `felix up` builds from its data dir, relative or not).
    for url, path in [
        (f"sqlite:///{tmp_path}/a.db", f"{tmp_path}/a.db"),
        ("sqlite:///data/control.db", "data/control.db"),
        (str(tmp_path / "b.db"), str(tmp_path / "b.db")),
        ("c.db", "c.db"),
    ]:
        store = open_store(url, feed_retention=7)
        assert isinstance(store, SQLiteStore)
        assert (store.path, store.feed_retention) == (path, 7)
    assert isinstance(open_store("postgres://u@h/db"), PostgresStore)
    assert isinstance(open_store("postgresql://u@h/db", max_children=3), PostgresStore)
    for bad in ("mysql://u@h/db", "memory://x", "sqlite://", ":memory:"):
        with pytest.raises(ConfigError):
            open_store(bad)
    with pytest.raises(ValueError):
        open_store("memory://", feed_retention=0)


def test_refuses_newer_schema(durable: Backend) -> None:
    async def main() -> None:
        async with durable.open() as store:
            if isinstance(store, SQLiteStore):
                assert store._writer is not None
                await store._writer.execute(
                    "INSERT INTO felix_schema_migrations VALUES (999, 'future', '')"
                )
            else:
                assert isinstance(store, PostgresStore)
                await execute(store.dsn, "INSERT INTO felix_schema_migrations VALUES (999, 'x')")
        with pytest.raises(ConfigError, match="newer felix"):
            async with durable.open():
                pass

    run(main)


async def execute(dsn: str, query: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def test_postgres_concurrent_migrations() -> None:
    async def main(dsn: str) -> None:
        stores = [PostgresStore(dsn, pool_size=1) for _ in range(4)]
        try:
            # Four sessions migrating an empty database at once (the advisory lock's job).
            await asyncio.gather(*(s.open() for s in stores))
            await stores[0].create(T, ("a",), {})
            assert await stores[3].get(T, ("a",)) is not None
        finally:
            await asyncio.gather(*(s.close() for s in stores))
        rows = await execute(dsn, "SELECT version FROM felix_schema_migrations ORDER BY 1")
        assert [r["version"] for r in rows] == [v for v, _, _ in PG_MIGRATIONS]

    with pg.temporary_database("felix_migrate") as dsn:
        run(lambda: main(dsn))


def test_postgres_wait_survives_a_killed_listener(pg_dsn: str) -> None:
    asyncio.run(pg.reset(pg_dsn))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        follower = PostgresStore(pg_dsn, poll_interval=0.3)
        writer = PostgresStore(pg_dsn)
        await follower.open()
        await writer.open()
        try:
            old = follower._listener
            await execute(pg_dsn, f"SELECT pg_terminate_backend({old.get_server_pid()})")
            await asyncio.sleep(0.1)

            async def write_later(name: str) -> None:
                await asyncio.sleep(0.2)
                await writer.create(T, (name,), {})  # another store: woken by NOTIFY or poll

            task = asyncio.create_task(write_later("a"))
            started = loop.time()
            await follower.wait(0, 10)
            assert loop.time() - started < 1.5
            await task
            # The wait re-established LISTEN: the next write wakes it by notification.
            assert follower._listener is not old and not follower._listener.is_closed()
            follower.poll_interval = 30
            task = asyncio.create_task(write_later("b"))
            started = loop.time()
            await follower.wait(1, 10)
            assert loop.time() - started < 1.5
            await task
        finally:
            await follower.close()
            await writer.close()

    run(main)


# --- PostgreSQL: writers in other processes -------------------------------------------------


def _writer_process(dsn: str, seed: int, start: Any, results: Any) -> None:
    """A separate control-plane process: its own PostgresStore, random writes, count reported."""

    async def main() -> int:
        store = PostgresStore(dsn, pool_size=2)
        await store.open()
        try:
            start.wait(30)
            rng = random.Random(seed)
            recorded = 0
            while recorded < 300:
                # Everyone also updates the shared tenant: contention on the same rows.
                await store.update(T, ("shared",), {"description": f"{seed}-{recorded}"})
                recorded += 1 + await random_writes(store, rng, 3)
            return recorded
        finally:
            await store.close()

    results.put(asyncio.run(main()))


def test_postgres_writers_in_two_processes(pg_dsn: str) -> None:
    asyncio.run(pg.reset(pg_dsn))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    writers = [
        ctx.Process(target=_writer_process, args=(pg_dsn, seed, start, results), daemon=True)
        for seed in (10, 11)
    ]

    async def follow_writers() -> None:
        store = PostgresStore(pg_dsn, poll_interval=0.5)
        await store.open()
        try:
            await store.create(T, ("shared",), {})
            for w in writers:
                w.start()
            stop = asyncio.Event()
            follower = asyncio.create_task(follow(store, random.Random(4), stop))
            start.set()
            while any(w.is_alive() for w in writers):
                await asyncio.sleep(0.05)
            stop.set()
            position, state = await follower
            assert [w.exitcode for w in writers] == [0, 0]
            recorded = [results.get(timeout=5) for _ in writers]
            assert all(n >= 300 for n in recorded)
            # Every change once, positions exactly 1..N (follow() checks each page is
            # contiguous from where the last one ended).
            assert position == 1 + sum(recorded) == await store.position()
            snapshot_position, resources = await store.snapshot()
            assert snapshot_position == position
            assert state == as_state(resources)
            feed = await read_all(store, limit=1000)
            assert len(feed) == position
            # The writers really ran at the same time: their updates of the shared
            # tenant interleave in the feed rather than coming in two blocks.
            writers_in_order = [
                ch.resource.spec["description"].split("-")[0]
                for ch in feed
                if ch.resource.path == ("shared",) and ch.op is Op.UPDATE
            ]
            switches = sum(a != b for a, b in itertools.pairwise(writers_in_order))
            assert switches >= 10, writers_in_order
        finally:
            await store.close()
            for w in writers:
                if w.is_alive():
                    w.kill()

    run(follow_writers, timeout=60)
