"""The gateway: QUIC connections in, requests routed to shards, replies and events out.

How it works:

- Every client-opened QUIC stream is a :class:`StreamSession` that must start
  with JSON ``auth`` (under a 64 KiB frame cap and a deadline), negotiates the
  felix extension bit, then carries extension frames (docs/wire-protocol.md,
  "Sessions").
- A request is forwarded to the shard that owns its stream or cache key as a
  ring record carrying the client's frame unchanged and a gateway token; the
  shard's reply frame comes back with the token and is written to the client's
  stream unchanged. The table of tokens in flight is bounded per connection.
- Subscriptions live here (felix/gateway/subscription.py): the shard pushes one
  EVENTS frame per stream per batch, written as-is to every caught-up
  subscriber with credit; the rest pull with READs.
- If a shard goes down, requests in flight to it fail at once with Unavailable
  (retryable), new ones fail fast until it is back, and subscriptions re-attach
  when it returns (a gap in offsets shows what was lost).

Transmits are coalesced per connection per loop tick (FelixQuicProtocol).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from felix import ipc, wire
from felix.errors import (
    BadRequest,
    FelixError,
    NotFound,
    Overloaded,
    PermissionDenied,
    RemoteProtocolError,
    Unavailable,
)
from felix.gateway import v1
from felix.gateway.links import ShardLinks
from felix.gateway.subscription import (
    MAX_CREDIT,
    READ_BYTES,
    READ_RECORDS,
    Subscription,
    SubState,
    events_count,
)
from felix.ipc import Kind
from felix.names import validate_name
from felix.quic.protocol import FelixQuicProtocol
from felix.shard.core import POLICY_NAMES

log = logging.getLogger("felix.gateway")

#: Flags this broker understands from clients: all of v1 plus the felix extension.
SUPPORTED_FLAGS = wire.FLAGS_V1 | wire.FLAG_FELIX_EXT
#: QUIC application error codes used when the broker closes a stream or connection.
CLOSE_PROTOCOL_ERROR = 0x101
CLOSE_AUTH_TIMEOUT = 0x102
CLOSE_DRAINING = 0x103
CLOSE_OVERLOADED = 0x104


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """Bounds of one gateway (defaults from ../shared/design: 64 KiB / 4 MiB frames)."""

    max_frame_pre_auth: int = 64 * 1024
    max_frame: int = 4 * 1024 * 1024
    auth_timeout: float = 5.0
    max_connections: int = 10_000
    max_streams_per_connection: int = 256
    max_subscriptions_per_connection: int = 1024
    max_in_flight_per_connection: int = 4096


class _SessionState(enum.Enum):
    AWAIT_AUTH = "await_auth"
    READY = "ready"
    CLOSED = "closed"


class _Pending:
    """A request forwarded to a shard, waiting for its reply."""

    __slots__ = ("conn", "quiet", "request_id", "session", "shard", "subscription", "translate")

    def __init__(
        self,
        conn: GatewayConnection,
        session: StreamSession,
        request_id: int,
        shard: int,
        subscription: Subscription | None = None,
        translate: v1.Translate | None = None,
    ) -> None:
        self.conn = conn
        self.session = session
        self.request_id = request_id
        self.shard = shard
        self.subscription = subscription
        # For v1 peers: how to turn the shard's reply into the answer they expect.
        self.translate = translate
        # A publish without ack: success is not answered (errors still are).
        self.quiet = False


class Gateway:
    """State shared by all connections of one gateway process."""

    def __init__(
        self,
        index: int,
        links: ShardLinks,
        limits: GatewayLimits | None = None,
        *,
        incarnation: int = 0,
    ) -> None:
        self.index = index
        self.links = links
        self.limits = limits or GatewayLimits()
        self.shard_ok = [True] * links.shards
        # Tokens carry the gateway's incarnation in their high bits, so a reply meant
        # for a previous incarnation of this gateway can never match a new request.
        self._next_token = ((incarnation & 0xFFFFFF) << 40) + 1
        self._pending: dict[int, _Pending] = {}
        self._subs_by_token: dict[int, Subscription] = {}
        self._subs_by_key: dict[str, set[Subscription]] = {}
        self.connections: set[GatewayConnection] = set()
        self.draining = False
        self._barriers: dict[int, asyncio.Future[None]] = {}
        # Counters (metrics).
        self.requests = 0
        self.protocol_errors = 0
        self.overloaded = 0
        self.slow_consumer_events = 0
        self.delivered_records = 0
        self.refused_connections = 0
        links.attach(index, self.on_shard_records)

    # -- routing ---------------------------------------------------------------------

    def shard_for(self, key: str) -> int:
        return ipc.shard_for(key, self.links.shards)

    def token(self) -> int:
        t = self._next_token
        self._next_token += 1
        return t

    def forward(self, pending: _Pending, token: int, record: bytes) -> bool:
        """Send a request record to its shard, or answer the client that it cannot be sent."""
        if not self.shard_ok[pending.shard]:
            pending.session.send_error(
                pending.request_id, Unavailable(f"shard {pending.shard} is restarting; retry")
            )
            return False
        if not self.links.send(pending.shard, record):
            self.overloaded += 1
            pending.session.send_error(
                pending.request_id, Overloaded(f"shard {pending.shard} is busy; retry")
            )
            return False
        self._pending[token] = pending
        pending.conn.in_flight += 1
        pending.session.in_flight += 1
        return True

    def _settle(self, pending: _Pending) -> None:
        pending.conn.in_flight -= 1
        pending.session.in_flight -= 1
        if pending.session.input_ended and not pending.session.in_flight:
            pending.session.finish()

    # -- records from shards ------------------------------------------------------------

    def on_shard_records(self, shard: int, records: Sequence[bytes | memoryview]) -> None:
        for record in records:
            try:
                kind, token, aux = ipc.decode_header(record)
                body = bytes(record[ipc.HEADER_SIZE :])
                if kind == Kind.REPLY:
                    self._on_reply(token, body, aux)
                elif kind == Kind.PUSH:
                    key, pos = ipc.decode_key(body)
                    self._on_push(key, body[pos:])
                elif kind == Kind.READ_REPLY:
                    self._on_read_reply(token, aux, body)
                elif kind == Kind.END:
                    self._on_stream_end(ipc.decode_key(body)[0])
                else:
                    log.warning(
                        "gateway %d: unexpected record kind %d from shard %d",
                        self.index,
                        kind,
                        shard,
                    )
            except Exception:
                # One bad record must not take the gateway down.
                log.exception("gateway %d: bad record from shard %d", self.index, shard)

    def _on_reply(self, token: int, frame: bytes, aux: int = 0) -> None:
        barrier = self._barriers.pop(token, None)
        if barrier is not None:
            if not barrier.done():
                barrier.set_result(None)
            return
        pending = self._pending.pop(token, None)
        if pending is None:
            return  # its connection went away, or the shard restarted: nobody waits
        sub = pending.subscription
        if sub is not None:
            self._on_subscribe_reply(sub, frame, aux)
        if pending.translate is None:
            if not (pending.quiet and frame[wire.HEADER_SIZE] == wire.OP_OK):
                pending.session.send(frame)
        else:
            answer = pending.translate(wire.decode_ext(wire.decode_frame(frame, extensions=True)))
            if answer is not None:
                pending.session.send(answer)
        self._settle(pending)

    def _on_subscribe_reply(self, sub: Subscription, frame: bytes, policy: int) -> None:
        if sub.state is not SubState.PENDING:
            return
        sub.policy = POLICY_NAMES.get(policy, sub.policy)
        if frame[wire.HEADER_SIZE] != wire.OP_SUBSCRIBED:
            self._drop_subscription(sub)
            return
        reply = wire.decode_ext(wire.decode_frame(frame, extensions=True))
        assert isinstance(reply, wire.Subscribed)
        sub.state = SubState.ACTIVE
        sub.next_offset = sub.known_tail = reply.start_offset
        sub.conn.open_event_stream(sub)
        # Learn the tail (and catch up if the start is in the past).
        sub.known_tail = sub.next_offset + 1
        self._read(sub)

    def _on_push(self, key: str, frame: bytes) -> None:
        subs = self._subs_by_key.get(key)
        if not subs:
            return
        base, count = events_count(frame)
        end = base + count
        v1_frames: dict[bool, bytes] = {}  # encode once per format, too
        for sub in subs:
            if sub.known_tail < end:
                sub.known_tail = end
            if sub.can_take_shared(base):
                out = frame
                if sub.v1_offsets is not None:
                    out = v1_frames.get(sub.v1_offsets) or v1_frames.setdefault(
                        sub.v1_offsets, v1.event_batch(frame, sub.v1_offsets)
                    )
                sub.conn.send_events(sub, out, base, count)
                self.delivered_records += count
            elif sub.wants_read():
                self._read(sub)

    def _on_stream_end(self, key: str) -> None:
        for sub in list(self._subs_by_key.get(key, ())):
            sub.conn.end_subscription(sub, NotFound.code, f"stream {key} was deleted")
            self._drop_subscription(sub)

    def _on_read_reply(self, token: int, tail: int, frame: bytes) -> None:
        sub = self._subs_by_token.get(token)
        if sub is None or sub.state is not SubState.ACTIVE:
            return
        sub.reading = False
        sub.known_tail = max(tail, sub.next_offset)
        op = frame[wire.HEADER_SIZE]
        if op == wire.OP_EVENTS:
            base, count = events_count(frame)
            if count and base == sub.next_offset:
                if sub.v1_offsets is not None:
                    frame = v1.event_batch(frame, sub.v1_offsets)
                sub.conn.send_events(sub, frame, base, count)
                self.delivered_records += count
        elif op == wire.OP_CURSOR_ERROR:
            err = wire.decode_ext(wire.decode_frame(frame, extensions=True))
            assert isinstance(err, wire.CursorErrorReply)
            if err.reason == "too_old":
                if not self._slow_subscriber(sub, err.available):
                    return
            else:  # in_future: the stream restarted empty; wait for new records
                sub.known_tail = sub.next_offset
        if sub.wants_read():
            self._read(sub)

    def _slow_subscriber(self, sub: Subscription, available: int) -> bool:
        """The subscriber's position left the replay ring: apply its policy."""
        self.slow_consumer_events += 1
        lost = available - sub.next_offset
        if sub.policy == "disconnect":
            sub.conn.end_subscription(
                sub, Overloaded.code, f"subscriber too slow: {lost} records left the replay ring"
            )
            self._drop_subscription(sub)
            return False
        sub.dropped += lost
        sub.conn.send_slow_consumer(sub, sub.next_offset, lost)
        sub.next_offset = available
        return True

    def _read(self, sub: Subscription) -> None:
        if not self.shard_ok[sub.shard]:
            return
        record = ipc.encode_read(sub.token, sub.key, sub.next_offset, READ_RECORDS, READ_BYTES)
        if self.links.send(sub.shard, record):
            sub.reading = True
        # else: the ring is full; the next push or credit retries.

    # -- subscriptions ------------------------------------------------------------------

    def add_subscription(self, sub: Subscription) -> None:
        self._subs_by_token[sub.token] = sub
        self._subs_by_key.setdefault(sub.key, set()).add(sub)

    def _drop_subscription(self, sub: Subscription) -> None:
        sub.state = SubState.CLOSED
        self._subs_by_token.pop(sub.token, None)
        subs = self._subs_by_key.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs_by_key[sub.key]
                if self.shard_ok[sub.shard]:
                    self.links.send(
                        sub.shard, ipc.encode(Kind.WATCH, 0, 0, ipc.encode_key(sub.key))
                    )
        sub.conn.subscriptions.pop(sub.sub_id, None)

    def credit(self, sub: Subscription, n: int) -> None:
        sub.add_credit(n)
        if sub.wants_read():
            self._read(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        self._drop_subscription(sub)

    # -- connections and shards ------------------------------------------------------

    def connection_lost(self, conn: GatewayConnection) -> None:
        self.connections.discard(conn)
        for token in [t for t, p in self._pending.items() if p.conn is conn]:
            del self._pending[token]
        for sub in list(conn.subscriptions.values()):
            self._drop_subscription(sub)

    def shard_down(self, shard: int) -> None:
        """Fail everything in flight to ``shard`` now; refuse new requests until it is back."""
        self.shard_ok[shard] = False
        for token in [t for t, p in self._pending.items() if p.shard == shard]:
            pending = self._pending.pop(token)
            if pending.subscription is not None:
                self._drop_subscription(pending.subscription)
            pending.session.send_error(
                pending.request_id, Unavailable(f"shard {shard} went down; retry")
            )
            self._settle(pending)
        for sub in self._subs_by_token.values():
            if sub.shard == shard:
                sub.reading = False

    def shard_up(self, shard: int) -> None:
        """``shard`` is back (a new process): re-attach this gateway's watches and readers."""
        self.shard_ok[shard] = True
        self.links.send(shard, ipc.encode(Kind.HELLO, 0, self.index, b""))
        for key, subs in self._subs_by_key.items():
            if subs and self.shard_for(key) == shard:
                self.links.send(shard, ipc.encode(Kind.WATCH, 0, 1, ipc.encode_key(key)))
                for sub in subs:
                    if sub.state is SubState.ACTIVE:
                        sub.known_tail = max(sub.known_tail, sub.next_offset + 1)
                        if sub.wants_read():
                            self._read(sub)

    async def quiesce(self, timeout: float) -> None:
        """Drain, phase 1: refuse new requests; wait (up to ``timeout``) for replies in flight."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._pending and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def drain(self, grace: float) -> None:
        """Drain, phase 2: deliver what is owed, then close every connection.

        Run once every gateway of the node has quiesced (no publish can still be
        appended anywhere): a barrier through each shard's ring makes sure every
        delivery the shards produced has reached this gateway; then it waits (up to
        ``grace`` seconds) until every subscriber with credit has been sent
        everything up to its stream's tail and QUIC has sent every queued byte.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        barriers = []
        for shard in range(self.links.shards):
            token = self.token()
            record = ipc.encode(Kind.REQUEST, token, 0, wire.encode_ping(0))
            if self.shard_ok[shard] and self.links.send(shard, record):
                barriers.append(self._barriers.setdefault(token, loop.create_future()))
        if barriers:
            await asyncio.wait(barriers, timeout=grace)
        while loop.time() < deadline and not self._flushed():
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close(CLOSE_DRAINING, "node draining")

    def _flushed(self) -> bool:
        if self._pending:
            return False
        for sub in self._subs_by_token.values():
            if (
                sub.state is SubState.ACTIVE
                and sub.credit > 0
                and (sub.reading or sub.next_offset < sub.known_tail)
            ):
                return False
        return all(conn.send_buffer_size() == 0 for conn in self.connections)


class StreamSession:
    """One client-opened QUIC stream: auth handshake, then requests."""

    __slots__ = (
        "conn",
        "deadline",
        "flags",
        "in_flight",
        "input_ended",
        "reader",
        "state",
        "stream_id",
        "tenant",
        "uni",
    )

    def __init__(self, conn: GatewayConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.uni = bool(stream_id & 0x2)
        limits = conn.gateway.limits
        self.reader = wire.FrameReader(limits.max_frame_pre_auth)
        self.state = _SessionState.AWAIT_AUTH
        self.flags = 0
        self.tenant = ""
        self.in_flight = 0
        self.input_ended = False
        loop = asyncio.get_running_loop()
        self.deadline: asyncio.TimerHandle | None = loop.call_later(
            limits.auth_timeout, self._auth_expired
        )

    # -- output ---------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        if self.state is not _SessionState.CLOSED and not self.uni:
            self.conn.send_stream_data(self.stream_id, frame)

    def send_error(self, request_id: int, exc: FelixError) -> None:
        code = exc.code or BadRequest.code
        self.send(wire.encode_error(request_id, code, str(exc)))

    def fail(self, message: str) -> None:
        """A protocol error: tell the client (v1 ``error``) and close this stream."""
        self.conn.gateway.protocol_errors += 1
        if self.state is not _SessionState.CLOSED:
            if not self.uni:
                self.conn.send_stream_data(
                    self.stream_id,
                    wire.encode_message({"type": "error", "message": message}),
                    end_stream=True,
                )
            self.conn.stop_stream(self.stream_id, CLOSE_PROTOCOL_ERROR)
        self.close()

    @property
    def closed(self) -> bool:
        return self.state is _SessionState.CLOSED

    def end_input(self) -> None:
        """The client sent FIN: answer what is in flight, then FIN our side too."""
        self.input_ended = True
        if not self.in_flight:
            self.finish()

    def finish(self) -> None:
        if self.state is not _SessionState.CLOSED and not self.uni:
            self.conn.send_stream_data(self.stream_id, b"", end_stream=True)
        self.close()
        self.conn.sessions.pop(self.stream_id, None)

    def close(self) -> None:
        self.state = _SessionState.CLOSED
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _auth_expired(self) -> None:
        self.deadline = None
        if self.state is _SessionState.AWAIT_AUTH:
            self.fail("no auth frame within the deadline")

    # -- input ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.state is _SessionState.CLOSED:
            return
        try:
            self.reader.feed(data)
            for frame in self.reader:
                if self.state is _SessionState.AWAIT_AUTH:
                    self._auth(frame)
                elif frame.flags == wire.FLAG_FELIX_EXT:
                    self._ext(frame)
                elif frame.flags == wire.FLAG_JSON:
                    self._v1(v1.from_json, wire.decode_message(frame))
                elif frame.flags in (0x0001, 0x0009):
                    self._v1(v1.from_binary, wire.decode_publish_batch(frame))
                else:
                    raise RemoteProtocolError(
                        f"a client does not send frames with flags 0x{frame.flags:04x}"
                    )
                if self.closed:
                    return
        except RemoteProtocolError as exc:
            self.fail(str(exc))

    def _auth(self, frame: wire.Frame) -> None:
        if frame.flags != 0:
            raise RemoteProtocolError("the first frame on a stream must be a JSON auth message")
        msg = wire.decode_message(frame)
        if msg["type"] != "auth":
            raise RemoteProtocolError(f"expected auth, got {msg['type']}")
        tenant = msg["tenant_id"] or "default"
        try:
            validate_name("tenant", tenant)
        except FelixError as exc:
            self.fail(str(exc))
            return
        # Until authentication lands the node only listens on loopback (or with
        # --insecure), and the token is not checked: the frame's tenant is used.
        self.tenant = tenant
        limits = self.conn.gateway.limits
        self.reader.max_frame_size = limits.max_frame
        self.state = _SessionState.READY
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        offered = msg.get("client_flags")
        if offered is None:
            self.send(wire.encode_message({"type": "ok"}))
            return
        self.flags = offered & SUPPORTED_FLAGS
        self.reader.accept_flags = wire.FLAGS_V1 | (self.flags & wire.FLAG_FELIX_EXT)
        self.send(wire.encode_message({"type": "auth_ok", "server_flags": self.flags}))

    def _ext(self, frame: wire.Frame) -> None:
        gateway = self.conn.gateway
        gateway.requests += 1
        try:
            msg = wire.decode_ext(frame)
        except RemoteProtocolError as exc:
            prefix = wire.ext_request_id(frame)
            if prefix is None:
                raise
            self.send_error(prefix[1], BadRequest(str(exc)))
            return
        try:
            self._dispatch(msg, frame)
        except FelixError as exc:
            self.send_error(msg.request_id, exc)

    def _dispatch(self, msg: wire.ExtMessage, frame: wire.Frame) -> None:
        gateway = self.conn.gateway
        conn = self.conn
        if gateway.draining:
            raise Unavailable("node is draining; reconnect")
        op = msg.opcode
        if op == wire.OP_PING or op == wire.OP_REAUTH:
            self.send(wire.encode_ok(msg.request_id))
            return
        if isinstance(msg, wire.SubscriptionOp):
            sub = conn.subscriptions.get(msg.subscription_id)
            if sub is None:
                raise BadRequest(f"no subscription {msg.subscription_id} on this connection")
            if op == wire.OP_CREDIT:
                gateway.credit(sub, msg.credit)
            else:
                gateway.unsubscribe(sub)
                conn.end_subscription(sub, 0, "unsubscribed")
            self.send(wire.encode_ok(msg.request_id))
            return
        if conn.in_flight >= gateway.limits.max_in_flight_per_connection:
            gateway.overloaded += 1
            raise Overloaded("too many requests in flight on this connection")
        if isinstance(msg, wire.CacheRequest):
            self._check_scope(msg.tenant_id, msg.namespace, "cache", msg.cache)
            key = f"{msg.tenant_id}/{msg.namespace}/{msg.cache}/{msg.key}"
            subscription = None
        elif isinstance(msg, wire.Publish):
            self._check_scope(msg.tenant_id, msg.namespace, "stream", msg.stream)
            key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
            subscription = None
        elif isinstance(msg, wire.Subscribe):
            self._check_scope(msg.tenant_id, msg.namespace, "stream", msg.stream)
            key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
            subscription = self._new_subscription(msg, key)
        else:
            raise BadRequest(f"opcode 0x{op:02x} is not a request")
        shard = gateway.shard_for(key) if subscription is None else subscription.shard
        token = gateway.token() if subscription is None else subscription.token
        pending = _Pending(conn, self, msg.request_id, shard, subscription)
        pending.quiet = isinstance(msg, wire.Publish) and msg.ack == wire.ACK_NONE
        sent = gateway.forward(pending, token, ipc.encode(Kind.REQUEST, token, 0, frame.to_bytes()))
        if subscription is not None and not sent:
            gateway.unsubscribe(subscription)  # could not be sent: forget it

    def _v1(self, translate: Callable[[Any], v1.V1Request], msg: Any) -> None:
        """A v1 request: translate it, forward it, answer in v1 form."""
        gateway = self.conn.gateway
        gateway.requests += 1
        try:
            req = translate(msg)
            if gateway.draining:
                raise Unavailable("node is draining; reconnect")
            tenant, namespace, name = req.names
            self._check_scope(tenant, namespace, "cache" if req.kind == "cache" else "stream", name)
            if self.conn.in_flight >= gateway.limits.max_in_flight_per_connection:
                gateway.overloaded += 1
                raise Overloaded("too many requests in flight on this connection")
        except FelixError as exc:
            self.send(wire.encode_message({"type": "error", "message": str(exc)}))
            return
        if req.kind == "subscribe":
            self._v1_subscribe(req)
            return
        token = gateway.token()
        shard = gateway.shard_for(req.route_key)
        pending = _Pending(self.conn, self, 0, shard, None, req.translate)
        gateway.forward(pending, token, ipc.encode(Kind.REQUEST, token, 0, req.frame))

    def _v1_subscribe(self, req: v1.V1Request) -> None:
        conn = self.conn
        gateway = conn.gateway
        sub_id = req.subscription_id
        if sub_id is None:
            conn.next_v1_subscription += 1
            sub_id = conn.next_v1_subscription
        try:
            if sub_id in conn.subscriptions:
                raise BadRequest(f"subscription {sub_id} already exists")
            if len(conn.subscriptions) >= gateway.limits.max_subscriptions_per_connection:
                raise Overloaded("too many subscriptions on this connection")
            frame = wire.encode_subscribe(
                0,
                *req.names,
                sub_id,
                start=req.start,  # type: ignore[arg-type]
                credit=0,
            )
        except FelixError as exc:
            self.send(wire.encode_message({"type": "error", "message": str(exc)}))
            return
        key = ipc.stream_key(*req.names)
        sub = Subscription(
            conn,
            sub_id,
            key,
            gateway.shard_for(key),
            gateway.token(),
            0,
            "drop_old",  # until the shard's SUBSCRIBED reply names the stream's policy
        )
        # v1 has no credit: the QUIC send buffer bound alone paces the subscriber.
        sub.v1_offsets = bool(self.flags & wire.FLAG_EVENT_BATCH_OFFSETS)
        sub.credit = MAX_CREDIT
        conn.subscriptions[sub_id] = sub
        gateway.add_subscription(sub)
        pending = _Pending(conn, self, 0, sub.shard, sub, req.translate)
        if not gateway.forward(pending, sub.token, ipc.encode(Kind.REQUEST, sub.token, 0, frame)):
            gateway.unsubscribe(sub)

    def _check_scope(self, tenant: str, namespace: str, kind: str, name: str) -> None:
        if tenant != self.tenant:
            raise PermissionDenied(f"this session belongs to tenant {self.tenant!r}")
        validate_name("namespace", namespace)
        validate_name(kind, name)

    def _new_subscription(self, msg: wire.Subscribe, key: str) -> Subscription:
        conn = self.conn
        gateway = conn.gateway
        if msg.subscription_id in conn.subscriptions:
            raise BadRequest(f"subscription {msg.subscription_id} already exists")
        if len(conn.subscriptions) >= gateway.limits.max_subscriptions_per_connection:
            raise Overloaded("too many subscriptions on this connection")
        if not self.flags & wire.FLAG_FELIX_EXT:
            raise BadRequest("subscriptions need the felix extension")
        sub = Subscription(
            conn,
            msg.subscription_id,
            key,
            gateway.shard_for(key),
            gateway.token(),
            msg.credit,
            "drop_old",  # until the shard's SUBSCRIBED reply names the stream's policy
        )
        conn.subscriptions[sub.sub_id] = sub
        gateway.add_subscription(sub)
        return sub


class GatewayConnection(FelixQuicProtocol):
    """One client's QUIC connection to a gateway."""

    #: Set on the per-gateway subclass created by :func:`connection_class`.
    gateway: Gateway

    def __init__(self, quic: object, stream_handler: object = None) -> None:
        super().__init__(quic, stream_handler)
        self.sessions: dict[int, StreamSession] = {}
        self.subscriptions: dict[int, Subscription] = {}
        self.in_flight = 0
        # v1 subscribers may let the broker pick ids: above any id a client would pick.
        self.next_v1_subscription = 1 << 48
        gateway = self.gateway
        # Over the bound, the connection is refused as soon as its handshake completes
        # (a close sent earlier may not be readable by the client yet).
        self.refused = len(gateway.connections) >= gateway.limits.max_connections
        if self.refused:
            gateway.refused_connections += 1
            return
        gateway.connections.add(self)

    def _on_handshake_completed(self, alpn_protocol: str | None) -> None:
        if self.refused:
            self.close(CLOSE_OVERLOADED, "gateway at its connection limit")

    # -- QUIC hooks ------------------------------------------------------------------

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        session = self.sessions.get(stream_id)
        if session is None:
            if stream_id & 0x1:  # server-initiated: our event streams take no input
                return
            if (
                self.gateway.draining
                or len(self.sessions) >= self.gateway.limits.max_streams_per_connection
            ):
                self.stop_stream(stream_id, CLOSE_PROTOCOL_ERROR)
                return
            session = self.sessions[stream_id] = StreamSession(self, stream_id)
        if data:
            session.feed(data)
        if end_stream:
            session.end_input()

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        session = self.sessions.pop(stream_id, None)
        if session is not None:
            session.close()

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()
        self.gateway.connection_lost(self)

    # -- subscriptions --------------------------------------------------------------

    def open_event_stream(self, sub: Subscription) -> None:
        sub.event_stream = self.next_stream_id(unidirectional=True)
        hello = wire.encode_message({"type": "event_stream_hello", "subscription_id": sub.sub_id})
        self.send_stream_data(sub.event_stream, hello)

    def event_stream_backlog(self, sub: Subscription) -> int:
        if sub.event_stream is None:
            return 0
        return self.send_buffer_size(sub.event_stream)

    def send_events(self, sub: Subscription, frame: bytes, base: int, count: int) -> None:
        assert sub.event_stream is not None
        self.send_stream_data(sub.event_stream, frame)
        sub.delivered(base, count)

    def send_slow_consumer(self, sub: Subscription, first_dropped: int, dropped: int) -> None:
        if sub.event_stream is not None:
            self.send_stream_data(
                sub.event_stream, wire.encode_slow_consumer(sub.sub_id, first_dropped, dropped)
            )

    def end_subscription(self, sub: Subscription, code: int, message: str) -> None:
        if sub.event_stream is not None:
            self.send_stream_data(
                sub.event_stream,
                wire.encode_subscription_end(sub.sub_id, code, message),
                end_stream=True,
            )
            sub.event_stream = None


def connection_class(gateway: Gateway) -> type[GatewayConnection]:
    """A GatewayConnection subclass bound to ``gateway`` (the engine's server creates instances)."""
    attrs: dict[str, object] = {"gateway": gateway}
    return type("BoundGatewayConnection", (GatewayConnection,), attrs)


Clock = Callable[[], float]
