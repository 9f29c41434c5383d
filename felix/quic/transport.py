"""The transport seam: what felix needs from a connection, whatever carries it.

Felix speaks to its peers over stream-multiplexed connections: QUIC today, maybe
a native QUIC engine or a shared-memory transport for same-host clients later.
The gateway and the client never see an engine; they see two small Protocols,
shaped like asyncio's own transport/protocol pair:

* :class:`StreamTransport` is what felix calls: open and write streams, reset or
  stop them, read the unsent backlog, close. A transport queues what it is given
  and sends it once per event-loop tick (one datagram for many small writes).
* :class:`StreamHandler` is what a transport calls: the handshake completed,
  bytes arrived on a stream (in order, FIN flagged), a stream was reset or
  stopped by the peer, the queued data went out, the connection ended.

A transport is created by the engine's shell (for QUIC: felix/quic/protocol.py,
which holds the engine's sans-IO connection the way aioquic's asyncio layer
holds ``self._quic``) and given to a *create-handler* callable, exactly as
aioquic's server passes each new connection to its ``create_protocol``::

    def create_handler(transport: StreamTransport) -> StreamHandler: ...

:class:`ConnectionHandler` is the convenient base for handlers: it keeps the
transport, forwards writes to it, and unpacks events into ``_on_*`` hooks, so a
felix connection reads like a subclass of the engine's protocol used to, minus
the engine. Another transport implements :class:`StreamTransport` and calls the
:class:`StreamHandler` methods; nothing in the gateway session or the client
changes (docs/architecture.md, "Transport seam").

Stream ids follow QUIC's numbering on every transport (felix's wire protocol
names streams that way): bit 0 is the initiator (0 client, 1 server), bit 1 the
direction (0 bidirectional, 1 unidirectional).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "CLOSE_INTERNAL_ERROR",
    "CloseReason",
    "ConnectionHandler",
    "CreateHandler",
    "StreamHandler",
    "StreamTransport",
]

#: Application close code sent when one of this side's hooks raised.
CLOSE_INTERNAL_ERROR = 0x1


@dataclass(frozen=True, slots=True)
class CloseReason:
    """Why a connection ended.

    ``error_code`` is a QUIC transport error code when ``frame_type`` is not None
    or the connection failed before the handshake completed (TLS alerts are
    ``0x100 + alert``, e.g. 0x12a bad_certificate), else the application code
    given to ``close()`` by either side (0: normal close).
    """

    error_code: int
    frame_type: int | None
    reason_phrase: str


class StreamTransport(Protocol):
    """What felix needs from a transport connection (one per peer)."""

    @property
    def peer(self) -> str:
        """The peer's address (host part), for audit lines and rate limits."""
        ...

    @property
    def close_reason(self) -> CloseReason | None:
        """Set once the connection has ended (before the handler hears of it)."""
        ...

    def next_stream_id(self, unidirectional: bool = False) -> int:
        """The id the next stream this side opens will have (opened by its first write)."""
        ...

    def streams_available(self, unidirectional: bool = False) -> int:
        """How many more streams of that kind this side may open now (the peer's limit)."""
        ...

    def max_peer_streams(self, unidirectional: bool = False) -> int:
        """How many streams of that kind the peer may have open towards this side at once."""
        ...

    def send_stream_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        """Queue ``data`` on ``stream_id`` (then FIN with ``end_stream``); sent this tick.

        Raises felix.errors.ConnectionLost if the connection is closing or closed
        (never a transport's own exception type for that), ValueError if the
        stream cannot take data (after its FIN or a reset, or a new stream past
        :meth:`streams_available`).
        """
        ...

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abandon sending on ``stream_id``."""
        ...

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        """Ask the peer to stop sending on ``stream_id``."""
        ...

    def send_buffer_size(self, stream_id: int | None = None) -> int:
        """Bytes queued on ``stream_id`` (None: all streams) and never sent yet."""
        ...

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """Start closing with an application ``error_code`` (idempotent)."""
        ...


class StreamHandler(Protocol):
    """What a transport delivers to felix. Calls must not block."""

    def handshake_completed(self, alpn_protocol: str | None) -> None: ...

    def stream_data_received(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...

    def stream_reset(self, stream_id: int, error_code: int) -> None: ...

    def stop_sending(self, stream_id: int, error_code: int) -> None: ...

    def transmitted(self) -> None:
        """Queued data was handed to the network: ``send_buffer_size`` may have dropped."""
        ...

    def connection_terminated(self, reason: CloseReason) -> None: ...


#: Makes the handler of a new connection, given its transport.
CreateHandler = Callable[[StreamTransport], StreamHandler]


class ConnectionHandler:
    """A :class:`StreamHandler` with ``_on_*`` hooks and the transport's writes at hand.

    Subclass it and override the hooks; pass the subclass (or a callable making
    one from a transport) as the create-handler. Hooks run inside the
    transport's receive path: they must not block and should only queue data.
    A hook that raises is logged by the transport and the connection is closed
    with :data:`CLOSE_INTERNAL_ERROR`.
    """

    def __init__(self, transport: StreamTransport) -> None:
        self.transport = transport

    # -- writing (forwarded to the transport) --------------------------------------------

    @property
    def peer(self) -> str:
        return self.transport.peer

    @property
    def close_reason(self) -> CloseReason | None:
        return self.transport.close_reason

    def next_stream_id(self, unidirectional: bool = False) -> int:
        return self.transport.next_stream_id(unidirectional)

    def send_stream_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        self.transport.send_stream_data(stream_id, data, end_stream)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self.transport.reset_stream(stream_id, error_code)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        self.transport.stop_stream(stream_id, error_code)

    def send_buffer_size(self, stream_id: int | None = None) -> int:
        return self.transport.send_buffer_size(stream_id)

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        self.transport.close(error_code, reason_phrase)

    # -- StreamHandler: events unpacked into the hooks ------------------------------------

    def handshake_completed(self, alpn_protocol: str | None) -> None:
        self._on_handshake_completed(alpn_protocol)

    def stream_data_received(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._on_stream_data(stream_id, data, end_stream)

    def stream_reset(self, stream_id: int, error_code: int) -> None:
        self._on_stream_reset(stream_id, error_code)

    def stop_sending(self, stream_id: int, error_code: int) -> None:
        self._on_stop_sending(stream_id, error_code)

    def transmitted(self) -> None:
        """Nothing by default (the client wakes publishers waiting for send room here)."""

    def connection_terminated(self, reason: CloseReason) -> None:
        self._on_connection_terminated(reason.error_code, reason.frame_type, reason.reason_phrase)

    # -- hooks (override; the defaults do nothing) --------------------------------------

    def _on_handshake_completed(self, alpn_protocol: str | None) -> None:
        """The handshake completed; ``alpn_protocol`` is the one negotiated."""

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Bytes arrived on ``stream_id``, in order; ``end_stream``: the peer sent FIN.

        ``data`` may be empty (a FIN alone). A stream the peer opens first shows
        up here; no separate event announces it.
        """

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        """The peer abandoned sending on ``stream_id`` (RESET_STREAM)."""

    def _on_stop_sending(self, stream_id: int, error_code: int) -> None:
        """The peer asked this side to stop sending on ``stream_id`` (STOP_SENDING)."""

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        """The connection has ended, by either side or by idle timeout (see CloseReason)."""
