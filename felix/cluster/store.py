"""The cluster's tables in PostgreSQL: members, leases, shard owners (asyncpg).

How it works (docs/architecture.md, "Cluster"):

- **One statement per change, checking what it expects.** A renewal names the
  node's incarnation and requires an unexpired lease; a shard move names the epoch it
  was planned on (compare-and-swap). So two placers, or a placer racing an owner that
  completes a handoff, can never both win, and every decision about time is taken on
  the database's clock (``now()``) inside the statement that acts on it.
- **Changes NOTIFY** channel :data:`CHANNEL` in the same statement, delivered at commit.
  :meth:`ClusterStore.wait_change` LISTENs; callers also re-read every poll interval,
  as a notification is lost while the listening connection reconnects, and a node's
  death writes nothing at all. Renewals do not notify: they change nobody's decisions.
- **Every call is bounded** by ``timeout`` (acquiring a connection included), and a
  connection that timed out or failed is terminated, never reused or closed politely,
  so a hung database cannot stall the renew loop past the node's fence. Failures
  surface as :class:`~felix.errors.ClusterUnavailable`.
- **The placer lock** is a session advisory lock on a connection of its own: it lasts
  exactly as long as that session, so a placer that dies or is cut off loses it. A
  placer that is merely frozen (SIGSTOP, a stalled VM) keeps its TCP connection, and
  the server would hold the lock for it forever: so the session is opened with
  ``idle_session_timeout`` (``placer_idle``, the lease's length), which a working
  placer never reaches (it uses the session every poll) and a frozen one does, and the
  placer's moves run on that same session (:meth:`ClusterStore.place`): once the
  server has ended it, a placer waking up with an old view cannot move anything.
- **Schema versions** are recorded in ``felix_cluster_schema`` (apart from the control
  store's migrations: the two may share a database) and applied, with the meta row and
  the shard rows, in one transaction under a transaction-level advisory lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from felix.cluster.ownership import MAX_LOGICAL_SHARDS, ClusterNode, OwnershipMap, ShardState
from felix.cluster.placement import Move
from felix.errors import (
    ClusterMismatch,
    ClusterUnavailable,
    ConfigError,
    FelixError,
    NodeIdInUse,
)
from felix.pgschema import apply_migrations

__all__ = [
    "CHANNEL",
    "MIGRATIONS",
    "PLACER_LOCK",
    "ClusterStore",
    "ClusterView",
    "forget_node",
    "move_shard",
    "unpin_shards",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Channel every write NOTIFYs and :meth:`ClusterStore.wait_change` LISTENs on.
CHANNEL = "felix_cluster"
#: Session advisory lock of the placer ("fxplacer" in ASCII).
PLACER_LOCK = int.from_bytes(b"fxplacer", "big")
#: Transaction advisory lock serializing schema set-up ("fxclschm").
SCHEMA_LOCK = int.from_bytes(b"fxclschm", "big")

#: Errors that mean "the database did not do it" (unreachable, cut, timed out, refused).
#: InternalClientError: asyncpg's state machine after a session the server ended mid-way.
_DB_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

#: Schema versions in order: (version, description, statements). Never edit a released
#: entry; add a new one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "cluster meta, nodes and shards",
        [
            """CREATE TABLE felix_cluster_meta (
                id integer PRIMARY KEY CHECK (id = 1),
                logical_shards integer NOT NULL CHECK (logical_shards > 0),
                region text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            )""",
            """CREATE TABLE felix_cluster_nodes (
                node_id text PRIMARY KEY,
                incarnation bigint NOT NULL,
                address text NOT NULL,
                health_url text NOT NULL,
                region text NOT NULL,
                started_at timestamptz NOT NULL,
                lease_until timestamptz NOT NULL,
                renewed_at timestamptz NOT NULL,
                durable_shards integer[] NOT NULL DEFAULT '{}',
                leaving boolean NOT NULL DEFAULT false
            )""",
            """CREATE TABLE felix_cluster_shards (
                shard integer PRIMARY KEY,
                owner text,
                epoch bigint NOT NULL DEFAULT 0,
                handoff_to text,
                durable_node text,
                changed_at timestamptz NOT NULL DEFAULT now()
            )""",
            # Incarnations from one sequence: unique across the cluster's life, so a
            # renewal can never be mistaken for another process's (even after a row is
            # replaced).
            "CREATE SEQUENCE felix_cluster_incarnations",
        ],
    ),
    (
        2,
        "the data dir a node id's durable data lives in",
        ["ALTER TABLE felix_cluster_nodes ADD COLUMN data_id text NOT NULL DEFAULT ''"],
    ),
    (
        3,
        "the lease every node runs with",
        # NULL until a node registers: the first one records its --cluster-lease (in a
        # cluster created before this version, the first node started after the upgrade).
        ["ALTER TABLE felix_cluster_meta ADD COLUMN lease_seconds double precision"],
    ),
    (
        4,
        "nodes holding a stale copy of a shard's durable data",
        # A node the shard was moved (or unpinned) away from keeps its old records: it
        # may not be given the shard again by `felix cluster move` until its reports
        # show the copy gone (its renewals clear it).
        [
            "ALTER TABLE felix_cluster_shards ADD COLUMN stale_nodes text[] NOT NULL DEFAULT '{}'",
            # A cluster upgraded with such copies: the nodes reporting durable records of
            # a shard pinned elsewhere (or unpinned) hold stale ones.
            """UPDATE felix_cluster_shards s SET stale_nodes = ARRAY(
                SELECT n.node_id FROM felix_cluster_nodes n
                WHERE s.shard = ANY(n.durable_shards)
                    AND n.node_id IS DISTINCT FROM s.durable_node ORDER BY n.node_id)""",
        ],
    ),
    (
        5,
        "where a node's imported shards came from",
        # shard (text) -> [source node id, source data id], from the node's
        # DATA_DIR/cluster-imports records: felix cluster move checks the copy it gives a
        # shard came from the node the shard is pinned to.
        ["ALTER TABLE felix_cluster_nodes ADD COLUMN imports jsonb NOT NULL DEFAULT '{}'"],
    ),
]

#: ``stale_nodes`` with the shard's durable node added (a move or unpin takes the shard
#: from it: the records it keeps are a stale copy from then on).
_STALE_ADD = """CASE WHEN s.durable_node IS NULL OR s.durable_node = ANY(s.stale_nodes)
    THEN s.stale_nodes ELSE array_append(s.stale_nodes, s.durable_node) END"""
#: An unpin's owner and epoch: a shard still owned by the (dead) node it was pinned to
#: loses that owner (a new epoch), else the node would serve its stale copy as soon as
#: it came back; the placer then gives it to a node holding no copy.
_UNPIN_OWNER = """owner = CASE WHEN s.owner = s.durable_node THEN NULL ELSE s.owner END,
    epoch = CASE WHEN s.owner = s.durable_node THEN s.epoch + 1 ELSE s.epoch END"""

# A node is live while ``lease_until + grace > now()`` ($grace in seconds).
_LIVE = "n.lease_until + make_interval(secs => {grace}) > now()"
_OWNER_DEAD = (
    "NOT EXISTS (SELECT 1 FROM felix_cluster_nodes n WHERE n.node_id = s.owner AND "
    + _LIVE.format(grace="$4")
    + ")"
)
_TARGET_LIVE = (
    "EXISTS (SELECT 1 FROM felix_cluster_nodes n WHERE n.node_id = $3 AND "
    + _LIVE.format(grace="$4")
    + ")"
)

# Shard moves: $1 shard, $2 expected epoch, $3 target, $4 placer grace. Each returns a row
# (and notifies) only if it changed the shard.
_MOVES = {
    # Only from a dead (or no) owner, on the database's clock at this very statement: a
    # placer that read an older view can never take a shard from a node alive again.
    "assign": f"""UPDATE felix_cluster_shards s SET owner = $3, epoch = s.epoch + 1,
            handoff_to = NULL, changed_at = now()
        WHERE s.shard = $1 AND s.epoch = $2 AND {_OWNER_DEAD} AND {_TARGET_LIVE}
            AND (s.durable_node IS NULL OR s.durable_node = $3)
            AND NOT ($3 = ANY(s.stale_nodes))""",
    "handoff": f"""UPDATE felix_cluster_shards s SET handoff_to = $3, changed_at = now()
        WHERE s.shard = $1 AND s.epoch = $2 AND s.handoff_to IS NULL
            AND s.owner IS DISTINCT FROM $3 AND {_TARGET_LIVE}
            AND (s.durable_node IS NULL OR s.durable_node = $3)
            AND NOT ($3 = ANY(s.stale_nodes))""",
    "clear_handoff": """UPDATE felix_cluster_shards s SET handoff_to = NULL, changed_at = now()
        WHERE s.shard = $1 AND s.epoch = $2 AND s.handoff_to IS NOT NULL
            AND ($3::text IS NULL OR s.handoff_to = $3) AND $4::float8 IS NOT NULL""",
}


def _notifying(statement: str, payload: str) -> str:
    """``statement`` (an UPDATE/INSERT) that also NOTIFYs, once per row it changed."""
    return (
        f"WITH changed AS ({statement} RETURNING *) "
        f"SELECT changed.*, pg_notify('{CHANNEL}', {payload}) FROM changed"
    )


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The cluster's tables as one transaction saw them."""

    logical_shards: int
    region: str
    #: The database's clock at the read (Unix seconds; shown, never compared locally).
    db_now: float
    #: Every node row, by node id; ``live`` per the placer's grace.
    nodes: tuple[ClusterNode, ...]
    #: Indexed by logical shard.
    shards: tuple[ShardState, ...]
    #: node id -> the logical shards it reported durable records for.
    durable_shards: Mapping[str, tuple[int, ...]]
    #: Nodes that left on purpose.
    leaving: frozenset[str]
    #: logical shard -> nodes holding a stale copy of its durable records (moved or
    #: unpinned away from them): never placed there.
    stale: Mapping[int, frozenset[str]] = field(default_factory=dict)

    @property
    def live(self) -> frozenset[str]:
        return frozenset(n.node_id for n in self.nodes if n.live)

    def ownership(self, node_id: str, version: int, serve_until: float) -> OwnershipMap:
        """The map ``node_id``'s gateways check requests against."""
        return OwnershipMap(
            version=version,
            node_id=node_id,
            logical_shards=self.logical_shards,
            serve_until=serve_until,
            nodes=self.nodes,
            shards=self.shards,
        )


class ClusterStore:
    """The cluster tables of the database ``dsn`` names; use :meth:`open`."""

    def __init__(
        self,
        dsn: str,
        *,
        logical_shards: int,
        region: str,
        placer_grace: float = 2.0,
        timeout: float = 2.0,
        application_name: str = "felix-cluster",
        placer_idle: float = 10.0,
        lease: float | None = None,
    ) -> None:
        if not 1 <= logical_shards <= MAX_LOGICAL_SHARDS:
            raise ConfigError(
                f"logical shards must be between 1 and {MAX_LOGICAL_SHARDS}, not {logical_shards}"
            )
        self.dsn = dsn
        self.logical_shards = logical_shards
        self.region = region
        self.placer_grace = placer_grace
        #: The lease (seconds) this node runs with, checked against the cluster's at every
        #: registration (None: not checked nor recorded; an inspector, a test).
        self.lease = lease
        #: Bound of every call, in seconds.
        self.timeout = timeout
        self._settings = {"application_name": application_name}
        #: The lock's session ends after this many idle seconds (a frozen placer's does).
        self._placer_idle_ms = max(1, round(placer_idle * 1000))
        self._warned_lock: str | None = None
        self._lock_use = asyncio.Lock()
        self._pool: Any = None
        self._listener: Any = None
        self._changed = asyncio.Event()
        self._lock_conn: Any = None
        self._placer_held = False
        #: Times the placer lock was lost after being held (its session ended).
        self.placer_losses = 0

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        logical_shards: int,
        region: str,
        placer_grace: float = 2.0,
        timeout: float = 2.0,
        application_name: str = "felix-cluster",
        placer_idle: float = 10.0,
        lease: float | None = None,
    ) -> ClusterStore:
        """Connect, create the tables and rows on first use, and check that the cluster
        was created with this ``logical_shards`` and ``region`` (else ClusterMismatch).
        ClusterUnavailable if the database cannot be reached within ``timeout``."""
        store = cls(
            dsn,
            logical_shards=logical_shards,
            region=region,
            placer_grace=placer_grace,
            timeout=timeout,
            application_name=application_name,
            placer_idle=placer_idle,
            lease=lease,
        )
        try:
            store._pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    dsn,
                    # No floor: the pool would re-dial a dead database in the background
                    # and log each failure; connections are made when a call needs one.
                    min_size=0,
                    max_size=4,
                    timeout=timeout,
                    server_settings=store._settings,
                ),
                timeout,
            )
        except _DB_ERRORS as exc:
            raise ClusterUnavailable(f"cannot connect to the cluster database: {exc!r}") from exc
        try:
            await store._call("set up the cluster tables", store._set_up, timeout=timeout * 5)
        except BaseException:
            await store.terminate()
            raise
        await store._listen()
        return store

    async def close(self) -> None:
        """Release the placer lock and close every connection (idempotent)."""
        pool, listener, lock_conn = self._pool, self._listener, self._lock_conn
        self._pool = self._listener = self._lock_conn = None
        self._placer_held = False
        for conn in (listener, lock_conn):
            if conn is not None:
                await _close(conn, self.timeout)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.timeout)
            except _DB_ERRORS:
                pool.terminate()
        self._changed.set()

    async def terminate(self) -> None:
        """Drop every connection at once, as a crash would (the placer lock goes with it)."""
        pool, listener, lock_conn = self._pool, self._listener, self._lock_conn
        self._pool = self._listener = self._lock_conn = None
        self._placer_held = False
        for conn in (listener, lock_conn):
            if conn is not None:
                conn.terminate()
        if pool is not None:
            pool.terminate()
        self._changed.set()

    # --- membership ---------------------------------------------------------------

    async def register(
        self, node_id: str, address: str, health_url: str, ttl: float, data_id: str = ""
    ) -> int:
        """Take ``node_id`` with a fresh incarnation and a lease of ``ttl`` seconds; the
        incarnation. A row whose lease has run out is replaced (the same pod after a
        restart, or another process after a node left); NodeIdInUse if another
        incarnation's lease is still live.

        ``data_id`` names the node's data dir. Shards are pinned to a node id because its
        durable records are in its data dir: a node coming back under that id with
        another data dir (a fresh volume, another host) would serve those shards empty
        and issue their offsets again, so it is refused (ClusterMismatch) while shards
        are pinned to the id (``felix cluster forget`` gives them up).

        With the store's ``lease`` set, the node is refused (ClusterMismatch) when the
        cluster runs with another lease: :meth:`_check_lease`."""

        async def op(conn: Any) -> int:
            if self.lease is None:
                return await registered(conn)
            # The lease check locks the meta row until the node's row is written. (now()
            # is then the transaction's start: a lease_until a little earlier, never later,
            # than the node's own fence assumes.)
            async with conn.transaction():
                await self._check_lease(conn, node_id, self.lease)
                return await registered(conn)

        async def registered(conn: Any) -> int:
            if data_id:
                await self._check_data_id(conn, node_id, data_id)
            # Two live nodes advertising one address would send clients in circles (each
            # redirect to "the owner" lands on the same place): refused, named.
            other = await conn.fetchval(
                "SELECT node_id FROM felix_cluster_nodes WHERE address = $1 AND node_id <> $2"
                " AND lease_until > now()",
                address,
                node_id,
            )
            if other is not None:
                raise ClusterMismatch(
                    f"node {other} already advertises {address} in this cluster: give each "
                    "node its own --advertise address"
                )
            statement = _notifying(
                """INSERT INTO felix_cluster_nodes AS n (node_id, incarnation, address,
                    health_url, region, started_at, lease_until, renewed_at, durable_shards,
                    leaving, data_id)
                VALUES ($1, nextval('felix_cluster_incarnations'), $2, $3, $4, now(),
                    now() + make_interval(secs => $5), now(), '{}', false, $6)
                ON CONFLICT (node_id) DO UPDATE SET incarnation = EXCLUDED.incarnation,
                    address = EXCLUDED.address, health_url = EXCLUDED.health_url,
                    region = EXCLUDED.region, started_at = EXCLUDED.started_at,
                    lease_until = EXCLUDED.lease_until, renewed_at = EXCLUDED.renewed_at,
                    durable_shards = EXCLUDED.durable_shards, leaving = false,
                    data_id = CASE WHEN EXCLUDED.data_id = '' THEN n.data_id
                        ELSE EXCLUDED.data_id END
                WHERE n.lease_until <= now()""",
                "'register ' || changed.node_id",
            )
            row = await conn.fetchrow(
                statement, node_id, address, health_url, self.region, ttl, data_id
            )
            if row is not None:
                return int(row["incarnation"])
            left = await conn.fetchval(
                "SELECT extract(epoch FROM lease_until - now())::float8"
                " FROM felix_cluster_nodes WHERE node_id = $1",
                node_id,
            )
            raise NodeIdInUse(node_id, max(0.0, float(left or 0.0)))

        return await self._call(f"register node {node_id}", op)

    @staticmethod
    async def _check_lease(conn: Any, node_id: str, lease: float) -> None:
        """Record ``lease`` as the cluster's, or refuse it (ClusterMismatch).

        Nodes must agree on the lease: a placer judges whether another node still renews
        by its own lease (agent.py, ``_renewing_lately``), so a node renewing less often
        than the placer's lease could be presumed dead while it still serves. The meta row
        is locked, so registrations are serialized and two nodes starting together with
        different leases cannot both be accepted. The lease recorded is changed only while
        no other node is live (the whole cluster was stopped to change it). While none was
        recorded yet (a cluster created by an older felix), the live nodes' own leases
        (``lease_until - renewed_at`` of their rows) are compared instead."""
        recorded = await conn.fetchval(
            "SELECT lease_seconds FROM felix_cluster_meta WHERE id = 1 FOR UPDATE"
        )
        if recorded is not None and abs(recorded - lease) < 1e-6:
            return
        others = await conn.fetch(
            "SELECT node_id, extract(epoch FROM lease_until - renewed_at)::float8 AS lease"
            " FROM felix_cluster_nodes WHERE node_id <> $1 AND NOT leaving"
            " AND lease_until > now() ORDER BY node_id",
            node_id,
        )
        if recorded is not None and others:
            raise ClusterMismatch(
                f"the cluster in this database runs with a {recorded:g}s lease; this node "
                f"was started with {lease:g}s (every node uses the same lease: pass "
                f"--cluster-lease {recorded:g}s, or stop every node to change it; "
                f"live: {', '.join(r['node_id'] for r in others[:5])})"
            )
        if recorded is None:
            for other in others:
                if abs(other["lease"] - lease) >= 1e-3:
                    raise ClusterMismatch(
                        f"node {other['node_id']} of this cluster runs with a "
                        f"{other['lease']:g}s lease; this node was started with {lease:g}s "
                        f"(every node uses the same lease: pass --cluster-lease "
                        f"{other['lease']:g}s)"
                    )
        else:
            log.warning(
                "the cluster's lease changes from %gs to %gs (no other node is live)",
                recorded,
                lease,
            )
        await conn.execute("UPDATE felix_cluster_meta SET lease_seconds = $1 WHERE id = 1", lease)

    @staticmethod
    async def _check_data_id(conn: Any, node_id: str, data_id: str) -> None:
        """ClusterMismatch if ``node_id`` was registered from another data dir and shards
        are pinned to the durable records that one holds."""
        before = await conn.fetchval(
            "SELECT data_id FROM felix_cluster_nodes WHERE node_id = $1", node_id
        )
        if not before or before == data_id:
            return
        pinned = [
            int(r["shard"])
            for r in await conn.fetch(
                "SELECT shard FROM felix_cluster_shards WHERE durable_node = $1 ORDER BY shard",
                node_id,
            )
        ]
        if pinned:
            listed = ", ".join(map(str, pinned[:20])) + (" ..." if len(pinned) > 20 else "")
            raise ClusterMismatch(
                f"node {node_id} holds the durable data of logical shards {listed} in "
                f"another data dir (data id {before[:8]}, this one is {data_id[:8]}): start it "
                f"with that data dir, or give those shards up (felix cluster forget {node_id})"
            )

    async def renew(
        self,
        node_id: str,
        incarnation: int,
        ttl: float,
        durable_shards: list[int],
        imports: Mapping[int, tuple[str, str]] | None = None,
    ) -> bool:
        """Extend this incarnation's lease to ``now() + ttl`` and record the shards it
        holds durable data for (and, given ``imports``, where the shards an operator
        imported came from: source node id and data id); False if the lease was gone
        (expired, taken, or left): the node must stop serving and re-register."""
        recorded = (
            None
            if imports is None
            else json.dumps({str(shard): list(src) for shard, src in sorted(imports.items())})
        )

        async def op(conn: Any) -> bool:
            # A node whose report no longer holds a shard it had a stale copy of (removed
            # by its operator) may be given that shard again (felix cluster move).
            renewed = await conn.fetchval(
                """WITH renewed AS (
                    UPDATE felix_cluster_nodes SET
                        lease_until = now() + make_interval(secs => $3),
                        renewed_at = now(), durable_shards = $4,
                        imports = COALESCE($5::jsonb, imports)
                    WHERE node_id = $1 AND incarnation = $2 AND lease_until > now()
                        AND NOT leaving
                    RETURNING node_id
                ), cleared AS (
                    UPDATE felix_cluster_shards SET stale_nodes = array_remove(stale_nodes, $1)
                    WHERE $1 = ANY(stale_nodes) AND NOT (shard = ANY($4::int[]))
                        AND EXISTS (SELECT 1 FROM renewed)
                )
                SELECT count(*) FROM renewed""",
                node_id,
                incarnation,
                ttl,
                sorted(durable_shards),
                recorded,
            )
            return bool(renewed == 1)

        return await self._call(f"renew node {node_id}'s lease", op)

    async def leave(self, node_id: str, incarnation: int) -> bool:
        """End this incarnation's lease now and past the placer's grace, so its shards
        move at once; False if it was not this incarnation's any more."""

        async def op(conn: Any) -> bool:
            row = await conn.fetchrow(
                _notifying(
                    """UPDATE felix_cluster_nodes SET leaving = true,
                        lease_until = now() - make_interval(secs => $3)
                    WHERE node_id = $1 AND incarnation = $2""",
                    "'leave ' || changed.node_id",
                ),
                node_id,
                incarnation,
                # One second beyond the grace: the placer compares with ">".
                self.placer_grace + 1.0,
            )
            return row is not None

        return await self._call(f"leave for node {node_id}", op)

    # --- reading --------------------------------------------------------------------

    async def view(self, placer_grace: float | None = None) -> ClusterView:
        """Nodes and shards as one snapshot; a node is live while its lease plus
        ``placer_grace`` (default: the store's) has not passed on the database's clock."""
        grace = self.placer_grace if placer_grace is None else placer_grace

        async def op(conn: Any) -> ClusterView:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                meta = await conn.fetchrow(
                    "SELECT logical_shards, region, extract(epoch FROM now())::float8 AS now"
                    " FROM felix_cluster_meta WHERE id = 1"
                )
                nodes = await conn.fetch(
                    "SELECT node_id, address, health_url, incarnation, durable_shards, leaving,"
                    " extract(epoch FROM lease_until)::float8 AS lease_until, "
                    + _LIVE.format(grace="$1")
                    + " AS live FROM felix_cluster_nodes n ORDER BY node_id",
                    grace,
                )
                shards = await conn.fetch(
                    "SELECT owner, epoch, handoff_to, durable_node, stale_nodes"
                    " FROM felix_cluster_shards ORDER BY shard"
                )
            return ClusterView(
                logical_shards=meta["logical_shards"],
                region=meta["region"],
                db_now=meta["now"],
                nodes=tuple(
                    ClusterNode(
                        node_id=r["node_id"],
                        address=r["address"],
                        health_url=r["health_url"],
                        live=r["live"],
                        incarnation=r["incarnation"],
                        lease_until=r["lease_until"],
                    )
                    for r in nodes
                ),
                shards=tuple(
                    ShardState(r["owner"], r["epoch"], r["handoff_to"], r["durable_node"])
                    for r in shards
                ),
                durable_shards={r["node_id"]: tuple(r["durable_shards"]) for r in nodes},
                leaving=frozenset(r["node_id"] for r in nodes if r["leaving"]),
                stale={
                    i: frozenset(r["stale_nodes"]) for i, r in enumerate(shards) if r["stale_nodes"]
                },
            )

        return await self._call("read the cluster", op)

    # --- shard moves ----------------------------------------------------------------

    async def apply(self, move: Move) -> bool:
        """Apply one of the placer's moves if the shard's epoch is still the expected one
        (and, for an assign, its owner is dead and the target live; for a handoff, the
        target live and no other handoff pending); whether it did."""
        statement = _notifying(_MOVES[move.kind], f"'{move.kind} ' || changed.shard")

        async def op(conn: Any) -> bool:
            row = await conn.fetchrow(
                statement, move.shard, move.expected_epoch, move.to, self.placer_grace
            )
            return row is not None

        return await self._call(f"{move.kind} shard {move.shard}", op)

    async def place(self, move: Move) -> bool:
        """:meth:`apply` as the placer: on the session that holds the placer lock, so the
        move can only happen while that session (and with it the lock) still exists; False
        when this process does not hold the lock (or lost it on the way)."""
        statement = _notifying(_MOVES[move.kind], f"'{move.kind} ' || changed.shard")
        rows = await self._as_placer(
            f"moving shard {move.shard}",
            statement,
            move.shard,
            move.expected_epoch,
            move.to,
            self.placer_grace,
        )
        return bool(rows)

    async def expire_nodes(self, node_ids: Collection[str], after: float) -> list[str]:
        """As the placer (:meth:`place`), delete the rows of ``node_ids`` whose lease ended
        more than ``after`` seconds ago (database clock) and that hold nothing: no shard
        pinned to their durable data, owned, or being handed to them. One statement that
        checks all of it, so a node registering again meanwhile (a fresh lease) or pinned
        meanwhile is kept. The node ids removed."""
        rows = await self._as_placer(
            "removing expired node rows",
            _notifying(
                """DELETE FROM felix_cluster_nodes n
                WHERE n.node_id = ANY($1::text[])
                    AND n.lease_until + make_interval(secs => $2) < now()
                    AND NOT EXISTS (SELECT 1 FROM felix_cluster_shards s
                        WHERE s.durable_node = n.node_id OR s.owner = n.node_id
                            OR s.handoff_to = n.node_id)""",
                "'expire ' || changed.node_id",
            ),
            sorted(node_ids),
            after,
        )
        return sorted(str(r["node_id"]) for r in rows)

    async def _as_placer(self, what: str, statement: str, *args: Any) -> list[Any]:
        """Run ``statement`` on the session that holds the placer lock; its rows ([] when
        this process does not hold the lock, or lost it on the way)."""
        if not self.held():
            return []
        try:
            async with asyncio.timeout(self.timeout), self._lock_use:
                conn = self._lock_conn
                if conn is None or conn.is_closed():
                    return []
                rows: list[Any] = await conn.fetch(statement, *args)
        except _DB_ERRORS as exc:
            log.warning("lost the cluster placer lock while %s: %r", what, exc)
            self._drop_lock_conn()
            return []
        return rows

    async def complete_handoff(
        self, shard: int, expected_epoch: int, from_node: str, to_node: str
    ) -> bool:
        """The owner ``from_node`` hands ``shard`` to ``to_node`` (epoch + 1), if nothing
        changed since it drained the shard, and the shard is not pinned to other durable
        data (a durable claim wins over a handoff in flight)."""

        async def op(conn: Any) -> bool:
            row = await conn.fetchrow(
                _notifying(
                    """UPDATE felix_cluster_shards s SET owner = $4, epoch = s.epoch + 1,
                        handoff_to = NULL, changed_at = now()
                    WHERE s.shard = $1 AND s.epoch = $2 AND s.owner = $3
                        AND s.handoff_to = $4
                        AND (s.durable_node IS NULL OR s.durable_node = $4)""",
                    "'handoff done ' || changed.shard",
                ),
                shard,
                expected_epoch,
                from_node,
                to_node,
            )
            return row is not None

        return await self._call(f"complete the handoff of shard {shard}", op)

    async def claim_durable(self, shard: int, node_id: str) -> bool:
        """Pin ``shard`` to ``node_id``, which owns it and holds durable records for it,
        unless it is pinned already; whether it did."""

        async def op(conn: Any) -> bool:
            row = await conn.fetchrow(
                _notifying(
                    """UPDATE felix_cluster_shards s SET durable_node = $2, changed_at = now()
                    WHERE s.shard = $1 AND s.durable_node IS NULL AND s.owner = $2
                        AND NOT ($2 = ANY(s.stale_nodes))
                        AND EXISTS (SELECT 1 FROM felix_cluster_nodes n
                            WHERE n.node_id = $2 AND n.lease_until > now())""",
                    "'durable ' || changed.shard",
                ),
                shard,
                node_id,
            )
            return row is not None

        return await self._call(f"pin shard {shard} to its durable data", op)

    # --- the placer lock --------------------------------------------------------------

    async def placer_lock(self) -> bool:
        """Try to be the placer (or check that this process still is); whether it is.

        The lock is held by a connection of its own. While held, every call checks that
        the session is still alive (a round trip): a session the server ended took the
        lock with it, and the next holder may already be placing.
        """
        try:
            async with asyncio.timeout(self.timeout), self._lock_use:
                if self._lock_conn is None or self._lock_conn.is_closed():
                    self._drop_lock_conn()
                    self._lock_conn = await asyncpg.connect(
                        self.dsn, timeout=self.timeout, server_settings=self._settings
                    )
                    self._lock_conn.add_termination_listener(self._lock_conn_ended)
                    if self._lock_conn.get_server_version().major >= 14:
                        # PostgreSQL 14+: the server ends the session of a frozen placer.
                        # Older servers only notice a dead peer through TCP keepalives.
                        await self._lock_conn.execute(
                            f"SET idle_session_timeout = {self._placer_idle_ms}"
                        )
                if self._placer_held:
                    await self._lock_conn.fetchval("SELECT 1")
                else:
                    self._placer_held = bool(
                        await self._lock_conn.fetchval(
                            "SELECT pg_try_advisory_lock($1)", PLACER_LOCK
                        )
                    )
        except _DB_ERRORS as exc:
            if self._placer_held:
                log.warning("lost the cluster placer lock: %r", exc)
            elif self._warned_lock != type(exc).__name__:
                # Once per kind of failure: a node that can never be the placer says why.
                self._warned_lock = type(exc).__name__
                log.warning("cannot try the cluster placer lock: %r", exc)
            self._drop_lock_conn()
            return False
        self._warned_lock = None
        return self._placer_held

    def held(self) -> bool:
        """Whether this process holds the placer lock, as far as it knows (its session
        has not visibly ended; :meth:`placer_lock` checks with a round trip)."""
        return self._placer_held and self._lock_conn is not None and not self._lock_conn.is_closed()

    async def release_placer(self) -> None:
        """Give the placer lock up (by ending its session)."""
        conn, self._lock_conn = self._lock_conn, None
        self._placer_held = False
        if conn is not None:
            await _close(conn, self.timeout)

    def _lock_conn_ended(self, conn: Any) -> None:
        if conn is self._lock_conn:
            self._drop_lock_conn()

    def _drop_lock_conn(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if self._placer_held:
            self.placer_losses += 1
        self._placer_held = False
        if conn is not None and not conn.is_closed():
            conn.terminate()

    # --- changes ----------------------------------------------------------------------

    async def wait_change(self, timeout: float) -> bool:
        """Return True once any node's write is notified (or the listener reconnected,
        when notifications may have been missed), False after ``timeout`` seconds."""
        if self._pool is None:  # closed: still a wait, so a caller's loop never spins
            await asyncio.sleep(timeout)
            return False
        if self._listener is None or self._listener.is_closed():
            await self._listen()
            if self._listener is not None:
                return True  # notifications sent while we were not listening are lost
        # Not cleared before waiting: a notification that came since the last call (while
        # the caller was reading) must wake this one.
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection; on failure callers fall back to polling."""
        if self._listener is not None:
            self._listener.terminate()
            self._listener = None
        listener = None
        try:
            async with asyncio.timeout(self.timeout):
                listener = await asyncpg.connect(
                    self.dsn, timeout=self.timeout, server_settings=self._settings
                )
                await listener.add_listener(CHANNEL, self._on_notification)
        except _DB_ERRORS as exc:
            log.debug("cannot LISTEN for cluster changes (polling instead): %r", exc)
            if listener is not None:
                listener.terminate()
            return
        if self._pool is None:  # closed while connecting
            listener.terminate()
            return
        listener.add_termination_listener(lambda _conn: self._changed.set())
        self._listener = listener

    def wake(self) -> None:
        """Wake :meth:`wait_change` as a notification would (this process changed
        something it wants re-read at once)."""
        self._changed.set()

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._changed.set()

    # --- plumbing -----------------------------------------------------------------------

    async def _call(
        self, what: str, op: Callable[[Any], Awaitable[T]], *, timeout: float | None = None
    ) -> T:
        """Run ``op`` on a pooled connection within the timeout; database failures as
        ClusterUnavailable (felix's own errors, such as NodeIdInUse, pass through)."""
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                async with self._connection() as conn:
                    return await op(conn)
        except _DB_ERRORS as exc:
            raise ClusterUnavailable(f"cluster database: cannot {what}: {exc!r}") from exc

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise ClusterUnavailable("the cluster store is closed")
        pool = self._pool
        conn = await pool.acquire()
        try:
            yield conn
        except FelixError:  # an answer (NodeIdInUse...): the connection is fine
            await pool.release(conn)
            raise
        except BaseException:
            # Its state is unknown (cancelled mid-query, cut, hung): a polite release would
            # wait on it. Terminated, the pool replaces it.
            conn.terminate()
            await pool.release(conn)
            raise
        await pool.release(conn)

    async def _set_up(self, conn: Any) -> None:
        async with conn.transaction():
            # The lock is held to the commit: a second node blocks here, then sees
            # everything done (the meta row below included).
            await apply_migrations(
                conn,
                table="felix_cluster_schema",
                lock=SCHEMA_LOCK,
                migrations=MIGRATIONS,
                newer=lambda versions: ClusterMismatch(
                    f"the cluster tables have schema versions {versions} that this "
                    "felix does not know: they were written by a newer felix"
                ),
            )
            await conn.execute(
                "INSERT INTO felix_cluster_meta (id, logical_shards, region) VALUES (1, $1, $2)"
                " ON CONFLICT (id) DO NOTHING",
                self.logical_shards,
                self.region,
            )
            meta = await conn.fetchrow(
                "SELECT logical_shards, region FROM felix_cluster_meta WHERE id = 1"
            )
            if meta["logical_shards"] != self.logical_shards:
                raise ClusterMismatch(
                    f"the cluster in this database has {meta['logical_shards']} logical "
                    f"shards; this node was started with {self.logical_shards} (the number "
                    "is fixed when the cluster is created: pass --logical-shards "
                    f"{meta['logical_shards']})"
                )
            if meta["region"] != self.region:
                raise ClusterMismatch(
                    f"the cluster in this database is region {meta['region']!r}; this node "
                    f"is region {self.region!r}"
                )
            await conn.execute(
                "INSERT INTO felix_cluster_shards (shard) SELECT generate_series(0, $1 - 1)"
                " ON CONFLICT (shard) DO NOTHING",
                self.logical_shards,
            )


async def _close(conn: Any, timeout: float) -> None:
    """Close politely within ``timeout``, else drop it."""
    try:
        await conn.close(timeout=timeout)
    except _DB_ERRORS:
        conn.terminate()


# --- operator actions (felix cluster forget / unpin) -------------------------------------


async def forget_node(dsn: str, node_id: str, *, timeout: float = 5.0) -> list[int]:
    """Remove ``node_id``, whose lease has run out, from the cluster for good: its row
    goes, and the shards pinned to its durable data are unpinned, so the placer gives
    them (empty) to live nodes. Its records stay on its disk, out of the cluster. The
    shards unpinned.

    Raises:
        ClusterMismatch: the node is alive (its lease has not run out), or unknown.
        ClusterUnavailable: the database cannot be reached.
    """

    async def op(conn: Any) -> list[int]:
        async with conn.transaction():
            row = await conn.fetchrow(
                "SELECT lease_until > now() AS live FROM felix_cluster_nodes"
                " WHERE node_id = $1 FOR UPDATE",
                node_id,
            )
            if row is None:
                raise ClusterMismatch(f"no node {node_id!r} in this cluster")
            if row["live"]:
                raise ClusterMismatch(
                    f"node {node_id} is alive (its lease has not run out): stop it first"
                )
            shards = await conn.fetch(
                _notifying(
                    f"""UPDATE felix_cluster_shards s SET durable_node = NULL,
                        stale_nodes = {_STALE_ADD}, {_UNPIN_OWNER}, changed_at = now()
                    WHERE s.durable_node = $1""",
                    "'unpin ' || changed.shard",
                ),
                node_id,
            )
            await conn.execute(
                _notifying(
                    "DELETE FROM felix_cluster_nodes n WHERE n.node_id = $1",
                    "'forget ' || changed.node_id",
                ),
                node_id,
            )
            return sorted(int(r["shard"]) for r in shards)

    return await _admin(dsn, f"forget node {node_id}", op, timeout)


async def unpin_shards(dsn: str, shards: list[int], *, timeout: float = 5.0) -> list[int]:
    """Unpin ``shards`` whose durable node's lease has run out (an operator giving up on,
    or having copied, that node's data); the shards unpinned. A shard pinned to a live
    node is left alone (stop the node first)."""

    async def op(conn: Any) -> list[int]:
        rows = await conn.fetch(
            _notifying(
                f"""UPDATE felix_cluster_shards s SET durable_node = NULL,
                    stale_nodes = {_STALE_ADD}, {_UNPIN_OWNER}, changed_at = now()
                WHERE s.shard = ANY($1::int[]) AND s.durable_node IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM felix_cluster_nodes n
                        WHERE n.node_id = s.durable_node AND n.lease_until > now())""",
                "'unpin ' || changed.shard",
            ),
            shards,
        )
        return sorted(int(r["shard"]) for r in rows)

    return await _admin(dsn, "unpin shards", op, timeout)


async def move_shard(
    dsn: str, shard: int, target: str, *, verify_source: bool = True, timeout: float = 5.0
) -> int:
    """Give ``shard``, whose durable data an operator copied to ``target`` (``felix
    cluster export-shard`` / ``import-shard``), to ``target``: owner and durable node
    ``target``, epoch + 1, no handoff; the new epoch.

    One statement, and only when: the node the shard is pinned to (if any) and its
    owner (if any, and not ``target``) are not live (their leases ended: they serve
    nothing), and ``target`` is live and reports the shard among the shards it holds
    durable records for (its data-dir scan found the imported streams), holds no stale
    copy of it, and (``verify_source``) its copy of a pinned shard was imported from the
    data dir of the node the shard is pinned to (its renewals report the records of
    ``DATA_DIR/cluster-imports``: source node id and data id), not from another node's
    copy. The placer keeps a pinned shard with its durable node, so it never moves it
    back.

    Raises:
        ClusterMismatch: a condition does not hold (the message says which).
        ClusterUnavailable: the database cannot be reached.
    """

    async def op(conn: Any) -> int:
        row = await conn.fetchrow(
            _notifying(
                f"""UPDATE felix_cluster_shards s SET owner = $2, durable_node = $2,
                    epoch = s.epoch + 1, handoff_to = NULL, changed_at = now(),
                    stale_nodes = array_remove({_STALE_ADD}, $2)
                WHERE s.shard = $1 AND s.durable_node IS DISTINCT FROM $2
                    AND NOT ($2 = ANY(s.stale_nodes))
                    AND NOT EXISTS (SELECT 1 FROM felix_cluster_nodes n
                        WHERE n.node_id IN (s.durable_node, s.owner) AND n.node_id <> $2
                            AND n.lease_until > now())
                    AND EXISTS (SELECT 1 FROM felix_cluster_nodes n
                        WHERE n.node_id = $2 AND n.lease_until > now()
                            AND $1 = ANY(n.durable_shards))
                    AND (NOT $3 OR s.durable_node IS NULL OR EXISTS (
                        SELECT 1 FROM felix_cluster_nodes t, felix_cluster_nodes p
                        WHERE t.node_id = $2 AND p.node_id = s.durable_node
                            AND t.imports -> ($1::text)
                                = jsonb_build_array(p.node_id, p.data_id)))""",
                "'move ' || changed.shard",
            ),
            shard,
            target,
            verify_source,
        )
        if row is not None:
            return int(row["epoch"])
        raise ClusterMismatch(await _why_not_moved(conn, shard, target))

    return await _admin(dsn, f"move shard {shard} to {target}", op, timeout)


async def _why_not_moved(conn: Any, shard: int, target: str) -> str:
    """Which condition of :func:`move_shard` does not hold (read after it failed)."""
    row = await conn.fetchrow(
        "SELECT owner, durable_node, stale_nodes FROM felix_cluster_shards WHERE shard = $1",
        shard,
    )
    if row is None:
        return f"no logical shard {shard} in this cluster"
    if target in row["stale_nodes"]:
        return (
            f"node {target} holds a stale copy of shard {shard} (the shard was moved or "
            "unpinned away from it; its log says which streams): remove those stream "
            "directories from its data dir and wait until its renewals no longer report "
            "the shard (within a lease; felix cluster status --json shows its "
            "durable_shards), then import a fresh export there and restart it"
        )
    nodes = {
        r["node_id"]: r
        for r in await conn.fetch(
            "SELECT node_id, lease_until > now() AS live, durable_shards, data_id,"
            " imports::text AS imports FROM felix_cluster_nodes WHERE node_id = ANY($1::text[])",
            [n for n in (row["durable_node"], row["owner"], target) if n is not None],
        )
    }
    pinned, owner = row["durable_node"], row["owner"]
    if pinned == target:
        return f"shard {shard} is pinned to {target} already"
    for what, node in (("pinned to", pinned), ("owned by", owner)):
        if node is not None and node != target and node in nodes and nodes[node]["live"]:
            return (
                f"shard {shard} is {what} node {node}, which is alive (its lease has not "
                "ended): stop it first (and export the shard from its data dir)"
            )
    me = nodes.get(target)
    if me is None:
        return f"no node {target!r} in this cluster"
    if not me["live"]:
        return f"node {target} is not live (its lease has ended): start it (after the import)"
    if shard not in me["durable_shards"]:
        return (
            f"node {target} does not report durable records of shard {shard}: import the "
            "shard into its data dir and restart it (it reports them within a lease)"
        )
    if pinned is not None and pinned in nodes:
        source = json.loads(me["imports"]).get(str(shard)) if me["imports"] else None
        want = [pinned, nodes[pinned]["data_id"]]
        if source != want:
            got = (
                "no import record of it (DATA_DIR/cluster-imports)"
                if source is None
                else f"a copy imported from node {source[0]} (data dir {source[1]})"
            )
            return (
                f"node {target} holds {got}, but shard {shard} is pinned to node {pinned} "
                f"(data dir {want[1]}): export the shard from that node's data dir and "
                "import it (or pass --unverified-source if you know the copy is current)"
            )
    return f"shard {shard} changed meanwhile: try again"


async def _admin(dsn: str, what: str, op: Callable[[Any], Awaitable[T]], timeout: float) -> T:
    try:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(dsn, timeout=timeout)
            try:
                return await op(conn)
            finally:
                await _close(conn, timeout)
    except _DB_ERRORS as exc:
        raise ClusterUnavailable(f"cluster database: cannot {what}: {exc!r}") from exc
