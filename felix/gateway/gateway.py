"""The gateway: QUIC connections in, requests routed to shards, replies and events out.

How it works:

- Every client connection is a protocol core (felix/gateway/session.py: the
  auth handshake, flags, admission and deadlines of each of its streams) in a
  shell that performs its actions (felix/gateway/connection.py); the shell is
  what this module calls a connection (docs/wire-protocol.md, "Sessions").
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

Transmits are coalesced per connection per loop tick (felix/quic/protocol.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from felix import ipc, wire
from felix.cluster.ownership import OwnershipMap, Redirect, Serve, logical_shard
from felix.errors import (
    FelixError,
    NotFound,
    Overloaded,
    TooLarge,
    Unavailable,
)
from felix.gateway import v1
from felix.gateway.admission import ConnectionTable
from felix.gateway.auth import Authenticator, DevAuthenticator, FailureLimiter
from felix.gateway.cluster import ClusterGate
from felix.gateway.links import ShardLinks
from felix.gateway.queues import Consumer, QueueRouter
from felix.gateway.subscription import (
    READ_BYTES,
    READ_RECORDS,
    Subscription,
    SubState,
    events_count,
)
from felix.ipc import RecordType

if TYPE_CHECKING:
    from felix.gateway.connection import ConnectionShell

log = logging.getLogger("felix.gateway")

#: Flags this broker understands from clients: all of v1 plus the felix extension.
SUPPORTED_FLAGS = wire.FLAGS_V1 | wire.FLAG_FELIX_EXT
#: QUIC application error codes used when the broker closes a stream or connection.
CLOSE_PROTOCOL_ERROR = 0x101
CLOSE_AUTH_TIMEOUT = 0x102
CLOSE_DRAINING = 0x103
CLOSE_OVERLOADED = 0x104
CLOSE_AUTH_FAILED = 0x105
CLOSE_TOKEN_EXPIRED = 0x106
CLOSE_INPUT_LIMIT = 0x107
CLOSE_FRAME_TIMEOUT = 0x108


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """Bounds of one gateway (defaults: docs/architecture.md, "Bounds": 64 KiB / 4 MiB frames)."""

    max_frame_pre_auth: int = 64 * 1024
    max_frame: int = 4 * 1024 * 1024
    auth_timeout: float = 5.0
    max_connections: int = 10_000
    max_streams_per_connection: int = 256
    max_subscriptions_per_connection: int = 1024
    #: Queue consumers one connection may hold (docs/queues.md).
    max_consumers_per_connection: int = 1024
    max_in_flight_per_connection: int = 4096
    #: Connections that have no authenticated stream yet: over either bound the
    #: oldest unauthenticated connection is closed to admit the new one (per source:
    #: the new one is refused instead), so idle connections never lock clients out.
    max_unauthenticated: int = 1024
    max_unauthenticated_per_source: int = 64
    #: Failed authentications one connection may make before it is closed.
    max_auth_failures_per_connection: int = 8
    #: Bytes of incomplete frames held for one connection, and for the whole gateway
    #: (over it, the connection holding the most is closed), and how long a frame may
    #: take to arrive once it started.
    max_buffered_input_per_connection: int = 16 * 1024 * 1024
    max_buffered_input: int = 256 * 1024 * 1024
    frame_timeout: float = 30.0


class _Pending:
    """A request forwarded to a shard, waiting for its reply."""

    __slots__ = (
        "conn",
        "consumer",
        "lshard",
        "quiet",
        "request_id",
        "shard",
        "stream_id",
        "subscription",
        "translate",
    )

    def __init__(
        self,
        conn: ConnectionShell,
        stream_id: int,
        request_id: int,
        shard: int,
        subscription: Subscription | None = None,
        translate: v1.Translate | None = None,
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id  # the client stream the answer goes to
        self.request_id = request_id
        self.shard = shard
        self.subscription = subscription
        # For v1 peers: how to turn the shard's reply into the answer they expect.
        self.translate = translate
        # A publish without ack: success is not answered (errors still are).
        self.quiet = False
        #: A CONSUME: the consumer it opens (dropped if the shard refuses it).
        self.consumer: Consumer | None = None
        #: Cluster mode: the logical shard it was admitted for (-1: standalone).
        self.lshard = -1


class Gateway:
    """State shared by all connections of one gateway process."""

    def __init__(
        self,
        index: int,
        links: ShardLinks,
        limits: GatewayLimits | None = None,
        *,
        incarnation: int = 0,
        authenticator: Authenticator | None = None,
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
        limits = self.limits
        #: Connections admitted, and which are still unauthenticated (felix/gateway/admission.py).
        self.admission: ConnectionTable[ConnectionShell] = ConnectionTable(
            limits.max_connections,
            limits.max_unauthenticated,
            limits.max_unauthenticated_per_source,
        )
        self.connections = self.admission.connections
        # Subscribers whose connection failed to take a delivery: dropped after the batch.
        self._failed_subscribers: list[Subscription] = []
        self._logged_errors: set[str] = set()
        self.draining = False
        self._barriers: dict[int, asyncio.Future[None]] = {}
        # block policy: streams with such subscribers here, and the cursor last reported.
        self._block_keys: set[str] = set()
        self._cursors: dict[str, int] = {}
        # Streams nobody here subscribes to any more whose WATCH-off found the shard's
        # ring full: retried after every batch of shard records (one per stream key, so
        # bounded by the streams this gateway ever watched at once).
        self._unwatch: set[str] = set()
        # Counters (metrics).
        self.requests = 0
        self.protocol_errors = 0
        self.overloaded = 0
        self.slow_consumer_events = 0
        self.dropped_records = 0  # records subscribers lost (told with SLOW_CONSUMER)
        self.gap_offsets = 0  # offsets skipped that were never assigned (shard restarts)
        self.delivered_records = 0
        self.refused_connections = 0
        self.auth_failures = 0
        self.expired_sessions = 0
        self.permission_denials = 0
        self.auth_throttled = 0  # auth attempts delayed by the failure back-off
        self.evicted_connections = 0  # unauthenticated connections closed to admit others
        self.input_limit_closes = 0  # connections closed over an input budget or deadline
        self.internal_errors = 0
        self.deferred_unwatches = 0  # WATCH-off records retried because a ring was full
        #: Bytes of incomplete frames held for all connections (sessions count into it).
        self.buffered_input = 0
        self.authenticator: Authenticator = authenticator or DevAuthenticator()
        self.auth_limiter = FailureLimiter()
        #: Queue consumers and dead-letter relays (felix/gateway/queues.py).
        self.queues = QueueRouter(links, self.shard_for, self.token)
        #: Cluster mode: the shard map every request is checked against (None: standalone).
        self.cluster: ClusterGate | None = None
        links.attach(index, self.on_shard_records)

    # -- routing ---------------------------------------------------------------------

    def shard_for(self, key: str) -> int:
        return ipc.shard_for(key, self.links.shards)

    def token(self) -> int:
        t = self._next_token
        self._next_token += 1
        return t

    def forward(
        self,
        pending: _Pending,
        token: int,
        record: bytes,
        key: str | None = None,
        *,
        redirect: bool = True,
    ) -> bool:
        """Send a request record to its shard, or answer the client that it cannot be sent.

        ``key``: the request's routing key, checked against the shard map in cluster
        mode; ``redirect`` False: a request that cannot go elsewhere (a consumer's ack)
        is refused rather than redirected.

        False: not sent (the client was answered); the caller settles the request.
        """
        if self.cluster is not None and key is not None and not self._admit(pending, key, redirect):
            return False
        if len(record) > self.links.max_record_size:
            pending.conn.reply_error(
                pending,
                TooLarge(
                    f"request of {len(record)} bytes exceeds this node's "
                    f"{self.links.max_record_size}-byte limit for one request"
                ),
            )
            return False
        if not self.shard_ok[pending.shard]:
            pending.conn.reply_error(
                pending, Unavailable(f"shard {pending.shard} is restarting; retry")
            )
            return False
        if not self.links.send(pending.shard, record):
            self.overloaded += 1
            pending.conn.reply_error(pending, Overloaded(f"shard {pending.shard} is busy; retry"))
            return False
        self._pending[token] = pending
        return True

    # -- cluster mode -------------------------------------------------------------------

    def _admit(self, pending: _Pending, key: str, redirect: bool) -> bool:
        """Whether this node serves ``key`` now (else the client was answered)."""
        cluster = self.cluster
        assert cluster is not None
        verdict = cluster.verdict(key)
        if type(verdict) is Serve:
            pending.lshard = verdict.shard
            return True
        if type(verdict) is Redirect and redirect:
            cluster.redirects += 1
            if pending.translate is None:
                pending.conn.reply(
                    pending,
                    wire.encode_redirect(
                        pending.request_id, verdict.shard, verdict.epoch, verdict.owner
                    ),
                )
            else:  # a v1 client cannot follow a redirect
                self._refuse(
                    pending,
                    Unavailable(
                        f"shard {verdict.shard} is served by the node at {verdict.owner}: "
                        "connect there (v1 clients are not redirected)"
                    ),
                )
            return False
        cluster.refused += 1
        if type(verdict) is Redirect:
            message = f"shard {verdict.shard} moved to the node at {verdict.owner}; retry there"
        else:
            message = verdict.reason  # type: ignore[union-attr]
        self._refuse(pending, Unavailable(message))
        return False

    def _refuse(self, pending: _Pending, exc: FelixError) -> None:
        if pending.translate is None:
            pending.conn.reply_error(pending, exc)
        else:
            pending.conn.reply(pending, wire.encode_message({"type": "error", "message": str(exc)}))

    def shard_map(self, request_id: int) -> bytes:
        """The SHARD_MAP answer (logical shards 0: a standalone node)."""
        if self.cluster is None:
            return wire.encode_shard_map(request_id, 0, 0, [], [], [])
        return self.cluster.shard_map(request_id)

    def apply_ownership(self, new: OwnershipMap) -> set[int] | None:
        """Take a new shard map (cluster mode); end what it takes away from this node:
        the subscriptions and consumers of those logical shards, told Unavailable
        ("moved") so their clients re-route. Returns the logical shards taken away
        (None: the map was not newer than the one held)."""
        if self.cluster is None:
            self.cluster = ClusterGate()
        lost = self.cluster.apply(new)
        if not lost:
            return lost
        count = new.logical_shards

        def moved(key: str) -> bool:
            return logical_shard(key, count) in lost

        for sub in [s for s in self._subs_by_token.values() if moved(s.key)]:
            shard = logical_shard(sub.key, count)
            sub.conn.end_subscription(
                sub, Unavailable.code, f"shard {shard} moved to another node: subscribe again"
            )
            self._drop_subscription(sub)
        self.queues.end_moved(moved)
        return lost

    def in_flight_for(self, shards: set[int]) -> int:
        """Requests sent to shards and not answered yet (dead-letter appends included),
        of these logical shards."""
        pending = sum(1 for p in self._pending.values() if p.lshard in shards)
        return pending + self.queues.relays_in_flight(shards)

    # -- records from shards ------------------------------------------------------------

    def on_shard_records(self, shard: int, records: Sequence[bytes | memoryview]) -> None:
        for record in records:
            try:
                kind, token, aux = ipc.decode_header(record)
                body = bytes(record[ipc.HEADER_SIZE :])
                if kind == RecordType.REPLY:
                    self._on_reply(token, body, aux)
                elif kind == RecordType.PUSH:
                    key, pos = ipc.decode_key(body)
                    self._on_push(key, body[pos:])
                elif kind == RecordType.READ_REPLY:
                    self._on_read_reply(token, aux, body)
                elif kind == RecordType.END:
                    self._on_stream_end(ipc.decode_key(body)[0], aux)
                elif kind == RecordType.DELIVER:
                    self.queues.on_deliver(token, body)
                elif kind == RecordType.RELAY:
                    self.queues.on_relay(shard, token, body, self.shard_ok, self.cluster)
                else:
                    log.warning(
                        "gateway %d: unexpected record kind %d from shard %d",
                        self.index,
                        kind,
                        shard,
                    )
            except Exception:
                # One bad record must not take the gateway down; one traceback per kind
                # of failure, the rest counted (felix_internal_errors).
                self.internal_error(f"record from shard {shard}")
        self._drop_failed_subscribers()
        if self._unwatch:
            self._send_unwatches()
        self.queues.retry_leaves(self.shard_ok)

    def internal_error(self, where: str) -> None:
        """Count an unexpected exception (being handled); log its traceback once per place."""
        self.internal_errors += 1
        if where in self._logged_errors:
            return
        self._logged_errors.add(where)
        log.exception(
            "gateway %d: unexpected error handling a %s (logged once; counted in "
            "felix_internal_errors)",
            self.index,
            where,
        )

    def subscriber_failed(self, sub: Subscription) -> None:
        """``sub``'s connection could not take a delivery: drop it once this batch is done.

        Deferred so that the loops over a stream's subscribers never change under them
        and one broken subscriber never costs another its delivery.
        """
        if sub.state is not SubState.CLOSED:
            sub.state = SubState.CLOSED
            self._failed_subscribers.append(sub)

    def _drop_failed_subscribers(self) -> None:
        while self._failed_subscribers:
            self._drop_subscription(self._failed_subscribers.pop())

    def _on_reply(self, token: int, frame: bytes, aux: int = 0) -> None:
        barrier = self._barriers.pop(token, None)
        if barrier is not None:
            if not barrier.done():
                barrier.set_result(None)
            return
        pending = self._pending.pop(token, None)
        if pending is None:
            self.queues.on_reply(token, frame)  # a dead-letter relay's answer, or nobody's
            return  # its connection went away, or the shard restarted: nobody waits
        if pending.consumer is not None:
            self.queues.on_consume_reply(pending.consumer, frame)
        sub = pending.subscription
        if sub is not None:
            was_pending = sub.state is SubState.PENDING
            self._on_subscribe_reply(sub, frame, aux)
            if (
                was_pending
                and sub.state is SubState.CLOSED
                and frame[wire.HEADER_SIZE] == wire.OP_SUBSCRIBED
            ):
                # Subscribed at the shard, but no event stream could be opened for it.
                frame = wire.encode_error(
                    pending.request_id,
                    Overloaded.code,
                    "could not open an event stream for this subscription",
                )
        try:
            if pending.translate is None:
                if not (pending.quiet and frame[wire.HEADER_SIZE] == wire.OP_OK):
                    pending.conn.reply(pending, frame)
            else:
                decoded = wire.decode_frame(frame, extensions=True)
                answer = pending.translate(wire.decode_ext(decoded))
                if answer is not None:
                    pending.conn.reply(pending, answer)
        finally:
            pending.conn.settle(pending)  # whatever became of the answer: never leaked

    def _on_subscribe_reply(self, sub: Subscription, frame: bytes, policy: int) -> None:
        if sub.state is not SubState.PENDING:
            return
        # A newer shard's policy this gateway does not know: keep the default.
        with contextlib.suppress(ValueError):
            sub.policy = ipc.SlowSubscriberPolicy(policy).setting
        if frame[wire.HEADER_SIZE] != wire.OP_SUBSCRIBED:
            self._drop_subscription(sub)
            return
        reply = wire.decode_ext(wire.decode_frame(frame, extensions=True))
        assert isinstance(reply, wire.Subscribed)
        sub.state = SubState.ACTIVE
        sub.next_offset = sub.known_tail = reply.start_offset
        if sub.policy == "block":
            self._block_keys.add(sub.key)
            self._report_cursor(sub.key)
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
            if sub.seen_tail < end:
                sub.seen_tail = end
            if count and sub.can_take_shared(base):
                out = frame
                if sub.v1_offsets is not None:
                    out = v1_frames.get(sub.v1_offsets) or v1_frames.setdefault(
                        sub.v1_offsets, v1.event_batch(frame, sub.v1_offsets)
                    )
                sub.conn.send_events(sub, out, base, count)
                self.delivered_records += count
            else:
                self._read_or_wait(sub)
        if key in self._block_keys:
            self._report_cursor(key)

    def _on_stream_end(self, key: str, aux: int = 0) -> None:
        for sub in list(self._subs_by_key.get(key, ())):
            if aux == ipc.END_MOVED:  # cluster mode: its logical shard moved away
                sub.conn.end_subscription(
                    sub, Unavailable.code, f"stream {key} moved to another node: subscribe again"
                )
            else:
                sub.conn.end_subscription(sub, NotFound.code, f"stream {key} was deleted")
            self._drop_subscription(sub)

    def _on_read_reply(self, token: int, tail: int, frame: bytes) -> None:
        sub = self._subs_by_token.get(token)
        if sub is None or sub.state is not SubState.ACTIVE:
            return
        sub.reading = False
        sub.known_tail = max(tail, sub.next_offset)
        sub.seen_tail = max(sub.seen_tail, tail)
        op = frame[wire.HEADER_SIZE]
        if op == wire.OP_EVENTS:
            base, count = events_count(frame)
            if base > sub.next_offset:
                # A durable stream read from disk skips offsets that hold no record
                # (never assigned, or lost unsynced in a crash): a gap, not a loss.
                gap = base - sub.next_offset
                sub.gaps += gap
                self.gap_offsets += gap
                sub.next_offset = base
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
        elif op == wire.OP_ERROR:
            # The stream cannot be read (a durable stream's log is damaged): end the
            # subscription with the shard's error instead of reading again.
            err = wire.decode_ext(wire.decode_frame(frame, extensions=True))
            assert isinstance(err, wire.ErrorReply)
            sub.conn.end_subscription(sub, err.code, err.message)
            self._drop_subscription(sub)
            return
        self._read_or_wait(sub)
        if sub.key in self._block_keys:
            self._report_cursor(sub.key)

    def _slow_subscriber(self, sub: Subscription, available: int) -> bool:
        """The subscriber's position left the replay ring: apply its policy.

        Only records that existed count as lost (SLOW_CONSUMER); offsets skipped
        after a shard restart that were never assigned are a gap, not a loss.
        """
        lost, gap = sub.skipped(available)
        sub.gaps += gap
        self.gap_offsets += gap
        if not lost:
            sub.next_offset = available  # nothing was lost: the next batch shows the jump
            return True
        self.slow_consumer_events += 1
        self.dropped_records += lost
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

    def _report_cursor(self, key: str) -> None:
        """Tell ``key``'s shard the lowest offset this gateway's block subscribers still need.

        Sent only when it changed; the shard refuses appends that would evict it.
        """
        low = min(
            (
                s.next_offset
                for s in self._subs_by_key.get(key, ())
                if s.policy == "block" and s.state is SubState.ACTIVE
            ),
            default=None,
        )
        if low == self._cursors.get(key):
            return
        shard = self.shard_for(key)
        if not self.shard_ok[shard]:
            return
        clear = low is None
        record = ipc.encode(RecordType.CURSOR, 1 if clear else 0, low or 0, ipc.encode_key(key))
        if not self.links.send(shard, record):
            return  # ring full: the next delivery reports again
        if low is None:
            self._cursors.pop(key, None)
            self._block_keys.discard(key)
        else:
            self._cursors[key] = low

    def _read_or_wait(self, sub: Subscription) -> None:
        """READ for ``sub`` if it is behind and has room; if only its event stream's
        backlog stops it, remember it: :meth:`transmitted` reads once that drains (no
        push or credit may ever come to wake it otherwise)."""
        if sub.wants_read():
            self._read(sub)
        elif sub.held_by_backlog():
            sub.conn.backlogged.add(sub)

    def transmitted(self, conn: ConnectionShell) -> None:
        """``conn`` handed data to the network: subscribers that waited for room read."""
        for sub in list(conn.backlogged):
            if sub.state is not SubState.ACTIVE:
                conn.backlogged.discard(sub)
            elif not sub.held_by_backlog():
                conn.backlogged.discard(sub)
                if sub.wants_read():
                    self._read(sub)

    def _read(self, sub: Subscription) -> None:
        if not self.shard_ok[sub.shard]:
            return
        record = ipc.encode_read(sub.token, sub.key, sub.next_offset, READ_RECORDS, READ_BYTES)
        if self.links.send(sub.shard, record):
            sub.reading = True
        # else: the ring is full; the next push or credit retries.

    # -- subscriptions ------------------------------------------------------------------

    def add_subscription(self, sub: Subscription) -> None:
        self._unwatch.discard(sub.key)  # watched again: its SUBSCRIBE re-attaches the watch
        self._subs_by_token[sub.token] = sub
        self._subs_by_key.setdefault(sub.key, set()).add(sub)

    def _drop_subscription(self, sub: Subscription) -> None:
        sub.state = SubState.CLOSED
        self._subs_by_token.pop(sub.token, None)
        subs = self._subs_by_key.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if sub.key in self._block_keys:
                self._report_cursor(sub.key)
            if not subs:
                del self._subs_by_key[sub.key]
                self._unwatch.add(sub.key)
                self._send_unwatches()
        sub.conn.subscriptions.pop(sub.sub_id, None)

    def _send_unwatches(self) -> None:
        """Tell shards to stop pushing streams nobody here subscribes to (WATCH off).

        A shard that is down forgets this gateway's watches anyway (shard_up sends
        only the live ones); a full ring keeps the key for the next try, else the
        shard would hold the watch, and the resource counted for it, for good.
        """
        for key in list(self._unwatch):
            shard = self.shard_for(key)
            record = ipc.encode(RecordType.WATCH, 0, 0, ipc.encode_key(key))
            if not self.shard_ok[shard] or self.links.send(shard, record):
                self._unwatch.discard(key)
            else:
                self.deferred_unwatches += 1

    def credit(self, sub: Subscription, n: int) -> None:
        sub.add_credit(n)
        if sub.wants_read():
            self._read(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        self._drop_subscription(sub)

    # -- connections and shards ------------------------------------------------------

    def connection_lost(self, conn: ConnectionShell) -> None:
        self.admission.remove(conn)
        for token in [t for t, p in self._pending.items() if p.conn is conn]:
            del self._pending[token]
        for sub in list(conn.subscriptions.values()):
            self._drop_subscription(sub)
        self.queues.connection_lost(conn)

    def shard_down(self, shard: int) -> None:
        """Fail everything in flight to ``shard`` now; refuse new requests until it is back."""
        self.shard_ok[shard] = False
        for token in [t for t, p in self._pending.items() if p.shard == shard]:
            pending = self._pending.pop(token)
            # One connection failing to take its answer must not cost the others theirs.
            try:
                if pending.subscription is not None:
                    self._drop_subscription(pending.subscription)
                if pending.consumer is not None:
                    self.queues.drop(pending.consumer, leave=False)
                pending.conn.reply_error(pending, Unavailable(f"shard {shard} went down; retry"))
            except Exception:
                self.internal_error("answer for a request to a shard that went down")
            try:
                pending.conn.settle(pending)
            except Exception:
                self.internal_error("answer for a request to a shard that went down")
        self.queues.shard_down(shard)
        for sub in self._subs_by_token.values():
            if sub.shard == shard:
                sub.reading = False
                # What it may still miss ends here: above, the restarted shard skips
                # offsets that were never assigned.
                sub.lost_until = sub.seen_tail if sub.lost_until is None else sub.lost_until

    def shard_up(self, shard: int) -> None:
        """``shard`` is back (a new process): re-attach this gateway's watches and readers."""
        self.shard_ok[shard] = True
        self.links.send(shard, ipc.encode(RecordType.HELLO, 0, self.index, b""))
        for key in [k for k in self._cursors if self.shard_for(k) == shard]:
            del self._cursors[key]  # the new shard knows none: report them again
        for key, subs in self._subs_by_key.items():
            if subs and self.shard_for(key) == shard:
                self.links.send(shard, ipc.encode(RecordType.WATCH, 0, 1, ipc.encode_key(key)))
                for sub in subs:
                    if sub.state is SubState.ACTIVE:
                        sub.known_tail = max(sub.known_tail, sub.next_offset + 1)
                        if sub.wants_read():
                            self._read(sub)
                if key in self._block_keys:
                    self._report_cursor(key)

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
            record = ipc.encode(RecordType.REQUEST, token, 0, wire.encode_ping(0))
            if self.shard_ok[shard] and self.links.send(shard, record):
                barriers.append(self._barriers.setdefault(token, loop.create_future()))
        if barriers:
            await asyncio.wait(barriers, timeout=grace)
        while loop.time() < deadline and not self._flushed():
            await asyncio.sleep(0.01)
        # Consumers leave gracefully before their connections close (which would count
        # a failure for every record they hold): a rolling restart costs no retries.
        self.queues.drain()
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
