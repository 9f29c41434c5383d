"""One client-opened stream inside a gateway session: its states and their one table.

How it works: a stream starts AUTHENTICATING (only its ``auth`` frame is read,
under the pre-auth rules; an attempt delayed by the failure back-off is parked
here with what arrived behind it), becomes READY once authenticated (its own
identity and token expiry), ENDING when the client sent FIN with answers still
owed, and CLOSED. The legal transitions are the table ``_TRANSITIONS``; any other
is a bug and raises. What moves a stream is decided in felix/gateway/session.py.
"""

from __future__ import annotations

import enum
from typing import Any

from felix import wire
from felix.errors import LocalProtocolError
from felix.gateway.auth import Identity
from felix.gateway.gateway import GatewayLimits
from felix.quic.stream_ids import is_unidirectional

__all__ = ["Stream", "StreamState"]


class StreamState(enum.Enum):
    AUTHENTICATING = "authenticating"  # waiting for the auth frame (or its back-off)
    READY = "ready"  # serving requests
    ENDING = "ending"  # the client sent FIN; answers still owed
    CLOSED = "closed"


_A, _R, _E, _C = (
    StreamState.AUTHENTICATING,
    StreamState.READY,
    StreamState.ENDING,
    StreamState.CLOSED,
)
#: (state, what happened) -> next state; anything else is a bug in this module.
#: "fin": the client ended its side with nothing owed; "fin_owed": with answers owed;
#: "settled": the last owed answer went out; "fail": protocol error, refusal,
#: deadline or expiry; "reset": the client reset the stream or the connection went away.
_TRANSITIONS: dict[tuple[StreamState, str], StreamState] = {
    (_A, "auth_ok"): _R,
    (_A, "fin"): _C,
    (_A, "fail"): _C,
    (_A, "reset"): _C,
    (_R, "request"): _R,
    (_R, "fin"): _C,
    (_R, "fin_owed"): _E,
    (_R, "fail"): _C,
    (_R, "reset"): _C,
    (_E, "settled"): _C,
    (_E, "fail"): _C,
    (_E, "reset"): _C,
}


class Stream:
    """One client-opened stream's state inside a session."""

    __slots__ = (
        "auth_deadline",
        "auth_fed",
        "auth_head",
        "buffered",
        "expires_at",
        "flags",
        "frame_deadline",
        "held",
        "identity",
        "in_flight",
        "parked",
        "reader",
        "retry_at",
        "send_closed",
        "state",
        "stream_id",
        "uni",
    )

    def __init__(self, stream_id: int, limits: GatewayLimits, now: float) -> None:
        self.stream_id = stream_id
        self.uni = is_unidirectional(stream_id)
        self.reader = wire.FrameReader(limits.max_frame_pre_auth)
        self.state = StreamState.AUTHENTICATING
        self.flags = 0
        self.identity: Identity | None = None
        self.expires_at: float | None = None  # of this stream's token (None: never)
        self.in_flight = 0
        self.auth_deadline: float | None = now + limits.auth_timeout
        self.frame_deadline: float | None = None  # an incomplete frame must be done by then
        # Bytes of the auth frame read so far, and its header (to know where it ends).
        self.auth_fed = 0
        self.auth_head = bytearray()
        # An auth frame waiting for the failure back-off, and what arrived behind it.
        self.parked: dict[str, Any] | None = None
        self.retry_at: float | None = None
        self.held = bytearray()
        self.buffered = 0  # incomplete input held for this stream (accounted)
        # Nothing may be written on it: the client's unidirectional stream, or one it
        # sent STOP_SENDING on (the engines refuse any further write).
        self.send_closed = self.uni

    def transition(self, what: str) -> None:
        new = _TRANSITIONS.get((self.state, what))
        if new is None:
            raise LocalProtocolError(f"stream {self.stream_id}: {what} in state {self.state}")
        self.state = new

    def deadlines(self) -> list[float]:
        return [
            t
            for t in (self.auth_deadline, self.frame_deadline, self.retry_at, self.expires_at)
            if t is not None
        ]
