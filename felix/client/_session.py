"""Sans-IO state of a client connection's streams: request ids, control and event streams.

How it works (docs/wire-protocol.md, "Sessions: how a felix client uses a
connection"):

* :class:`RequestTable` hands out request ids and matches replies to waiters.
  Ids come from one counter per connection that only goes up, so an id is never
  reused at all (a u64 does not wrap in practice), let alone while outstanding.
  A cancelled call removes its entry, so a reply that arrives later finds
  nothing and is dropped: it can never complete a different call (the failure
  docs/reliability.md, R8, guards against).
* :class:`ControlStream` is one bidirectional control stream: it writes the
  ``auth`` frame, then turns received bytes into events: :class:`Authenticated`
  once, then one :class:`Reply` per extension frame, and finally
  :class:`StreamClosed`. Its states and their legal transitions are the one
  table ``_CONTROL_TRANSITIONS``.
* :class:`EventStream` is one broker-opened event stream: ``event_stream_hello``
  first (:class:`EventHello`), then EVENTS, SLOW_CONSUMER and SUBSCRIPTION_END
  as :class:`Notice` events.

Nothing here raises for bytes the broker sent: a broken stream becomes a
:class:`StreamClosed` event carrying the error, and the stream stays closed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from felix import wire
from felix.errors import (
    FelixError,
    HandshakeFailed,
    ProtocolError,
    RemoteProtocolError,
    Unauthenticated,
)

__all__ = [
    "CLIENT_FLAGS",
    "Authenticated",
    "ControlState",
    "ControlStream",
    "EventHello",
    "EventStream",
    "Notice",
    "Reply",
    "RequestTable",
    "StreamClosed",
]

T = TypeVar("T")

#: What a felix client offers in ``auth``: all of v1 plus the extension family.
CLIENT_FLAGS = wire.FLAGS_V1 | wire.FLAG_FELIX_EXT
#: Largest frame accepted from the broker (its own cap after auth).
MAX_FRAME_SIZE = wire.DEFAULT_MAX_FRAME_SIZE
_U64_MAX = 2**64 - 1


class RequestTable(Generic[T]):
    """Outstanding requests of one connection, by request id.

    Ids start at ``first_id`` (default 1: id 0 is what fire-and-forget
    publishes and EVENTS carry) and increase by one per :meth:`new_id`.
    """

    def __init__(self, first_id: int = 1) -> None:
        self._next = first_id
        self._waiting: dict[int, T] = {}
        #: Replies dropped because their call had already ended (cancelled, timed out).
        self.late_replies = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._waiting

    def new_id(self) -> int:
        """A fresh id (also used for subscription ids, so the two never collide)."""
        request_id = self._next
        if request_id > _U64_MAX:
            raise ProtocolError("request ids exhausted on this connection")  # 2**64 calls
        self._next = request_id + 1
        return request_id

    def start(self, waiter: T) -> int:
        """Register ``waiter`` under a fresh id and return the id. Do this before sending."""
        request_id = self.new_id()
        self._waiting[request_id] = waiter
        return request_id

    def pop(self, request_id: int) -> T | None:
        """The waiter of a reply's ``request_id``, removed; None for a late reply (dropped).

        Raises RemoteProtocolError for an id this table never issued: the
        broker answered a request nobody sent.
        """
        waiter = self._waiting.pop(request_id, None)
        if waiter is None:
            if request_id >= self._next:
                raise RemoteProtocolError(f"reply to request {request_id}, which was never sent")
            self.late_replies += 1
        return waiter

    def discard(self, request_id: int) -> None:
        """Forget ``request_id`` (its call ended); a later reply will be dropped. Idempotent."""
        self._waiting.pop(request_id, None)

    def drain(self) -> list[T]:
        """Remove and return every outstanding waiter (the connection is gone)."""
        waiters = list(self._waiting.values())
        self._waiting.clear()
        return waiters


# --- stream events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The broker accepted ``auth``; ``server_flags`` includes the extension family."""

    server_flags: int


@dataclass(frozen=True, slots=True)
class Reply:
    """An extension frame on a control stream (a reply, or a notice keyed by subscription)."""

    message: wire.ExtMessage


@dataclass(frozen=True, slots=True)
class EventHello:
    """An event stream announced the subscription it carries."""

    subscription_id: int


@dataclass(frozen=True, slots=True)
class Notice:
    """An extension frame on an event stream: Events, SlowConsumerNotice or SUBSCRIPTION_END."""

    message: wire.ExtMessage


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The stream ended: ``error`` None for a clean FIN, else why it broke."""

    error: FelixError | None


ControlEvent = Authenticated | Reply | StreamClosed
EventStreamEvent = EventHello | Notice | StreamClosed


class ControlState(enum.Enum):
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


_A, _R, _C = ControlState.AUTHENTICATING, ControlState.READY, ControlState.CLOSED
#: (state, what arrived) -> next state. Anything else is a protocol violation.
#: Inputs: "auth_ok", "error" (JSON error), "ext" (extension frame), "end" (FIN).
_CONTROL_TRANSITIONS: dict[tuple[ControlState, str], ControlState] = {
    (_A, "auth_ok"): _R,
    (_A, "error"): _C,
    (_A, "end"): _C,
    (_R, "ext"): _R,
    (_R, "error"): _C,
    (_R, "end"): _C,
}


class ControlStream:
    """One control stream's protocol state (no I/O): send :meth:`auth_frame`, feed bytes."""

    def __init__(self, tenant: str, token: str) -> None:
        self.state = ControlState.AUTHENTICATING
        self.server_flags = 0
        self._auth = wire.encode_message(
            {"type": "auth", "tenant_id": tenant, "token": token, "client_flags": CLIENT_FLAGS}
        )
        # Extension frames are accepted by the reader from the start; whether one
        # may arrive yet is the state table's decision, with a clearer error.
        self._reader = wire.FrameReader(MAX_FRAME_SIZE, accept_flags=wire.FLAGS_ALL)

    def auth_frame(self) -> bytes:
        """The first frame to send on the stream."""
        return self._auth

    def receive(self, data: bytes, end_stream: bool = False) -> list[ControlEvent]:
        """Events for ``data`` received on the stream (``end_stream``: the broker sent FIN)."""
        if self.state is ControlState.CLOSED:
            return []
        events: list[ControlEvent] = []
        try:
            self._reader.feed(data)
            for frame in self._reader:
                events.append(self._on_frame(frame))
                if isinstance(events[-1], StreamClosed):
                    return events
            if end_stream:
                self._transition("end")
                events.append(StreamClosed(RemoteProtocolError("broker closed the control stream")))
        except FelixError as exc:
            self.state = ControlState.CLOSED
            events.append(StreamClosed(exc))
        return events

    def _transition(self, what: str) -> None:
        new = _CONTROL_TRANSITIONS.get((self.state, what))
        if new is None:
            raise RemoteProtocolError(
                f"unexpected {what} on a control stream in state {self.state.value}"
            )
        self.state = new

    def _on_frame(self, frame: wire.Frame) -> ControlEvent:
        if frame.flags == wire.FLAG_FELIX_EXT:
            self._transition("ext")
            return Reply(wire.decode_ext(frame))
        if frame.flags != wire.FLAG_JSON:
            raise RemoteProtocolError(
                f"unexpected frame (flags 0x{frame.flags:04x}) on a control stream"
            )
        message = wire.decode_message(frame)
        kind = message["type"]
        if kind == "auth_ok":
            self._transition("auth_ok")
            flags = int(message["server_flags"])
            if not flags & wire.FLAG_FELIX_EXT:
                self.state = ControlState.CLOSED
                return StreamClosed(
                    HandshakeFailed(
                        f"the broker does not support the felix extension family "
                        f"(server_flags 0x{flags:04x}); this client needs it"
                    )
                )
            self.server_flags = flags
            return Authenticated(flags)
        if kind == "error":
            authenticating = self.state is ControlState.AUTHENTICATING
            self._transition("error")
            text = str(message["message"])
            if authenticating:
                return StreamClosed(Unauthenticated(f"authentication refused: {text}"))
            return StreamClosed(ProtocolError(f"the broker closed the control stream: {text}"))
        if kind == "ok" and self.state is ControlState.AUTHENTICATING:
            self.state = ControlState.CLOSED
            return StreamClosed(
                HandshakeFailed(
                    "the broker ignored client_flags (a v1-only broker); "
                    "this client needs the felix extension family"
                )
            )
        raise RemoteProtocolError(f"unexpected {kind!r} message on a control stream")


class EventStream:
    """One broker-opened event stream's protocol state (no I/O): feed bytes, get events."""

    def __init__(self) -> None:
        self.subscription_id: int | None = None
        self.closed = False
        # The connection negotiated the extension family on its control streams,
        # and the broker applies it to the event streams it opens for it.
        self._reader = wire.FrameReader(MAX_FRAME_SIZE, accept_flags=wire.FLAGS_ALL)

    def receive(self, data: bytes, end_stream: bool = False) -> list[EventStreamEvent]:
        """Events for ``data`` received on the stream (``end_stream``: the broker sent FIN)."""
        if self.closed:
            return []
        events: list[EventStreamEvent] = []
        try:
            self._reader.feed(data)
            events.extend(self._frames())
            if end_stream:
                self.closed = True
                events.append(StreamClosed(None))
        except FelixError as exc:
            self.closed = True
            events.append(StreamClosed(exc))
        return events

    def _frames(self) -> Iterator[EventStreamEvent]:
        for frame in self._reader:
            if self.subscription_id is None:
                if frame.flags != wire.FLAG_JSON:
                    raise RemoteProtocolError("an event stream must start with event_stream_hello")
                message = wire.decode_message(frame)
                if message["type"] != "event_stream_hello":
                    raise RemoteProtocolError(
                        "an event stream must start with event_stream_hello, "
                        f"not {message['type']!r}"
                    )
                self.subscription_id = int(message["subscription_id"])
                yield EventHello(self.subscription_id)
            elif frame.flags == wire.FLAG_FELIX_EXT:
                yield Notice(wire.decode_ext(frame))
            else:
                raise RemoteProtocolError(
                    f"unexpected frame (flags 0x{frame.flags:04x}) on an event stream"
                )
