"""The SQLite store: the embedded default of ``felix up``, one file in the data dir.

How it works:

- One **writer** connection, used under an asyncio lock, runs every write as a
  ``BEGIN IMMEDIATE`` transaction. Writes are therefore serialized in this
  process, and positions (a single-row counter, ``felix_feed``) are assigned in
  commit order by construction.
- One **reader** connection serves gets, listings, snapshots and the feed. The
  database is in WAL mode, so readers see only committed transactions and are
  not blocked by a write in progress; multi-statement reads (snapshot) run in
  one read transaction so the position and the resources agree.
- ``wait`` uses an in-process event set after each commit: the store is meant
  for a single process (use PostgreSQL for several control-plane processes).
- Schema changes are numbered migrations recorded in ``felix_schema_migrations``
  and applied on :meth:`SQLiteStore.open` in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import aiosqlite

from felix.control.model import Change, Op, Path, Resource, ResourceKind
from felix.control.stores import _common as c
from felix.errors import AlreadyExists, ConfigError

__all__ = ["MIGRATIONS", "SQLiteStore"]

#: Schema versions in order: (version, description, statements). Never edit a released
#: entry; add a new one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "resources, change feed and feed position",
        [
            # Paths are stored as their names joined by "/" (names cannot contain it);
            # ``parent`` is the parent's path ("" for tenants) for listings and counts.
            """CREATE TABLE felix_resources (
                kind TEXT NOT NULL,
                path TEXT NOT NULL,
                parent TEXT NOT NULL,
                name TEXT NOT NULL,
                spec TEXT NOT NULL,
                version INTEGER NOT NULL CHECK (version >= 1),
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (kind, path)
            )""",
            "CREATE INDEX felix_resources_parent ON felix_resources (parent, kind, name)",
            """CREATE TABLE felix_changes (
                position INTEGER PRIMARY KEY,
                op TEXT NOT NULL,
                kind TEXT NOT NULL,
                path TEXT NOT NULL,
                spec TEXT NOT NULL,
                version INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            # The newest position, kept apart from felix_changes so trimming the feed
            # can never make a position be handed out twice.
            """CREATE TABLE felix_feed (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                position INTEGER NOT NULL
            )""",
            "INSERT INTO felix_feed (id, position) VALUES (1, 0)",
        ],
    ),
    (
        2,
        "stream fsync renamed: batch -> interval, always -> commit; fsync_interval_ms",
        [
            # Both the resources and the feed's copies, so a follower replaying old
            # changes reads only values this felix accepts. A stream that is not durable
            # gets "none": it never had anything to fsync, and any other value would now
            # be a setting conflict that blocks its every update. (JSON true reads as 1.)
            f"""UPDATE {table} SET spec = json_set(spec, '$.fsync',
                CASE WHEN json_extract(spec, '$.durable') = 1 THEN
                    CASE json_extract(spec, '$.fsync') WHEN 'batch' THEN 'interval'
                    ELSE 'commit' END
                ELSE 'none' END)
            WHERE kind = 'stream' AND json_extract(spec, '$.fsync') IN ('batch', 'always')"""
            for table in ("felix_resources", "felix_changes")
        ]
        + [
            f"""UPDATE {table} SET spec = json_set(spec, '$.fsync_interval_ms', 100)
            WHERE kind = 'stream' AND json_type(spec, '$.fsync_interval_ms') IS NULL"""
            for table in ("felix_resources", "felix_changes")
        ],
    ),
]


def _encode_path(path: Path) -> str:
    return "/".join(path)


def _resource(row: Sequence[Any]) -> Resource:
    kind, path, spec, version, created_at, updated_at = row
    return Resource(
        kind=ResourceKind(kind),
        path=tuple(path.split("/")),
        spec=json.loads(spec),
        version=version,
        created_at=datetime.fromisoformat(created_at),
        updated_at=datetime.fromisoformat(updated_at),
    )


def _values(res: Resource) -> tuple[str, str, str, int, str, str]:
    return (
        res.kind.value,
        _encode_path(res.path),
        json.dumps(res.spec),
        res.version,
        res.created_at.isoformat(),
        res.updated_at.isoformat(),
    )


class SQLiteStore:
    """A :class:`~felix.control.store.Store` in the SQLite file at ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        feed_retention: int = c.DEFAULT_FEED_RETENTION,
        max_children: int = c.DEFAULT_MAX_CHILDREN,
        clock: Callable[[], datetime] = c.utcnow,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            # Two connections to ":memory:" would be two different databases.
            raise ConfigError(f"SQLite store needs a file path, got {self.path!r} (memory://?)")
        self.feed_retention = c.check_feed_retention(feed_retention)
        self.max_children = max_children
        self._clock = clock
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._changed: asyncio.Event | None = None

    async def open(self) -> None:
        """Open (creating if needed) the file, switch to WAL and apply migrations."""
        if self._writer is not None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise ConfigError(f"directory of the SQLite store {self.path!r} does not exist")
        # isolation_level=None: no implicit transactions; every one is explicit below.
        writer = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await writer.execute("PRAGMA journal_mode=WAL")
            await writer.execute("PRAGMA busy_timeout=5000")
            await self._migrate(writer)
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            await writer.close()
            raise
        self._writer, self._reader = writer, reader

    async def close(self) -> None:
        """Close both connections (idempotent) and wake waiters."""
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            async with self._write_lock:
                await writer.close()
        if reader is not None:
            async with self._read_lock:
                await reader.close()
        self._notify()

    async def get(self, kind: ResourceKind, path: Path) -> Resource | None:
        async with self._read() as db:
            return await self._get(db, kind, tuple(path))

    async def list_resources(self, kind: ResourceKind, parent: Path) -> list[Resource]:
        """Resources of ``kind`` directly under ``parent``, by name; NotFound if it is missing."""
        parent_key = c.check_list_parent(kind, parent)
        async with self._read() as db:
            await db.execute("BEGIN")
            try:
                if parent_key is not None and await self._get(db, *parent_key) is None:
                    raise c.missing(*parent_key)
                rows = await db.execute_fetchall(
                    f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources"
                    " WHERE parent = ? AND kind = ? ORDER BY name",
                    (_encode_path(tuple(parent)), kind.value),
                )
            finally:
                await db.execute("COMMIT")
        return [_resource(row) for row in rows]

    async def create(self, kind: ResourceKind, path: Path, spec: dict[str, Any]) -> Resource:
        path, full_spec = c.check_create(kind, path, spec)
        async with self._write() as (db, position):
            parent = c.parent_of(kind, path)
            c.check_parent(kind, path, None if parent is None else await self._get(db, *parent))
            if await self._get(db, kind, path) is not None:
                raise AlreadyExists(f"{kind} {'/'.join(path)} already exists")
            rows = await db.execute_fetchall(
                "SELECT count(*) FROM felix_resources WHERE parent = ?",
                (_encode_path(path[:-1]),),
            )
            c.check_children(kind, path[:-1], next(iter(rows))[0], self.max_children)
            now = self._clock()
            res = Resource(
                kind=kind, path=path, spec=full_spec, version=1, created_at=now, updated_at=now
            )
            await db.execute(
                f"INSERT INTO felix_resources ({c.RESOURCE_COLUMNS}, parent, name)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*_values(res), _encode_path(path[:-1]), path[-1]),
            )
            await self._record(db, position, [(Op.CREATE, res)])
        return res

    async def update(
        self, kind: ResourceKind, path: Path, patch: dict[str, Any], if_version: int | None = None
    ) -> Resource:
        path = tuple(path)
        async with self._write() as (db, position):
            old = await self._get(db, kind, path)
            res = c.updated(kind, path, old, patch, if_version, self._clock())
            if c.loses_durability(old, res):
                rows = await db.execute_fetchall(
                    "SELECT count(*) FROM felix_resources WHERE parent = ? AND kind = ?",
                    (_encode_path(path), ResourceKind.GROUP.value),
                )
                c.check_groups_kept(path, next(iter(rows))[0])
            spec = res.spec
            await db.execute(
                "UPDATE felix_resources SET spec = ?, version = ?, updated_at = ?"
                " WHERE kind = ? AND path = ?",
                (
                    json.dumps(spec),
                    res.version,
                    res.updated_at.isoformat(),
                    kind.value,
                    _encode_path(path),
                ),
            )
            await self._record(db, position, [(Op.UPDATE, res)])
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
        async with self._write() as (db, position):
            root = await self._get(db, kind, path)
            if root is None:
                raise c.missing(kind, path)
            c.check_version(root, if_version)
            prefix = _encode_path(path) + "/"
            below = await db.execute_fetchall(
                f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources WHERE substr(path, 1, ?) = ?",
                (len(prefix), prefix),
            )
            doomed = c.cascade_order(root, map(_resource, below), cascade)
            await db.executemany(
                "DELETE FROM felix_resources WHERE kind = ? AND path = ?",
                [(r.kind.value, _encode_path(r.path)) for r in doomed],
            )
            return await self._record(db, position, [(Op.DELETE, r) for r in doomed])

    async def snapshot(self) -> tuple[int, list[Resource]]:
        """Every resource (ordered by path, then kind) and the position it reflects."""
        async with self._read() as db:
            # One read transaction: the position and the rows come from one commit.
            await db.execute("BEGIN")
            try:
                position = await self._position(db)
                rows = await db.execute_fetchall(
                    f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources"
                )
            finally:
                await db.execute("COMMIT")
        resources = sorted(map(_resource, rows), key=lambda r: (r.path, r.kind.value))
        return position, resources

    async def changes(self, since: int, limit: int) -> tuple[list[Change], int]:
        limit = c.feed_limit(since, limit)
        async with self._read() as db:
            rows = await db.execute_fetchall(
                f"SELECT position, op, {c.RESOURCE_COLUMNS} FROM felix_changes"
                " WHERE position > ? ORDER BY position LIMIT ?",
                (since, limit),
            )
        page = [Change(position=r[0], op=Op(r[1]), resource=_resource(r[2:])) for r in rows]
        c.check_page(since, page[0].position if page else None)
        return page, page[-1].position if page else since

    async def wait(self, since: int, timeout: float) -> None:
        """Return once the position is past ``since``, or after ``timeout`` seconds.

        Woken by commits of this process only (the store is single-process).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._reader is not None:  # closing wakes waiters and ends the wait
            # Take the event before reading the position: a commit in between sets it.
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            if await self.position() > since:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return

    async def position(self) -> int:
        async with self._read() as db:
            return await self._position(db)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        # The lock keeps one task's read transaction from interleaving with another's.
        async with self._read_lock:
            if self._reader is None:
                raise RuntimeError("SQLiteStore is not open")
            yield self._reader

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[tuple[aiosqlite.Connection, int]]:
        """One write transaction and the feed position before it; waiters woken after."""
        try:
            async with self._write_lock:
                db = self._writer
                if db is None:
                    raise RuntimeError("SQLiteStore is not open")
                # IMMEDIATE takes the database write lock now, so the checks below
                # see the state the write will commit on.
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db, await self._position(db)
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
        finally:
            # Spurious wake-ups (after a rollback) are harmless: waiters re-check.
            self._notify()

    async def _record(
        self, db: aiosqlite.Connection, position: int, entries: Iterable[tuple[Op, Resource]]
    ) -> list[Change]:
        """Append ``entries`` after ``position``, advance the counter, trim the feed."""
        recorded = [
            Change(position=position + i, op=op, resource=res)
            for i, (op, res) in enumerate(entries, 1)
        ]
        await db.executemany(
            f"INSERT INTO felix_changes (position, op, {c.RESOURCE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(ch.position, ch.op.value, *_values(ch.resource)) for ch in recorded],
        )
        newest = recorded[-1].position
        await db.execute("UPDATE felix_feed SET position = ? WHERE id = 1", (newest,))
        await db.execute(
            "DELETE FROM felix_changes WHERE position <= ?", (newest - self.feed_retention,)
        )
        return recorded

    @staticmethod
    async def _get(db: aiosqlite.Connection, kind: ResourceKind, path: Path) -> Resource | None:
        rows = await db.execute_fetchall(
            f"SELECT {c.RESOURCE_COLUMNS} FROM felix_resources WHERE kind = ? AND path = ?",
            (kind.value, _encode_path(path)),
        )
        return next((_resource(row) for row in rows), None)

    @staticmethod
    async def _position(db: aiosqlite.Connection) -> int:
        rows = await db.execute_fetchall("SELECT position FROM felix_feed WHERE id = 1")
        return int(next(iter(rows))[0])

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        """Apply the migrations this file lacks, all in one transaction."""
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS felix_schema_migrations ("
                " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                " applied_at TEXT NOT NULL)"
            )
            rows = await db.execute_fetchall("SELECT version FROM felix_schema_migrations")
            applied = {int(row[0]) for row in rows}
            for version, description, statements in c.migrations_to_apply(
                applied, MIGRATIONS, "SQLite"
            ):
                for statement in statements:
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO felix_schema_migrations VALUES (?, ?, ?)",
                    (version, description, c.utcnow().isoformat()),
                )
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None
