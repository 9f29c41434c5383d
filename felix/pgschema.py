"""Numbered schema migrations of a felix table set in PostgreSQL, applied once.

Each set of felix tables in a database (the control store's, the cluster's, the key
rings') records its applied versions in a version table of its own and serializes its
set-up under a transaction-level advisory lock of its own, so the sets share a database
without sharing versions. :func:`apply_migrations` is that set-up, run inside the
caller's transaction (which may do more under the same lock, as the cluster's does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Migration", "apply_migrations"]

#: (version, description, statements). Never edit a released entry; add a new one.
Migration = tuple[int, str, Sequence[str]]


async def apply_migrations(
    conn: Any,
    *,
    table: str,
    lock: int,
    migrations: Sequence[Migration],
    newer: Callable[[list[int]], Exception],
) -> None:
    """Apply the ``migrations`` the database lacks, recording them in ``table``.

    Call inside a transaction of ``conn`` (an asyncpg connection): the advisory
    ``lock`` is held until it ends, so a second process blocks here and then finds
    the versions applied. Raises ``newer(versions)`` when ``table`` records versions
    ``migrations`` does not have (written by a newer felix), applying nothing.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {table} ("
        " version integer PRIMARY KEY, description text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied = {r["version"] for r in await conn.fetch(f"SELECT version FROM {table}")}
    unknown = applied - {version for version, _, _ in migrations}
    if unknown:
        raise newer(sorted(unknown))
    for version, description, statements in migrations:
        if version in applied:
            continue
        for statement in statements:
            await conn.execute(statement)
        await conn.execute(
            f"INSERT INTO {table} (version, description) VALUES ($1, $2)", version, description
        )
