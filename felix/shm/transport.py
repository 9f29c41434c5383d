"""ShmTransport: a felix connection over two shared-memory rings, driven on the asyncio loop.

How it works: the same class runs on both sides of a same-host connection. It
writes frames (felix/shm/framing.py) into its *outbound* ring and reads the
peer's from its *inbound* ring; each ring has an eventfd doorbell that its
producer rings only when the consumer said it sleeps (felix/_ring.pyx). It is a
:class:`~felix.quic.transport.StreamTransport` for felix, exactly like
QuicTransport: the gateway's connection and the client's protocol run on it
unchanged.

- Writes go straight into the ring while nothing is queued, unpublished; one
  publish (and at most one doorbell) at the end of the loop tick publishes them
  all, after which ``handler.transmitted()`` runs (as QUIC's end-of-tick transmit).
- A full ring: frames wait in a per-connection backlog (what ``send_buffer_size``
  reports, per stream and in total, so the gateway's slow-consumer policies and
  the client's flow control see it as a QUIC send buffer) and are retried every
  RETRY_INTERVAL until the peer has made room. The backlog is bounded
  (``max_backlog`` bytes): a peer that stops reading that long has its
  connection closed (OVERLOADED), nothing is dropped silently.
- Reading: the inbound doorbell wakes the loop; one wake-up handles at most
  MAX_BATCHES_PER_WAKE batches, then yields, so one busy peer cannot starve the
  other connections of the process. Payloads are copied out of the ring before
  the handler sees them (the peer may rewrite its ring at any time).
- The Unix socket of the handshake stays open for the connection's life: its
  end (EOF, ECONNRESET) means the peer is gone. Whatever ends the connection
  (CLOSE frame, socket end, protocol violation, corrupt ring) ends it on this
  side at once: readers removed, rings unmapped, memfds, eventfds and socket
  closed, the handler's ``connection_terminated`` called.

A peer that breaks the rules (a bad frame, a stream beyond its limit, a ring
whose words point out of bounds) has its connection closed with a transport
error code and one log line; nothing is raised into the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable

from felix.errors import ConnectionLost, RingError, ShmProtocolError
from felix.quic.transport import CLOSE_INTERNAL_ERROR, CloseReason, CreateHandler, StreamHandler
from felix.ring import Ring
from felix.shm import framing
from felix.shm.framing import FRAME_HEADER, Frame, ShmStreams

__all__ = ["CLOSE_BACKLOG", "ShmTransport"]

log = logging.getLogger("felix.shm")

#: Seconds between attempts to write a backlog into a full ring.
RETRY_INTERVAL = 0.001
#: Bound on one connection's backlog (bytes of frames not yet in the ring) by default.
DEFAULT_MAX_BACKLOG = 64 * 1024 * 1024
#: Batches of records one doorbell wake-up handles before yielding to the loop: at most
#: 256 records (a few ms of gateway work), then the other connections' callbacks run.
MAX_BATCHES_PER_WAKE = 4
MAX_RECORDS_PER_BATCH = 64
MAX_BYTES_PER_BATCH = 1 << 20
#: Largest payload of one DATA frame (larger writes are split).
MAX_CHUNK = 256 * 1024
#: Doorbell wake-ups in a row that find no record before the peer is taken to be
#: ringing for nothing (a legitimate producer rings only a consumer that said it
#: sleeps: at most one empty wake-up now and then, from a race it then loses).
MAX_EMPTY_WAKES = 256
#: How long close() keeps flushing a backlog before it ends the connection anyway.
CLOSING_TIMEOUT = 1.0
#: Application close code for a peer that stopped reading (docs/wire-protocol.md).
CLOSE_BACKLOG = 0x109
ALPN = "felix"


class BacklogBudget:
    """Bytes of frames waiting for ring space over all the connections that share it (a
    gateway's): each connection's own bound times its connection limit would be
    gigabytes, so the total has a bound of its own."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a backlog budget must be at least 1 byte")
        self.total = total
        self.used = 0


class ShmTransport:
    """One same-host connection (see the module doc). It owns everything it is given:
    the socket, both rings (and so their memfds) and both doorbell eventfds."""

    def __init__(
        self,
        *,
        sock: socket.socket,
        outbound: Ring,
        inbound: Ring,
        doorbells: tuple[int, int],
        streams: ShmStreams,
        peer: str,
        create_handler: CreateHandler,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        on_ended: Callable[[ShmTransport], None] | None = None,
        budget: BacklogBudget | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._sock = sock
        self._out = outbound
        self._in = inbound
        self._doorbells = doorbells
        self._streams = streams
        self._peer = peer
        self._max_backlog = max_backlog
        self._budget = budget
        self._on_ended = on_ended
        self._chunk = min(MAX_CHUNK, outbound.max_record_size - FRAME_HEADER)
        #: Frames not yet in the ring: (stream id or -1, record), oldest first.
        self._queue: deque[tuple[int, bytes]] = deque()
        self._backlog = 0
        self._backlog_by_stream: dict[int, int] = {}
        self._unpublished = False
        self._flush_handle: asyncio.Handle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._again: asyncio.Handle | None = None
        self._closing: bytes | None = None  # the CLOSE frame to send once the backlog is out
        self._closing_reason = CloseReason(0, None, "")
        self._closing_timer: asyncio.TimerHandle | None = None
        self._ending = False
        self._close_reason: CloseReason | None = None
        self._ended = loop.create_future()
        self._started = False
        self._empty_wakes = 0
        # Last: the handler may already use this transport while being made.
        self.handler: StreamHandler = create_handler(self)

    def start(self) -> None:
        """Watch the doorbell and the socket; the handshake completes at the next tick."""
        if self._started:
            return
        self._started = True
        loop = self._loop
        loop.add_reader(self._in.doorbell_fd, self._on_doorbell)
        loop.add_reader(self._sock.fileno(), self._on_socket)
        loop.call_soon(self._handshake_completed)

    def _handshake_completed(self) -> None:
        if self._ending:
            return
        try:
            self.handler.handshake_completed(ALPN)
        except Exception:
            self._hook_failed("handshake")
        # Records may already wait, and nobody rings for a consumer that never slept.
        self._on_doorbell()

    # -- StreamTransport -----------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def close_reason(self) -> CloseReason | None:
        return self._close_reason

    def next_stream_id(self, unidirectional: bool = False) -> int:
        return self._streams.next_stream_id(unidirectional)

    def streams_available(self, unidirectional: bool = False) -> int:
        return self._streams.streams_available(unidirectional)

    def max_peer_streams(self, unidirectional: bool = False) -> int:
        return self._streams.local_limits[1 if unidirectional else 0]

    def send_stream_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        """Queue ``data`` on ``stream_id`` (then FIN); published at the end of this tick.

        Raises ConnectionLost once the connection is closing or closed, ValueError
        when the stream cannot take data (see ShmStreams.send_data).
        """
        if self._closing is not None or self._ending:
            raise ConnectionLost(f"the shm connection to {self._peer} is closing")
        self._streams.send_data(stream_id, end_stream)
        size = len(data)
        chunk = self._chunk
        if size <= chunk:
            flags = framing.FLAG_FIN if end_stream else 0
            self._send(stream_id, framing.encode(framing.DATA, stream_id, bytes(data), flags=flags))
            return
        view = memoryview(data).cast("B")
        for start in range(0, size, chunk):
            last = start + chunk >= size
            flags = framing.FLAG_FIN if end_stream and last else 0
            piece = bytes(view[start : start + chunk])
            self._send(stream_id, framing.encode(framing.DATA, stream_id, piece, flags=flags))

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abandon sending on ``stream_id``: its unsent frames are dropped, RESET_STREAM sent."""
        if self._closing is not None or self._ending:
            raise ConnectionLost(f"the shm connection to {self._peer} is closing")
        if self._streams.send_reset(stream_id):
            self._drop_queued(stream_id)
            self._send(-1, framing.encode(framing.RESET_STREAM, stream_id, code=error_code))

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        """Ask the peer to stop sending on ``stream_id`` (STOP_SENDING)."""
        if self._closing is not None or self._ending:
            raise ConnectionLost(f"the shm connection to {self._peer} is closing")
        if self._streams.send_stop(stream_id):
            self._send(-1, framing.encode(framing.STOP_SENDING, stream_id, code=error_code))

    def send_buffer_size(self, stream_id: int | None = None) -> int:
        """Bytes of frames on ``stream_id`` (None: all) waiting for room in the ring."""
        if stream_id is None:
            return self._backlog
        return self._backlog_by_stream.get(stream_id, 0)

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """Close with an application ``error_code`` (idempotent): what is queued goes out
        first (for up to CLOSING_TIMEOUT), then a CLOSE frame; then the connection ends."""
        if self._closing is not None or self._ending:
            return
        self._closing = framing.encode_close(error_code, reason_phrase)
        self._closing_reason = CloseReason(error_code, None, reason_phrase)
        self._closing_timer = self._loop.call_later(CLOSING_TIMEOUT, self._closing_expired)
        self._flush()

    async def wait_closed(self) -> None:
        """Wait until the connection has ended."""
        await asyncio.shield(self._ended)

    # -- sending -------------------------------------------------------------------------

    def _send(self, stream_id: int, record: bytes) -> None:
        if not self._queue:
            try:
                written = self._out.write(record, publish=False)
            except RingError as exc:
                self._corrupt(exc)
                raise ConnectionLost(f"the shm connection to {self._peer} failed") from None
            if written:
                self._unpublished = True
                if self._flush_handle is None:
                    self._flush_handle = self._loop.call_soon(self._flush)
                return
        size = len(record)
        budget = self._budget
        if self._backlog + size > self._max_backlog or (
            budget is not None and budget.used + size > budget.total
        ):
            log.warning(
                "shm connection %s: the peer is not reading (backlog over %d bytes, or the "
                "gateway's %d in all); closing",
                self._peer,
                self._max_backlog,
                budget.total if budget is not None else 0,
            )
            self._end_now(CloseReason(CLOSE_BACKLOG, None, "the peer stopped reading"))
            raise ConnectionLost(f"the shm connection to {self._peer} is over its backlog")
        self._queue.append((stream_id, record))
        self._backlog += size
        if budget is not None:
            budget.used += size
        if stream_id >= 0:
            self._backlog_by_stream[stream_id] = self._backlog_by_stream.get(stream_id, 0) + size
        if self._flush_handle is None and self._retry is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _drop_queued(self, stream_id: int) -> None:
        if not self._backlog_by_stream.pop(stream_id, 0):
            return
        kept = deque(item for item in self._queue if item[0] != stream_id)
        backlog = sum(len(record) for _, record in kept)
        if self._budget is not None:
            self._budget.used -= self._backlog - backlog
        self._backlog = backlog
        self._queue = kept

    def _flush(self) -> None:
        """Write what the backlog holds while the ring has room, publish, tell the handler."""
        self._flush_handle = None
        self._retry = None
        if self._ending:
            return
        queue = self._queue
        out = self._out
        progress = self._unpublished
        try:
            while queue:
                stream_id, record = queue[0]
                if not out.write(record, publish=False):
                    break
                queue.popleft()
                size = len(record)
                self._backlog -= size
                if self._budget is not None:
                    self._budget.used -= size
                if stream_id >= 0:
                    left = self._backlog_by_stream[stream_id] - size
                    if left:
                        self._backlog_by_stream[stream_id] = left
                    else:
                        del self._backlog_by_stream[stream_id]
                progress = True
            if not queue and self._closing is not None and out.write(self._closing, publish=False):
                out.publish()
                self._end_now(self._closing_reason)
                return
            out.publish()
        except (RingError, OSError) as exc:
            self._corrupt(exc)
            return
        self._unpublished = False
        if queue or self._closing is not None:
            self._retry = self._loop.call_later(RETRY_INTERVAL, self._flush)
        if progress and self._closing is None:
            try:
                self.handler.transmitted()
            except Exception:
                self._hook_failed("transmitted")

    def _closing_expired(self) -> None:
        self._closing_timer = None
        if not self._ending:
            self._end_now(self._closing_reason)

    # -- receiving -----------------------------------------------------------------------

    def _on_doorbell(self) -> None:
        self._again = None
        if self._ending:
            return
        ring = self._in
        try:
            ring.drain_doorbell()
            batches = MAX_BATCHES_PER_WAKE
            while batches:
                views = ring.next_batch(MAX_RECORDS_PER_BATCH, MAX_BYTES_PER_BATCH)
                if not views:
                    if batches < MAX_BATCHES_PER_WAKE:
                        self._empty_wakes = 0
                    else:
                        self._empty_wakes += 1
                        if self._empty_wakes > MAX_EMPTY_WAKES:
                            raise ShmProtocolError(
                                f"doorbell rung {self._empty_wakes} times in a row with "
                                "no record in the ring"
                            )
                    return
                for view in views:
                    self._on_record(view)
                    if self._ending:
                        return
                batches -= 1
            ring.commit()
        except ShmProtocolError as exc:
            self._violation(exc)
            return
        except (RingError, OSError) as exc:
            self._corrupt(exc)
            return
        # Still busy: let the other connections' callbacks run, then continue awake.
        self._again = self._loop.call_soon(self._on_doorbell)

    def _on_record(self, view: memoryview) -> None:
        frame = framing.parse(view)
        kind = frame.kind
        if kind == framing.CLOSE:
            self._peer_closed(frame)
            return
        action = self._streams.receive(frame)
        if action == framing.IGNORE:
            return
        handler = self.handler
        stream_id = frame.stream_id
        try:
            if kind == framing.DATA:
                handler.stream_data_received(
                    stream_id, frame.payload, bool(frame.flags & framing.FLAG_FIN)
                )
            elif kind == framing.RESET_STREAM:
                handler.stream_reset(stream_id, frame.error_code)
            else:
                handler.stop_sending(stream_id, frame.error_code)
        except Exception:
            self._hook_failed("a stream event")
        if action == framing.DELIVER_AND_RESET and not self._ending and self._closing is None:
            # The peer stops reading: its unsent data is dropped and the stream reset,
            # as a QUIC stack answers STOP_SENDING.
            self._drop_queued(stream_id)
            with contextlib.suppress(ConnectionLost):
                self._send(
                    -1, framing.encode(framing.RESET_STREAM, stream_id, code=frame.error_code)
                )

    def _peer_closed(self, frame: Frame) -> None:
        reason = frame.payload[: framing.MAX_CLOSE_REASON].decode("utf-8", "replace")
        if frame.flags & framing.FLAG_TRANSPORT:
            self._end_now(CloseReason(frame.error_code, frame.stream_id, reason))
        else:
            self._end_now(CloseReason(frame.error_code, None, reason))

    def _on_socket(self) -> None:
        if self._ending:
            return
        try:
            data = self._sock.recv(256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                log.debug("shm connection %s: socket error %s", self._peer, exc)
            data = b""
        if data:
            self._violation(ShmProtocolError("bytes on the shm socket after the handshake"))
            return
        # The peer is gone (or closed its end after its CLOSE frame): read what it left.
        with contextlib.suppress(Exception):
            self._on_doorbell()
        if not self._ending:
            self._end_now(CloseReason(0, None, "the peer closed the shm socket"))

    # -- ending --------------------------------------------------------------------------

    def _hook_failed(self, where: str) -> None:
        log.exception(
            "shm connection %s: error in a connection hook (%s), closing", self._peer, where
        )
        if self._closing is None and not self._ending:
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _violation(self, exc: ShmProtocolError) -> None:
        """The peer broke the framing or stream rules: tell it (best effort), end now."""
        log.warning("shm connection %s: protocol violation, closing: %s", self._peer, exc)
        with contextlib.suppress(Exception):
            self._out.write(framing.encode_close(exc.transport_code, str(exc), transport=True))
        self._end_now(CloseReason(exc.transport_code, 0, str(exc)))

    def _corrupt(self, exc: Exception) -> None:
        """A ring's shared words are out of bounds (a hostile or broken peer): end now."""
        log.warning("shm connection %s: corrupt ring, closing: %s", self._peer, exc)
        self._end_now(CloseReason(framing.PROTOCOL_VIOLATION, 0, f"corrupt ring: {exc}"))

    def _end_now(self, reason: CloseReason) -> None:
        """End the connection on this side: release everything, tell the handler once."""
        if self._ending:
            return
        self._ending = True
        self._close_reason = reason
        loop = self._loop
        for handle in (self._flush_handle, self._retry, self._again, self._closing_timer):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._retry = self._again = self._closing_timer = None
        self._queue.clear()
        if self._budget is not None:
            self._budget.used -= self._backlog
        self._backlog = 0
        self._backlog_by_stream.clear()
        if self._started:
            loop.remove_reader(self._in.doorbell_fd)
            loop.remove_reader(self._sock.fileno())
        # The handler hears of it on the next tick, outside whatever call ended it (a
        # hook of the handler itself, as with QUIC, never reenters it).
        loop.call_soon(self._terminated, reason)

    def _terminated(self, reason: CloseReason) -> None:
        if self._on_ended is not None:
            try:
                self._on_ended(self)
            except Exception:
                log.exception("shm connection %s: error in on_ended", self._peer)
        try:
            self.handler.connection_terminated(reason)
        except Exception:
            log.exception("shm connection %s: error in connection_terminated", self._peer)
        finally:
            self._release()
            if not self._ended.done():
                self._ended.set_result(None)

    def _release(self) -> None:
        """Unmap the rings and close every descriptor of the connection."""
        for ring in (self._out, self._in):
            with contextlib.suppress(Exception):
                ring.close()
        for fd in self._doorbells:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._doorbells = (-1, -1)
        with contextlib.suppress(OSError):
            self._sock.close()

    def abort(self) -> None:
        """End at once without a CLOSE frame (used when the process shuts down)."""
        self._end_now(CloseReason(0, None, "closed"))

    def __repr__(self) -> str:
        return f"<ShmTransport peer={self._peer}>"
