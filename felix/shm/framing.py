"""Frames of the shared-memory transport, and its sans-IO stream state.

One ring record is one frame (docs/wire-protocol.md, "Same-host transport")::

    u8 kind | u8 flags | u16 reserved (0) | u32 error_code | u64 stream_id | payload

little-endian, 16 header bytes. Kinds:

- DATA (1): ``payload`` is the next bytes of the stream; flag FIN (0x1): the
  sender's last frame on it. The sender may split a write into several frames.
- RESET_STREAM (2): the sender abandons sending on the stream (``error_code``).
- STOP_SENDING (3): the sender asks the receiver to stop sending on the stream;
  the receiver answers with RESET_STREAM unless its side already ended.
- CLOSE (4): the connection ends; ``error_code`` and a utf-8 reason in the
  payload. Flag TRANSPORT (0x1): a transport error code (the peer broke these
  rules), with the offending frame's kind in ``stream_id``; else an application
  code as given to ``close()``.

Streams are numbered as in QUIC (felix/quic/stream_ids.py): bit 0 is the
initiator (0 client), bit 1 the direction (1 unidirectional); each side opens
its streams in increasing order (a skipped id counts as opened and closed).
Each side tells the other in the handshake how many streams of each kind the
other may hold open towards it at once; a stream stops counting once both of its
directions ended (FIN or RESET_STREAM each way, one way for unidirectional
streams). Nothing needs a credit frame: both sides see the same frames in the
same order, and the side that enforces a limit always sees a stream end no later
than the side that opened it (every event the opener knows of was either sent
by it, so earlier in the ring it then writes, or sent by the enforcer itself).

:class:`ShmStreams` keeps that state; it does no I/O. Whatever a peer sends that
breaks these rules raises :class:`~felix.errors.ShmProtocolError`, which closes
the connection.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from felix.errors import ShmProtocolError

__all__ = [
    "CLOSE",
    "DATA",
    "FLAG_FIN",
    "FLAG_TRANSPORT",
    "FRAME_HEADER",
    "MAX_CLOSE_REASON",
    "RESET_STREAM",
    "STOP_SENDING",
    "Frame",
    "ShmStreams",
    "encode",
    "encode_close",
    "parse",
]

DATA: Final = 1
RESET_STREAM: Final = 2
STOP_SENDING: Final = 3
CLOSE: Final = 4
_KINDS: Final = frozenset((DATA, RESET_STREAM, STOP_SENDING, CLOSE))

FLAG_FIN: Final = 0x1
FLAG_TRANSPORT: Final = 0x1

_HEADER = struct.Struct("<BBHIQ")
#: Bytes before a frame's payload.
FRAME_HEADER: Final = _HEADER.size
#: A CLOSE frame's reason is cut to this many bytes (then decoded leniently).
MAX_CLOSE_REASON: Final = 1024
U32_MAX: Final = 2**32 - 1
U62_MAX: Final = 2**62 - 1

#: QUIC transport error codes (RFC 9000, 20.1) the transport closes with.
STREAM_LIMIT_ERROR: Final = 0x4
STREAM_STATE_ERROR: Final = 0x5
FRAME_ENCODING_ERROR: Final = 0x7
PROTOCOL_VIOLATION: Final = 0xA

_SERVER: Final = 0x1
_UNI: Final = 0x2


class Frame(NamedTuple):
    """One parsed frame; ``payload`` is a copy (the ring's space is reused after commit).

    A named tuple: made once per record on the receive path, where a frozen
    dataclass's slower constructor would show."""

    kind: int
    flags: int
    error_code: int
    stream_id: int
    payload: bytes


def encode(
    kind: int, stream_id: int, payload: bytes = b"", *, flags: int = 0, code: int = 0
) -> bytes:
    """One frame's bytes. Raises ValueError for a code or stream id out of range."""
    if not 0 <= code <= U32_MAX:
        raise ValueError(f"error code {code} does not fit the shm transport's u32")
    if not 0 <= stream_id <= U62_MAX:
        raise ValueError(f"stream id {stream_id} out of range")
    return _HEADER.pack(kind, flags, 0, code, stream_id) + payload


def encode_close(code: int, reason: str, *, transport: bool = False, kind: int = 0) -> bytes:
    """A CLOSE frame (the reason is cut to MAX_CLOSE_REASON bytes)."""
    data = reason.encode("utf-8", "replace")[:MAX_CLOSE_REASON]
    flags = FLAG_TRANSPORT if transport else 0
    return encode(CLOSE, kind, data, flags=flags, code=code & U32_MAX)


def parse(record: memoryview | bytes) -> Frame:
    """Parse one ring record (the peer may rewrite it meanwhile: it is read once).

    Raises ShmProtocolError for a short record, an unknown kind, nonzero reserved
    bits or flags that kind does not have.
    """
    if len(record) < FRAME_HEADER:
        raise ShmProtocolError(
            f"shm frame of {len(record)} bytes, shorter than its header", FRAME_ENCODING_ERROR
        )
    kind, flags, reserved, code, stream_id = _HEADER.unpack_from(record)
    if kind not in _KINDS:
        raise ShmProtocolError(f"unknown shm frame kind {kind}", FRAME_ENCODING_ERROR)
    allowed = FLAG_FIN if kind == DATA else FLAG_TRANSPORT if kind == CLOSE else 0
    if reserved or flags & ~allowed:
        raise ShmProtocolError(
            f"shm frame kind {kind} with reserved bits set", FRAME_ENCODING_ERROR
        )
    if stream_id > U62_MAX:
        raise ShmProtocolError(f"stream id {stream_id} out of range", FRAME_ENCODING_ERROR)
    payload = bytes(record[FRAME_HEADER:])
    if kind != DATA and kind != CLOSE and payload:
        raise ShmProtocolError(f"shm frame kind {kind} with a payload", FRAME_ENCODING_ERROR)
    return Frame(kind, flags, code, stream_id, payload)


class _Stream:
    __slots__ = ("recv_open", "send_open", "stopped")

    def __init__(self, send_open: bool, recv_open: bool) -> None:
        self.send_open = send_open
        self.recv_open = recv_open
        #: This side sent STOP_SENDING: data still arriving is dropped.
        self.stopped = False


#: What :meth:`ShmStreams.receive` tells the transport to do with a frame.
IGNORE: Final = 0
DELIVER: Final = 1
#: A STOP_SENDING for a stream this side still sends on: deliver, then RESET_STREAM it.
DELIVER_AND_RESET: Final = 2


class ShmStreams:
    """Per-stream state of one connection (see the module doc).

    ``local_limits`` is (bidirectional, unidirectional): how many streams the peer
    may hold open towards this side at once (enforced on what arrives);
    ``peer_limits`` the same as the peer announced it for this side (checked
    before this side opens a stream: :meth:`streams_available`).
    """

    def __init__(
        self, *, is_client: bool, local_limits: tuple[int, int], peer_limits: tuple[int, int]
    ) -> None:
        self.is_client = is_client
        self.local_limits = local_limits
        self.peer_limits = peer_limits
        self._streams: dict[int, _Stream] = {}
        own = 0 if is_client else _SERVER
        #: Next id this side / the peer opens, by direction (index 1: unidirectional).
        self._next_local = [own, own | _UNI]
        self._next_peer = [own ^ _SERVER, (own ^ _SERVER) | _UNI]
        #: Open streams opened by this side / the peer, by direction.
        self._open_local = [0, 0]
        self._open_peer = [0, 0]

    # -- what this side does ---------------------------------------------------------------

    def is_local(self, stream_id: int) -> bool:
        return bool(stream_id & _SERVER) != self.is_client

    def next_stream_id(self, unidirectional: bool = False) -> int:
        return self._next_local[1 if unidirectional else 0]

    def streams_available(self, unidirectional: bool = False) -> int:
        uni = 1 if unidirectional else 0
        return max(0, self.peer_limits[uni] - self._open_local[uni])

    def open_streams(self) -> int:
        """Streams not yet ended both ways (what the limits count)."""
        return len(self._streams)

    def send_data(self, stream_id: int, end_stream: bool) -> None:
        """This side writes on ``stream_id`` (opening it if new). ValueError if it cannot."""
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._open_new_local(stream_id)
        if not stream.send_open:
            raise ValueError(f"stream {stream_id} cannot send (ended, reset or receive-only)")
        if end_stream:
            stream.send_open = False
            self._maybe_free(stream_id, stream)

    def send_reset(self, stream_id: int) -> bool:
        """This side abandons sending on ``stream_id``: True if a RESET_STREAM must go out."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if self.is_local(stream_id) and stream_id >= self._next_local[_dir(stream_id)]:
                raise ValueError(f"stream {stream_id} was never opened")
            return False  # ended meanwhile (or never this side's to send on)
        if not stream.send_open:
            return False
        stream.send_open = False
        self._maybe_free(stream_id, stream)
        return True

    def send_stop(self, stream_id: int) -> bool:
        """This side asks the peer to stop: True if a STOP_SENDING must go out."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if self.is_local(stream_id) and stream_id >= self._next_local[_dir(stream_id)]:
                raise ValueError(f"stream {stream_id} was never opened")
            return False
        if not stream.recv_open or stream.stopped:
            return False
        stream.stopped = True
        return True

    def _open_new_local(self, stream_id: int) -> _Stream:
        uni = _dir(stream_id)
        if not self.is_local(stream_id) or stream_id != self._next_local[uni]:
            raise ValueError(f"stream {stream_id} is not this side's next stream to open")
        if self._open_local[uni] >= self.peer_limits[uni]:
            raise ValueError(
                f"the peer allows {self.peer_limits[uni]} open "
                f"{'unidirectional' if uni else 'bidirectional'} streams"
            )
        self._next_local[uni] += 4
        self._open_local[uni] += 1
        stream = _Stream(send_open=True, recv_open=not uni)
        self._streams[stream_id] = stream
        return stream

    # -- what the peer does ------------------------------------------------------------------

    def receive(self, frame: Frame) -> int:
        """Apply a stream frame from the peer (not CLOSE): IGNORE, DELIVER or DELIVER_AND_RESET.

        Raises ShmProtocolError when the frame breaks the rules.
        """
        stream_id = frame.stream_id
        if stream_id & _UNI:
            # A unidirectional stream has one sender: its opener.
            if self.is_local(stream_id) and frame.kind != STOP_SENDING:
                raise ShmProtocolError(
                    f"data or reset on this side's unidirectional stream {stream_id}",
                    STREAM_STATE_ERROR,
                )
            if not self.is_local(stream_id) and frame.kind == STOP_SENDING:
                raise ShmProtocolError(
                    f"STOP_SENDING on the peer's unidirectional stream {stream_id}",
                    STREAM_STATE_ERROR,
                )
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._stream_for_peer_frame(frame)
            if stream is None:
                return IGNORE
        kind = frame.kind
        if kind == DATA:
            if not stream.recv_open:
                raise ShmProtocolError(
                    f"data on stream {stream_id} after its end", STREAM_STATE_ERROR
                )
            if frame.flags & FLAG_FIN:
                stream.recv_open = False
                self._maybe_free(stream_id, stream)
            return IGNORE if stream.stopped else DELIVER
        if kind == RESET_STREAM:
            if not stream.recv_open:
                return IGNORE  # a reset racing our view of its end: nothing to tell
            stream.recv_open = False
            self._maybe_free(stream_id, stream)
            return DELIVER
        # STOP_SENDING: the peer stops reading what this side sends.
        if not stream.send_open:
            return IGNORE
        stream.send_open = False
        self._maybe_free(stream_id, stream)
        return DELIVER_AND_RESET

    def _stream_for_peer_frame(self, frame: Frame) -> _Stream | None:
        """The state of a stream not in the table: a new peer stream, or None (ended)."""
        stream_id = frame.stream_id
        uni = _dir(stream_id)
        kind = frame.kind
        if self.is_local(stream_id):
            if stream_id >= self._next_local[uni]:
                raise ShmProtocolError(
                    f"frame for stream {stream_id}, which this side never opened",
                    STREAM_STATE_ERROR,
                )
            if kind == DATA:
                raise ShmProtocolError(
                    f"data on stream {stream_id} after its end", STREAM_STATE_ERROR
                )
            return None  # a late RESET or STOP for a stream that ended: harmless
        if stream_id < self._next_peer[uni]:
            if kind == DATA:
                raise ShmProtocolError(
                    f"data on stream {stream_id} after its end", STREAM_STATE_ERROR
                )
            return None
        if self._open_peer[uni] >= self.local_limits[uni]:
            raise ShmProtocolError(
                f"the peer opened more than {self.local_limits[uni]} "
                f"{'unidirectional' if uni else 'bidirectional'} streams",
                STREAM_LIMIT_ERROR,
            )
        self._next_peer[uni] = stream_id + 4  # ids skipped on the way count as ended
        self._open_peer[uni] += 1
        stream = _Stream(send_open=not uni, recv_open=True)
        self._streams[stream_id] = stream
        return stream

    def _maybe_free(self, stream_id: int, stream: _Stream) -> None:
        if stream.send_open or stream.recv_open:
            return
        del self._streams[stream_id]
        uni = _dir(stream_id)
        if self.is_local(stream_id):
            self._open_local[uni] -= 1
        else:
            self._open_peer[uni] -= 1


def _dir(stream_id: int) -> int:
    return 1 if stream_id & _UNI else 0
