"""Client connections to a gateway: one QUIC connection, one session per client stream.

How it works: every client-opened QUIC stream is a :class:`StreamSession` that
must start with JSON ``auth`` (under the pre-auth frame cap and a deadline),
negotiates the felix extension bit, then carries requests: extension frames, or
v1 frames translated by felix/gateway/v1.py. Requests go to the shared
:class:`~felix.gateway.gateway.Gateway`, which forwards them to shards and routes
replies and events back to the connection (docs/wire-protocol.md, "Sessions").
Failed authentications, permission denials and connections closed at their
token's expiry are written to the audit log (felix/audit.py).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import Any

from felix import audit, ipc, wire
from felix.errors import (
    BadRequest,
    FelixError,
    Overloaded,
    PermissionDenied,
    RemoteProtocolError,
    Unauthenticated,
    Unavailable,
    error_slug,
)
from felix.gateway import v1
from felix.gateway.auth import Identity
from felix.gateway.gateway import (
    CLOSE_AUTH_FAILED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_OVERLOADED,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOKEN_EXPIRED,
    SUPPORTED_FLAGS,
    Gateway,
    _Pending,
)
from felix.gateway.subscription import MAX_CREDIT, Subscription
from felix.ipc import RecordType
from felix.names import validate_name
from felix.quic.protocol import FelixQuicProtocol
from felix.quic.stream_ids import is_server_initiated, is_unidirectional


class _SessionState(enum.Enum):
    AWAIT_AUTH = "await_auth"
    READY = "ready"
    CLOSED = "closed"


class StreamSession:
    """One client-opened QUIC stream: auth handshake, then requests."""

    __slots__ = (
        "conn",
        "deadline",
        "flags",
        "identity",
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
        self.uni = is_unidirectional(stream_id)
        limits = conn.gateway.limits
        self.reader = wire.FrameReader(limits.max_frame_pre_auth)
        self.state = _SessionState.AWAIT_AUTH
        self.flags = 0
        self.tenant = ""
        self.identity: Identity | None = None
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

    def fail(self, message: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        """A protocol error: tell the client (v1 ``error``) and close this stream."""
        self.conn.gateway.protocol_errors += 1
        if self.state is not _SessionState.CLOSED:
            if not self.uni:
                self.conn.send_stream_data(
                    self.stream_id,
                    wire.encode_message({"type": "error", "message": message}),
                    end_stream=True,
                )
            self.conn.stop_stream(self.stream_id, code)
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
            self.fail("no auth frame within the deadline", CLOSE_AUTH_TIMEOUT)

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
        conn = self.conn
        gateway = conn.gateway
        source, now = conn.peer, time.monotonic()
        if gateway.auth_limiter.blocked(source, now):
            _audit_auth(conn, "session.auth", msg.get("tenant_id"), "rate-limited", "anonymous")
            conn.close(CLOSE_AUTH_FAILED, "too many failed authentications; wait")
            self.close()
            return
        try:
            identity = gateway.authenticator.authenticate(msg["token"], msg["tenant_id"])
            conn.admit(identity)
        except FelixError as exc:
            gateway.auth_failures += 1
            gateway.auth_limiter.failed(source, now)
            _audit_auth(
                conn, "session.auth", msg.get("tenant_id"), error_slug(exc), "anonymous", exc
            )
            self.fail(f"unauthenticated: {exc}")
            return
        self.identity = identity
        self.tenant = identity.tenant
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
        if isinstance(msg, wire.Reauth):
            # A fresh token for this connection's tenant: new permissions, new deadline.
            try:
                identity = gateway.authenticator.authenticate(msg.token, self.tenant)
                conn.admit(identity)
            except FelixError as exc:
                gateway.auth_failures += 1
                who = self.identity.subject if self.identity is not None else "anonymous"
                _audit_auth(conn, "session.reauth", self.tenant, error_slug(exc), who, exc)
                raise Unauthenticated(str(exc)) from None
            self.identity = identity
            self.send(wire.encode_ok(msg.request_id))
            return
        if op == wire.OP_PING:
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
            self._check_scope(msg.tenant_id, msg.namespace, "cache", msg.cache, _cache_action(op))
            key = f"{msg.tenant_id}/{msg.namespace}/{msg.cache}/{msg.key}"
            subscription = None
        elif isinstance(msg, wire.Publish):
            self._check_scope(msg.tenant_id, msg.namespace, "stream", msg.stream, "stream.publish")
            key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
            subscription = None
        elif isinstance(msg, wire.Subscribe):
            self._check_scope(
                msg.tenant_id, msg.namespace, "stream", msg.stream, "stream.subscribe"
            )
            key = ipc.stream_key(msg.tenant_id, msg.namespace, msg.stream)
            subscription = self._new_subscription(msg, key)
        else:
            raise BadRequest(f"opcode 0x{op:02x} is not a request")
        shard = gateway.shard_for(key) if subscription is None else subscription.shard
        token = gateway.token() if subscription is None else subscription.token
        pending = _Pending(conn, self, msg.request_id, shard, subscription)
        pending.quiet = isinstance(msg, wire.Publish) and msg.ack == wire.ACK_NONE
        sent = gateway.forward(
            pending, token, ipc.encode(RecordType.REQUEST, token, 0, frame.to_bytes())
        )
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
            self._check_scope(
                tenant,
                namespace,
                "cache" if req.kind == "cache" else "stream",
                name,
                _v1_action(req),
            )
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
        gateway.forward(pending, token, ipc.encode(RecordType.REQUEST, token, 0, req.frame))

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
        if not gateway.forward(
            pending, sub.token, ipc.encode(RecordType.REQUEST, sub.token, 0, frame)
        ):
            gateway.unsubscribe(sub)

    def _check_scope(self, tenant: str, namespace: str, kind: str, name: str, action: str) -> None:
        if tenant != self.tenant:
            self._audit_denied(action, f"{kind}:{tenant}/{namespace}/{name}", "other tenant")
            raise PermissionDenied(f"this session belongs to tenant {self.tenant!r}")
        validate_name("namespace", namespace)
        validate_name(kind, name)
        identity = self.identity
        assert identity is not None  # requests are only served after auth
        allowed = (
            identity.allows_cache(action, namespace, name)
            if kind == "cache"
            else identity.allows_stream(action, namespace, name)
        )
        if not allowed:
            self._audit_denied(action, f"{kind}:{tenant}/{namespace}/{name}", "not granted")
            raise PermissionDenied(f"{action} on {kind} {tenant}/{namespace}/{name} is not granted")

    def _audit_denied(self, action: str, obj: str, detail: str) -> None:
        self.conn.gateway.permission_denials += 1
        identity = self.identity
        audit.emit(
            "permission",
            who=identity.subject if identity is not None else "anonymous",
            source=self.conn.peer,
            tenant=self.tenant,
            action=action,
            object=obj,
            result="denied",
            reason="permission-denied",
            detail=detail,
        )

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
        # One tenant per connection (set by its first authenticated stream), and the
        # latest expiry among the tokens it presented (wall clock; None: never).
        self.tenant: str | None = None
        self.subject = "anonymous"  # of the latest token admitted (for the audit log)
        self.expires_at: float | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.peer = "?"
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

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.peer == "?":
            self.peer = str(addr[0])  # the source failed authentications are counted by
        super().datagram_received(data, addr)

    # -- authentication -----------------------------------------------------------------

    def admit(self, identity: Identity) -> None:
        """Accept ``identity`` on this connection: same tenant as before, later expiry kept."""
        if self.tenant is None:
            self.tenant = identity.tenant
        elif identity.tenant != self.tenant:
            raise Unauthenticated(f"this connection belongs to tenant {self.tenant!r}")
        self.subject = identity.subject
        if identity.expires_at is None:
            return
        if self.expires_at is None or identity.expires_at > self.expires_at:
            self.expires_at = identity.expires_at
            if self._expiry is not None:
                self._expiry.cancel()
            delay = max(self.expires_at - time.time(), 0.0)
            self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        if self.expires_at is not None and time.time() < self.expires_at:
            # Extended meanwhile by a fresh token (REAUTH): wait for the new deadline.
            delay = self.expires_at - time.time()
            self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)
            return
        self.gateway.expired_sessions += 1
        _audit_auth(self, "session.expire", self.tenant, "token-expired", self.subject)
        self.close(CLOSE_TOKEN_EXPIRED, "token expired: reconnect with a fresh token")

    # -- QUIC hooks ------------------------------------------------------------------

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        session = self.sessions.get(stream_id)
        if session is None:
            if is_server_initiated(stream_id):  # our event streams take no input
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


def _audit_auth(
    conn: GatewayConnection,
    action: str,
    tenant: object,
    reason: str,
    who: str,
    exc: FelixError | None = None,
) -> None:
    """An authentication refused (or a session ended at its token's expiry): one audit line."""
    audit.emit(
        "auth",
        who=who,
        source=conn.peer,
        tenant=tenant if isinstance(tenant, str) and tenant else None,
        action=action,
        object="session",
        result="denied",
        reason=reason,
        detail=None if exc is None else str(exc),
    )


def _cache_action(opcode: int) -> str:
    return "cache.read" if opcode in (wire.OP_CACHE_GET, wire.OP_CACHE_TTL) else "cache.write"


def _v1_action(req: v1.V1Request) -> str:
    if req.kind == "cache":
        return _cache_action(req.frame[wire.HEADER_SIZE])
    return "stream.subscribe" if req.kind == "subscribe" else "stream.publish"
