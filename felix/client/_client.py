"""The client: the API, bounded calls and their timeouts, on top of the pool.

How it works: a call waits for an in-flight slot (``max_in_flight``: at the
bound callers wait, they do not fail), then, within ``request_timeout``, for a
live pooled connection and for its reply. When the connection is lost under a
call it fails with ConnectionLost; only calls that change nothing (``get``,
``ttl``, ``ping``, SUBSCRIBE) are retried, once, on the next live connection.
Connections, reconnects, keepalives and token refresh are the pool's (``_pool``).

Clusters (``_cluster``): once a node answers REDIRECT, requests are routed by their
routing key to the owner's node, over a pool per node address (at most
``MAX_NODES``, with the TLS and token settings of the first); a call follows at most
``MAX_REDIRECTS`` REDIRECTs in a row. Until then nothing of this runs. Only hosts the
host policy (``cluster_hosts``, ``_hosts``) allows are connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

from felix import wire
from felix.client._cache import Cache
from felix.client._cluster import MAX_NODES, Redirected, Router, ShardMap, parse_address
from felix.client._connection import Connection, QuietBatch, R, expect_reply
from felix.client._consumer import Consumer
from felix.client._convert import (
    Endpoint,
    ShmEndpoint,
    StartSpec,
    WireStart,
    resolve_name,
    start_spec,
)
from felix.client._e2e import seal_record
from felix.client._events import ClientEvent, EventFeed, EventHub, EventListener
from felix.client._hosts import HostPolicy
from felix.client._links import PooledMember, PooledSubscription
from felix.client._options import ClientOptions
from felix.client._pool import Pool, PoolSettings
from felix.client._subscription import Subscription
from felix.client._tls import client_configuration
from felix.errors import (
    ClientClosed,
    ConfigError,
    ConnectionLost,
    DuplicatesInBatch,
    FelixError,
    FelixTimeoutError,
    LocalProtocolError,
    Overloaded,
    RemoteProtocolError,
    Unauthenticated,
    Unavailable,
    error_for_code,
)
from felix.names import validate_name
from felix.quic import QuicEngine, load_engine

__all__ = ["BytesLike", "Client", "Durability", "PublishAck"]

log = logging.getLogger("felix.client")

BytesLike: TypeAlias = bytes | bytearray | memoryview

#: Seconds ``close()`` waits for connections to finish closing before it returns.
CLOSE_WAIT = 1.0
#: Default credit window of a subscription, in records.
DEFAULT_CREDIT = 1024
#: ack=False batches a client sends again at once after a REDIRECT (beyond: dropped).
MAX_RESENDS = 64
#: Seconds between two warnings about ack=False records dropped after a REDIRECT.
DROP_LOG_INTERVAL = 10.0
#: Seconds a node of a cluster that could not be connected to is not tried again
#: (requests for its shards go to another node meanwhile, which redirects or refuses).
NODE_RETRY = 1.0


class Durability(enum.StrEnum):
    """What a publish ack promises about the record (docs/wire-protocol.md, "Publish
    durability"); compares equal to its string value."""

    #: Held in memory only (an in-memory stream): lost if the owning shard process ends.
    MEMORY = "memory"
    #: Written to the stream's log files, not yet fsynced: survives a crash of felix,
    #: not a power loss (a durable stream with fsync none or interval).
    WRITTEN = "written"
    #: Written and fsynced before the ack: survives a power loss (fsync commit).
    SYNCED = "synced"


_DURABILITY = {
    wire.DURABILITY_MEMORY: Durability.MEMORY,
    wire.DURABILITY_WRITTEN: Durability.WRITTEN,
    wire.DURABILITY_SYNCED: Durability.SYNCED,
}


@dataclass(frozen=True, slots=True)
class PublishAck:
    """The broker stored a published record at ``offset`` of ``stream``, as ``durability``
    says (MEMORY from brokers older than durable streams)."""

    #: The stream name as given to ``publish()``.
    stream: str
    offset: int
    durability: Durability = Durability.MEMORY


#: The header a stream deduplicates publishes by (docs/api.md, "Message ids").
MSG_ID_HEADER = "felix-msg-id"


def _headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    if not headers:
        return None
    out = dict(headers)
    for name, value in out.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError(f"header names and values must be strings: {name!r}: {value!r}")
    return out


def _with_msg_id(headers: dict[str, str] | None, msg_id: str | None) -> dict[str, str] | None:
    """``headers`` plus the record's message id (None: as they are)."""
    if msg_id is None:
        return headers
    if not isinstance(msg_id, str):
        raise ConfigError(f"msg_id must be a str, not {type(msg_id).__name__}")
    return {**(headers or {}), MSG_ID_HEADER: msg_id}


class Client:
    """A connected felix client. Get one from :func:`connect`; see its arguments there."""

    def __init__(self, endpoint: Endpoint | ShmEndpoint, options: ClientOptions) -> None:
        self.endpoint = endpoint
        #: What the client was made with (see :class:`ClientOptions`).
        self.options = options
        #: The tenant every request names (the broker checks it against the token).
        self.tenant = options.tenant
        #: The namespace relative names resolve in.
        self.namespace = options.namespace
        self.request_timeout = options.request_timeout
        self.connect_timeout = options.connect_timeout
        engine = options.engine
        self._engine = engine if isinstance(engine, QuicEngine) else load_engine(engine)
        self._hub = EventHub()
        if options.on_event is not None:
            self._hub.add_listener(options.on_event)
        self._pool = Pool(
            PoolSettings(
                on_stray_reply=self._on_stray_reply,
                on_member_lost=self._on_member_lost,
                engine=self._engine,
                endpoint=endpoint,
                configuration=(
                    None  # same host, shared memory: no TLS to configure
                    if isinstance(endpoint, ShmEndpoint)
                    else client_configuration(
                        self._engine, options.ca, endpoint.host, client_cert=options.client_cert
                    )
                ),
                tenant=self.tenant,
                token=self._get_token,
                refreshable=options.token_provider is not None,
                size=options.pool_size,
                control_streams=options.control_streams,
                connect_timeout=options.connect_timeout,
                ping_timeout=options.request_timeout,
                keepalive=options.keepalive,
                backoff_base=options.reconnect_backoff[0],
                backoff_cap=options.reconnect_backoff[1],
                random=options.random_source,
            ),
            self._hub.emit,
        )
        self._inflight = asyncio.Semaphore(options.max_in_flight)
        self._active = 0  # calls in progress, for drain()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._closed = False
        self._close_done = asyncio.Event()
        # Cluster routing (_cluster): idle until a node answers REDIRECT.
        self._hosts = HostPolicy(endpoint, options.cluster_hosts, pinned_ca=options.ca is not None)
        self._router = Router(self._host_refusal)
        #: Pools of the other nodes of a cluster, by advertised address.
        self._nodes: dict[str, Pool] = {}
        self._node_starts: dict[str, asyncio.Future[Pool]] = {}
        self._node_down: dict[str, float] = {}  # address -> loop time it may be tried again
        self._home: set[str] = set()  # addresses that are the endpoint itself
        self._node_count = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._map_timer: asyncio.TimerHandle | None = None  # a SHARD_MAP fetch put off
        # ack=False batches a REDIRECT answered: being sent again, sent again, dropped.
        self._resending = 0
        self._resent_redirected = 0
        self._dropped_redirected = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL

    # -- lifecycle -----------------------------------------------------------------------

    async def _start(self) -> None:
        # On failure, close() also closes the pooled connections that did open.
        try:
            await self._pool.start()
        except BaseException:
            await self.close()
            raise

    async def _get_token(self) -> str:
        provider = self.options.token_provider
        if provider is None:
            return self.options.token or ""
        try:
            token = provider()
            if inspect.isawaitable(token):
                token = await token
        except FelixError:
            raise
        except Exception as exc:  # e.g. the identity provider is unreachable
            raise Unauthenticated(f"token_provider failed: {exc!r}") from exc
        if not isinstance(token, str):
            raise ConfigError(f"token_provider returned {type(token).__name__}, not str")
        return token

    async def close(self) -> None:
        """Close every connection and end every subscription. Idempotent, bounded (about 1 s).

        Calls still in flight fail with ConnectionLost; ``ack=False`` publishes
        not yet sent are lost (use :meth:`drain` to deliver them first).
        """
        if self._closed:
            await self._close_done.wait()
            return
        self._closed = True
        if self._map_timer is not None:
            self._map_timer.cancel()
        for task in self._tasks:
            task.cancel()
        for start in self._node_starts.values():
            start.cancel()
        pools = [self._pool, *self._nodes.values()]
        self._nodes.clear()
        await asyncio.gather(*(pool.close(CLOSE_WAIT) for pool in pools))
        self._hub.close()
        self._close_done.set()

    async def drain(self, timeout: float = 30.0) -> None:
        """Deliver what was sent, then :meth:`close`.

        New calls fail with ConnectionLost from now on. Waits for calls in
        flight, sends queued ``ack=False`` publishes, then waits until the
        broker has read everything sent on each control stream (a PING behind
        it is answered), all within ``timeout`` seconds. Closes in any case;
        raises FelixTimeoutError or ConnectionLost if delivery could not be
        confirmed.
        """
        if self._closed:
            return
        self._draining = True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
                conns = [conn for pool in self._pools() for conn in pool.live()]
                for conn in conns:
                    conn.flush_publishes()
                await asyncio.gather(*(self._ping_all_streams(conn) for conn in conns))
        except TimeoutError as exc:
            if isinstance(exc, FelixError):
                raise
            raise FelixTimeoutError(f"drain did not finish within {timeout} s") from None
        finally:
            await self.close()

    async def _ping_all_streams(self, conn: Connection) -> None:
        await asyncio.gather(
            *(conn.call(wire.encode_ping, stream_id=sid) for sid in conn.control_stream_ids)
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`drain`) has started."""
        return self._closed

    @property
    def connected(self) -> int:
        """How many pooled connections are live right now (to every node of a cluster)."""
        return sum(pool.connected for pool in self._pools())

    @property
    def redirects(self) -> int:
        """REDIRECTs this client followed (a cluster's node sent a call to another)."""
        return self._router.redirects

    @property
    def resent_redirected(self) -> int:
        """Records published with ack=False that a cluster's node answered with REDIRECT
        (not stored) and this client sent again to the owner it named (once each)."""
        return self._resent_redirected

    @property
    def dropped_redirected(self) -> int:
        """Records published with ack=False that a cluster's node answered with REDIRECT
        (not stored) and this client did not send again: redirected twice, sent too long
        before (QUIET_KEEP_*), to a host it does not allow, the owner unreachable within
        ``request_timeout``, too many being resent at once, or the client closed."""
        return self._dropped_redirected

    @property
    def shard_map(self) -> ShardMap | None:
        """The cluster's shard map as this client knows it; None until a node of a
        cluster redirected it (and always with a single node)."""
        return self._router.map

    def _pools(self) -> list[Pool]:
        return [self._pool, *self._nodes.values()]

    def __repr__(self) -> str:
        size = self._pool.settings.size
        state = "closed" if self._closed else f"{self.connected}/{size} connected"
        return f"<felix.Client {self.endpoint} tenant={self.tenant} {state}>"

    # -- events --------------------------------------------------------------------------

    def events(self) -> EventFeed:
        """An async iterator over connection events (Disconnected, Reconnected, SlowConsumer)
        from now on; it ends when the client closes."""
        return self._hub.feed()

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every event (a coroutine function is run as a task)."""
        self._hub.add_listener(listener)

    def remove_listener(self, listener: EventListener) -> None:
        self._hub.remove_listener(listener)

    def _emit(self, event: ClientEvent) -> None:
        self._hub.emit(event)

    # -- API -----------------------------------------------------------------------------

    async def publish(
        self,
        stream: str,
        data: BytesLike,
        *,
        headers: Mapping[str, str] | None = None,
        ack: bool = True,
        msg_id: str | None = None,
    ) -> PublishAck | None:
        """Append ``data`` to ``stream``; return its offset once the broker stored it.

        ``msg_id`` (the ``felix-msg-id`` header, 1-512 bytes): a stream that stored a
        record with this id within its dedup window stores nothing and acknowledges
        the original record's offset, so a retry after a lost ack is safe.

        With ``ack=False`` return None as soon as the record is queued: records
        queued in the same loop iteration leave together in one frame; delivery
        is not confirmed (failures are only logged by the broker) and a lost
        connection loses what was not yet sent. The call waits while over 1 MiB
        is waiting to be sent. Against a cluster, a batch a node answers with REDIRECT
        (nothing stored) is sent once more, to the owner it names, possibly after
        records published later (``resent_redirected``); one that cannot be is
        dropped and counted (``dropped_redirected``). Raises the broker's error, FelixTimeoutError,
        ConnectionLost (never resent: the record may or may not be stored).
        """
        ns, name = resolve_name("stream", stream, self.namespace)
        hdrs = _with_msg_id(_headers(headers), msg_id)
        e2e = self.options.e2e
        if e2e is not None:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise LocalProtocolError(f"payload must be bytes-like, not {type(data).__name__}")
            # Sealed here: the broker gets only the ciphertext (a new buffer: no copy
            # of the caller's is needed below). felix-msg-id is not bound (felix-*).
            data, hdrs = seal_record(e2e, f"{self.tenant}/{ns}/{name}", data, hdrs)
        if not ack:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise LocalProtocolError(f"payload must be bytes-like, not {type(data).__name__}")
            # A copy: the record waits in a batch, and the caller may reuse its buffer.
            payload = bytes(data)
            if not self._publish_now(ns, name, payload, hdrs):
                await self._publish_when_writable(ns, name, payload, hdrs)
            return None
        t = self.tenant
        reply = await self._request(
            lambda rid: wire.encode_publish(
                rid, t, ns, name, [data], headers=[hdrs] if hdrs else None
            ),
            wire.PublishOffsets,
            wire.OP_PUBLISH_OFFSETS,
            key=(ns, name),
            route=(ns, name),
        )
        if reply.count != 1:
            raise RemoteProtocolError(f"PUBLISH_OFFSETS for {reply.count} records, 1 was sent")
        return PublishAck(stream, reply.base_offset, _DURABILITY[reply.durability])

    async def publish_batch(
        self,
        stream: str,
        items: Sequence[BytesLike],
        *,
        headers: Mapping[str, str] | None = None,
        msg_ids: Sequence[str | None] | None = None,
    ) -> list[PublishAck]:
        """Append ``items`` to ``stream`` in one frame; their acks, in order.

        The records get consecutive offsets. ``headers`` applies to every item.
        Errors as for :meth:`publish`; the batch is stored whole or not at all.

        ``msg_ids``: one message id (or None) per item, as ``publish(msg_id=)``. A
        batch holding records the stream already stored is acknowledged with their
        original offsets when those and the new records' are one run (a retried
        batch); otherwise the broker refuses it whole (DuplicatesInBatch) and this
        call publishes the items one by one, in order, each acked as it is stored (or
        with its original offset): the acks are then not consecutive, and a failure
        part way leaves the items before it stored.
        """
        ns, name = resolve_name("stream", stream, self.namespace)
        if not items:
            return []
        hdrs = _headers(headers)
        per_item: list[dict[str, str] | None] | None = None
        if msg_ids is not None:
            if len(msg_ids) != len(items):
                raise ConfigError(f"{len(msg_ids)} msg_ids for {len(items)} items")
            per_item = [_with_msg_id(hdrs, mid) for mid in msg_ids]
        elif hdrs:
            per_item = [hdrs] * len(items)
        t = self.tenant
        plain = items
        e2e = self.options.e2e
        if e2e is not None:
            path = f"{t}/{ns}/{name}"
            for item in items:
                if not isinstance(item, bytes | bytearray | memoryview):
                    raise LocalProtocolError(
                        f"payload must be bytes-like, not {type(item).__name__}"
                    )
            sealed = [
                seal_record(e2e, path, item, item_hdrs)
                for item, item_hdrs in zip(items, per_item or [None] * len(items), strict=True)
            ]
            items = [payload for payload, _h in sealed]
            per_item = [item_hdrs for _p, item_hdrs in sealed]
        try:
            reply = await self._request(
                lambda rid: wire.encode_publish(rid, t, ns, name, items, headers=per_item),
                wire.PublishOffsets,
                wire.OP_PUBLISH_OFFSETS,
                key=(ns, name),
                route=(ns, name),
            )
        except DuplicatesInBatch:
            if msg_ids is None:
                raise
            acks = []
            # One by one, from the caller's items (publish seals each again).
            for item, mid in zip(plain, msg_ids, strict=True):
                ack = await self.publish(stream, item, headers=headers, msg_id=mid)
                assert ack is not None
                acks.append(ack)
            return acks
        if reply.count != len(items):
            raise RemoteProtocolError(
                f"PUBLISH_OFFSETS for {reply.count} records, {len(items)} were sent"
            )
        durability = _DURABILITY[reply.durability]
        return [PublishAck(stream, reply.base_offset + i, durability) for i in range(len(items))]

    def subscribe(
        self, stream: str, *, start: StartSpec = "latest", credit: int = DEFAULT_CREDIT
    ) -> Subscription:
        """A subscription to ``stream``; use ``async with`` (see :class:`Subscription`).

        ``start``: ``"latest"`` (records published from now on), ``"earliest"``
        (the oldest retained), an offset, or ``{"time": t}``: from the first record
        stamped at or after ``t`` (a timezone-aware ``datetime``, or Unix seconds as
        a number; a durable stream's records carry their timestamps, an in-memory
        stream refuses it with BadRequest). ``credit``: records the broker may
        send ahead of the application (the local queue's bound); at least 2,
        topped up whenever half is consumed.
        """
        ns, name = resolve_name("stream", stream, self.namespace)
        if not isinstance(credit, int) or not 2 <= credit <= 2**32 - 1:
            raise ConfigError(f"credit must be an int within 2..2**32-1, got {credit!r}")
        return Subscription(self, stream, ns, name, start_spec(start), credit, self.options.e2e)

    def consume(
        self, stream: str, group: str, *, prefetch: int = 64, max_bytes: int = 4 << 20
    ) -> Consumer:
        """A member of queue group ``group`` on the durable stream ``stream``; use
        ``async with`` (see :class:`Consumer`, docs/queues.md).

        ``prefetch``: records the broker may lease to this consumer ahead of the
        application (and not yet settled); ``max_bytes``: their payload bytes (one
        record always fits). The group is created with the node's defaults on the
        first consume unless it was defined through the control plane.
        """
        ns, name = resolve_name("stream", stream, self.namespace)
        validate_name("group", group)
        if not isinstance(prefetch, int) or not 1 <= prefetch <= 65_536:
            raise ConfigError(f"prefetch must be an int within 1..65536, got {prefetch!r}")
        if not isinstance(max_bytes, int) or not 1 <= max_bytes <= 64 << 20:
            raise ConfigError(f"max_bytes must be an int within 1..64 MiB, got {max_bytes!r}")
        return Consumer(self, stream, group, ns, name, prefetch, max_bytes, self.options.e2e)

    def cache(self, name: str) -> Cache:
        """The cache ``name`` (``"ns/name"`` for another namespace); no round trip."""
        return Cache(self, name, self.options.e2e)

    async def ping(self) -> float:
        """Round-trip time of a PING through the broker, in seconds."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        await self._request(wire.encode_ping, wire.ExtMessage, wire.OP_OK, idempotent=True)
        return loop.time() - began

    # -- calls ---------------------------------------------------------------------------

    async def _request(
        self,
        build: Callable[[int], bytes],
        reply_type: type[R],
        opcode: int,
        *,
        key: object | None = None,
        idempotent: bool = False,
        route: tuple[str, ...] | None = None,
    ) -> R:
        """Send ``build(request_id)`` and return the reply: a ``reply_type`` with ``opcode``
        (else raise what the broker answered).

        ``idempotent``: retry once if the connection is lost under the call.
        ``route``: the names after the tenant in the request's routing key (stream:
        namespace, stream; cache entry: namespace, cache, key), for a cluster's map.
        """
        self._check_usable()
        # _call_scope inline (this is every call's path): drain() waits for these.
        self._active += 1
        self._idle.clear()
        try:
            async with self._inflight:
                pool = self._pool if self._router.map is None else self._ready_pool(route)
                conn = None if pool is None else pool.ready(key)
                if conn is None:  # none is live: wait for one, within the timeout
                    reply, conn = await self._with_timeout(
                        self._call_on_pool(build, key, idempotent, route)
                    )
                else:
                    try:
                        reply = await conn.call(build, key=key, timeout=self.request_timeout)
                    except ConnectionLost:
                        if not idempotent or self._closed:
                            raise
                        reply, conn = await self._with_timeout(
                            self._call_on_pool(build, key, False, route)
                        )
                if isinstance(reply, wire.Redirect):  # a cluster's node: not its shard
                    reply = await self._with_timeout(
                        self._follow(build, key, idempotent, reply, conn)
                    )
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        return expect_reply(reply, reply_type, opcode)

    async def _call_on_pool(
        self,
        build: Callable[[int], bytes],
        key: object | None,
        idempotent: bool,
        route: tuple[str, ...] | None,
    ) -> tuple[wire.ExtMessage, Connection]:
        while True:
            pool = await self._pool_for(route)
            conn = await pool.connection(key)
            try:
                return await conn.call(build, key=key), conn
            except ConnectionLost:
                if not idempotent or self._closed:
                    raise
                idempotent = False  # once

    async def _follow(
        self,
        build: Callable[[int], bytes],
        key: object | None,
        idempotent: bool,
        redirect: wire.Redirect,
        conn: Connection,
    ) -> wire.ExtMessage:
        """Send the call again to the owner ``redirect`` names, and on while the answer is
        another REDIRECT (at most MAX_REDIRECTS in all). Nothing happened where a
        REDIRECT came from, so this is safe for any call."""
        followed = 0
        left: set[Endpoint | ShmEndpoint] = set()
        while True:
            pool = await self._redirected(redirect, followed, conn, left)
            followed += 1
            conn = await pool.connection(key)
            try:
                reply = await conn.call(build, key=key)
            except ConnectionLost:
                if not idempotent or self._closed:
                    raise
                idempotent = False
                conn = await pool.connection(key)
                reply = await conn.call(build, key=key)
            if not isinstance(reply, wire.Redirect):
                return reply
            redirect = reply

    # -- routing across a cluster's nodes (felix/client/_cluster.py) ------------------------

    def _ready_pool(self, route: tuple[str, ...] | None) -> Pool | None:
        """The pool a request for ``route`` goes to, when that needs no waiting (None: ask
        :meth:`_pool_for`). Only called once a map exists."""
        if route is None:
            return self._pool
        address = self._router.route("/".join((self.tenant, *route)))
        if address is None:
            return self._fallback()
        pool = self._known_pool(address)
        if pool is None or pool.connected == 0:
            return None
        return pool

    async def _pool_for(self, route: tuple[str, ...] | None) -> Pool:
        """The pool a request for ``route`` goes to: its owner's by the map; the endpoint's
        without a map; another live one when the owner is not known or cannot be reached
        (that node redirects or refuses, and the call says so)."""
        if route is None or self._router.map is None:
            return self._pool
        address = self._router.route("/".join((self.tenant, *route)))
        if address is None:
            return self._fallback()
        try:
            pool = await self._node_pool(address)
        except FelixError as exc:
            log.info("felix client: node %s: %s; asking another", address, exc)
            return self._fallback()
        return pool if pool.connected else self._fallback()

    def _fallback(self) -> Pool:
        """A pool to ask when the owner is unknown or down: the endpoint's, unless it is down
        and another node's is live."""
        if self._pool.connected:
            return self._pool
        for pool in self._nodes.values():
            if pool.connected:
                return pool
        return self._pool

    def _known_pool(self, address: str) -> Pool | None:
        pool = self._nodes.get(address)
        if pool is None and address in self._home:
            return self._pool
        return pool

    async def _redirected(
        self,
        redirect: wire.Redirect,
        followed: int,
        conn: Connection,
        left: set[Endpoint | ShmEndpoint],
    ) -> Pool:
        """The pool to send a call to that got ``redirect`` on ``conn`` after following
        ``followed``; raises Unavailable after MAX_REDIRECTS or when the owner cannot be
        reached, ConfigError when the host policy refuses it. ``left``: the nodes this
        call was redirected away from so far (a REDIRECT back to one is a loop: the map
        is then fetched again from the node the client was given, and taken whole)."""
        left.add(conn.endpoint)
        with contextlib.suppress(RemoteProtocolError):  # _node_pool reports it
            owner = parse_address(redirect.owner)
            if owner in left:
                if not self._router.reset_wanted:
                    log.info(
                        "felix client: shard %d was redirected back to %s; fetching the map "
                        "from %s",
                        redirect.shard,
                        redirect.owner,
                        self.endpoint,
                    )
                self._router.looped()
        try:
            address = self._router.redirected(redirect, followed)
        finally:
            self._fetch_map_soon(conn)  # the map tells where the rest goes
        pool = await self._node_pool(address)
        if not pool.connected:
            raise Unavailable(
                f"shard {redirect.shard} is on {address}, which cannot be reached right now; retry"
            )
        return pool

    def _host_refusal(self, address: str) -> str | None:
        """Why the host policy refuses the node at ``address`` (None: it allows it, or
        ``address`` is not host:port, which connecting it reports)."""
        try:
            endpoint = parse_address(address)
        except RemoteProtocolError:
            return None
        if endpoint == self.endpoint or self._hosts.allows(endpoint.host):
            return None
        return self._hosts.refusal(address)

    async def _node_pool(self, address: str) -> Pool:
        """The started pool of the node at ``address`` (host:port), connecting it first.

        Raises what connecting raises, ConfigError when the host policy refuses it,
        Unavailable while a node that could not be connected to is not tried again,
        Overloaded beyond MAX_NODES nodes.
        """
        pool = self._known_pool(address)
        if pool is not None:
            return pool
        start = self._node_starts.get(address)
        if start is None:
            endpoint = parse_address(address)
            if endpoint == self.endpoint:
                self._home.add(address)
                return self._pool
            if not self._hosts.allows(endpoint.host):
                raise ConfigError(self._hosts.refusal(address))
            self._check_usable()
            loop = asyncio.get_running_loop()
            if self._node_down.get(address, 0.0) > loop.time():
                raise Unavailable(f"node {address} could not be reached; retry")
            if len(self._nodes) + len(self._node_starts) >= MAX_NODES:
                raise Overloaded(
                    f"this client already connects to {MAX_NODES} nodes of the cluster; "
                    f"not connecting to {address}"
                )
            start = loop.create_task(self._start_node(address, endpoint))
            self._node_starts[address] = start
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if start.cancelled() and (task is None or not task.cancelling()):
                raise ClientClosed("the client is closed") from None  # close() stopped it
            raise

    async def _start_node(self, address: str, endpoint: Endpoint) -> Pool:
        options = self.options
        self._node_count += 1
        settings = dataclasses.replace(
            self._pool.settings,
            endpoint=endpoint,
            # The node's certificate is verified against its advertised host.
            configuration=client_configuration(
                self._engine, options.ca, endpoint.host, client_cert=options.client_cert
            ),
            index_base=self._node_count * options.pool_size,
        )
        pool = Pool(settings, self._hub.emit)
        try:
            await pool.start()
        except BaseException:
            self._node_down[address] = asyncio.get_running_loop().time() + NODE_RETRY
            await pool.close(0.0)
            raise
        finally:
            self._node_starts.pop(address, None)
        if self._closed:
            await pool.close(0.0)
            raise ClientClosed("the client is closed")
        self._node_down.pop(address, None)
        self._nodes[address] = pool
        return pool

    def _fetch_map_soon(self, conn: Connection) -> None:
        """Ask ``conn``'s node for the shard map in the background, if the router wants it
        (after a redirect loop: the node the client was given, when connected)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._router.reset_wanted:
            home = self._pool.ready()
            if home is not None:
                conn = home
        bootstrap = conn.endpoint == self.endpoint
        node = str(conn.endpoint)
        wait = self._router.fetch_wait(loop.time(), bootstrap=bootstrap, node=node)
        if wait is None:
            return
        if wait > 0.0:  # asked less than MAP_INTERVAL ago: once more, when it may be
            if self._map_timer is None:
                self._map_timer = loop.call_later(wait, self._fetch_map_later, conn)
            return
        task = loop.create_task(self._fetch_map(conn, bootstrap))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fetch_map_later(self, conn: Connection) -> None:
        self._map_timer = None
        if conn.lost is not None:
            conn = self._pool.ready() or conn  # the fetch fails, and is tried again later
        self._fetch_map_soon(conn)

    async def _fetch_map(self, conn: Connection, bootstrap: bool = False) -> None:
        loop = asyncio.get_running_loop()
        node = str(conn.endpoint)
        try:
            async with asyncio.timeout(self.request_timeout):
                reply = await conn.call(wire.encode_shard_map_request)
            shard_map = expect_reply(reply, wire.ShardMap, wire.OP_SHARD_MAP_REPLY)
        except (FelixError, TimeoutError) as exc:
            log.info("felix client: fetching the shard map from %s failed: %s", conn.endpoint, exc)
            self._router.fetch_failed(loop.time(), node)
            return
        except BaseException:
            self._router.fetch_failed(loop.time(), node)
            raise
        if self._router.fetched(shard_map, loop.time(), bootstrap=bootstrap, node=node):
            self._prune_nodes()

    def _prune_nodes(self) -> None:
        """Close the pools of nodes the map no longer names (and nothing lives on)."""
        shard_map = self._router.map
        if shard_map is None:
            return
        current = set(shard_map.owners)
        for address, pool in list(self._nodes.items()):
            if address not in current and not pool.members:
                del self._nodes[address]
                task = asyncio.get_running_loop().create_task(pool.close(CLOSE_WAIT))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _on_stray_reply(
        self, reply: wire.ExtMessage, conn: Connection, sent: QuietBatch | None
    ) -> None:
        """An ERROR or REDIRECT answering ``sent``, a publish with ack=False (nothing was
        stored; None: which one is not known). A REDIRECT, or an Unavailable saying the
        stream's shard moved, tells of a cluster: learn the map. A REDIRECT's batch is
        sent to the owner once; a batch refused as moved, or that cannot be sent again,
        is counted dropped."""
        if isinstance(reply, wire.ErrorReply):
            if not self._router.reroutes(error_for_code(reply.code, reply.message)):
                return  # failed for another reason (logged by the connection)
            self._fetch_map_soon(conn)
            if sent is not None and "moved" in reply.message:
                self._drop_redirected(sent, f"refused: {reply.message}")
            return
        if not isinstance(reply, wire.Redirect):
            return
        redirect = reply
        learned = self._router.learn(redirect)
        self._fetch_map_soon(conn)
        if sent is None:
            return  # not known which batch: nothing to count
        if sent.payloads is None:
            why = "it was sent too long ago to be kept"
        elif sent.resent:
            why = "it was redirected already"
        elif not learned:
            why = f"{redirect.owner} is not an allowed host (cluster_hosts)"
        elif self._closed:
            why = "the client is closed"
        elif self._resending >= MAX_RESENDS:
            why = f"{MAX_RESENDS} such batches are being sent again already"
        else:
            self._resending += 1
            task = asyncio.get_running_loop().create_task(self._resend(redirect, sent))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._drop_redirected(sent, why, redirect)

    async def _resend(self, redirect: wire.Redirect, sent: QuietBatch) -> None:
        try:
            async with self._call_scope():  # drain() waits for it
                await self._with_timeout(self._resend_to(redirect.owner, sent))
        except FelixError as exc:
            self._drop_redirected(sent, str(exc), redirect)
        except BaseException:
            self._dropped_redirected += sent.records  # cancelled: the client closed
            raise
        else:
            self._resent_redirected += sent.records
        finally:
            self._resending -= 1

    async def _resend_to(self, owner: str, sent: QuietBatch) -> None:
        pool = await self._node_pool(owner)
        conn = await pool.connection(sent.key)
        await conn.wait_writable(sent.key)
        conn.resend_nowait(sent)

    def _drop_redirected(
        self, sent: QuietBatch, why: str, redirect: wire.Redirect | None = None
    ) -> None:
        self._dropped_redirected += sent.records
        now = asyncio.get_running_loop().time()
        if now >= self._drop_logged_at + DROP_LOG_INTERVAL:
            self._drop_logged_at = now
            where = "" if redirect is None else f" (shard {redirect.shard} is on {redirect.owner})"
            log.warning(
                "felix client: %d record(s) published with ack=False were not stored%s and "
                "are not sent again: %s; dropped_redirected is %d",
                sent.records,
                where,
                why,
                self._dropped_redirected,
            )

    def _learn(self, redirect: wire.Redirect) -> None:
        self._router.learn(redirect)

    def _reroutes(self, error: FelixError | None) -> bool:
        """Whether a subscription or consumer the broker ended with ``error`` should be
        subscribed again through the map (in a cluster: its shard moved)."""
        return not self._closed and self._router.reroutes(error)

    def _on_member_lost(self, member: PooledMember) -> bool:
        """A connection under ``member`` was lost: in a cluster it subscribes again through
        the map (its node may be gone for good); alone, it waits for the reconnect."""
        if self._closed or not self._router.clustered:
            return False
        member._reroute()
        return True

    async def _join(
        self,
        member: PooledMember,
        route: tuple[str, ...],
        join: Callable[[Connection], Awaitable[None]],
    ) -> None:
        """Run ``join`` (SUBSCRIBE or CONSUME) on the connection ``route`` picks, attached
        there; retry once if the connection is lost, follow REDIRECTs."""
        pool = await self._pool_for(route)
        followed = 0
        left: set[Endpoint | ShmEndpoint] = set()
        retried = False
        while True:
            conn = await pool.connection()
            pool.attach(member, conn)
            try:
                await join(conn)
                return
            except Redirected as exc:
                self._detach(member)
                pool = await self._redirected(exc.redirect, followed, conn, left)
                followed += 1
            except BaseException as exc:
                self._detach(member)
                if not isinstance(exc, ConnectionLost) or retried or self._closed:
                    raise
                retried = True  # SUBSCRIBE and CONSUME change nothing until they succeed

    def _detach(self, member: PooledMember) -> None:
        for pool in self._pools():
            pool.detach(member)

    def _publish_now(
        self, namespace: str, stream: str, payload: bytes, headers: dict[str, str] | None
    ) -> bool:
        """Queue an ``ack=False`` record on a live connection with send room; False when
        there is none (then :meth:`_publish_when_writable`). The common case, without a
        coroutine, context manager or timer of its own."""
        self._check_usable()
        key = (namespace, stream)
        pool = self._pool if self._router.map is None else self._ready_pool(key)
        conn = None if pool is None else pool.ready(key)
        if conn is None or not conn.writable_now(key):
            return False
        conn.publish_nowait(namespace, stream, payload, headers)
        return True

    async def _publish_when_writable(
        self, namespace: str, stream: str, payload: bytes, headers: dict[str, str] | None
    ) -> None:
        key = (namespace, stream)

        async def queue() -> None:
            pool = await self._pool_for(key)
            conn = await pool.connection(key)
            await conn.wait_writable(key)
            conn.publish_nowait(namespace, stream, payload, headers)

        async with self._call_scope():
            await self._with_timeout(queue())

    async def _start_subscription(self, sub: PooledSubscription) -> None:
        self._check_usable()
        join = self._join(sub, sub._route, sub._subscribe_on)
        async with self._call_scope(), self._inflight:
            await self._with_timeout(join)

    async def _resubscribe(self, sub: PooledSubscription, start: WireStart) -> None:
        """SUBSCRIBE ``sub`` again from ``start``, routed by the map (its shard moved)."""
        self._check_usable()
        await self._join(sub, sub._route, lambda conn: sub._subscribe_on(conn, start))

    def _forget_subscription(self, sub: PooledSubscription) -> None:
        self._detach(sub)

    async def _start_consumer(self, consumer: Consumer) -> None:
        self._check_usable()
        join = self._join(consumer, consumer._route, consumer._consume_on)
        async with self._call_scope(), self._inflight:
            await self._with_timeout(join)

    async def _rejoin(self, consumer: Consumer) -> None:
        """CONSUME ``consumer`` again, routed by the map (its shard moved)."""
        self._check_usable()
        await self._join(consumer, consumer._route, consumer._consume_on)

    def _forget_consumer(self, consumer: Consumer) -> None:
        self._detach(consumer)

    async def _with_timeout(self, awaitable: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self.request_timeout):
                return await awaitable
        except TimeoutError as exc:
            if isinstance(exc, FelixError):
                raise
            raise FelixTimeoutError(f"no reply within {self.request_timeout} s") from None

    @contextlib.asynccontextmanager
    async def _call_scope(self) -> Any:
        # Counts calls in progress so drain() can wait for them.
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _check_usable(self) -> None:
        if self._closed or self._draining:
            raise ClientClosed("the client is closed")
