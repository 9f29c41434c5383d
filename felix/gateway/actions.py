"""What a gateway session hands its shell: actions, and what it reads of its gateway.

A :class:`~felix.gateway.session.GatewaySession` does no I/O; each call leaves
a list of these small records, performed in order by the connection shell
(felix/gateway/connection.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from felix import audit
from felix.gateway import v1
from felix.gateway.auth import Authenticator, FailureLimiter
from felix.gateway.gateway import GatewayLimits

__all__ = [
    "Action",
    "Audit",
    "CloseConnection",
    "ConnectionAuthenticated",
    "ConnectionUnauthenticated",
    "Consume",
    "Credit",
    "EndConsumers",
    "Forward",
    "GatewayState",
    "QueueOp",
    "Send",
    "StopStream",
    "Subscribe",
    "Unsubscribe",
]


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` on ``stream_id`` (``end_stream``: then FIN)."""

    stream_id: int
    data: bytes
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class StopStream:
    """Ask the client to stop sending on ``stream_id`` (QUIC STOP_SENDING with ``code``)."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the whole connection with application error ``code``."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``frame`` to the shard owning ``key``; answer on ``stream_id``.

    The shell reports the outcome with :meth:`GatewaySession.reply` (zero or more
    times) and exactly one :meth:`GatewaySession.settle` per Forward.
    """

    stream_id: int
    request_id: int
    key: str
    frame: bytes
    translate: v1.Translate | None = None  # v1 peers: how to answer
    quiet: bool = False  # a publish without ack: success is not answered


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Open subscription ``sub_id`` on stream ``key`` and forward its SUBSCRIBE ``frame``.

    Settled like :class:`Forward`; ``v1_offsets`` is None for felix clients.
    """

    stream_id: int
    request_id: int
    sub_id: int
    key: str
    frame: bytes
    credit: int
    v1_offsets: bool | None = None
    translate: v1.Translate | None = None


@dataclass(frozen=True, slots=True)
class Credit:
    """Give subscription ``sub_id`` ``credit`` more records."""

    sub_id: int
    credit: int


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """End subscription ``sub_id`` (``code`` 0: at the client's request)."""

    sub_id: int
    code: int = 0
    message: str = "unsubscribed"


@dataclass(frozen=True, slots=True)
class Consume:
    """Join queue group ``group`` of stream ``key`` as consumer ``consumer_id`` and
    forward the CONSUME ``frame``; deliveries come back on ``stream_id``. Settled like
    :class:`Forward`."""

    stream_id: int
    request_id: int
    consumer_id: int
    key: str
    group: str
    frame: bytes
    credit_bytes: int = 0  # as asked (0: the default)


@dataclass(frozen=True, slots=True)
class QueueOp:
    """Forward a consumer's request (ack, nak, release, in_progress, term, window,
    stop) to its group's shard. Settled like :class:`Forward`; ``stop``: the consumer
    is gone here once it is sent."""

    stream_id: int
    request_id: int
    consumer_id: int
    frame: bytes
    stop: bool = False


@dataclass(frozen=True, slots=True)
class EndConsumers:
    """The QUIC stream ``stream_id`` is gone: its consumers leave their groups (abruptly:
    what they held counts a failure)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionAuthenticated:
    """The connection's first stream authenticated (it no longer counts as idle)."""


@dataclass(frozen=True, slots=True)
class ConnectionUnauthenticated:
    """Its authenticated streams and subscriptions are all gone: idle (evictable) again."""


@dataclass(frozen=True, slots=True)
class Audit:
    """One audit line for a refusal (felix/audit.py ``emit``; the result is "denied")."""

    event: audit.Event
    who: str
    source: str
    tenant: str | None
    action: str
    object: str
    reason: str
    detail: str | None


Action = (
    Send
    | StopStream
    | CloseConnection
    | Forward
    | Subscribe
    | Credit
    | Unsubscribe
    | Consume
    | QueueOp
    | EndConsumers
    | ConnectionAuthenticated
    | ConnectionUnauthenticated
    | Audit
)


class GatewayState(Protocol):
    """What a session reads (and counts into) of its gateway: no I/O behind it."""

    limits: GatewayLimits
    authenticator: Authenticator
    auth_limiter: FailureLimiter
    draining: bool
    requests: int
    protocol_errors: int
    overloaded: int
    auth_failures: int
    expired_sessions: int
    permission_denials: int
    auth_throttled: int
    input_limit_closes: int
    buffered_input: int

    def shard_map(self, request_id: int) -> bytes:
        """The SHARD_MAP answer for ``request_id`` (the cluster's map, or none)."""
        ...
