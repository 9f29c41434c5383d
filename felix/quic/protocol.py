"""QuicTransport: felix's asyncio shell around one engine connection.

How it works: the engine's ``QuicConnection`` is sans-IO: it takes datagrams
and the time, and hands back datagrams to send, a timer deadline and events.
:class:`QuicTransport` holds one (``self._quic``, as aioquic's own asyncio
``QuicConnectionProtocol`` does) and does the I/O: it feeds it what the socket
receives, sends what it has ready, keeps one loop timer at its deadline, and
turns its events into calls on the connection's :class:`StreamHandler` (found
by a table lookup by event type). To felix it is a
:class:`~felix.quic.transport.StreamTransport`; no engine class is subclassed
or mixed in, and the handler never sees the engine.

Transmit once per loop tick: building and sending datagrams is the expensive
part of QUIC in Python (docs/architecture.md, "The QUIC engine": 3-5x throughput when coalesced),
so :meth:`QuicTransport.send_stream_data` only queues data and schedules a
single :meth:`~QuicTransport.transmit` for the end of the current loop
iteration; received datagrams are acknowledged by that same transmit, so the
ACK leaves in the datagram carrying whatever the handler answered.

On a client the transport is the socket's datagram protocol (one socket per
connection) and sends with the socket's ``sendto``; on a server,
felix/quic/server.py routes each datagram to its connection's transport, all
share the listening socket, and they send through its per-tick batch
(felix/quic/batch.py: one sendmmsg for the datagrams of every connection that
transmitted in the tick) unless batching is off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

from felix.errors import ConnectionLost
from felix.quic.engine import QuicConnection, QuicEngine, load_engine
from felix.quic.transport import CLOSE_INTERNAL_ERROR, CloseReason, CreateHandler, StreamHandler

__all__ = ["QuicTransport"]

log = logging.getLogger(__name__)

_EventHandler = Callable[["QuicTransport", Any], None]


class QuicTransport(asyncio.DatagramProtocol):
    """One QUIC connection, driven on the running loop; a StreamTransport for felix.

    ``on_connection_id`` and ``on_ended`` are the server's bookkeeping: called
    with (this transport, connection id, issued?) when the engine issues or
    retires one of its ids, and with this transport once the connection ended.
    """

    def __init__(
        self,
        engine: QuicEngine,
        quic: QuicConnection,
        peer_address: Any,
        create_handler: CreateHandler,
        *,
        on_connection_id: Callable[[QuicTransport, bytes, bool], None] | None = None,
        on_ended: Callable[[QuicTransport], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._time = loop.time
        self._call_soon = loop.call_soon
        self.engine = engine
        self._quic = quic
        self._dispatch = _dispatch_table(engine.name)
        self._peer = str(peer_address[0])
        self._sendto: Callable[[bytes, Any], None] | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._on_connection_id = on_connection_id
        self._on_ended = on_ended
        self._owned_transport: asyncio.BaseTransport | None = None
        self._pings: dict[int, asyncio.Future[None]] = {}
        # True once the handshake completed, False if the connection ended first.
        # A result, never an exception: nobody has to retrieve it.
        self.handshake_outcome: asyncio.Future[bool] = loop.create_future()
        self._ended = loop.create_future()
        self._close_reason: CloseReason | None = None
        # Last: the handler may already use this transport while being made.
        self.handler: StreamHandler = create_handler(self)

    # -- StreamTransport -----------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def close_reason(self) -> CloseReason | None:
        return self._close_reason

    @property
    def quic(self) -> QuicConnection:
        """The engine's sans-IO QuicConnection (tests and diagnostics only)."""
        return self._quic

    def next_stream_id(self, unidirectional: bool = False) -> int:
        """The id of the next stream this side opens.

        The stream is opened by the first :meth:`send_stream_data` on that id;
        until then, calling this again returns the same id.
        """
        return int(self._quic.get_next_available_stream_id(is_unidirectional=unidirectional))

    def streams_available(self, unidirectional: bool = False) -> int:
        """How many more streams of that kind the peer lets this side open now."""
        return self.engine.streams_available(self._quic, unidirectional)

    def max_peer_streams(self, unidirectional: bool = False) -> int:
        """How many streams of that kind the peer may have open towards this side at once."""
        return self.engine.peer_stream_limits[1 if unidirectional else 0]

    def send_stream_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        """Queue ``data`` on ``stream_id`` (``end_stream``: then FIN) and :meth:`transmit_soon`.

        The engine copies ``data``, so the caller may reuse its buffer at once.
        Nothing here bounds how much is queued: callers enforce their own credit
        and watch :meth:`send_buffer_size`. Raises ConnectionLost if the
        connection is closing or closed, and the engine's ValueError when the
        stream cannot send (after its FIN or a reset, or past the peer's stream
        limit: see :meth:`streams_available`).
        """
        try:
            self._quic.send_stream_data(stream_id, data, end_stream)
        except self.engine.connection_error as exc:
            raise self._lost(exc) from None
        if self._transmit_handle is None:
            self._transmit_handle = self._call_soon(self._transmit_scheduled)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abandon sending on ``stream_id`` (RESET_STREAM with ``error_code``)."""
        try:
            self._quic.reset_stream(stream_id, error_code)
        except self.engine.connection_error as exc:
            raise self._lost(exc) from None
        self.transmit_soon()

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        """Ask the peer to stop sending on ``stream_id`` (STOP_SENDING with ``error_code``)."""
        try:
            self._quic.stop_stream(stream_id, error_code)
        except self.engine.connection_error as exc:
            raise self._lost(exc) from None
        self.transmit_soon()

    def _lost(self, exc: Exception) -> ConnectionLost:
        # The engine's own error stays inside felix/quic: callers see the felix tree.
        reason = getattr(exc, "reason_phrase", "") or str(exc)
        return ConnectionLost(f"the QUIC connection to {self._peer} is closing: {reason}")

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

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """Start closing the connection with an application ``error_code`` (0: normal).

        Idempotent: only the first call sends CONNECTION_CLOSE. The connection
        ends (``close_reason`` set, the handler's ``connection_terminated``
        called, :meth:`wait_closed` returns) after the closing period, about
        three probe timeouts.
        """
        self._quic.close(error_code=error_code, reason_phrase=reason_phrase)
        self.transmit()

    # -- more than StreamTransport -------------------------------------------------------

    async def wait_closed(self) -> None:
        """Wait until the connection has ended."""
        await asyncio.shield(self._ended)

    async def ping(self) -> None:
        """Send a QUIC PING and wait for its acknowledgement (ConnectionError if it ends)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        uid = id(waiter)
        self._pings[uid] = waiter
        self._quic.send_ping(uid)
        self.transmit()
        try:
            await waiter
        finally:
            self._pings.pop(uid, None)

    def connect(self, address: Any) -> None:
        """Start the handshake with the server at ``address`` (clients, once)."""
        self._quic.connect(address, now=self._time())
        self.transmit()

    def own_transport(self, transport: asyncio.BaseTransport) -> None:
        """Close ``transport`` when this connection ends (client side: one socket each)."""
        self._owned_transport = transport

    # -- sending ---------------------------------------------------------------------------

    def transmit_soon(self) -> None:
        """Schedule one :meth:`transmit` at the end of this loop iteration (no-op if pending)."""
        if self._transmit_handle is None:
            self._transmit_handle = self._call_soon(self._transmit_scheduled)

    def _transmit_scheduled(self) -> None:
        self._transmit_handle = None
        self.transmit()

    def transmit(self) -> None:
        """Send the datagrams the connection has ready and re-arm its timer.

        The one place that sends; a pending :meth:`transmit_soon` is cancelled
        because this call already sends what it would have.
        """
        handle = self._transmit_handle
        if handle is not None:
            self._transmit_handle = None
            handle.cancel()
        sendto = self._sendto
        if sendto is not None:
            try:
                for data, address in self._quic.datagrams_to_send(now=self._time()):
                    sendto(data, address)
            except self.engine.connection_error as exc:
                self._engine_failed(exc)
                return
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at
        if sendto is not None:  # (and so the handler exists: made before connection_made)
            self.handler.transmitted()

    def _handle_timer(self) -> None:
        now = max(self._timer_at or 0.0, self._time())
        self._timer = None
        self._timer_at = None
        try:
            self._quic.handle_timer(now=now)
        except self.engine.connection_error as exc:
            self._engine_failed(exc)
            return
        self._process_events()
        self.transmit()

    def _engine_failed(self, exc: Exception) -> None:
        """The engine raised outside any call of felix's: end the connection here.

        Nothing can be sent any more, so the peer learns at its idle timeout (or
        from a stateless reset); this side ends it now and logs it once.
        """
        if self._close_reason is not None:
            return
        log.warning("%s: the QUIC engine failed, dropping the connection: %s", self, exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None
        self._terminated(CloseReason(CLOSE_INTERNAL_ERROR, None, f"engine failure: {exc}"))

    # -- receiving (asyncio.DatagramProtocol) ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sendto = transport.sendto  # type: ignore[attr-defined]

    def send_with(self, sendto: Callable[[bytes, Any], None]) -> None:
        """Send datagrams with ``sendto(data, address)`` (a server: its socket's batch)."""
        self._sendto = sendto

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._quic.receive_datagram(data, addr, now=self._time())
        self._process_events()
        # Not transmitted here: the end-of-tick transmit carries the ACK together
        # with whatever the handler queued in reply (one datagram, one syscall).
        if self._transmit_handle is None:
            self._transmit_handle = self._call_soon(self._transmit_scheduled)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. port unreachable) say nothing reliable about the peer:
        # loss detection and the idle timeout decide.
        log.debug("%s: socket error: %s", self, exc)

    def _process_events(self) -> None:
        quic = self._quic
        dispatch = self._dispatch
        event = quic.next_event()
        while event is not None:
            handler = dispatch.get(type(event))
            if handler is not None:
                try:
                    handler(self, event)
                except Exception:
                    log.exception("%s: error in a connection hook, closing the connection", self)
                    if self._close_reason is None:
                        quic.close(error_code=CLOSE_INTERNAL_ERROR, reason_phrase="internal error")
            event = quic.next_event()

    # -- engine events -------------------------------------------------------------------

    def _ev_handshake_completed(self, event: Any) -> None:
        if not self.handshake_outcome.done():
            self.handshake_outcome.set_result(True)
        self.handler.handshake_completed(event.alpn_protocol)

    def _ev_stream_data(self, event: Any) -> None:
        self.handler.stream_data_received(event.stream_id, event.data, event.end_stream)

    def _ev_stream_reset(self, event: Any) -> None:
        self.handler.stream_reset(event.stream_id, event.error_code)

    def _ev_stop_sending(self, event: Any) -> None:
        self.handler.stop_sending(event.stream_id, event.error_code)

    def _ev_connection_id_issued(self, event: Any) -> None:
        if self._on_connection_id is not None:
            self._on_connection_id(self, event.connection_id, True)

    def _ev_connection_id_retired(self, event: Any) -> None:
        if self._on_connection_id is not None:
            self._on_connection_id(self, event.connection_id, False)

    def _ev_ping_acknowledged(self, event: Any) -> None:
        waiter = self._pings.pop(event.uid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _ev_connection_terminated(self, event: Any) -> None:
        self._terminated(CloseReason(event.error_code, event.frame_type, event.reason_phrase))

    def _terminated(self, reason: CloseReason) -> None:
        self._close_reason = reason
        if not self.handshake_outcome.done():
            self.handshake_outcome.set_result(False)
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the connection ended"))
        self._pings.clear()
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        if self._on_ended is not None:
            self._on_ended(self)
        try:
            self.handler.connection_terminated(reason)
        finally:
            if not self._ended.done():
                self._ended.set_result(None)
            if self._owned_transport is not None:
                # The CONNECTION_CLOSE may still be queued: close after this tick's transmit.
                self._call_soon(self._owned_transport.close)

    def __repr__(self) -> str:
        return f"<QuicTransport {self.engine.name} peer={self._peer}>"


@cache
def _dispatch_table(engine_name: str) -> dict[type[Any], _EventHandler]:
    events = load_engine(engine_name).events
    return {
        events.stream_data_received: QuicTransport._ev_stream_data,
        events.handshake_completed: QuicTransport._ev_handshake_completed,
        events.stream_reset: QuicTransport._ev_stream_reset,
        events.stop_sending_received: QuicTransport._ev_stop_sending,
        events.connection_id_issued: QuicTransport._ev_connection_id_issued,
        events.connection_id_retired: QuicTransport._ev_connection_id_retired,
        events.ping_acknowledged: QuicTransport._ev_ping_acknowledged,
        events.connection_terminated: QuicTransport._ev_connection_terminated,
    }
