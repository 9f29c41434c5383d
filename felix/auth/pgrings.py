"""The tenants' key rings in a cluster's PostgreSQL database (asyncpg).

How it works
------------
One row per tenant in ``felix_key_rings``: the ring (private keys), the JWK set it
published when it was stored, the time it was stored at (``saved_at``: the set is
``ring.jwks(saved_at)``) and a ``version`` that every write increments.

- **One writer per ring.** :meth:`PostgresRingStore.update` reads the row ``FOR
  UPDATE`` and writes it back in the same transaction: a second node's rotator, or a
  ``felix token rotate --cluster``, waits on the row lock (at most ``timeout``,
  ``lock_timeout``) and then sees the ring as the first left it. The rotation's
  decision is taken on that fresh ring (:func:`felix.auth.rotation.apply`), so two
  nodes due at once rotate once, and no key written by one is lost by another.
  Creating a ring is one ``INSERT ... ON CONFLICT`` (``keygen --force``: a replace).
- **Wrapped with the region key, when there is one.** A store given a
  :class:`~felix.keys.kek.KeyEncryptionKey` (``--region-key`` or
  ``$FELIX_REGION_KEY_FILE``, the same file on every node of the region) seals each
  ring it writes: the ring's JSON is encrypted with AES-256-GCM under a fresh random
  data key, which the region key wraps; both are bound to the tenant (associated
  data), and the row records the region key's fingerprint (``kek_id``). A store
  without one writes the ring's JSON as is (``kek_id`` NULL), as the key directory's
  0600 file holds it. Reading a sealed ring needs the region key that sealed it
  (:class:`~felix.errors.KeyUnavailable` names both fingerprints otherwise); the
  public set is never sealed, so any node can verify tokens whatever key it has.
- **Never unsealed over sealed.** A store without a region key refuses to create a
  ring (``keygen``, ``keygen --force``, a node importing its old ring) while any row
  of the table is sealed, so a forgotten ``--region-key`` cannot put a tenant's
  private keys in the clear beside sealed ones; ``allow_unsealed`` (``felix token
  keygen --unsealed``) says it is meant.
- **Schema versions** are numbered (:data:`MIGRATIONS`), recorded in
  ``felix_key_ring_migrations`` and applied on first use in one transaction under a
  transaction-level advisory lock, as the control store's are: the table may sit in
  the same database as the control store's and the cluster's, each with its own
  version table. A store made with ``existing_only`` (``felix token --cluster``) first
  checks that the database is a cluster's (``felix_cluster_meta``) or already holds
  the rings' table, and otherwise refuses (:class:`~felix.errors.ConfigError`) before
  creating anything: a mistyped DSN gets no tables, and rings are not written where
  no node looks.

Every call is bounded by ``timeout`` (connecting included); the database's failures
surface as :class:`~felix.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from felix.auth.keys import TenantKeyRing
from felix.auth.ringstore import Change
from felix.auth.tokens import public_keys_by_kid
from felix.dsn import redact_dsn
from felix.errors import BadRequest, ConfigError, FelixError, KeyUnavailable, NotFound, Unavailable
from felix.extras import require_extra
from felix.keys.kek import KeyEncryptionKey
from felix.names import validate_name
from felix.pgschema import apply_migrations

__all__ = ["MIGRATIONS", "PostgresRingStore", "StoredRing"]

#: Transaction advisory lock serializing schema set-up ("fxkeyrng" in ASCII).
SCHEMA_LOCK = int.from_bytes(b"fxkeyrng", "big")
#: Bound on a ring as stored (the key directory's file has the same).
MAX_RING_BYTES = 1 << 20

#: Schema versions in order: (version, description, statements). Never edit a released
#: entry; add a new one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "tenant key rings",
        [
            """CREATE TABLE felix_key_rings (
                tenant text COLLATE "C" PRIMARY KEY,
                version bigint NOT NULL CHECK (version >= 1),
                ring bytea NOT NULL,
                wrapped_key bytea,
                kek_id text,
                jwks text NOT NULL,
                saved_at double precision NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now(),
                CHECK ((wrapped_key IS NULL) = (kek_id IS NULL))
            )""",
        ],
    ),
]

#: Associated data of a sealed ring and its wrapped data key (with the tenant's name).
_SEAL_CONTEXT = b"felix tenant key ring v1\x00"
_NONCE = 12

_COLUMNS = "tenant, version, ring, wrapped_key, kek_id, jwks, saved_at"


@dataclass(frozen=True, slots=True)
class StoredRing:
    """One tenant's row: its ``version``, the public ``jwks`` stored with it, and the
    ``ring`` (None when it cannot be opened here: ``problem`` says why); ``kek_id``:
    the region key that sealed it (None: unsealed)."""

    tenant: str
    version: int
    jwks: dict[str, Any]
    saved_at: float
    ring: TenantKeyRing | None
    problem: str | None = None
    kek_id: str | None = None


class PostgresRingStore:
    """The rings in the ``felix_key_rings`` table of the database ``dsn`` names.

    ``kek``: the region key that seals the rings this store writes and opens the ones
    it reads (None: rings are written unsealed; sealed ones cannot be read).
    ``allow_unsealed``: without ``kek``, create rings even where the table holds sealed
    ones (module docstring). ``existing_only``: refuse a database that is not a
    cluster's and holds no rings' table, instead of creating the table.
    """

    def __init__(
        self,
        dsn: str,
        *,
        kek: KeyEncryptionKey | None = None,
        timeout: float = 10.0,
        allow_unsealed: bool = False,
        existing_only: bool = False,
    ) -> None:
        require_extra("postgres", "tenant key rings in PostgreSQL")
        self.dsn = dsn
        self.kek = kek
        self.timeout = timeout
        self.allow_unsealed = allow_unsealed
        self.existing_only = existing_only
        self._pool: Any = None
        # The node's mirror and rotator share a store and both connect at start: one pool.
        self._pool_lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return "the cluster's database"

    def __repr__(self) -> str:
        return f"PostgresRingStore({redact_dsn(self.dsn)!r})"

    # -- connections ----------------------------------------------------------------------

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A connection of the pool (made, and the schema set up, on first use); the
        database's failures as Unavailable."""
        import asyncpg

        try:
            if self._pool is None:
                async with self._pool_lock:
                    if self._pool is None:
                        self._pool = await self._connect()
            async with self._pool.acquire(timeout=self.timeout) as conn:
                yield conn
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"the key rings in the cluster's database: {exc!r}") from None

    async def _connect(self) -> Any:
        """A new pool, the schema set up (or, ``existing_only``, the database checked)."""
        import asyncpg

        pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=2,
            timeout=self.timeout,
            command_timeout=self.timeout,
        )
        try:
            async with pool.acquire(timeout=self.timeout) as conn:
                if self.existing_only:
                    await self._check_cluster_database(conn)
                await _migrate(conn)
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def _check_cluster_database(self, conn: Any) -> None:
        cluster, rings = await conn.fetchrow(
            "SELECT to_regclass('felix_cluster_meta') IS NOT NULL,"
            " to_regclass('felix_key_rings') IS NOT NULL"
        )
        if not (cluster or rings):
            raise ConfigError(
                f"{redact_dsn(self.dsn)} is not a felix cluster's database (it has neither "
                "the cluster's tables nor a key ring table): the nodes keep the rings in "
                "their control store, the cluster's database unless --control-store names "
                "another (which holds the rings' table once a node has run there with --auth)"
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    # -- reading ----------------------------------------------------------------------------

    async def versions(self) -> dict[str, Hashable]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT tenant, version FROM felix_key_rings ORDER BY tenant")
        return {r["tenant"]: r["version"] for r in rows}

    async def fetch(self, tenant: str) -> StoredRing | None:
        """The tenant's row (None: no ring); a ring that cannot be opened here (sealed
        by another region key, damaged) has ``ring`` None and the ``problem``.

        Raises:
            ConfigError: the row's public set is not a JWK set (nothing of it is usable).
        """
        validate_name("tenant", tenant)
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM felix_key_rings WHERE tenant = $1", tenant
            )
        if row is None:
            return None
        try:
            ring: TenantKeyRing | None = self._open(row)
            problem = None
        except FelixError as exc:
            ring, problem = None, str(exc)
        jwks = _jwks(row["jwks"], tenant)
        return StoredRing(
            tenant, row["version"], jwks, row["saved_at"], ring, problem, row["kek_id"]
        )

    async def load(self, tenant: str) -> TenantKeyRing:
        validate_name("tenant", tenant)
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM felix_key_rings WHERE tenant = $1", tenant
            )
        if row is None:
            raise NotFound(f"no key ring for tenant {tenant!r} in {self.where}")
        return self._open(row)

    async def jwks(self, tenant: str) -> dict[str, Any] | None:
        validate_name("tenant", tenant)
        async with self._conn() as conn:
            text = await conn.fetchval("SELECT jwks FROM felix_key_rings WHERE tenant = $1", tenant)
        return None if text is None else _jwks(text, tenant)

    async def region(self) -> str | None:
        """The cluster's region (``felix_cluster_meta``), if this database holds a cluster."""
        import asyncpg

        async with self._conn() as conn:
            try:
                value = await conn.fetchval("SELECT region FROM felix_cluster_meta WHERE id = 1")
            except asyncpg.UndefinedTableError:
                return None
        return value if isinstance(value, str) else None

    # -- writing ----------------------------------------------------------------------------

    async def create(self, ring: TenantKeyRing, now: float, *, replace: bool = False) -> bool:
        """Store ``ring`` (the :class:`~felix.auth.ringstore.RingStore` method).

        Raises:
            ConfigError: this store has no region key, ``allow_unsealed`` is not set and
                a ring of the table is sealed (nothing stored).
        """
        values = self._values(ring, now)
        if replace:
            sql = f"""INSERT INTO felix_key_rings ({_COLUMNS}) VALUES ($1, 1, $2, $3, $4, $5, $6)
                ON CONFLICT (tenant) DO UPDATE SET version = felix_key_rings.version + 1,
                    ring = $2, wrapped_key = $3, kek_id = $4, jwks = $5, saved_at = $6,
                    updated_at = now()
                RETURNING tenant"""
        else:
            sql = f"""INSERT INTO felix_key_rings ({_COLUMNS}) VALUES ($1, 1, $2, $3, $4, $5, $6)
                ON CONFLICT (tenant) DO NOTHING RETURNING tenant"""
        async with self._conn() as conn, conn.transaction():
            if self.kek is None and not self.allow_unsealed:
                sealed = await conn.fetchval(
                    "SELECT kek_id FROM felix_key_rings WHERE kek_id IS NOT NULL"
                    " ORDER BY tenant = $1 DESC LIMIT 1",
                    ring.tenant,
                )
                if sealed is not None:
                    raise ConfigError(
                        f"not writing the key ring of {ring.tenant!r} unsealed: the rings in "
                        f"{self.where} are sealed with region key {sealed}; give that key "
                        "(--region-key FILE or $FELIX_REGION_KEY_FILE), or --unsealed if an "
                        "unsealed ring is meant"
                    )
            return await conn.fetchval(sql, ring.tenant, *values) is not None

    async def update(self, tenant: str, change: Change) -> TenantKeyRing:
        validate_name("tenant", tenant)
        async with self._conn() as conn, conn.transaction():
            # Another writer holding the row past this is stuck: fail, try again later.
            await conn.execute(f"SET LOCAL lock_timeout = {int(self.timeout * 1000)}")
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM felix_key_rings WHERE tenant = $1 FOR UPDATE", tenant
            )
            if row is None:
                raise NotFound(f"no key ring for tenant {tenant!r} in {self.where}")
            ring = self._open(row)
            at = change(ring)
            if at is not None:
                await conn.execute(
                    """UPDATE felix_key_rings SET version = version + 1, ring = $2,
                        wrapped_key = $3, kek_id = $4, jwks = $5, saved_at = $6,
                        updated_at = now()
                    WHERE tenant = $1""",
                    tenant,
                    *self._values(ring, at),
                )
        return ring

    # -- sealing ----------------------------------------------------------------------------

    def _values(
        self, ring: TenantKeyRing, now: float
    ) -> tuple[bytes, bytes | None, str | None, str, float]:
        """(ring, wrapped_key, kek_id, jwks, saved_at) of ``ring`` stored at ``now``."""
        data = ring.to_json().encode("utf-8")
        if len(data) > MAX_RING_BYTES:
            raise ConfigError(
                f"the key ring of {ring.tenant!r} is larger than {MAX_RING_BYTES} bytes"
            )
        jwks = json.dumps(ring.jwks(now), sort_keys=True)
        if self.kek is None:
            return data, None, None, jwks, float(now)
        context = _SEAL_CONTEXT + ring.tenant.encode("utf-8")
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        sealed = nonce + AESGCM(data_key).encrypt(nonce, data, context)
        return sealed, self.kek.wrap(data_key, context), self.kek.key_id, jwks, float(now)

    def _open(self, row: Any) -> TenantKeyRing:
        tenant: str = row["tenant"]
        data = bytes(row["ring"])
        kek_id = row["kek_id"]
        if kek_id is not None:
            data = self._unseal(tenant, data, bytes(row["wrapped_key"]), kek_id)
        try:
            ring = TenantKeyRing.from_json(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"the key ring of {tenant!r} in {self.where} is not UTF-8") from None
        except (ConfigError, BadRequest) as exc:
            raise ConfigError(f"the key ring of {tenant!r} in {self.where}: {exc}") from None
        if ring.tenant != tenant:
            raise ConfigError(
                f"the row of tenant {tenant!r} in {self.where} holds the ring of {ring.tenant!r}"
            )
        return ring

    def _unseal(self, tenant: str, sealed: bytes, wrapped: bytes, kek_id: str) -> bytes:
        if self.kek is None:
            raise KeyUnavailable(
                f"the key ring of tenant {tenant!r} is sealed with region key {kek_id}, and "
                "this process has no region key (--region-key FILE or $FELIX_REGION_KEY_FILE)"
            )
        if self.kek.key_id != kek_id:
            raise KeyUnavailable(
                f"the key ring of tenant {tenant!r} is sealed with region key {kek_id}, not "
                f"with this process's {self.kek.key_id} ({self.kek.source}): every node of "
                "the cluster needs the same region key"
            )
        context = _SEAL_CONTEXT + tenant.encode("utf-8")
        data_key = self.kek.unwrap(wrapped, context)
        try:
            return AESGCM(data_key).decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
        except (InvalidTag, ValueError):
            raise KeyUnavailable(
                f"the key ring of tenant {tenant!r} does not decrypt with its data key: altered"
            ) from None


def _jwks(text: str, tenant: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
        public_keys_by_kid(value, strict=True)
    except (ValueError, RecursionError, BadRequest) as exc:
        raise ConfigError(f"the JWK set of {tenant!r} in the cluster's database: {exc}") from None
    assert isinstance(value, dict)  # public_keys_by_kid checked it
    return value


async def _migrate(conn: Any) -> None:
    """Apply the migrations the database lacks, once, even with several processes starting."""

    def newer(versions: list[int]) -> Exception:
        return ConfigError(
            f"the key rings' tables have schema versions {versions} that this felix "
            "does not know: they were written by a newer felix"
        )

    async with conn.transaction():
        await apply_migrations(
            conn,
            table="felix_key_ring_migrations",
            lock=SCHEMA_LOCK,
            migrations=MIGRATIONS,
            newer=newer,
        )
