"""Control-plane store backends and :func:`open_store`, which picks one from a URL."""

from __future__ import annotations

from felix.control.store import Store
from felix.control.stores._common import DEFAULT_FEED_RETENTION, DEFAULT_MAX_CHILDREN
from felix.control.stores.memory import MemoryStore
from felix.dsn import redact_dsn
from felix.errors import ConfigError
from felix.extras import require_extra

__all__ = ["MemoryStore", "open_store"]


def open_store(
    url: str,
    *,
    feed_retention: int = DEFAULT_FEED_RETENTION,
    max_children: int = DEFAULT_MAX_CHILDREN,
) -> Store:
    """The store ``url`` names, not yet opened (``await store.open()`` connects and migrates).

    - ``memory://``: :class:`MemoryStore` (nothing persists).
    - ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the SQLAlchemy
      convention: the path is what follows the third slash) or a plain file path:
      :class:`~felix.control.stores.sqlite.SQLiteStore`.
    - ``postgresql://...`` or ``postgres://...``:
      :class:`~felix.control.stores.postgres.PostgresStore` (the URL is the asyncpg DSN).

    ``feed_retention`` is how many changes the feed keeps; ``max_children`` how many
    resources one parent may hold (more: Overloaded). Raises ConfigError for an
    unknown scheme or an empty path, or a backend whose extra is not installed.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "sqlite", url
    scheme = scheme.lower()
    if scheme == "memory":
        if rest:
            raise ConfigError(f"memory:// takes no path, got {redact_dsn(url)!r}")
        return MemoryStore(feed_retention=feed_retention, max_children=max_children)
    if scheme == "sqlite":
        # Imported here so a memory- or PostgreSQL-only process never loads aiosqlite.
        require_extra("server", "the SQLite store")
        from felix.control.stores.sqlite import SQLiteStore

        path = rest.removeprefix("/") if sep else rest
        if not path:
            raise ConfigError(f"no database file in {redact_dsn(url)!r}")
        return SQLiteStore(path, feed_retention=feed_retention, max_children=max_children)
    if scheme in ("postgresql", "postgres"):
        require_extra("postgres", "the PostgreSQL store")
        from felix.control.stores.postgres import PostgresStore

        return PostgresStore(url, feed_retention=feed_retention, max_children=max_children)
    raise ConfigError(f"unknown store URL scheme {scheme!r} in {redact_dsn(url)!r}")
