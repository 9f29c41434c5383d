"""The client: the API, bounded calls and their timeouts, on top of the pool.

How it works: a call waits for an in-flight slot (``max_in_flight``: at the
bound callers wait, they do not fail), then, within ``request_timeout``, for a
live pooled connection and for its reply. When the connection is lost under a
call it fails with ConnectionLost; only calls that change nothing (``get``,
``ttl``, ``ping``, SUBSCRIBE) are retried, once, on the next live connection.
Connections, reconnects, keepalives and token refresh are the pool's (``_pool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

from felix import wire
from felix.client._cache import Cache
from felix.client._connection import Connection, R, expect_reply
from felix.client._consumer import Consumer
from felix.client._convert import Endpoint, ShmEndpoint, StartSpec, resolve_name, start_spec
from felix.client._e2e import seal_record
from felix.client._events import ClientEvent, EventFeed, EventHub, EventListener
from felix.client._links import PooledSubscription
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
    RemoteProtocolError,
    Unauthenticated,
)
from felix.names import validate_name
from felix.quic import QuicEngine, load_engine

__all__ = ["BytesLike", "Client", "Durability", "PublishAck"]

BytesLike: TypeAlias = bytes | bytearray | memoryview

#: Seconds ``close()`` waits for connections to finish closing before it returns.
CLOSE_WAIT = 1.0
#: Default credit window of a subscription, in records.
DEFAULT_CREDIT = 1024


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
        await self._pool.close(CLOSE_WAIT)
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
                conns = self._pool.live()
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
        """How many pooled connections are live right now."""
        return self._pool.connected

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
        is waiting to be sent. Raises the broker's error, FelixTimeoutError,
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
    ) -> R:
        """Send ``build(request_id)`` and return the reply: a ``reply_type`` with ``opcode``
        (else raise what the broker answered).

        ``idempotent``: retry once if the connection is lost under the call.
        """
        self._check_usable()
        # _call_scope inline (this is every call's path): drain() waits for these.
        self._active += 1
        self._idle.clear()
        try:
            async with self._inflight:
                conn = self._pool.ready(key)
                if conn is None:  # none is live: wait for one, within the timeout
                    reply = await self._with_timeout(self._call_on_pool(build, key, idempotent))
                else:
                    try:
                        reply = await conn.call(build, key=key, timeout=self.request_timeout)
                    except ConnectionLost:
                        if not idempotent or self._closed:
                            raise
                        reply = await self._with_timeout(self._call_on_pool(build, key, False))
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        return expect_reply(reply, reply_type, opcode)

    async def _call_on_pool(
        self, build: Callable[[int], bytes], key: object | None, idempotent: bool
    ) -> wire.ExtMessage:
        while True:
            conn = await self._pool.connection(key)
            try:
                return await conn.call(build, key=key)
            except ConnectionLost:
                if not idempotent or self._closed:
                    raise
                idempotent = False  # once

    def _publish_now(
        self, namespace: str, stream: str, payload: bytes, headers: dict[str, str] | None
    ) -> bool:
        """Queue an ``ack=False`` record on a live connection with send room; False when
        there is none (then :meth:`_publish_when_writable`). The common case, without a
        coroutine, context manager or timer of its own."""
        self._check_usable()
        key = (namespace, stream)
        conn = self._pool.ready(key)
        if conn is None or not conn.writable_now(key):
            return False
        conn.publish_nowait(namespace, stream, payload, headers)
        return True

    async def _publish_when_writable(
        self, namespace: str, stream: str, payload: bytes, headers: dict[str, str] | None
    ) -> None:
        key = (namespace, stream)

        async def queue() -> None:
            conn = await self._pool.connection(key)
            await conn.wait_writable(key)
            conn.publish_nowait(namespace, stream, payload, headers)

        async with self._call_scope():
            await self._with_timeout(queue())

    async def _start_subscription(self, sub: PooledSubscription) -> None:
        self._check_usable()

        async def subscribe() -> None:
            for attempt in (1, 2):  # SUBSCRIBE changes nothing until it succeeds: retry once
                conn = await self._pool.connection()
                self._pool.attach(sub, conn)
                try:
                    await sub._subscribe_on(conn)
                    return
                except BaseException as exc:
                    self._pool.detach(sub)
                    if not isinstance(exc, ConnectionLost) or attempt == 2 or self._closed:
                        raise

        async with self._call_scope(), self._inflight:
            await self._with_timeout(subscribe())

    def _forget_subscription(self, sub: PooledSubscription) -> None:
        self._pool.detach(sub)

    async def _start_consumer(self, consumer: Consumer) -> None:
        self._check_usable()

        async def join() -> None:
            for attempt in (1, 2):  # CONSUME changes nothing until it succeeds: retry once
                conn = await self._pool.connection()
                self._pool.attach(consumer, conn)
                try:
                    await consumer._consume_on(conn)
                    return
                except BaseException as exc:
                    self._pool.detach(consumer)
                    if not isinstance(exc, ConnectionLost) or attempt == 2 or self._closed:
                        raise

        async with self._call_scope(), self._inflight:
            await self._with_timeout(join())

    def _forget_consumer(self, consumer: Consumer) -> None:
        self._pool.detach(consumer)

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
