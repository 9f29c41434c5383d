"""FelixQuicProtocol: the asyncio shell around one QUIC connection, on either engine.

How it works: the engine's asyncio ``QuicConnectionProtocol`` feeds datagrams and
timer ticks to its sans-IO ``QuicConnection`` and calls ``quic_event_received``
for every event. :class:`FelixQuicProtocol` replaces that method with a table
lookup by event type that unpacks each event into an ``_on_<event>`` hook, and
adds one-per-tick transmits. Felix code subclasses it without naming an engine::

    class GatewayProtocol(FelixQuicProtocol):
        def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
            ...
            self.send_stream_data(stream_id, reply)  # transmitted once this tick ends

and :func:`bind_protocol` (used by ``serve_on_socket`` and ``connect``) mixes it
with the chosen engine's protocol class at run time: ``GatewayProtocol[qh3]``
derives from ``GatewayProtocol``, ``FelixQuicProtocol`` and qh3's
``QuicConnectionProtocol``, in that order.

Transmit once per loop tick: building and sending datagrams is the expensive
part of QUIC in Python (docs/architecture.md, "The QUIC engine": 3-5x throughput when coalesced),
so :meth:`FelixQuicProtocol.send_stream_data` only queues data and schedules a
single :meth:`~FelixQuicProtocol.transmit` for the end of the current loop
iteration; everything queued until then leaves in as few datagrams as possible.

The engine's own stream reader/writer API (``create_stream``) is bypassed:
incoming stream data goes to the hooks, never into unbounded ``StreamReader``
buffers nobody reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from felix.quic.engine import QuicConnection, QuicEngine

__all__ = ["CLOSE_INTERNAL_ERROR", "CloseReason", "FelixQuicProtocol", "bind_protocol"]

log = logging.getLogger(__name__)

#: Application close code sent when one of this side's hooks raised.
CLOSE_INTERNAL_ERROR = 0x1

P = TypeVar("P", bound="FelixQuicProtocol")

_EventHandler = Callable[["FelixQuicProtocol", Any], None]


@dataclass(frozen=True, slots=True)
class CloseReason:
    """Why a connection ended (the engine's ConnectionTerminated event).

    ``error_code`` is a QUIC transport error code when ``frame_type`` is not None
    or the connection failed before the handshake completed (TLS alerts are
    ``0x100 + alert``, e.g. 0x12a bad_certificate), else the application code
    given to ``close()`` by either side (0: normal close).
    """

    error_code: int
    frame_type: int | None
    reason_phrase: str


class FelixQuicProtocol(asyncio.DatagramProtocol):
    """Base class of felix's QUIC connection protocols (gateway and client side).

    Subclass it, override the ``_on_*`` hooks, and run it through
    :func:`bind_protocol` (``serve_on_socket`` and ``connect`` do that); an
    unbound class cannot be instantiated. Hooks run inside the engine's
    datagram/timer callbacks: they must not block, and should only queue data
    with :meth:`send_stream_data`. A hook that raises is logged and the
    connection is closed with :data:`CLOSE_INTERNAL_ERROR`; other connections on
    the same socket are not affected.

    Also available from the engine's base class: ``await wait_closed()`` and
    ``await ping()``. (Clients get their protocol from ``connect``, which
    returns once the handshake completed; the engines' ``wait_connected`` is
    best left alone: cancelled, it leaves an unretrieved exception behind.)
    """

    #: The engine this class is bound to (set by bind_protocol).
    engine: ClassVar[QuicEngine]
    #: Event type -> handler, built by bind_protocol from the engine's event classes.
    _dispatch: ClassVar[dict[type[Any], _EventHandler]]

    if TYPE_CHECKING:
        # Provided by the engine's QuicConnectionProtocol, mixed in by bind_protocol.
        _quic: QuicConnection

        async def wait_closed(self) -> None: ...
        async def ping(self) -> None: ...
        def connect(self, addr: Any) -> None: ...

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        """Called by the engine's server (or by ``connect``) with a new connection.

        ``stream_handler`` is accepted because the engines' servers pass it; it
        is unused (felix reads streams through the hooks).
        """
        if getattr(type(self), "engine", None) is None:
            raise TypeError(
                f"{type(self).__name__} is not bound to a QUIC engine: "
                "create it through bind_protocol(engine, cls)"
            )
        # Next in the MRO of a bound class: the engine's QuicConnectionProtocol.
        super().__init__(quic, stream_handler=stream_handler)  # type: ignore[call-arg]
        loop = asyncio.get_running_loop()
        self._call_soon = loop.call_soon
        self._transmit_handle: asyncio.Handle | None = None
        self._receiving = False
        # True once the handshake completed, False if the connection ended first.
        # A result, never an exception: nobody has to retrieve it (the engines'
        # wait_connected() leaves an unretrieved exception behind when cancelled).
        self._handshake_outcome: asyncio.Future[bool] = loop.create_future()
        self._owned_transport: asyncio.BaseTransport | None = None
        #: Set when the connection has ended (before _on_connection_terminated runs).
        self.close_reason: CloseReason | None = None

    # -- sending -----------------------------------------------------------------------

    @property
    def quic(self) -> QuicConnection:
        """The engine's sans-IO QuicConnection (use the methods both engines share)."""
        return self._quic

    def next_stream_id(self, unidirectional: bool = False) -> int:
        """The id of the next stream this side opens.

        The stream is opened by the first :meth:`send_stream_data` on that id;
        until then, calling this again returns the same id.
        """
        return int(self._quic.get_next_available_stream_id(is_unidirectional=unidirectional))

    def send_stream_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        """Queue ``data`` on ``stream_id`` (``end_stream``: then FIN) and :meth:`transmit_soon`.

        The engine copies ``data``, so the caller may reuse its buffer at once.
        Nothing here bounds how much is queued: callers enforce their own credit
        and watch :meth:`send_buffer_size`. Raises the engine's error (ValueError,
        RuntimeError or its QuicConnectionError) when the stream cannot send,
        e.g. after its FIN or a reset.
        """
        self._quic.send_stream_data(stream_id, data, end_stream)
        self.transmit_soon()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abandon sending on ``stream_id`` (RESET_STREAM with ``error_code``)."""
        self._quic.reset_stream(stream_id, error_code)
        self.transmit_soon()

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        """Ask the peer to stop sending on ``stream_id`` (STOP_SENDING with ``error_code``)."""
        self._quic.stop_stream(stream_id, error_code)
        self.transmit_soon()

    def send_buffer_size(self, stream_id: int | None = None) -> int:
        """Bytes queued on ``stream_id`` (None: all streams) and not yet sent once.

        After a transmit, a nonzero value means a backlog (flow control,
        congestion, pacing): the caller should stop feeding that stream. Data in
        flight awaiting an ACK or a retransmission is not counted, nor are reset
        or finished streams. qh3: its public ``get_send_buffer_size()``.
        aioquic (no public API): the same quantity read from its pure-Python
        stream state, O(streams) for the total.
        """
        return self.engine.send_buffer_size(self._quic, stream_id)

    def transmit_soon(self) -> None:
        """Schedule one :meth:`transmit` at the end of this loop iteration (no-op if pending)."""
        if self._transmit_handle is None:
            self._transmit_handle = self._call_soon(self._transmit_scheduled)

    def transmit(self) -> None:
        """Send the datagrams the connection has ready and re-arm its timer.

        The one place that sends. The engine calls it after every received
        datagram and timer tick; a pending :meth:`transmit_soon` is cancelled
        because this call already sends what it would have.
        """
        if self._receiving:
            # The engine transmits right after handling received datagrams. Defer
            # that to the end of the loop iteration instead: the ACK then leaves in
            # the same datagram as whatever the woken callers send in reply (one
            # datagram and one syscall instead of two per request/response).
            self.transmit_soon()
            return
        handle = self._transmit_handle
        if handle is not None:
            self._transmit_handle = None
            handle.cancel()
        super().transmit()  # type: ignore[misc]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._receiving = True
        try:
            super().datagram_received(data, addr)
        finally:
            self._receiving = False

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        """qh3's batched receive (GRO); same deferral as :meth:`datagram_received`."""
        self._receiving = True
        try:
            super().datagrams_received(data, addr)  # type: ignore[misc]
        finally:
            self._receiving = False

    def _transmit_scheduled(self) -> None:
        self._transmit_handle = None
        self.transmit()

    # -- closing -----------------------------------------------------------------------

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """Start closing the connection with an application ``error_code`` (0: normal).

        Idempotent: only the first call sends CONNECTION_CLOSE. The connection
        ends (``close_reason`` set, ``_on_connection_terminated`` called,
        ``wait_closed`` returns) after the closing period, about three probe
        timeouts.
        """
        # Through the connection, whose close() has these arguments on both
        # engines (qh3's protocol-level close() takes none).
        self._quic.close(error_code=error_code, reason_phrase=reason_phrase)
        self.transmit()

    async def aclose(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """:meth:`close`, then wait until the connection has ended."""
        self.close(error_code, reason_phrase)
        await self.wait_closed()

    def _own_transport(self, transport: asyncio.BaseTransport) -> None:
        """Close ``transport`` when this connection ends (client side: one socket each)."""
        self._owned_transport = transport

    # -- events ------------------------------------------------------------------------

    def quic_event_received(self, event: Any) -> None:
        """Dispatch one engine event to its ``_on_*`` hook (others are ignored)."""
        handler = self._dispatch.get(type(event))
        if handler is None:
            return
        try:
            handler(self, event)
        except Exception:
            log.exception("%s: error in QUIC event hook, closing the connection", self)
            if self.close_reason is None:
                self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _ev_handshake_completed(self, event: Any) -> None:
        if not self._handshake_outcome.done():
            self._handshake_outcome.set_result(True)
        self._on_handshake_completed(event.alpn_protocol)

    def _ev_stream_data(self, event: Any) -> None:
        self._on_stream_data(event.stream_id, event.data, event.end_stream)

    def _ev_stream_reset(self, event: Any) -> None:
        self._on_stream_reset(event.stream_id, event.error_code)

    def _ev_stop_sending(self, event: Any) -> None:
        self._on_stop_sending(event.stream_id, event.error_code)

    def _ev_connection_terminated(self, event: Any) -> None:
        self.close_reason = CloseReason(event.error_code, event.frame_type, event.reason_phrase)
        if not self._handshake_outcome.done():
            self._handshake_outcome.set_result(False)
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        try:
            self._on_connection_terminated(event.error_code, event.frame_type, event.reason_phrase)
        finally:
            if self._owned_transport is not None:
                # Later in this callback the engine still calls transmit(); close after it.
                self._call_soon(self._owned_transport.close)

    # -- hooks (override in subclasses; the defaults do nothing) -----------------------

    def _on_handshake_completed(self, alpn_protocol: str | None) -> None:
        """The TLS handshake completed; ``alpn_protocol`` is the one negotiated."""

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Bytes arrived on ``stream_id``, in order; ``end_stream``: the peer sent FIN.

        ``data`` may be empty (a FIN alone). A stream the peer opens first shows
        up here, no separate event announces it.
        """

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        """The peer abandoned sending on ``stream_id`` (RESET_STREAM)."""

    def _on_stop_sending(self, stream_id: int, error_code: int) -> None:
        """The peer asked this side to stop sending on ``stream_id`` (STOP_SENDING)."""

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        """The connection has ended, by either side or by idle timeout (see CloseReason)."""


_bound: dict[tuple[str, type[Any]], type[Any]] = {}


def bind_protocol(engine: QuicEngine, cls: type[P]) -> type[P]:
    """``cls`` combined with ``engine``'s QuicConnectionProtocol: the class to instantiate.

    The result is a subclass of ``cls`` (so isinstance checks and hooks work as
    written) and is cached: the same (engine, cls) always gives the same class.
    Raises TypeError if ``cls`` is not a FelixQuicProtocol subclass or is
    already bound.
    """
    if not (isinstance(cls, type) and issubclass(cls, FelixQuicProtocol)):
        raise TypeError(f"{cls!r} is not a FelixQuicProtocol subclass")
    key = (engine.name, cls)
    bound = _bound.get(key)
    if bound is None:
        if getattr(cls, "engine", None) is not None:
            raise TypeError(f"{cls.__name__} is already bound to {cls.engine.name}")
        events = engine.events
        dispatch: dict[type[Any], _EventHandler] = {
            events.handshake_completed: FelixQuicProtocol._ev_handshake_completed,
            events.stream_data_received: FelixQuicProtocol._ev_stream_data,
            events.stream_reset: FelixQuicProtocol._ev_stream_reset,
            events.stop_sending_received: FelixQuicProtocol._ev_stop_sending,
            events.connection_terminated: FelixQuicProtocol._ev_connection_terminated,
        }
        name = f"{cls.__name__}[{engine.name}]"
        namespace = {
            "engine": engine,
            "_dispatch": dispatch,
            "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}[{engine.name}]",
        }
        bound = type(name, (cls, engine.protocol_class), namespace)
        _bound[key] = bound
    return cast(type[P], bound)
