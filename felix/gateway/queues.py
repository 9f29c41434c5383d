"""The gateway's side of queue groups: consumers, deliveries, leaves, dead-letter relays.

How it works (docs/queues.md, "Inside the node"): a consumer lives on the client
connection that sent its CONSUME, bound to the QUIC stream it came on (deliveries go
there). The gateway gives it a *member token*, forwards CONSUME with it as the ring
token, and forwards its later requests with the token in the ring record's ``aux``.
The shard's DELIVER records (token = member token) carry DELIVERIES frames written to
the consumer's stream unchanged.

A consumer whose stream or connection goes is told to its shard at once with LEAVE
(abrupt: its leases count a failure and are redelivered without waiting for them to
expire; when the node drains, LEAVE with aux 1 is graceful: nothing counted); a
LEAVE that finds the shard's ring full is retried after the next batch of shard
records. A shard that goes down ends its consumers with CONSUMER_END
(Unavailable): the client consumes again when it is back.

RELAY records are dead-letter appends a shard sends for a stream that may live on
another shard: forwarded as a request there, the answer returned as RELAY_REPLY. In
cluster mode a relay passes the same gate as a client's request: one for a
dead-letter stream whose logical shard this node does not serve now is answered
Unavailable and not appended here (the record stays ``dying`` in its group, which
retries it with backoff; counted in ``relays_refused`` and logged once per stream).
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING

from felix import ipc, wire
from felix.cluster.ownership import Redirect, Serve
from felix.errors import Overloaded, Unavailable
from felix.ipc import RecordType

if TYPE_CHECKING:
    from collections.abc import Callable

    from felix.cluster.ownership import Verdict
    from felix.gateway.cluster import ClusterGate
    from felix.gateway.connection import ConnectionShell
    from felix.gateway.links import ShardLinks

__all__ = ["Consumer", "ConsumerState", "QueueRouter"]

log = logging.getLogger("felix.gateway")

#: Dead-letter streams a gateway remembers having logged a refused relay for (one line each).
MAX_REFUSED_LOGGED = 1024


class ConsumerState(enum.Enum):
    PENDING = "pending"  # CONSUME sent, no answer yet
    ACTIVE = "active"
    CLOSED = "closed"


class Consumer:
    """One queue consumer of a client connection."""

    __slots__ = (
        "conn",
        "consumer_id",
        "credit_bytes",
        "group",
        "key",
        "shard",
        "state",
        "stream_id",
        "token",
    )

    def __init__(
        self,
        conn: ConnectionShell,
        consumer_id: int,
        key: str,
        group: str,
        shard: int,
        token: int,
        stream_id: int,
        credit_bytes: int = ipc.QUEUE_DEFAULT_CREDIT_BYTES,
    ) -> None:
        self.conn = conn
        #: Its window in bytes: what it may have leased, so about what may wait unsent.
        self.credit_bytes = credit_bytes
        self.consumer_id = consumer_id
        self.key = key  # the stream's key (tenant/namespace/stream)
        self.group = group
        self.shard = shard
        self.token = token  # the member token: its identity at the shard
        self.stream_id = stream_id  # the client stream its deliveries go to
        self.state = ConsumerState.PENDING


class QueueRouter:
    """The consumers and relays of one gateway (owned by felix/gateway/gateway.py)."""

    def __init__(
        self, links: ShardLinks, shard_for: Callable[[str], int], new_token: Callable[[], int]
    ) -> None:
        self._links = links
        self._shard_for = shard_for
        self._new_token = new_token
        self.by_token: dict[int, Consumer] = {}
        # LEAVEs that found a ring full: retried after the next batch of shard records.
        self._leaves: list[bytes] = []
        self._leave_shards: list[int] = []
        # Relayed requests: our ring token -> (source shard, relay id).
        # Relayed requests: our ring token -> (source shard, relay id, target shard,
        # logical shard of the dead-letter stream; -1 outside a cluster).
        self._relays: dict[int, tuple[int, int, int, int]] = {}
        # Counters (metrics).
        self.deliveries = 0
        self.leaves = 0
        self.too_slow = 0  # consumers ended for not reading their deliveries
        self.relayed = 0
        #: Cluster mode: relays refused, their dead-letter stream's logical shard not served here.
        self.relays_refused = 0
        self._refused_logged: set[str] = set()

    # -- consumers ---------------------------------------------------------------------

    def add(self, consumer: Consumer) -> None:
        self.by_token[consumer.token] = consumer

    def drop(self, consumer: Consumer, *, leave: bool, graceful: bool = False) -> None:
        """Forget ``consumer``; ``leave``: tell its shard it is gone (abruptly: what it
        holds counts a failure; ``graceful``: released, as when the node drains)."""
        if consumer.state is ConsumerState.CLOSED:
            return
        consumer.state = ConsumerState.CLOSED
        self.by_token.pop(consumer.token, None)
        consumer.conn.consumers.pop(consumer.consumer_id, None)
        if leave:
            body = ipc.encode_key(consumer.key) + ipc.encode_key(consumer.group)
            record = ipc.encode(RecordType.LEAVE, consumer.token, int(graceful), body)
            self._send_leave(consumer.shard, record)

    def _send_leave(self, shard: int, record: bytes) -> None:
        self.leaves += 1
        if not self._links.send(shard, record):
            self._leaves.append(record)
            self._leave_shards.append(shard)

    def retry_leaves(self, shard_ok: list[bool]) -> None:
        if not self._leaves:
            return
        records, shards = self._leaves, self._leave_shards
        self._leaves, self._leave_shards = [], []
        for record, shard in zip(records, shards, strict=True):
            # A shard that went down forgot its members anyway.
            if shard_ok[shard] and not self._links.send(shard, record):
                self._leaves.append(record)
                self._leave_shards.append(shard)

    def on_consume_reply(self, consumer: Consumer, frame: bytes) -> None:
        if consumer.state is not ConsumerState.PENDING:
            return
        if frame[wire.HEADER_SIZE] == wire.OP_CONSUMING:
            consumer.state = ConsumerState.ACTIVE
        else:
            self.drop(consumer, leave=False)

    def on_deliver(self, token: int, frame: bytes) -> None:
        """A DELIVER record: write it to the consumer's stream (or tell the shard it is gone)."""
        consumer = self.by_token.get(token)
        op = frame[wire.HEADER_SIZE]
        if consumer is None:
            return  # gone here: its LEAVE is on the way (or the shard already knows)
        if op == wire.OP_CONSUMER_END:
            consumer.conn.deliver(consumer, frame)
            self.drop(consumer, leave=False)
            return
        backlog = consumer.conn.stream_backlog(consumer.stream_id)
        if backlog > consumer.credit_bytes + ipc.QUEUE_GATEWAY_SLACK:
            # It does not read what it leased (the shard keeps delivering as leases
            # expire): end it rather than buffer without bound; its leases fail.
            self.too_slow += 1
            end = wire.encode_consumer_end(
                consumer.consumer_id,
                Overloaded.code,
                f"consumer too slow: {backlog} bytes of deliveries not read",
            )
            consumer.conn.deliver(consumer, end)
            self.drop(consumer, leave=True)
            return
        if not consumer.conn.deliver(consumer, frame):
            self.drop(consumer, leave=True)  # its stream is gone: what it holds fails
            return
        if op == wire.OP_DELIVERIES:
            self.deliveries += 1

    def stream_closed(self, conn: ConnectionShell, stream_id: int) -> None:
        for consumer in [c for c in conn.consumers.values() if c.stream_id == stream_id]:
            self.drop(consumer, leave=True)

    def connection_lost(self, conn: ConnectionShell) -> None:
        for consumer in list(conn.consumers.values()):
            self.drop(consumer, leave=True)

    def drain(self) -> None:
        """The node drains: every consumer leaves gracefully (no failure counted; what
        they hold goes to other members, or waits for the restarted node)."""
        for consumer in list(self.by_token.values()):
            self.drop(consumer, leave=True, graceful=True)

    def shard_down(self, shard: int) -> None:
        """The shard's process is gone (its members with it): end its consumers."""
        for consumer in [c for c in self.by_token.values() if c.shard == shard]:
            end = wire.encode_consumer_end(
                consumer.consumer_id, Unavailable.code, f"shard {shard} restarted: consume again"
            )
            consumer.conn.deliver(consumer, end)
            self.drop(consumer, leave=False)
        # Relays from it (nobody to answer), and to it (no answer will come: the source
        # retries on its own timer).
        for token in [t for t, r in self._relays.items() if shard in (r[0], r[2])]:
            del self._relays[token]

    def end_moved(self, moved: Callable[[str], bool]) -> None:
        """Cluster mode: end the consumers of streams whose logical shard left this node
        (CONSUMER_END Unavailable, "moved": the client consumes through the new owner);
        they leave their groups gracefully (what they hold is released, no failure)."""
        for consumer in [c for c in self.by_token.values() if moved(c.key)]:
            end = wire.encode_consumer_end(
                consumer.consumer_id,
                Unavailable.code,
                "the stream's shard moved to another node: consume again",
            )
            consumer.conn.deliver(consumer, end)
            self.drop(consumer, leave=True, graceful=True)

    # -- relays --------------------------------------------------------------------------

    def on_relay(
        self,
        source: int,
        relay: int,
        body: bytes,
        shard_ok: list[bool],
        cluster: ClusterGate | None = None,
    ) -> None:
        """A shard asks to publish to a stream that may live elsewhere (a dead letter).

        ``cluster``: the gateway's gate in cluster mode: the dead-letter stream must be
        served by this node now, else the relay is refused (the group retries it)."""
        key, pos = ipc.decode_key(body)
        frame = body[pos:]
        lshard = -1
        if cluster is not None:
            verdict = cluster.verdict(key)
            if type(verdict) is not Serve:
                self.relays_refused += 1
                refusal = self._cluster_refusal(key, verdict)
                self._answer(source, relay, wire.encode_error(0, Unavailable.code, refusal))
                return
            lshard = verdict.shard
        target = self._shard_for(key)
        token = self._new_token()
        if shard_ok[target] and self._links.send(
            target, ipc.encode(RecordType.REQUEST, token, ipc.AUX_DEAD_LETTER, frame)
        ):
            self._relays[token] = (source, relay, target, lshard)
            self.relayed += 1
            return
        self._answer(source, relay, wire.encode_error(0, Unavailable.code, f"shard {target} busy"))

    def relays_in_flight(self, lshards: set[int]) -> int:
        """Dead-letter appends sent to a shard and not answered yet, of these logical
        shards (what a handoff waits for, with the requests in flight)."""
        return sum(1 for r in self._relays.values() if r[3] in lshards)

    def _cluster_refusal(self, key: str, verdict: Verdict) -> str:
        """Why a dead-letter append to ``key`` may not happen here now (logged once)."""
        why = f"dead-letter stream {key} is not served by this node now: " + (
            f"its logical shard {verdict.shard} is the node's at {verdict.owner}"
            if type(verdict) is Redirect
            else verdict.reason  # type: ignore[union-attr]
        )
        if key not in self._refused_logged and len(self._refused_logged) < MAX_REFUSED_LOGGED:
            self._refused_logged.add(key)
            log.warning(
                "%s: its dead letters stay pending (retried) until it is; in a cluster a "
                "custom dead_letter stream must share its source's logical shard (name it "
                "<stream>.dlq)",
                why,
            )
        return why

    def on_reply(self, token: int, frame: bytes) -> bool:
        """A reply: True if it answered a relay (sent back to the shard that asked)."""
        entry = self._relays.pop(token, None)
        if entry is None:
            return False
        source, relay, _target, _lshard = entry
        self._answer(source, relay, frame)
        return True

    def _answer(self, source: int, relay: int, frame: bytes) -> None:
        # Best effort: a full ring or a shard that went down retries on its own timer.
        self._links.send(source, ipc.encode(RecordType.RELAY_REPLY, relay, 0, frame))
