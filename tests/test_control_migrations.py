"""Store migration 2 (stream fsync batch -> interval, always -> commit), on SQLite and on a
real PostgreSQL (tests/pg.py): a database written at schema 1 with the old values opens
at schema 2 with values this felix accepts, in the resources and in the change feed."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from felix.control.model import ResourceKind, validate_spec
from felix.control.store import Store
from felix.control.stores import postgres as pg_store
from felix.control.stores import sqlite as sqlite_store
from felix.control.stores.postgres import PostgresStore
from felix.control.stores.sqlite import SQLiteStore
from tests import pg
from tests.aio import run

T, NS, ST = ResourceKind.TENANT, ResourceKind.NAMESPACE, ResourceKind.STREAM

#: stream name -> (spec as an older felix stored it, fsync after migration 2)
OLD = {
    "batched": ({"durable": True, "fsync": "batch"}, "interval"),
    "always": ({"durable": True, "fsync": "always"}, "commit"),
    # Never honoured (nothing was on disk); "commit" would now be a setting conflict.
    "memory-always": ({"durable": False, "fsync": "always"}, "none"),
    "memory-batch": ({"durable": False, "fsync": "batch"}, "none"),
    "plain": ({"durable": False, "fsync": "none"}, "none"),
    "written": ({"durable": True, "fsync": "none"}, "none"),
}

Rewrite = Callable[[str, dict[str, Any]], Awaitable[None]]


async def _check_migrated(store: Store) -> None:
    streams = {r.name: r for r in await store.list_resources(ST, ("acme", "prod"))}
    assert set(streams) == set(OLD)
    for name, (old, fsync) in OLD.items():
        spec = streams[name].spec
        assert spec["fsync"] == fsync, name
        assert spec["fsync_interval_ms"] == 100, name
        assert spec["durable"] == old["durable"], name
        assert validate_spec(ST, spec) == spec, name  # valid as stored
    page, _ = await store.changes(0, 100)
    for change in page:
        if change.resource.kind is ST:
            assert change.resource.spec == streams[change.resource.name].spec
    # Every stream can be updated (no stored conflict blocks it).
    for name in OLD:
        res = await store.update(ST, ("acme", "prod", name), {"replay_max_records": 500})
        assert res.spec["replay_max_records"] == 500


async def _scenario(open_store: Callable[[], Store], rewrite: Rewrite) -> None:
    """Write resources at schema 1, rewrite their specs to the old values, migrate."""
    store = open_store()
    await store.open()
    try:
        await store.create(T, ("acme",), {})
        await store.create(NS, ("acme", "prod"), {})
        for name in OLD:
            await store.create(ST, ("acme", "prod", name), {})
        for name, (old, _) in OLD.items():
            spec = {k: v for k, v in validate_spec(ST, {}).items() if k != "fsync_interval_ms"}
            await rewrite(name, {**spec, **old})
    finally:
        await store.close()


def test_sqlite_migration_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "control.db"
    v1 = [m for m in sqlite_store.MIGRATIONS if m[0] == 1]

    async def main() -> None:
        import aiosqlite

        async def rewrite(name: str, spec: dict[str, Any]) -> None:
            async with aiosqlite.connect(path) as db:
                for table in ("felix_resources", "felix_changes"):
                    await db.execute(
                        f"UPDATE {table} SET spec = ? WHERE kind = 'stream' AND path = ?",
                        (json.dumps(spec), f"acme/prod/{name}"),
                    )
                await db.commit()

        with monkeypatch.context() as m:
            m.setattr(sqlite_store, "MIGRATIONS", v1)
            await _scenario(lambda: SQLiteStore(path), rewrite)
        async with aiosqlite.connect(path) as db:
            rows = await db.execute_fetchall("SELECT version FROM felix_schema_migrations")
            assert [r[0] for r in rows] == [1]
        store = SQLiteStore(path)
        await store.open()
        try:
            await _check_migrated(store)
        finally:
            await store.close()
        # Opening again applies nothing twice.
        store = SQLiteStore(path)
        await store.open()
        await store.close()
        async with aiosqlite.connect(path) as db:
            rows = await db.execute_fetchall("SELECT version FROM felix_schema_migrations")
            assert sorted(r[0] for r in rows) == [1, 2]

    run(main)


def test_postgres_migration_2(monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = [m for m in pg_store.MIGRATIONS if m[0] == 1]

    async def main(dsn: str) -> None:
        async def rewrite(name: str, spec: dict[str, Any]) -> None:
            conn = await asyncpg.connect(dsn)
            try:
                for table in ("felix_resources", "felix_changes"):
                    await conn.execute(
                        f"UPDATE {table} SET spec = $1::jsonb WHERE kind = 'stream' AND path = $2",
                        json.dumps(spec),
                        ["acme", "prod", name],
                    )
            finally:
                await conn.close()

        with monkeypatch.context() as m:
            m.setattr(pg_store, "MIGRATIONS", v1)
            await _scenario(lambda: PostgresStore(dsn), rewrite)
        store = PostgresStore(dsn)
        await store.open()
        try:
            await _check_migrated(store)
        finally:
            await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT version FROM felix_schema_migrations ORDER BY 1")
        finally:
            await conn.close()
        assert [r["version"] for r in rows] == [1, 2]

    with pg.temporary_database("felix_migrate2") as dsn:
        run(lambda: main(dsn))
