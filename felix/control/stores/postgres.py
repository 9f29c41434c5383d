"""The PostgreSQL store: several control-plane processes share one database.

How it works:

- **Positions are serialized by one row.** Every write transaction starts with
  ``SELECT position FROM felix_feed WHERE id = 1 FOR UPDATE``. The row lock is
  held until commit, so write transactions run one at a time, each assigns the
  positions right after the previous committed one, and a transaction commits
  before the next can even take its first position: commit order equals
  position order, and a follower can never see position N+1 while N is still
  invisible. (A ``SEQUENCE`` would not do: ``nextval`` is taken inside the
  transaction but the transaction may commit later than one that took a larger
  value, so a follower paging by position would skip it for good.) Holding the
  lock for the whole write also makes the checks (parent exists, no children,
  If-Match version, children bound) race-free across processes. Control-plane
  writes are rare and short, so one writer at a time costs nothing that matters.
  The transactions are READ COMMITTED so each statement after the lock sees
  everything committed before it was granted.
- **The feed** is the ``felix_changes`` table keyed by position, trimmed to
  ``feed_retention`` rows by each write. ``changes`` is a single query, and a
  page that does not start right after ``since`` means trimmed history
  (CursorTooOld).
- **wait** LISTENs on a channel that each write transaction NOTIFYs (delivered
  at commit), so writes from other processes wake followers; it also re-reads
  the position every ``poll_interval`` seconds in case a notification is lost
  (for instance while the listening connection reconnects).
- **Migrations** are numbered, recorded in ``felix_schema_migrations`` and
  applied on :meth:`PostgresStore.open` in one transaction that first takes a
  transaction-level advisory lock, so processes starting together apply each
  migration exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from felix.control.model import Change, Op, Path, Resource, ResourceKind
from felix.control.stores import _common as c
from felix.errors import AlreadyExists
from felix.pgschema import apply_migrations

__all__ = ["MIGRATIONS", "PostgresStore"]

log = logging.getLogger(__name__)

#: Channel the writers NOTIFY (payload: the newest position) and ``wait`` LISTENs on.
CHANNEL = "felix_control_changes"
#: Key of the advisory lock that serializes migrations ("felix" in ASCII).
MIGRATION_LOCK = 0x66656C6978

#: Schema versions in order: (version, description, statements). Never edit a released
#: entry; add a new one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "resources, change feed and feed position",
        [
            # ``parent`` duplicates path[:-1] so listings and child counts use an index;
            # ``name`` sorts bytewise (COLLATE "C") like the other backends.
            """CREATE TABLE felix_resources (
                kind text NOT NULL,
                path text[] NOT NULL,
                parent text[] NOT NULL,
                name text COLLATE "C" NOT NULL,
                spec jsonb NOT NULL,
                version integer NOT NULL CHECK (version >= 1),
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                PRIMARY KEY (kind, path)
            )""",
            "CREATE INDEX felix_resources_parent ON felix_resources (parent, kind, name)",
            """CREATE TABLE felix_changes (
                position bigint PRIMARY KEY,
                op text NOT NULL,
                kind text NOT NULL,
                path text[] NOT NULL,
                spec jsonb NOT NULL,
                version integer NOT NULL,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL
            )""",
            # The newest position; its row lock serializes writers (module docstring).
            """CREATE TABLE felix_feed (
                id integer PRIMARY KEY CHECK (id = 1),
                position bigint NOT NULL
            )""",
            "INSERT INTO felix_feed (id, position) VALUES (1, 0)",
        ],
    ),
    (
        2,
        "stream fsync renamed: batch -> interval, always -> commit; fsync_interval_ms",
        [
            # As SQLite's migration 2: resources and the feed's copies; a stream that
            # is not durable gets "none" (anything else would now be a conflict).
            f"""UPDATE {table} SET spec = jsonb_set(spec, '{{fsync}}', to_jsonb(
                CASE WHEN spec->'durable' = 'true'::jsonb THEN
                    CASE spec->>'fsync' WHEN 'batch' THEN 'interval' ELSE 'commit' END
                ELSE 'none' END))
            WHERE kind = 'stream' AND spec->>'fsync' IN ('batch', 'always')"""
            for table in ("felix_resources", "felix_changes")
        ]
        + [
            f"""UPDATE {table} SET spec = spec || '{{"fsync_interval_ms": 100}}'::jsonb
            WHERE kind = 'stream' AND NOT spec ? 'fsync_interval_ms'"""
            for table in ("felix_resources", "felix_changes")
        ],
    ),
]


def _resource(row: Mapping[str, Any]) -> Resource:
    return Resource(
        kind=ResourceKind(row["kind"]),
        path=tuple(row["path"]),
        spec=row["spec"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _values(res: Resource) -> tuple[str, list[str], dict[str, Any], int, datetime, datetime]:
    return (
        res.kind.value,
        list(res.path),
        res.spec,
        res.version,
        res.created_at,
        res.updated_at,
    )


async def _init_connection(conn: Any) -> None:
    # jsonb in and out as Python objects instead of JSON text.
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
    )


class PostgresStore:
    """A :class:`~felix.control.store.Store` in the PostgreSQL database ``dsn`` names.

    ``pool_size`` bounds the connections this process uses (plus one for LISTEN);
    ``poll_interval`` is how often ``wait`` re-reads the position without a notification.
    """

    def __init__(
        self,
        dsn: str,
        *,
        feed_retention: int = c.DEFAULT_FEED_RETENTION,
        max_children: int = c.DEFAULT_MAX_CHILDREN,
        clock: Callable[[], datetime] = c.utcnow,
        pool_size: int = 5,
        poll_interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.feed_retention = c.check_feed_retention(feed_retention)
        self.max_children = max_children
        self.poll_interval = poll_interval
        self._clock = clock
        self._pool_size = pool_size
        self._pool: Any = None
        self._listener: Any = None
        self._changed: asyncio.Event | None = None

    async def open(self) -> None:
        """Connect, apply migrations and start listening for other writers' changes."""
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self._pool_size, init=_init_connection
        )
        try:
            async with pool.acquire() as conn:
                await _migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        await self._listen(timeout=10)

    async def close(self) -> None:
        """Close the listener and the pool (idempotent) and wake waiters."""
        pool, listener = self._pool, self._listener
        self._pool = self._listener = None
        if listener is not None:
            await listener.close()
        if pool is not None:
            await pool.close()
        self._notify()

    async def get(self, kind: ResourceKind, path: Path) -> Resource | None:
        async with self._acquire() as conn:
            return await _get(conn, kind, tuple(path))

    async def list_resources(self, kind: ResourceKind, parent: Path) -> list[Resource]:
        """Resources of ``kind`` directly under ``parent``, by name; NotFound if it is missing."""
        parent_key = c.check_list_parent(kind, parent)
        async with (
            self._acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            if parent_key is not None and await _get(conn, *parent_key) is None:
                raise c.missing(*parent_key)
            rows = await conn.fetch(
                f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources"
                " WHERE parent = $1 AND kind = $2 ORDER BY name",
                list(parent),
                kind.value,
            )
        return [_resource(row) for row in rows]

    async def create(self, kind: ResourceKind, path: Path, spec: dict[str, Any]) -> Resource:
        path, full_spec = c.check_create(kind, path, spec)
        async with self._write() as (conn, position):
            parent = c.parent_of(kind, path)
            c.check_parent(kind, path, None if parent is None else await _get(conn, *parent))
            if await _get(conn, kind, path) is not None:
                raise AlreadyExists(f"{kind} {'/'.join(path)} already exists")
            count = await conn.fetchval(
                "SELECT count(*) FROM felix_resources WHERE parent = $1", list(path[:-1])
            )
            c.check_children(kind, path[:-1], count, self.max_children)
            now = self._clock()
            res = Resource(
                kind=kind, path=path, spec=full_spec, version=1, created_at=now, updated_at=now
            )
            await conn.execute(
                f"INSERT INTO felix_resources ({c.RESOURCE_COLUMNS}, parent, name)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                *_values(res),
                list(path[:-1]),
                path[-1],
            )
            await self._record(conn, position, [(Op.CREATE, res)])
        return res

    async def update(
        self, kind: ResourceKind, path: Path, patch: dict[str, Any], if_version: int | None = None
    ) -> Resource:
        path = tuple(path)
        async with self._write() as (conn, position):
            old = await _get(conn, kind, path)
            res = c.updated(kind, path, old, patch, if_version, self._clock())
            if c.loses_durability(old, res):
                groups = await conn.fetchval(
                    "SELECT count(*) FROM felix_resources WHERE parent = $1 AND kind = $2",
                    list(path),
                    ResourceKind.GROUP.value,
                )
                c.check_groups_kept(path, groups)
            spec = res.spec
            await conn.execute(
                "UPDATE felix_resources SET spec = $3, version = $4, updated_at = $5"
                " WHERE kind = $1 AND path = $2",
                kind.value,
                list(path),
                spec,
                res.version,
                res.updated_at,
            )
            await self._record(conn, position, [(Op.UPDATE, res)])
        return res

    async def delete(
        self,
        kind: ResourceKind,
        path: Path,
        *,
        cascade: bool = False,
        if_version: int | None = None,
    ) -> list[Change]:
        path = tuple(path)
        async with self._write() as (conn, position):
            root = await _get(conn, kind, path)
            if root is None:
                raise c.missing(kind, path)
            c.check_version(root, if_version)
            below = await conn.fetch(
                f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources"
                " WHERE cardinality(path) > $2 AND path[1:$2] = $1",
                list(path),
                len(path),
            )
            doomed = c.cascade_order(root, map(_resource, below), cascade)
            await conn.executemany(
                "DELETE FROM felix_resources WHERE kind = $1 AND path = $2",
                [(r.kind.value, list(r.path)) for r in doomed],
            )
            return await self._record(conn, position, [(Op.DELETE, r) for r in doomed])

    async def snapshot(self) -> tuple[int, list[Resource]]:
        """Every resource (ordered by path, then kind) and the position it reflects."""
        # REPEATABLE READ: both queries see the same committed state, and a write
        # commits its resources and its position together.
        async with (
            self._acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            position = await conn.fetchval("SELECT position FROM felix_feed WHERE id = 1")
            rows = await conn.fetch(f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources")
        resources = sorted(map(_resource, rows), key=lambda r: (r.path, r.kind.value))
        return int(position), resources

    async def changes(self, since: int, limit: int) -> tuple[list[Change], int]:
        limit = c.feed_limit(since, limit)
        async with self._acquire() as conn:
            rows = await conn.fetch(
                f"SELECT position, op, {c.RESOURCE_COLUMNS} FROM felix_changes"
                " WHERE position > $1 ORDER BY position LIMIT $2",
                since,
                limit,
            )
        page = [Change(position=r["position"], op=Op(r["op"]), resource=_resource(r)) for r in rows]
        c.check_page(since, page[0].position if page else None)
        return page, page[-1].position if page else since

    async def wait(self, since: int, timeout: float) -> None:
        """Return once the position is past ``since``, or after ``timeout`` seconds.

        Woken by a NOTIFY from any process's write; without one, the position is
        re-read every ``poll_interval`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._pool is not None:  # closing wakes waiters and ends the wait
            # Take the event before reading the position: a notification in between sets it.
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            if await self.position() > since:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if self._listener is None or self._listener.is_closed():
                await self._listen(timeout=min(remaining, self.poll_interval))
            try:
                async with asyncio.timeout(min(remaining, self.poll_interval)):
                    await changed.wait()
            except TimeoutError:
                pass

    async def position(self) -> int:
        async with self._acquire() as conn:
            return int(await conn.fetchval("SELECT position FROM felix_feed WHERE id = 1"))

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open")
        async with self._pool.acquire() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[tuple[Any, int]]:
        """One write transaction, holding the feed row lock, and the position before it."""
        async with self._acquire() as conn, conn.transaction(isolation="read_committed"):
            # The serialization point (module docstring): blocks until every earlier
            # writer has committed or rolled back, and is held until this one does.
            position = await conn.fetchval(
                "SELECT position FROM felix_feed WHERE id = 1 FOR UPDATE"
            )
            yield conn, int(position)

    async def _record(
        self, conn: Any, position: int, entries: Iterable[tuple[Op, Resource]]
    ) -> list[Change]:
        """Append ``entries`` after ``position``, advance the counter, trim, notify at commit."""
        recorded = [
            Change(position=position + i, op=op, resource=res)
            for i, (op, res) in enumerate(entries, 1)
        ]
        await conn.executemany(
            f"INSERT INTO felix_changes (position, op, {c.RESOURCE_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(ch.position, ch.op.value, *_values(ch.resource)) for ch in recorded],
        )
        newest = recorded[-1].position
        await conn.execute("UPDATE felix_feed SET position = $1 WHERE id = 1", newest)
        await conn.execute(
            "DELETE FROM felix_changes WHERE position <= $1", newest - self.feed_retention
        )
        # Queued by the server and delivered only if and when this transaction commits.
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(newest))
        return recorded

    async def _listen(self, timeout: float) -> None:
        """(Re)open the LISTEN connection; on failure ``wait`` falls back to polling."""
        if self._pool is None:
            return
        listener = None
        try:
            # Bounded so a reconnect inside ``wait`` cannot outlast the wait's timeout.
            listener = await asyncpg.connect(self.dsn, timeout=max(timeout, 0.1))
            await listener.add_listener(CHANNEL, self._on_notification)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("cannot LISTEN for control-plane changes (polling instead): %r", exc)
            if listener is not None:
                await listener.close()
            return
        if self._pool is None:  # closed while connecting
            await listener.close()
            return
        self._listener = listener
        # A notification sent while we were not listening is lost: wake waiters to re-check.
        self._notify()

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


async def _get(conn: Any, kind: ResourceKind, path: Path) -> Resource | None:
    row = await conn.fetchrow(
        f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources WHERE kind = $1 AND path = $2",
        kind.value,
        list(path),
    )
    return None if row is None else _resource(row)


async def _migrate(conn: Any) -> None:
    """Apply the migrations the database lacks, once, even with several processes starting."""
    async with conn.transaction():
        await apply_migrations(
            conn,
            table="felix_schema_migrations",
            lock=MIGRATION_LOCK,
            migrations=MIGRATIONS,
            newer=lambda versions: c.newer_schema("PostgreSQL", versions),
        )
