"""PostgreSQL for tests: uniquely named databases on the local server, dropped afterwards.

The server is the one ``.ci/run`` starts (``FELIX_TEST_PG`` overrides the admin DSN).
If it cannot be reached the tests that need it FAIL with a message saying so: a
missing server must never turn into silently skipped coverage.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

#: DSN of a database to run CREATE/DROP DATABASE from.
ADMIN_DSN = os.environ.get("FELIX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_for(database: str) -> str:
    """The admin DSN pointed at ``database``."""
    parts = urlsplit(ADMIN_DSN)
    return urlunsplit(parts._replace(path="/" + database))


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        problem = repr(exc)
    # Outside the except block, so the report is this message and not a chained traceback.
    pytest.fail(
        f"PostgreSQL is not reachable at {ADMIN_DSN} ({problem}). The store tests need the "
        "local server: run them through .ci/run, which starts it, or start it yourself "
        "(or point FELIX_TEST_PG at one).",
        pytrace=False,
    )


async def create_database(prefix: str = "felix_test") -> str:
    """Create an empty database with a unique name; its DSN."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(name)


async def drop_database(dsn: str) -> None:
    """Drop the database ``dsn`` names, disconnecting anyone still in it."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def reset(dsn: str) -> None:
    """Empty the database: drop and recreate the public schema (tables, migrations and all)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


@contextmanager
def temporary_database(prefix: str = "felix_test") -> Iterator[str]:
    """A fresh database for the ``with`` block (its DSN), dropped afterwards."""
    dsn = asyncio.run(create_database(prefix))
    try:
        yield dsn
    finally:
        asyncio.run(drop_database(dsn))
