"""One QUIC connection of the client pool: control streams, event streams, requests.

How it works: :class:`ClientProtocol` is the handler of the connection's
transport (felix/quic/transport.py); it hands every stream's bytes to its
:class:`Connection`, which feeds them to the sans-IO
state in ``_session`` and acts on the events: a reply completes the future
registered under its request id, an event stream's notices go to the
subscription registered under its subscription id. Everything sent goes
through the transport's ``send_stream_data``, which transmits once per loop
tick, so concurrent calls share datagrams.

When the connection ends (either side, idle timeout, or a broken control
stream) every outstanding call fails with ``ConnectionLost`` and the owner's
``on_lost`` callback runs once; the pool reconnects. Nothing is resent here.
When the broker closes it because the session's token expired (application
error 0x106), the error is ``Unauthenticated`` instead, for the calls too.

:meth:`Connection.reauth` presents a fresh token (REAUTH) on every control
stream: the broker then extends the connection's deadline and each stream's
permissions (docs/wire-protocol.md, "Sessions").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from felix import wire
from felix.client._cluster import Redirected
from felix.client._convert import Endpoint, ShmEndpoint
from felix.client._session import (
    Authenticated,
    ControlStream,
    EventHello,
    EventStream,
    Notice,
    Reply,
    RequestTable,
    StreamClosed,
)
from felix.errors import (
    ConnectionLost,
    CursorError,
    FelixError,
    FelixTimeoutError,
    Overloaded,
    RemoteProtocolError,
    Unauthenticated,
    Unavailable,
    error_for_code,
)
from felix.quic import (
    CLOSE_INTERNAL_ERROR,
    ConnectionHandler,
    QuicConfiguration,
    QuicEngine,
    StreamTransport,
)
from felix.quic import connect as quic_connect
from felix.quic.stream_ids import is_server_initiated, is_unidirectional

__all__ = ["ClientProtocol", "Connection", "QuietBatch", "SubscriptionSink", "expect_reply"]

log = logging.getLogger("felix.client")

#: Application close code when this client gives up on a connection it found broken.
CLOSE_PROTOCOL_ERROR = 0x2
#: Application close code of a broker ending a session whose token expired.
CLOSE_TOKEN_EXPIRED = 0x106
#: Fire-and-forget publishes wait while a control stream has this much unsent data...
SEND_HIGH_WATER = 1024 * 1024
#: ...until it is back under this.
SEND_LOW_WATER = 256 * 1024
#: How often a connection checks the deadlines of its calls (a call times out at most
#: this much after its timeout).
DEADLINE_SWEEP = 0.05
#: Client-side batching of ``ack=False`` publishes: records and payload bytes per frame.
BATCH_MAX_RECORDS = 512
BATCH_MAX_BYTES = 256 * 1024
#: ``ack=False`` batches a connection keeps after sending them, so that one a cluster's
#: node answers with REDIRECT (nothing stored) can be sent again to the owner: the
#: newest, at most this many and this many payload bytes (success is not answered, so
#: older ones are forgotten by age)...
QUIET_KEEP_BATCHES = 128
QUIET_KEEP_BYTES = 1024 * 1024
#: ...and the request ids (with their record counts) of this many forgotten ones, so a
#: late REDIRECT of one is still counted as dropped.
QUIET_KEEP_GONE = 4096


#: Notices that carry a consumer id in the request id (docs/wire-protocol.md).
_CONSUMER_NOTICES = frozenset((wire.OP_DELIVERIES, wire.OP_CONSUMER_ROLE, wire.OP_CONSUMER_END))
#: Queue consumers one connection carries at most (the broker's default bound).
MAX_CONSUMERS = 1024


class ConsumerSink(Protocol):
    """What a connection tells a queue consumer (felix/client/_consumer.py)."""

    def _on_deliveries(self, message: wire.Deliveries) -> None: ...
    def _on_role(self, role: int) -> None: ...
    def _on_consumer_end(self, code: int, text: str) -> None: ...


class SubscriptionSink(Protocol):
    """What a connection delivers a subscription's event stream to."""

    def _on_events(self, message: wire.Events) -> None: ...
    def _on_slow_consumer(self, first_dropped: int, dropped: int) -> None: ...
    def _on_end(self, error: FelixError | None) -> None: ...


R = TypeVar("R", bound=wire.ExtMessage)


def expect_reply(reply: wire.ExtMessage, reply_type: type[R], opcode: int) -> R:
    """``reply``, typed as ``reply_type``, if its opcode is ``opcode``; else raise what
    it reports. (A class may carry more than one opcode: CacheResult answers both
    CACHE_SET and CACHE_DELETE, so the opcode is checked too.)

    ERROR becomes its ``felix.errors`` class, CURSOR_ERROR a CursorError,
    REDIRECT a Redirected (an Unavailable carrying the REDIRECT, which the client
    follows where it can), and any other opcode a RemoteProtocolError.
    """
    got = reply.opcode
    if got == opcode:
        if isinstance(reply, reply_type):
            return reply
        raise RemoteProtocolError(
            f"reply opcode 0x{got:02x} decoded as {type(reply).__name__}, not {reply_type.__name__}"
        )
    if isinstance(reply, wire.ErrorReply) and got == wire.OP_ERROR:
        raise error_for_code(reply.code, reply.message)
    if isinstance(reply, wire.CursorErrorReply):
        raise CursorError(reply.reason, reply.requested, reply.available)
    if isinstance(reply, wire.Redirect):
        raise Redirected(reply)
    raise RemoteProtocolError(f"reply opcode 0x{got:02x} where 0x{opcode:02x} was expected")


async def _quic_connect(
    engine: QuicEngine,
    endpoint: Endpoint,
    configuration: QuicConfiguration | None,
    timeout: float,
) -> ClientProtocol:
    assert configuration is not None  # a felix:// endpoint always has one
    try:
        return await quic_connect(
            engine,
            endpoint.host,
            endpoint.port,
            configuration=configuration,
            create_handler=ClientProtocol,
            handshake_timeout=timeout,
        )
    except FelixError:
        raise  # HandshakeFailed is also an OSError (a ConnectionError)
    except OSError as exc:  # e.g. the host name does not resolve
        raise ConnectionLost(f"cannot connect to {endpoint}: {exc}") from exc


class ClientProtocol(ConnectionHandler):
    """The transport's handler: forwards stream events to its :class:`Connection`."""

    def __init__(self, transport: StreamTransport) -> None:
        super().__init__(transport)
        self.connection: Connection | None = None

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self.connection is not None:
            self.connection._on_stream_data(stream_id, data, end_stream)

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        if self.connection is not None:
            self.connection._on_stream_reset(stream_id, error_code)

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        if self.connection is not None:
            self.connection._on_terminated(error_code, reason_phrase)

    def transmitted(self) -> None:
        # After each transmit (every received ACK leads here): wake publishers
        # waiting for their stream's send buffer to drain.
        if self.connection is not None and self.connection._send_waiters:
            self.connection._wake_writers()


@dataclass(slots=True)
class _Batch:
    payloads: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str] | None] = field(default_factory=list)
    size: int = 0
    has_headers: bool = False


@dataclass(slots=True)
class QuietBatch:
    """An ``ack=False`` PUBLISH a connection sent, as kept for a REDIRECT answering it."""

    #: (namespace, stream).
    key: tuple[str, str]
    #: None: forgotten (only its record count is known).
    payloads: list[bytes] | None
    headers: list[dict[str, str] | None] | None
    records: int
    size: int
    #: Sent again after a REDIRECT already (it is not sent a third time).
    resent: bool = False


class Connection:
    """A connected, authenticated QUIC connection with ``len(control_streams)`` control streams.

    Create with :meth:`open`. ``on_lost(error)`` is called once when it ends
    (not when :meth:`close` was called first).
    """

    def __init__(
        self, protocol: ClientProtocol, endpoint: Endpoint | ShmEndpoint, tenant: str
    ) -> None:
        self.protocol = protocol
        self.endpoint = endpoint
        self.tenant = tenant
        self.on_lost: Callable[[FelixError], None] | None = None
        #: Called with an ERROR or REDIRECT answering a publish with ack=False (its
        #: records were not stored), this connection and the batch as kept (None: not
        #: known, e.g. request id 0; its payloads None: forgotten already). Set: such
        #: batches carry their own request id and are kept a while (QUIET_KEEP_*).
        self.on_stray_reply: (
            Callable[[wire.ExtMessage, Connection, QuietBatch | None], None] | None
        ) = None
        #: Called when a call timed out with nothing received on this connection since it
        #: was sent: its node may be gone without closing it (kill -9, a partition), so
        #: the pool checks it now rather than after ``keepalive`` seconds of silence.
        self.on_silent: Callable[[Connection], None] | None = None
        #: Set once the connection has ended: what outstanding and later calls fail with.
        self.lost: FelixError | None = None
        self.requests: RequestTable[asyncio.Future[wire.ExtMessage]] = RequestTable()
        self.subscriptions: dict[int, SubscriptionSink] = {}
        #: Queue consumers on this connection, by consumer id (felix/client/_consumer.py).
        self.consumers: dict[int, ConsumerSink] = {}
        self._loop = asyncio.get_running_loop()
        self._controls: dict[int, ControlStream] = {}
        self._ready: list[int] = []  # authenticated control stream ids, in opening order
        self._auth_waiters: dict[int, asyncio.Future[None]] = {}
        self._event_streams: dict[int, EventStream] = {}
        self._next_stream = 0
        self._send_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._batches: dict[tuple[str, str], _Batch] = {}
        # ack=False batches sent, by request id (oldest first), their payload bytes,
        # and the record counts of forgotten ones.
        self._quiet: dict[int, QuietBatch] = {}
        self._quiet_bytes = 0
        self._quiet_gone: dict[int, int] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._closing = False
        self._terminated = self._loop.create_future()
        # Calls with a timeout: request id -> (deadline, waiter, timeout). One sweep timer
        # for them all (DEADLINE_SWEEP apart) instead of a timer per request.
        self._deadlines: dict[int, tuple[float, asyncio.Future[wire.ExtMessage], float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.last_received = self._loop.time()
        #: Fresh tokens the broker accepted on this connection (REAUTH on every stream).
        self.reauths = 0
        #: Why the last attempt to refresh this connection's token failed (None: it did not).
        self.refresh_error: FelixError | None = None
        protocol.connection = self

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        engine: QuicEngine,
        endpoint: Endpoint | ShmEndpoint,
        configuration: QuicConfiguration | None,
        *,
        tenant: str,
        token: str,
        control_streams: int,
        timeout: float,
    ) -> Connection:
        """Connect, open ``control_streams`` control streams and authenticate each.

        Raises FelixTimeoutError (handshake or auth slower than ``timeout``
        seconds in all), HandshakeFailed (TLS, ALPN, or a broker without the
        extension family), Unauthenticated (token refused), ConnectionLost.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        if isinstance(endpoint, ShmEndpoint):
            # Same host: the node's shared-memory rings instead of QUIC (felix/shm).
            from felix.shm.client import shm_connect

            protocol = await shm_connect(endpoint.path, ClientProtocol, timeout)
        else:
            protocol = await _quic_connect(engine, endpoint, configuration, timeout)
        conn = cls(protocol, endpoint, tenant)
        if protocol.close_reason is not None:  # ended between handshake and now
            conn._on_terminated(
                protocol.close_reason.error_code, protocol.close_reason.reason_phrase
            )
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*(conn._open_control(token) for _ in range(control_streams)))
        except TimeoutError:
            conn.close()
            raise FelixTimeoutError(
                f"authentication with {endpoint} took longer than {timeout} s"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    async def _open_control(self, token: str) -> None:
        if self.lost is not None:
            raise ConnectionLost(str(self.lost))
        stream = ControlStream(self.tenant, token)
        stream_id = self.protocol.next_stream_id()
        self._controls[stream_id] = stream
        waiter = self._auth_waiters[stream_id] = self._loop.create_future()
        self.protocol.send_stream_data(stream_id, stream.auth_frame())
        try:
            await waiter
        finally:
            self._auth_waiters.pop(stream_id, None)
        self._ready.append(stream_id)

    # -- requests ------------------------------------------------------------------------

    @property
    def control_stream_ids(self) -> list[int]:
        """The authenticated control streams' ids, in opening order."""
        return list(self._ready)

    def control_stream_for(self, key: object | None) -> int:
        """The control stream for ``key`` (same key, same stream: keeps order), or round-robin."""
        if key is None:
            self._next_stream += 1
            return self._ready[self._next_stream % len(self._ready)]
        return self._ready[hash(key) % len(self._ready)]

    async def call(
        self,
        build: Callable[[int], bytes],
        *,
        key: object | None = None,
        stream_id: int | None = None,
        timeout: float | None = None,
    ) -> wire.ExtMessage:
        """Send ``build(request_id)`` on a control stream and wait for the reply with that id.

        Cancellation (or a timeout) forgets the id, so a late reply is dropped.
        Raises ConnectionLost if the connection ends first, FelixTimeoutError when
        ``timeout`` seconds pass first (checked every DEADLINE_SWEEP: one timer per
        connection, not one per call).
        """
        self._check_alive()
        future: asyncio.Future[wire.ExtMessage] = self._loop.create_future()
        request_id = self.requests.start(future)
        try:
            frame = build(request_id)
            if stream_id is None:
                stream_id = self.control_stream_for(key)
            self.protocol.send_stream_data(stream_id, frame)
            if timeout is not None:
                self._deadlines[request_id] = (self._loop.time() + timeout, future, timeout)
                if self._sweeper is None:
                    self._sweeper = self._loop.call_later(DEADLINE_SWEEP, self._sweep_deadlines)
            return await future
        finally:
            self.requests.discard(request_id)
            if timeout is not None:
                self._deadlines.pop(request_id, None)

    def _sweep_deadlines(self) -> None:
        self._sweeper = None
        now = self._loop.time()
        silent = False
        for deadline, future, timeout in list(self._deadlines.values()):
            if deadline <= now and not future.done():
                future.set_exception(FelixTimeoutError(f"no reply within {timeout} s"))
                silent = silent or self.last_received <= deadline - timeout
        if silent and self.lost is None and self.on_silent is not None:
            self.on_silent(self)
        if self._deadlines and self.lost is None:
            self._sweeper = self._loop.call_later(DEADLINE_SWEEP, self._sweep_deadlines)

    async def reauth(self, token: str) -> None:
        """Present ``token`` (REAUTH) on every control stream and wait until all accept it.

        Raises the broker's refusal (Unauthenticated: invalid, expired, another
        tenant), ConnectionLost if the connection ends first.
        """
        self._check_alive()
        replies = await asyncio.gather(
            *(
                self.call(lambda rid: wire.encode_reauth(rid, token), stream_id=sid)
                for sid in list(self._ready)
            )
        )
        for reply in replies:
            expect_reply(reply, wire.ExtMessage, wire.OP_OK)
        self.reauths += 1

    def send_nowait(self, build: Callable[[int], bytes], *, key: object | None = None) -> None:
        """Send a request whose reply nobody waits for (CREDIT, UNSUBSCRIBE); it gets dropped."""
        if self.lost is None:
            request_id = self.requests.new_id()
            self.protocol.send_stream_data(self.control_stream_for(key), build(request_id))

    def new_subscription_id(self) -> int:
        """An id for one more subscription; Overloaded if the connection takes no more.

        Each subscription gets its own event stream, opened by the broker, and
        the QUIC engine lets the broker have only so many open at once (qh3:
        103, aioquic: 128; felix/quic/engine.py). Past that the broker could not
        deliver, so the subscription is refused here, before anything is sent.
        Streams of ended subscriptions count until the broker has closed them.
        """
        self._check_alive()
        limit = self.protocol.transport.max_peer_streams(unidirectional=True)
        if max(len(self.subscriptions), len(self._event_streams)) >= limit:
            raise Overloaded(
                f"this connection to {self.endpoint} already carries {limit} subscriptions, "
                "as many event streams as its QUIC engine accepts; unsubscribe first"
            )
        return self.requests.new_id()

    def new_consumer_id(self) -> int:
        """An id for one more queue consumer (unique among this connection's request ids)."""
        self._check_alive()
        if len(self.consumers) >= MAX_CONSUMERS:
            raise Overloaded(
                f"this connection to {self.endpoint} already carries {MAX_CONSUMERS} consumers"
            )
        return self.requests.new_id()

    def _check_alive(self) -> None:
        if self.lost is not None:
            raise ConnectionLost(str(self.lost))

    # -- fire-and-forget publishes ---------------------------------------------------------

    def writable_now(self, key: object) -> bool:
        """True when live and the control stream for ``key`` is under its high-water mark
        (then :meth:`wait_writable` would not wait)."""
        return self.lost is None and (
            self.protocol.send_buffer_size(self.control_stream_for(key)) <= SEND_HIGH_WATER
        )

    async def wait_writable(self, key: object) -> None:
        """Wait while the control stream for ``key`` has over 1 MiB not yet sent."""
        self._check_alive()
        stream_id = self.control_stream_for(key)
        while self.protocol.send_buffer_size(stream_id) > SEND_HIGH_WATER:
            waiter = self._loop.create_future()
            self._send_waiters.append((stream_id, waiter))
            await waiter

    def _wake_writers(self) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for stream_id, waiter in self._send_waiters:
            if waiter.done():
                continue
            if self.protocol.send_buffer_size(stream_id) <= SEND_LOW_WATER:
                waiter.set_result(None)
            else:
                still.append((stream_id, waiter))
        self._send_waiters = still

    def publish_nowait(
        self, namespace: str, stream: str, payload: bytes, headers: dict[str, str] | None
    ) -> None:
        """Queue one ``ack=False`` record; queued records leave as one PUBLISH per stream
        at the end of this loop tick (or sooner when a batch is full)."""
        self._check_alive()
        key = (namespace, stream)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch()
        batch.payloads.append(payload)
        batch.headers.append(headers)
        batch.size += len(payload)
        batch.has_headers = batch.has_headers or bool(headers)
        if len(batch.payloads) >= BATCH_MAX_RECORDS or batch.size >= BATCH_MAX_BYTES:
            self._flush_batch(key, self._batches.pop(key))
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush_publishes)

    def flush_publishes(self) -> None:
        """Send every queued ``ack=False`` record now."""
        self._flush_handle = None
        batches, self._batches = self._batches, {}
        if self.lost is None:
            for key, batch in batches.items():
                self._flush_batch(key, batch)

    def _flush_batch(self, key: tuple[str, str], batch: _Batch) -> None:
        headers = batch.headers if batch.has_headers else None
        self._send_quiet(QuietBatch(key, batch.payloads, headers, len(batch.payloads), batch.size))

    def resend_nowait(self, sent: QuietBatch) -> None:
        """Send an ``ack=False`` batch another node answered with REDIRECT (once: a
        REDIRECT answering this one is not resent)."""
        self._check_alive()
        assert sent.payloads is not None
        self._send_quiet(
            QuietBatch(sent.key, sent.payloads, sent.headers, sent.records, sent.size, True)
        )

    def _send_quiet(self, sent: QuietBatch) -> None:
        # Nothing answers a publish with ack none when it is stored. Its request id
        # matches what may answer it (ERROR, REDIRECT; see on_stray_reply): id 0
        # when nobody would use a REDIRECT, else a fresh id, the batch kept a while.
        keep = self.on_stray_reply is not None
        request_id = self.requests.new_id() if keep else 0
        assert sent.payloads is not None
        frame = wire.encode_publish(
            request_id,
            self.tenant,
            sent.key[0],
            sent.key[1],
            sent.payloads,
            ack=wire.ACK_NONE,
            headers=sent.headers,
        )
        self.protocol.send_stream_data(self.control_stream_for(sent.key), frame)
        if not keep:
            return
        quiet = self._quiet
        quiet[request_id] = sent
        self._quiet_bytes += sent.size
        while len(quiet) > QUIET_KEEP_BATCHES or (
            self._quiet_bytes > QUIET_KEEP_BYTES and len(quiet) > 1
        ):
            old_id = next(iter(quiet))
            old = quiet.pop(old_id)
            self._quiet_bytes -= old.size
            self._quiet_gone[old_id] = old.records
            if len(self._quiet_gone) > QUIET_KEEP_GONE:
                del self._quiet_gone[next(iter(self._quiet_gone))]

    def _on_quiet_reply(self, message: wire.ExtMessage) -> bool:
        """Handle an answer to a kept ``ack=False`` batch; False: it is not one."""
        request_id = message.request_id
        sent = self._quiet.pop(request_id, None)
        if sent is not None:
            self._quiet_bytes -= sent.size
        else:
            records = self._quiet_gone.pop(request_id, None)
            if records is None:
                return False
            sent = QuietBatch(("", ""), None, None, records, 0)
        if isinstance(message, wire.ErrorReply):
            log.warning("felix client: a publish with ack=False failed: %s", message.message)
        if isinstance(message, wire.ErrorReply | wire.Redirect) and self.on_stray_reply:
            self.on_stray_reply(message, self, sent)
        return True  # else an OK (brokers that answer one): stored

    # -- receiving -----------------------------------------------------------------------

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.last_received = self._loop.time()
        control = self._controls.get(stream_id)
        if control is not None:
            for event in control.receive(data, end_stream):
                self._on_control_event(stream_id, event)
            return
        events = self._event_streams.get(stream_id)
        if events is None:
            if not (is_server_initiated(stream_id) and is_unidirectional(stream_id)):
                # only broker-opened unidirectional streams are event streams
                self.fail(RemoteProtocolError(f"unexpected data on stream {stream_id}"))
                return
            events = self._event_streams[stream_id] = EventStream()
        for notice in events.receive(data, end_stream):
            self._on_event_stream_event(stream_id, events, notice)
        if events.closed:
            del self._event_streams[stream_id]

    def _on_control_event(
        self, stream_id: int, event: Authenticated | Reply | StreamClosed
    ) -> None:
        if isinstance(event, Reply):
            self._on_reply(event.message)
        elif isinstance(event, Authenticated):
            waiter = self._auth_waiters.get(stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            waiter = self._auth_waiters.get(stream_id)
            error = event.error or RemoteProtocolError("control stream closed")
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
            # A control stream is never closed on purpose by the broker while the
            # connection lives: whatever broke it may have broken its requests too.
            self.fail(error)

    def _on_reply(self, message: wire.ExtMessage) -> None:
        opcode = message.opcode
        if opcode in _CONSUMER_NOTICES:
            consumer = self.consumers.get(message.request_id)
            if consumer is None:
                return  # stopped meanwhile: the broker releases what it still sends
            if isinstance(message, wire.Deliveries):
                consumer._on_deliveries(message)
            elif isinstance(message, wire.ConsumerRole):
                consumer._on_role(message.role)
            elif isinstance(message, wire.ErrorReply):
                self.consumers.pop(message.request_id, None)
                consumer._on_consumer_end(message.code, message.message)
            return
        if opcode in (wire.OP_SLOW_CONSUMER, wire.OP_SUBSCRIPTION_END):
            # Notices carry the subscription id; they belong on the event stream,
            # but are understood here too.
            sink = self.subscriptions.get(message.request_id)
            if sink is not None:
                self._notify(message.request_id, sink, message)
            return
        if (self._quiet or self._quiet_gone) and self._on_quiet_reply(message):
            return
        if message.request_id == 0:
            # Fire-and-forget publishes of a connection without on_stray_reply carry id 0;
            # the node answers them only when not stored (ERROR, e.g. when overloaded;
            # REDIRECT). Nobody waits: log failures only.
            if isinstance(message, wire.ErrorReply):
                log.warning("felix client: a publish with ack=False failed: %s", message.message)
            elif isinstance(message, wire.Redirect):
                log.warning(
                    "felix client: a publish with ack=False was not stored: shard %d is on %s",
                    message.shard,
                    message.owner,
                )
            if self.on_stray_reply is not None:
                self.on_stray_reply(message, self, None)
            return
        try:
            waiter = self.requests.pop(message.request_id)
        except RemoteProtocolError as exc:
            self.fail(exc)
            return
        if waiter is None:
            log.debug("felix client: dropped a late reply to request %d", message.request_id)
        elif not waiter.done():
            waiter.set_result(message)

    def _on_event_stream_event(
        self, stream_id: int, stream: EventStream, event: EventHello | Notice | StreamClosed
    ) -> None:
        sub_id = stream.subscription_id
        sink = None if sub_id is None else self.subscriptions.get(sub_id)
        if isinstance(event, EventHello):
            if sink is None:
                # Already unsubscribed: ask the broker to stop sending on it.
                self.protocol.stop_stream(stream_id, 0)
            return
        if sink is None or sub_id is None:
            return
        if isinstance(event, Notice):
            self._notify(sub_id, sink, event.message)
        elif event.error is not None:
            self.subscriptions.pop(sub_id, None)
            sink._on_end(event.error)

    def _notify(self, sub_id: int, sink: SubscriptionSink, message: wire.ExtMessage) -> None:
        try:
            if isinstance(message, wire.Events):
                sink._on_events(message)
            elif isinstance(message, wire.SlowConsumerNotice):
                sink._on_slow_consumer(message.first_dropped, message.dropped)
            elif (
                isinstance(message, wire.ErrorReply) and message.opcode == wire.OP_SUBSCRIPTION_END
            ):
                self.subscriptions.pop(sub_id, None)
                sink._on_end(
                    error_for_code(message.code, message.message) if message.code else None
                )
            else:
                raise RemoteProtocolError(f"opcode 0x{message.opcode:02x} on an event stream")
        except RemoteProtocolError as exc:
            # This subscription broke (e.g. events beyond its credit); the
            # connection and the others are fine. Tell the broker to stop it.
            if self.subscriptions.pop(sub_id, None) is not None:
                self.send_nowait(lambda rid: wire.encode_unsubscribe(rid, sub_id))
            sink._on_end(exc)

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        if stream_id in self._controls:
            self.fail(RemoteProtocolError(f"the broker reset control stream {stream_id}"))
            return
        stream = self._event_streams.pop(stream_id, None)
        if stream is not None and stream.subscription_id is not None:
            sink = self.subscriptions.pop(stream.subscription_id, None)
            if sink is not None:
                sink._on_end(Unavailable(f"the broker reset the event stream (code {error_code})"))

    # -- ending --------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.lost is None

    def fail(self, error: FelixError) -> None:
        """Give up on this connection because of ``error`` (calls fail, ``on_lost`` runs)."""
        if self.lost is None:
            log.warning("felix client: closing the connection to %s: %s", self.endpoint, error)
            code = (
                CLOSE_PROTOCOL_ERROR
                if isinstance(error, RemoteProtocolError)
                else CLOSE_INTERNAL_ERROR
            )
            self._end(error)
            self.protocol.close(code, str(error)[:200])

    def close(self) -> None:
        """Close (CONNECTION_CLOSE, code 0); calls in flight get ConnectionLost. Idempotent."""
        if self.lost is None:
            self._closing = True
            self._end(ConnectionLost("the client closed the connection"))
            self.protocol.close(0, "client closed")

    async def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the connection's closing period to end."""
        if not self._terminated.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._terminated), timeout)

    def _on_terminated(self, error_code: int, reason: str) -> None:
        if not self._terminated.done():
            self._terminated.set_result(None)
        if self.lost is None:
            detail = f"{reason or 'no reason given'} (code 0x{error_code:x})"
            if error_code == CLOSE_TOKEN_EXPIRED:
                why = f"the broker closed the connection to {self.endpoint}: {detail}"
                if self.refresh_error is not None:
                    why += f"; the token could not be refreshed: {self.refresh_error}"
                self._end(Unauthenticated(why))
            else:
                self._end(ConnectionLost(f"connection to {self.endpoint} lost: {detail}"))

    def _end(self, error: FelixError) -> None:
        self.lost = error
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._quiet.clear()  # nothing answers them any more
        self._quiet_gone.clear()
        self._quiet_bytes = 0
        # An expired session is not a network failure: its calls say so (not retried).
        call_error = Unauthenticated if isinstance(error, Unauthenticated) else ConnectionLost
        for waiter in self.requests.drain():
            if not waiter.done():
                waiter.set_exception(call_error(str(error)))
        for auth in self._auth_waiters.values():
            if not auth.done():
                auth.set_exception(
                    error if not isinstance(error, ConnectionLost) else ConnectionLost(str(error))
                )
        for _, writer in self._send_waiters:
            if not writer.done():
                writer.set_exception(ConnectionLost(str(error)))
        self._send_waiters.clear()
        if not self._closing and self.on_lost is not None:
            self.on_lost(error)
