"""The gateway's protocol core for one client connection: bytes and ``now`` in, actions out.

How it works (docs/wire-protocol.md, "Sessions"):

* A :class:`GatewaySession` is one QUIC connection's worth of protocol state,
  with no I/O: its shell (felix/gateway/connection.py) feeds it what QUIC
  delivered (:meth:`~GatewaySession.receive`, :meth:`~GatewaySession.stream_reset`),
  the shards' answers (:meth:`~GatewaySession.reply`,
  :meth:`~GatewaySession.settle`) and the time (every call takes ``now``,
  wall-clock seconds, because tokens expire on the wall clock), then performs
  the actions (felix/gateway/actions.py) :meth:`~GatewaySession.actions`
  hands back, in order, and arms one timer at :meth:`~GatewaySession.get_timer`,
  calling :meth:`~GatewaySession.handle_timer` when it fires. It never reads
  the clock and never touches asyncio, so tests drive it directly and move time.
* Every client-opened stream is a :class:`~felix.gateway.streams.Stream`, its
  states and legal transitions one table (felix/gateway/streams.py). It must
  start with a JSON ``auth`` frame (under the pre-auth cap, within the deadline),
  negotiates the felix extension bit, then carries requests: extension frames,
  or v1 frames translated by felix/gateway/v1.py. Only the auth frame's bytes
  are read under the pre-auth rules: what the client pipelined after it is
  judged by the post-auth ones.
* Every stream carries its own identity: a request is authorised by the token
  of the stream it came on, until that token's expiry; REAUTH refreshes only
  its own stream. At a stream's expiry the stream is closed (and the
  subscriptions it opened are ended); when no live authenticated stream is
  left the connection closes (CLOSE_TOKEN_EXPIRED), as it does, whatever it
  still holds, once every token that authenticated it has expired. After the
  client's STOP_SENDING on a stream nothing more is written on it (the
  engines refuse it).
* Connection-level rules live here too: one tenant per connection (its first
  authenticated stream sets it); a connection with no authenticated stream
  within ``auth_timeout`` of its handshake is closed, and so is one whose
  authenticated streams and subscriptions are all gone (it is then
  unauthenticated again, evictable by admission) unless a stream
  authenticates within ``auth_timeout``; at most
  ``max_auth_failures_per_connection`` failed ``auth`` attempts; failures back
  off the next attempts of the same source and claimed tenant (delayed, never
  refused: felix/gateway/auth.py); incomplete frames are bounded in bytes per
  connection and in time once started (the gateway-wide byte budget is the
  shell's, since it spans connections).
* Every request, extension or v1, passes one admission check
  (:meth:`GatewaySession._admit`: draining, token expiry, requests in flight,
  tenant scope and permission) before it is forwarded.
* Refused authentications, permission denials and expiries become
  :class:`~felix.gateway.actions.Audit` actions (felix/audit.py writes them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from felix import ipc, wire
from felix.auth.tokens import read_unverified_claims
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
from felix.gateway.actions import (
    Action,
    Audit,
    CloseConnection,
    ConnectionAuthenticated,
    ConnectionUnauthenticated,
    Consume,
    Credit,
    EndConsumers,
    Forward,
    GatewayState,
    QueueOp,
    Send,
    StopStream,
    Subscribe,
    Unsubscribe,
)
from felix.gateway.admission import admission_source
from felix.gateway.auth import Identity
from felix.gateway.gateway import (
    CLOSE_AUTH_FAILED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_FRAME_TIMEOUT,
    CLOSE_INPUT_LIMIT,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOKEN_EXPIRED,
    SUPPORTED_FLAGS,
)
from felix.gateway.streams import Stream, StreamState
from felix.gateway.targets import Target, consumer_target, ext_target, v1_target
from felix.names import validate_name
from felix.quic.stream_ids import is_server_initiated

__all__ = ["GatewaySession", "StreamState"]

#: What the client is told when its connection's tokens have all expired.
EXPIRED = "token expired: reconnect with a fresh token"


class GatewaySession:
    """Protocol state of one client connection (see the module docstring)."""

    def __init__(
        self,
        gateway: GatewayState,
        peer: str,
        subscriptions: Mapping[int, object],
        consumers: Mapping[int, Any] | None = None,
    ) -> None:
        self._gateway = gateway
        self._limits = gateway.limits
        #: The client's address (failed authentications are backed off per source).
        self.peer = peer
        # The live subscriptions of this connection, kept by the shell; read only here.
        self._subscriptions = subscriptions
        self._opening: set[int] = set()  # ids in Subscribe actions not yet performed
        # The queue consumers of this connection, kept by the shell (each has the
        # ``stream_id`` its deliveries go to and its stream ``key``); read only here.
        self._consumers: Mapping[int, Any] = {} if consumers is None else consumers
        self._opening_consumers: set[int] = set()  # ids in Consume actions not yet performed
        # Subscriptions opened under a token that expires: sub id -> [stream id, expiry].
        self._sub_expiry: dict[int, list[Any]] = {}
        self.streams: dict[int, Stream] = {}
        #: Requests forwarded and not yet settled, over all streams.
        self.in_flight = 0
        #: Bytes of incomplete frames held for this connection.
        self.buffered = 0
        # v1 subscribers may let the broker pick ids: above any id a client would pick.
        self._next_v1_subscription = 1 << 48
        #: One tenant per connection (set by its first authenticated stream).
        self.tenant: str | None = None
        self.authenticated = False
        self.auth_failures = 0
        self._auth_deadline: float | None = None  # from the handshake, until authenticated
        # While authenticated: the latest expiry of the tokens that authenticated it
        # (inf: one never expires); past it the connection closes even with no stream left.
        self._live_until: float | None = None
        self.closed = False
        self._actions: list[Action] = []
        self._timer: float | None = None
        self._timer_dirty = False

    # -- what the shell calls ---------------------------------------------------------

    def actions(self) -> list[Action]:
        """The actions produced so far, in order (the shell performs them all)."""
        out = self._actions
        if out:
            self._actions = []
            self._opening.clear()
            self._opening_consumers.clear()
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (None: no deadline)."""
        if self._timer_dirty:
            self._timer_dirty = False
            deadlines = [t for s in self.streams.values() for t in s.deadlines()]
            deadlines.extend(expiry for _, expiry in self._sub_expiry.values())
            if self._auth_deadline is not None:
                deadlines.append(self._auth_deadline)
            if self._live_until is not None and self._live_until < math.inf:
                deadlines.append(self._live_until)
            self._timer = None if self.closed else min(deadlines, default=None)
        return self._timer

    def handshake_completed(self, now: float) -> None:
        """The QUIC handshake is done: an authenticated stream is due within the deadline."""
        if not self.authenticated and not self.closed:
            self._auth_deadline = now + self._limits.auth_timeout
            self._timer_dirty = True

    def handle_timer(self, now: float) -> None:
        """Apply every deadline that has passed at ``now``."""
        if self.closed:
            return
        self._timer_dirty = True
        if self._auth_deadline is not None and now >= self._auth_deadline:
            self.close(CLOSE_AUTH_TIMEOUT, "no authenticated stream within the auth deadline")
            return
        for stream in list(self.streams.values()):
            if stream.state is StreamState.CLOSED:
                continue
            if stream.frame_deadline is not None and now >= stream.frame_deadline:
                self._gateway.input_limit_closes += 1
                timeout = self._limits.frame_timeout
                self.close(CLOSE_FRAME_TIMEOUT, f"a frame was not completed within {timeout:g} s")
                return
            if stream.auth_deadline is not None and now >= stream.auth_deadline:
                self._fail(stream, "no auth frame within the deadline", CLOSE_AUTH_TIMEOUT)
            elif stream.retry_at is not None and now >= stream.retry_at:
                self._resume_auth(stream, now)
            elif stream.expires_at is not None and now >= stream.expires_at:
                self._expire(stream, now)
            if self.closed:
                return
        if self._live_until is not None and now >= self._live_until:
            # Every token this connection authenticated with has expired, whatever is
            # left on it (subscriptions, streams that never authenticated).
            self._gateway.expired_sessions += 1
            self.close(CLOSE_TOKEN_EXPIRED, EXPIRED)
            return
        for sub_id, (_, expiry) in list(self._sub_expiry.items()):
            if now >= expiry:
                del self._sub_expiry[sub_id]
                if sub_id in self._subscriptions:
                    self._actions.append(Unsubscribe(sub_id, Unauthenticated.code, EXPIRED))

    def receive(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> None:
        """Bytes (and maybe FIN) the client sent on ``stream_id``."""
        if self.closed:
            return
        self._receive(stream_id, data, end_stream, now)
        self._check_idle(now)

    def _receive(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if is_server_initiated(stream_id):  # our event streams take no input
                return
            limit = self._limits.max_streams_per_connection
            if self._gateway.draining or len(self.streams) >= limit:
                self._actions.append(StopStream(stream_id, CLOSE_PROTOCOL_ERROR))
                return
            stream = self.streams[stream_id] = Stream(stream_id, self._limits, now)
            self._timer_dirty = True
        if data and stream.state is not StreamState.CLOSED:
            self._feed(stream, data, now)
        if not end_stream or self.closed:
            return
        if stream.state is StreamState.CLOSED:
            self.streams.pop(stream_id, None)  # failed earlier; now the client is done too
        elif stream.in_flight:
            stream.transition("fin_owed")
        else:
            self._finish(stream, "fin")

    def stream_reset(self, stream_id: int, now: float) -> None:
        """The client reset ``stream_id``: forget it (answers still owed are dropped)."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None and stream.state is not StreamState.CLOSED:
            self._close_stream(stream, "reset")
        self._check_idle(now)

    def stop_sending(self, stream_id: int, now: float) -> None:
        """The client sent STOP_SENDING on ``stream_id``: nothing more is written on it.

        Requests on it are still read and served (their answers dropped) until the
        client ends or resets its side. The engine may report it before the stream's
        first bytes: the stream is then opened here, under the usual limits.
        """
        if self.closed or is_server_initiated(stream_id):
            return  # event streams: their writes fail and drop the subscription
        if stream_id not in self.streams:
            self._receive(stream_id, b"", False, now)
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_closed = True

    def reply(self, stream_id: int, frame: bytes) -> None:
        """An answer for a forwarded request on ``stream_id`` (dropped if the stream is gone)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.state is not StreamState.CLOSED:
            self._send(stream, frame)

    def can_send(self, stream_id: int) -> bool:
        """Whether frames may still be written on ``stream_id`` (open, not stopped)."""
        stream = self.streams.get(stream_id)
        return (
            stream is not None and stream.state is not StreamState.CLOSED and not stream.send_closed
        )

    def reply_error(self, stream_id: int, request_id: int, exc: FelixError) -> None:
        self.reply(stream_id, _error_frame(request_id, exc))

    def settle(self, stream_id: int, now: float) -> None:
        """A forwarded request on ``stream_id`` is done (answered, or failed to send)."""
        self.in_flight -= 1
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.in_flight -= 1
        if stream.state is StreamState.ENDING and not stream.in_flight:
            self._finish(stream, "settled")
            self._check_idle(now)

    def close(self, code: int, reason: str) -> None:
        """Close the connection (``code``, ``reason`` go to the client)."""
        if not self.closed:
            self._actions.append(CloseConnection(code, reason))
        self.connection_lost()

    def connection_lost(self) -> None:
        """The connection is gone: every stream closes, nothing more is sent."""
        self.closed = True
        self._timer_dirty = True
        for stream in self.streams.values():
            if stream.state is not StreamState.CLOSED:
                self._close_stream(stream, "reset")
        self.streams.clear()
        self._sub_expiry.clear()

    # -- streams ----------------------------------------------------------------------

    def _feed(self, stream: Stream, data: bytes, now: float) -> None:
        if stream.parked is not None:
            stream.held += data  # behind an auth frame waiting for its back-off
            self._account(stream, now, False)
            return
        completed = False
        try:
            if stream.state is StreamState.AUTHENTICATING:
                data = self._feed_auth(stream, data, now)
                if stream.parked is not None:
                    stream.held += data
                completed = _is_ready(stream)  # the auth frame was one
                if not completed or self.closed:
                    data = b""
            if data:
                stream.reader.feed(data)
            for frame in stream.reader:
                completed = True
                if frame.flags == wire.FLAG_FELIX_EXT:
                    self._ext(stream, frame, now)
                elif frame.flags == wire.FLAG_JSON:
                    self._v1(stream, v1.from_json, wire.decode_message(frame), now)
                elif frame.flags in (0x0001, 0x0009):
                    self._v1(stream, v1.from_binary, wire.decode_publish_batch(frame), now)
                else:
                    raise RemoteProtocolError(
                        f"a client does not send frames with flags 0x{frame.flags:04x}"
                    )
                if stream.state is StreamState.CLOSED or self.closed:
                    return
        except RemoteProtocolError as exc:
            self._fail(stream, str(exc))
        if not self.closed and stream.state is not StreamState.CLOSED:
            self._account(stream, now, completed)

    def _feed_auth(self, stream: Stream, data: bytes, now: float) -> bytes:
        """Read the auth frame and nothing beyond it; returns the bytes after it."""
        header = wire.HEADER_SIZE
        while data and stream.state is StreamState.AUTHENTICATING and stream.parked is None:
            fed = stream.auth_fed
            if fed < header:
                room = header - fed
            else:
                room = header + int.from_bytes(stream.auth_head[8:12], "big") - fed
            chunk, data = data[:room], data[room:]
            if fed < header:
                stream.auth_head += chunk
            stream.auth_fed += len(chunk)
            stream.reader.feed(chunk)  # checks the header against the pre-auth rules
            for frame in stream.reader:
                self._auth(stream, frame, now)
        return data

    def _account(self, stream: Stream, now: float, completed: bool) -> None:
        """Keep the incomplete-input budget and the frame deadline in step with the reader."""
        held = stream.reader.buffered + len(stream.held)
        delta = held - stream.buffered
        if delta:
            stream.buffered = held
            self.buffered += delta
            self._gateway.buffered_input += delta
        if stream.state is StreamState.READY and stream.reader.buffered:
            if stream.frame_deadline is None or completed:
                stream.frame_deadline = now + self._limits.frame_timeout
                self._timer_dirty = True
        elif stream.frame_deadline is not None:
            stream.frame_deadline = None
            self._timer_dirty = True
        limit = self._limits.max_buffered_input_per_connection
        if self.buffered > limit:
            self._gateway.input_limit_closes += 1
            self.close(CLOSE_INPUT_LIMIT, f"over {limit} bytes of incomplete frames")

    def _send(self, stream: Stream, frame: bytes, end_stream: bool = False) -> None:
        # Not on the client's unidirectional streams, nor after its STOP_SENDING.
        if not stream.send_closed:
            self._actions.append(Send(stream.stream_id, frame, end_stream))

    def _fail(
        self,
        stream: Stream,
        message: str,
        code: int = CLOSE_PROTOCOL_ERROR,
        *,
        protocol_error: bool = True,
    ) -> None:
        """Tell the client (v1 ``error``) and stop the stream.

        The stream stays in the table, closed, so later bytes on it are ignored.
        """
        if protocol_error:
            self._gateway.protocol_errors += 1
        if stream.state is StreamState.CLOSED:
            return
        self._send(stream, wire.encode_message({"type": "error", "message": message}), True)
        self._actions.append(StopStream(stream.stream_id, code))
        self._close_stream(stream, "fail")

    def _finish(self, stream: Stream, what: str) -> None:
        """Every answer is out and the client is done: FIN our side and forget the stream."""
        self._send(stream, b"", True)
        self._close_stream(stream, what)
        self.streams.pop(stream.stream_id, None)

    def _close_stream(self, stream: Stream, what: str) -> None:
        """Move ``stream`` to CLOSED: release its input budget, drop its deadlines."""
        stream.transition(what)
        if stream.buffered:
            self.buffered -= stream.buffered
            self._gateway.buffered_input -= stream.buffered
            stream.buffered = 0
        stream.held = bytearray()
        stream.parked = None
        if self._consumers or self._opening_consumers:
            # Consumers whose deliveries went to this stream leave their groups.
            self._actions.append(EndConsumers(stream.stream_id))
        if stream.deadlines():
            stream.auth_deadline = stream.frame_deadline = None
            stream.retry_at = stream.expires_at = None
            self._timer_dirty = True

    # -- authentication ---------------------------------------------------------------

    def _auth(self, stream: Stream, frame: wire.Frame, now: float) -> None:
        if frame.flags != 0:
            raise RemoteProtocolError("the first frame on a stream must be a JSON auth message")
        msg = wire.decode_message(frame)
        if msg["type"] != "auth":
            raise RemoteProtocolError(f"expected auth, got {msg['type']}")
        ready = self._gateway.auth_limiter.ready_at(self._throttle_keys(msg), now)
        if ready > now:
            # Recent failures from this source or for this tenant: check it later.
            self._gateway.auth_throttled += 1
            stream.parked, stream.retry_at = msg, ready
            self._timer_dirty = True
            return
        self._check_auth(stream, msg, now)

    def _resume_auth(self, stream: Stream, now: float) -> None:
        msg, stream.parked, stream.retry_at = stream.parked, None, None
        assert msg is not None
        held, stream.held = bytes(stream.held), bytearray()
        self._check_auth(stream, msg, now)
        if held and stream.state is StreamState.READY and not self.closed:
            self._feed(stream, held, now)
        elif not self.closed and stream.state is not StreamState.CLOSED:
            self._account(stream, now, False)

    def _check_auth(self, stream: Stream, msg: dict[str, Any], now: float) -> None:
        gateway = self._gateway
        try:
            identity = gateway.authenticator.authenticate(msg["token"], msg["tenant_id"])
            self._admit_tenant(identity)
        except FelixError as exc:
            gateway.auth_failures += 1
            gateway.auth_limiter.failed(self._throttle_keys(msg), now)
            self.auth_failures += 1
            self._audit_auth(
                "session.auth", msg.get("tenant_id"), error_slug(exc), "anonymous", exc
            )
            self._fail(stream, f"unauthenticated: {exc}")
            if self.auth_failures >= self._limits.max_auth_failures_per_connection:
                reason = "too many failed authentications on this connection"
                self.close(CLOSE_AUTH_FAILED, reason)
            return
        stream.identity = identity
        stream.expires_at = identity.expires_at
        stream.reader.max_frame_size = self._limits.max_frame
        stream.transition("auth_ok")
        stream.auth_deadline = None
        self._timer_dirty = True
        self._extend_live(identity.expires_at)
        if not self.authenticated:
            self.authenticated = True
            self._auth_deadline = None
            self._actions.append(ConnectionAuthenticated())
        offered = msg.get("client_flags")
        if offered is None:
            self._send(stream, wire.encode_message({"type": "ok"}))
            return
        stream.flags = offered & SUPPORTED_FLAGS
        stream.reader.accept_flags = wire.FLAGS_V1 | (stream.flags & wire.FLAG_FELIX_EXT)
        self._send(stream, wire.encode_message({"type": "auth_ok", "server_flags": stream.flags}))

    def _throttle_keys(self, msg: dict[str, Any]) -> list[str]:
        """What failures are backed off by: the source, and the tenant the attempt claims."""
        tenant = msg.get("tenant_id")
        if not tenant:
            try:
                tenant = read_unverified_claims(str(msg.get("token") or "")).get("tid")
            except FelixError:
                tenant = None
        keys = [admission_source(self.peer)]  # a same-host peer by its user
        if isinstance(tenant, str) and tenant:
            keys.append("tenant:" + tenant)
        return keys

    def _admit_tenant(self, identity: Identity) -> None:
        """One tenant per connection: its first authenticated stream's."""
        if self.tenant is None:
            self.tenant = identity.tenant
        elif identity.tenant != self.tenant:
            raise Unauthenticated(f"this connection belongs to tenant {self.tenant!r}")

    def _reauth(self, stream: Stream, token: str, now: float) -> None:
        """A fresh token for this stream: its new permissions and expiry (this stream only)."""
        gateway = self._gateway
        identity = stream.identity
        assert identity is not None
        try:
            fresh = gateway.authenticator.authenticate(token, identity.tenant)
            self._admit_tenant(fresh)
        except FelixError as exc:
            # Counted, but not against the connection's bound: an authenticated client
            # whose refresh keeps failing keeps its stream until its token expires.
            gateway.auth_failures += 1
            self._audit_auth(
                "session.reauth", identity.tenant, error_slug(exc), identity.subject, exc
            )
            raise Unauthenticated(str(exc)) from None
        stream.identity = fresh
        stream.expires_at = fresh.expires_at
        self._extend_live(fresh.expires_at)
        for sub_id, entry in list(self._sub_expiry.items()):
            if entry[0] == stream.stream_id:
                if fresh.expires_at is None:
                    del self._sub_expiry[sub_id]
                else:
                    entry[1] = fresh.expires_at
        self._timer_dirty = True

    def _extend_live(self, expires_at: float | None) -> None:
        until = math.inf if expires_at is None else expires_at
        if self._live_until is None or until > self._live_until:
            self._live_until = until
            self._timer_dirty = True

    def _check_idle(self, now: float) -> None:
        """No authenticated stream and no subscription left: unauthenticated again.

        The connection then must authenticate a stream within ``auth_timeout`` like a
        new one, and admission may evict it for a newcomer: an authentication once
        does not hold a slot for good (felix/gateway/admission.py).
        """
        if not self.authenticated or self.closed or self._subscriptions or self._opening:
            return
        if self._consumers or self._opening_consumers:
            return
        for stream in self.streams.values():
            if stream.state in (StreamState.READY, StreamState.ENDING):
                return
        self.authenticated = False
        self._live_until = None
        self._auth_deadline = now + self._limits.auth_timeout
        self._timer_dirty = True
        self._actions.append(ConnectionUnauthenticated())

    def _expire(self, stream: Stream, now: float) -> None:
        """``stream``'s token expired: close it, or the connection if nothing else is live."""
        self._gateway.expired_sessions += 1
        identity = stream.identity
        who = identity.subject if identity is not None else "anonymous"
        self._audit_auth("session.expire", self.tenant, "token-expired", who)
        live = [
            s
            for s in self.streams.values()
            if s is not stream
            and s.state in (StreamState.READY, StreamState.ENDING)
            and (s.expires_at is None or s.expires_at > now)
        ]
        if not live:
            self.close(CLOSE_TOKEN_EXPIRED, EXPIRED)
            return
        for sub_id, entry in list(self._sub_expiry.items()):
            if entry[0] == stream.stream_id:
                del self._sub_expiry[sub_id]
                if sub_id in self._subscriptions:
                    self._actions.append(Unsubscribe(sub_id, Unauthenticated.code, EXPIRED))
        message = "token expired: present a fresh one (REAUTH) before it expires"
        self._fail(stream, message, CLOSE_TOKEN_EXPIRED, protocol_error=False)

    # -- requests ---------------------------------------------------------------------

    def _ext(self, stream: Stream, frame: wire.Frame, now: float) -> None:
        self._gateway.requests += 1
        try:
            msg = wire.decode_ext(frame)
        except RemoteProtocolError as exc:
            prefix = wire.ext_request_id(frame)
            if prefix is None:
                raise
            self._send(stream, _error_frame(prefix[1], BadRequest(str(exc))))
            return
        try:
            self._dispatch(stream, msg, frame, now)
        except FelixError as exc:
            self._send(stream, _error_frame(msg.request_id, exc))

    def _dispatch(
        self, stream: Stream, msg: wire.ExtMessage, frame: wire.Frame, now: float
    ) -> None:
        op = msg.opcode
        if isinstance(msg, _CONSUMER_REQUESTS):
            self._consumer_request(stream, msg, frame, now)
            return
        target = ext_target(msg)
        self._admit(stream, target, now)
        if isinstance(msg, wire.Reauth):
            self._reauth(stream, msg.token, now)
            self._send(stream, wire.encode_ok(msg.request_id))
        elif op == wire.OP_PING:
            self._send(stream, wire.encode_ok(msg.request_id))
        elif isinstance(msg, wire.ShardMapRequest):
            # The cluster's shard map as this node routes (logical shards 0: standalone).
            self._send(stream, self._gateway.shard_map(msg.request_id))
        elif isinstance(msg, wire.SubscriptionOp):
            if msg.subscription_id not in self._subscriptions:
                raise BadRequest(f"no subscription {msg.subscription_id} on this connection")
            if op == wire.OP_CREDIT:
                self._actions.append(Credit(msg.subscription_id, msg.credit))
            else:
                self._sub_expiry.pop(msg.subscription_id, None)
                self._actions.append(Unsubscribe(msg.subscription_id))
            self._send(stream, wire.encode_ok(msg.request_id))
        elif target is None:
            raise BadRequest(f"opcode 0x{op:02x} is not a request")
        elif isinstance(msg, wire.Consume):
            self._claim_consumer(msg.consumer_id)
            self._forward(
                stream,
                Consume(
                    stream.stream_id,
                    msg.request_id,
                    msg.consumer_id,
                    target.key,
                    msg.group,
                    frame.to_bytes(),
                    msg.credit_bytes,
                ),
            )
        elif isinstance(msg, wire.Subscribe):
            if not stream.flags & wire.FLAG_FELIX_EXT:
                raise BadRequest("subscriptions need the felix extension")
            sub_id = msg.subscription_id
            self._claim_subscription(stream, sub_id)
            self._forward(
                stream,
                Subscribe(
                    stream.stream_id,
                    msg.request_id,
                    sub_id,
                    target.key,
                    frame.to_bytes(),
                    msg.credit,
                ),
            )
        else:
            quiet = isinstance(msg, wire.Publish) and msg.ack == wire.ACK_NONE
            self._forward(
                stream,
                Forward(
                    stream.stream_id, msg.request_id, target.key, frame.to_bytes(), None, quiet
                ),
            )

    def _v1(
        self, stream: Stream, translate: Callable[[Any], v1.V1Request], msg: Any, now: float
    ) -> None:
        """A v1 request: translate it, admit it, forward it; errors answered in v1 form."""
        self._gateway.requests += 1
        try:
            req = translate(msg)
            self._admit(stream, v1_target(req), now)
            if req.kind == "subscribe":
                self._v1_subscribe(stream, req)
            else:
                self._forward(
                    stream, Forward(stream.stream_id, 0, req.route_key, req.frame, req.translate)
                )
        except FelixError as exc:
            self._send(stream, wire.encode_message({"type": "error", "message": str(exc)}))

    def _v1_subscribe(self, stream: Stream, req: v1.V1Request) -> None:
        sub_id = req.subscription_id
        if sub_id is None:
            self._next_v1_subscription += 1
            sub_id = self._next_v1_subscription
        self._claim_subscription(stream, sub_id)
        frame = wire.encode_subscribe(
            0,
            *req.names,
            sub_id,
            start=req.start,  # type: ignore[arg-type]
            credit=0,
        )
        self._forward(
            stream,
            Subscribe(
                stream.stream_id,
                0,
                sub_id,
                ipc.stream_key(*req.names),
                frame,
                0,
                v1_offsets=bool(stream.flags & wire.FLAG_EVENT_BATCH_OFFSETS),
                translate=req.translate,
            ),
        )

    def _consumer_request(
        self, stream: Stream, msg: wire.ExtMessage, frame: wire.Frame, now: float
    ) -> None:
        """ack, nak, release, in_progress, term, window or stop of a consumer of this
        connection: checked (``stream.consume`` on its stream, per request) and forwarded.

        Allowed while the node drains: settling finishes work instead of redelivering it.
        """
        consumer_id = msg.consumer_id  # type: ignore[attr-defined]
        consumer = self._consumers.get(consumer_id)
        if consumer is None:
            raise BadRequest(f"no consumer {consumer_id} on this connection")
        self._admit(stream, consumer_target(consumer.key), now, settling=True)
        stop = msg.opcode == wire.OP_STOP_CONSUME
        if isinstance(msg, wire.ConsumerWindow):
            consumer.credit_bytes = ipc.queue_credit_bytes(msg.credit_bytes)
        self._forward(
            stream, QueueOp(stream.stream_id, msg.request_id, consumer_id, frame.to_bytes(), stop)
        )

    def _claim_consumer(self, consumer_id: int) -> None:
        if consumer_id in self._consumers or consumer_id in self._opening_consumers:
            raise BadRequest(f"consumer {consumer_id} already exists")
        held = len(self._consumers) + len(self._opening_consumers)
        if held >= self._limits.max_consumers_per_connection:
            raise Overloaded("too many consumers on this connection")
        self._opening_consumers.add(consumer_id)

    def _forward(self, stream: Stream, action: Forward | Subscribe | Consume | QueueOp) -> None:
        self.in_flight += 1
        stream.in_flight += 1
        self._actions.append(action)

    def _claim_subscription(self, stream: Stream, sub_id: int) -> None:
        if sub_id in self._subscriptions or sub_id in self._opening:
            raise BadRequest(f"subscription {sub_id} already exists")
        if (
            len(self._subscriptions) + len(self._opening)
            >= self._limits.max_subscriptions_per_connection
        ):
            raise Overloaded("too many subscriptions on this connection")
        self._opening.add(sub_id)
        if stream.expires_at is not None:
            # The subscription is authorised by this stream's token: it ends with it.
            if len(self._sub_expiry) > 2 * self._limits.max_subscriptions_per_connection:
                for gone in [s for s in self._sub_expiry if s not in self._subscriptions]:
                    del self._sub_expiry[gone]
            self._sub_expiry[sub_id] = [stream.stream_id, stream.expires_at]
            self._timer_dirty = True

    # -- admission --------------------------------------------------------------------

    def _admit(
        self, stream: Stream, target: Target | None, now: float, *, settling: bool = False
    ) -> None:
        """Whether a request may go ahead: the one check for extension and v1 requests.

        ``settling``: a consumer's request on work it holds, allowed while draining.

        ``target`` None: a control request (ping, reauth, credit, unsubscribe), which
        is refused only while the node drains or once the stream's token expired.
        """
        gateway = self._gateway
        if gateway.draining and not settling:
            raise Unavailable("node is draining; reconnect")
        if stream.expires_at is not None and now >= stream.expires_at:
            raise Unauthenticated("this stream's token expired")
        if target is None:
            return
        if self.in_flight >= self._limits.max_in_flight_per_connection:
            gateway.overloaded += 1
            raise Overloaded("too many requests in flight on this connection")
        identity = stream.identity
        assert identity is not None  # requests are only served after auth
        tenant, namespace, kind, name = target.tenant, target.namespace, target.kind, target.name
        obj = f"{kind}:{tenant}/{namespace}/{name}"
        if tenant != identity.tenant:
            self._audit_denied(stream, target.action, obj, "other tenant")
            raise PermissionDenied(f"this session belongs to tenant {identity.tenant!r}")
        validate_name("namespace", namespace)
        validate_name(kind, name)
        allowed = (
            identity.allows_cache(target.action, namespace, name)
            if kind == "cache"
            else identity.allows_stream(target.action, namespace, name)
        )
        if not allowed:
            self._audit_denied(stream, target.action, obj, "not granted")
            raise PermissionDenied(
                f"{target.action} on {kind} {tenant}/{namespace}/{name} is not granted"
            )

    # -- audit ------------------------------------------------------------------------

    def _audit_denied(self, stream: Stream, action: str, obj: str, detail: str) -> None:
        self._gateway.permission_denials += 1
        identity = stream.identity
        who = identity.subject if identity is not None else "anonymous"
        tenant = identity.tenant if identity is not None else None
        self._actions.append(
            Audit("permission", who, self.peer, tenant, action, obj, "permission-denied", detail)
        )

    def _audit_auth(
        self, action: str, tenant: object, reason: str, who: str, exc: FelixError | None = None
    ) -> None:
        """An authentication refused (or a stream ended at its token's expiry)."""
        self._actions.append(
            Audit(
                "auth",
                who,
                self.peer,
                tenant if isinstance(tenant, str) and tenant else None,
                action,
                "session",
                reason,
                None if exc is None else str(exc),
            )
        )


# --- helpers ---------------------------------------------------------------------------


#: Requests that name one of the connection's consumers (not a stream).
_CONSUMER_REQUESTS = (wire.Settle, wire.ConsumerWindow, wire.ConsumerOp)


def _is_ready(stream: Stream) -> bool:
    return stream.state is StreamState.READY


def _error_frame(request_id: int, exc: FelixError) -> bytes:
    return wire.encode_error(request_id, exc.code or BadRequest.code, str(exc))
