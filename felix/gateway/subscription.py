"""One subscriber's cursor, credit and slow-subscriber policy, inside a gateway.

How it works: a subscription is *caught up* when its next offset equals the
stream's tail as far as the gateway knows. Caught-up subscriptions with credit
get the shard's shared EVENTS frame for each new batch (the same bytes object
for every subscriber: encode once). Anything else (no credit, the client's
QUIC stream is backed up, a gap after a restart, a start in the past) makes it
*lag*: it stops taking shared frames and pulls from the stream's replay ring
with READs, one at a time, until it reaches the tail again. So a slow
subscriber is never buffered in the broker beyond its credit; if it falls out
of the replay ring, its policy fires (drop_old: skip to the oldest record with a
SLOW_CONSUMER notice and a visible offset gap; disconnect: SUBSCRIPTION_END).

Records lost and offsets never assigned are told apart: after its shard
restarts, a stream continues above its reserved offsets, so the range a
subscriber skips holds the records it missed (up to the tail the gateway had
seen before the restart) and offsets nobody was ever given. SLOW_CONSUMER
counts only the former (``dropped``); the rest is a jump in the next batch's
base offset, counted in ``gaps``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from felix import wire

if TYPE_CHECKING:
    from felix.gateway.connection import ConnectionShell

#: Most credit a client may hold (records); more is capped, not refused.
MAX_CREDIT = 1 << 16
#: Credit when the client asks for the default (0).
DEFAULT_CREDIT = 1024
#: Bytes queued in QUIC for an event stream beyond which the subscription stalls.
MAX_QUEUED_BYTES = 4 * 1024 * 1024
#: Records and bytes per READ.
READ_RECORDS = 1024
READ_BYTES = 512 * 1024


class SubState(enum.Enum):
    PENDING = "pending"  # SUBSCRIBE sent to the shard, no answer yet
    ACTIVE = "active"
    CLOSED = "closed"


class Subscription:
    """A client's subscription as its gateway tracks it."""

    __slots__ = (
        "conn",
        "credit",
        "dropped",
        "event_stream",
        "gaps",
        "key",
        "known_tail",
        "lost_until",
        "next_offset",
        "policy",
        "reading",
        "seen_tail",
        "shard",
        "state",
        "sub_id",
        "token",
        "v1_offsets",
    )

    def __init__(
        self,
        conn: ConnectionShell,
        sub_id: int,
        key: str,
        shard: int,
        token: int,
        credit: int,
        policy: str,
    ) -> None:
        self.conn = conn
        self.sub_id = sub_id
        self.key = key
        self.shard = shard
        self.token = token
        self.credit = min(credit or DEFAULT_CREDIT, MAX_CREDIT)
        self.policy = policy
        self.state = SubState.PENDING
        self.event_stream: int | None = None
        self.next_offset = 0
        self.known_tail = 0
        self.reading = False
        self.dropped = 0
        self.gaps = 0
        # The stream's tail as the shard reported it (offsets below were assigned)...
        self.seen_tail = 0
        # ...frozen when the shard went down: above it, offsets may never have been assigned.
        self.lost_until: int | None = None
        #: None for felix clients; for v1 peers, whether their batches carry offsets.
        self.v1_offsets: bool | None = None

    # -- decisions (no I/O: the gateway carries them out) ------------------------------

    def can_take_shared(self, base: int) -> bool:
        """Whether the shared frame of a batch starting at ``base`` goes to this subscriber."""
        return (
            self.state is SubState.ACTIVE
            and not self.reading
            and base == self.next_offset
            and self.credit > 0
            and self.conn.event_stream_backlog(self) < MAX_QUEUED_BYTES
        )

    def delivered(self, base: int, count: int) -> None:
        self.next_offset = base + count
        self.known_tail = max(self.known_tail, self.next_offset)
        if self.v1_offsets is None:  # v1 peers have no credit to spend
            self.credit -= count

    def wants_read(self) -> bool:
        """Behind the known tail, with room to take more, and no READ in flight."""
        return (
            self.state is SubState.ACTIVE
            and not self.reading
            and self.next_offset < self.known_tail
            and self.credit > 0
            and self.conn.event_stream_backlog(self) < MAX_QUEUED_BYTES
        )

    def held_by_backlog(self) -> bool:
        """Behind, with credit and no READ in flight, but its event stream holds the
        most the gateway queues for one subscriber: it reads once that drains."""
        return (
            self.state is SubState.ACTIVE
            and not self.reading
            and self.next_offset < self.known_tail
            and self.credit > 0
            and self.conn.event_stream_backlog(self) >= MAX_QUEUED_BYTES
        )

    def add_credit(self, n: int) -> None:
        self.credit = min(self.credit + n, MAX_CREDIT)

    def skipped(self, available: int) -> tuple[int, int]:
        """``(records lost, offsets never assigned)`` when skipping to ``available``."""
        skipped = available - self.next_offset
        if self.lost_until is None:
            return skipped, 0
        lost = max(0, min(available, self.lost_until) - self.next_offset)
        self.lost_until = None
        return lost, skipped - lost


def events_count(frame: bytes) -> tuple[int, int]:
    """``(base_offset, record count)`` of an encoded EVENTS frame, without decoding records."""
    p = wire.HEADER_SIZE + 9
    base = int.from_bytes(frame[p : p + 8], "big")
    count = int.from_bytes(frame[p + 8 : p + 12], "big")
    return base, count
