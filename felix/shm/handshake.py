"""The shared-memory transport's handshake over a Unix stream socket.

A client connects to the node's socket and sends a fixed-size hello; the node
answers with one reply message, carrying the connection's four descriptors
(SCM_RIGHTS) when it accepts. All integers little-endian (docs/wire-protocol.md,
"Same-host transport")::

    hello  (client -> node, 24 bytes)
      magic "FLXSHM1\\0" | u16 version (1) | u16 flags (0) | u32 ring_capacity
      | u32 max_bidi_streams | u32 max_uni_streams
    reply  (node -> client, 26 bytes + reason)
      magic "FLXSHM1\\0" | u16 version | u16 status | u32 ring_capacity
      | u32 max_bidi_streams | u32 max_uni_streams | u16 reason_length | reason (utf-8)

``ring_capacity`` in the hello is what the client asks for each direction (0:
the node's default; else a power of two within MIN_RING..MAX_RING); in the reply
it is what the node made. The stream limits are how many streams of each kind
the *other* side may hold open towards the sender at once. Status 0 (OK) comes
with exactly four descriptors, in this order: the client->node ring (a sealed
memfd, felix/_ring.pyx), the node->client ring, the client->node ring's doorbell
(an eventfd the node waits on) and the node->client ring's doorbell. Status 1
(BUSY: the node is at its connection limit) and 2 (REFUSED: a bad hello) carry a
reason and no descriptors. Afterwards the socket carries nothing: its closing
tells either side that the other is gone.

The node never maps a descriptor a client made: it creates both rings and both
doorbells, and reads the hello with a plain ``recv`` (descriptors a client
attaches are discarded by the kernel).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Final

from felix.errors import HandshakeFailed, Overloaded

__all__ = [
    "BUSY",
    "DEFAULT_RING",
    "HELLO_SIZE",
    "MAGIC",
    "MAX_RING",
    "MIN_RING",
    "OK",
    "REFUSED",
    "Hello",
    "Reply",
    "decode_hello",
    "decode_reply",
    "encode_hello",
    "encode_reply",
    "peer_credentials",
    "read_hello",
    "recv_reply",
]

MAGIC: Final = b"FLXSHM1\0"
VERSION: Final = 1
#: Ring capacity bounds a client may ask for (each direction), and the default.
MIN_RING: Final = 64 * 1024
MAX_RING: Final = 8 * 1024 * 1024
DEFAULT_RING: Final = 1024 * 1024
#: Stream limits a side may announce (at least one of each kind is needed to talk).
MAX_STREAM_LIMIT: Final = 1 << 16
#: A refusal's reason is cut to this many bytes.
MAX_REASON: Final = 512

OK: Final = 0
BUSY: Final = 1
REFUSED: Final = 2

_HELLO = struct.Struct("<8sHHIII")
_REPLY = struct.Struct("<8sHHIIIH")
HELLO_SIZE: Final = _HELLO.size
REPLY_HEADER: Final = _REPLY.size
#: Descriptors an OK reply carries.
FDS: Final = 4


@dataclass(frozen=True, slots=True)
class Hello:
    ring_capacity: int
    max_bidi_streams: int
    max_uni_streams: int


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    ring_capacity: int = 0
    max_bidi_streams: int = 0
    max_uni_streams: int = 0
    reason: str = ""


def _check_capacity(capacity: int, *, allow_default: bool) -> None:
    if capacity == 0 and allow_default:
        return
    if not MIN_RING <= capacity <= MAX_RING or capacity & (capacity - 1):
        raise ValueError(
            f"ring capacity must be a power of two within {MIN_RING}..{MAX_RING}, got {capacity}"
        )


def _check_limits(bidi: int, uni: int) -> None:
    if not (1 <= bidi <= MAX_STREAM_LIMIT and 1 <= uni <= MAX_STREAM_LIMIT):
        raise ValueError(f"stream limits must be within 1..{MAX_STREAM_LIMIT}, got {bidi}, {uni}")


def encode_hello(hello: Hello) -> bytes:
    """The hello's bytes; ValueError for values out of their bounds."""
    _check_capacity(hello.ring_capacity, allow_default=True)
    _check_limits(hello.max_bidi_streams, hello.max_uni_streams)
    return _HELLO.pack(
        MAGIC, VERSION, 0, hello.ring_capacity, hello.max_bidi_streams, hello.max_uni_streams
    )


def decode_hello(data: bytes) -> Hello:
    """Parse a client's hello. Raises HandshakeFailed with what is wrong."""
    if len(data) != HELLO_SIZE:
        raise HandshakeFailed(f"shm hello of {len(data)} bytes, expected {HELLO_SIZE}")
    magic, version, flags, capacity, bidi, uni = _HELLO.unpack(data)
    if magic != MAGIC:
        raise HandshakeFailed("not a felix shm hello (bad magic)")
    if version != VERSION:
        raise HandshakeFailed(f"shm transport version {version} is not supported (only {VERSION})")
    if flags:
        raise HandshakeFailed(f"unknown shm hello flags 0x{flags:x}")
    try:
        _check_capacity(capacity, allow_default=True)
        _check_limits(bidi, uni)
    except ValueError as exc:
        raise HandshakeFailed(f"bad shm hello: {exc}") from None
    return Hello(capacity, bidi, uni)


def encode_reply(reply: Reply) -> bytes:
    reason = reply.reason.encode("utf-8", "replace")[:MAX_REASON]
    if reply.status == OK:
        _check_capacity(reply.ring_capacity, allow_default=False)
        _check_limits(reply.max_bidi_streams, reply.max_uni_streams)
    return (
        _REPLY.pack(
            MAGIC,
            VERSION,
            reply.status,
            reply.ring_capacity,
            reply.max_bidi_streams,
            reply.max_uni_streams,
            len(reason),
        )
        + reason
    )


def decode_reply_header(data: bytes) -> tuple[Reply, int]:
    """The reply without its reason, and the reason's length. Raises HandshakeFailed."""
    magic, version, status, capacity, bidi, uni, reason_len = _REPLY.unpack(data)
    if magic != MAGIC:
        raise HandshakeFailed("the socket did not answer as a felix shm endpoint (bad magic)")
    if version != VERSION:
        raise HandshakeFailed(f"the node speaks shm transport version {version}, not {VERSION}")
    if status not in (OK, BUSY, REFUSED):
        raise HandshakeFailed(f"unknown shm handshake status {status}")
    if reason_len > MAX_REASON:
        raise HandshakeFailed(f"shm refusal reason of {reason_len} bytes (limit {MAX_REASON})")
    if status == OK:
        try:
            _check_capacity(capacity, allow_default=False)
            _check_limits(bidi, uni)
        except ValueError as exc:
            raise HandshakeFailed(f"bad shm reply: {exc}") from None
    return Reply(status, capacity, bidi, uni), reason_len


def decode_reply(data: bytes) -> Reply:
    """Parse a whole reply (header and reason). Raises HandshakeFailed."""
    if len(data) < REPLY_HEADER:
        raise HandshakeFailed(f"shm reply of {len(data)} bytes is truncated")
    reply, reason_len = decode_reply_header(data[:REPLY_HEADER])
    if len(data) != REPLY_HEADER + reason_len:
        raise HandshakeFailed("shm reply length does not match its reason length")
    reason = data[REPLY_HEADER:].decode("utf-8", "replace")
    return Reply(
        reply.status, reply.ring_capacity, reply.max_bidi_streams, reply.max_uni_streams, reason
    )


def refusal_error(reply: Reply) -> Exception:
    """What a client raises for a refusal: Overloaded (retryable) or HandshakeFailed."""
    if reply.status == BUSY:
        return Overloaded(f"the node refused the shm connection: {reply.reason}")
    return HandshakeFailed(f"the node refused the shm connection: {reply.reason}")


_CRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


# -- async I/O (the socket must be non-blocking) ---------------------------------------------


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise HandshakeFailed(f"the peer closed the socket after {len(data)} of {n} bytes")
        data += chunk
    return data


async def read_hello(sock: socket.socket) -> Hello:
    """Read and parse exactly one hello (the caller bounds the time). HandshakeFailed."""
    return decode_hello(await _recv_exactly(sock, HELLO_SIZE))


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def recv_reply(sock: socket.socket) -> tuple[Reply, list[int]]:
    """Read the node's reply and the descriptors that came with it (the caller owns them,
    and bounds the time). Raises HandshakeFailed (also for an OK without exactly four
    descriptors, which are then closed) or Overloaded for a BUSY refusal."""
    fds: list[int] = []
    data = b""
    try:
        while True:
            await _wait_readable(sock)
            try:
                chunk, got, flags, _ = socket.recv_fds(
                    sock, REPLY_HEADER + MAX_REASON, FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            fds.extend(got)
            if not chunk:
                raise HandshakeFailed("the node closed the shm socket during the handshake")
            data += chunk
            if flags & socket.MSG_CTRUNC or len(fds) > FDS:
                raise HandshakeFailed("the node sent more descriptors than a shm reply has")
            break
        if len(data) < REPLY_HEADER:
            data += await _recv_exactly(sock, REPLY_HEADER - len(data))
        reply, reason_len = decode_reply_header(data[:REPLY_HEADER])
        need = REPLY_HEADER + reason_len
        if len(data) < need:
            data += await _recv_exactly(sock, need - len(data))
        reply = decode_reply(data[:need])
        if reply.status != OK:
            raise refusal_error(reply)
        if len(fds) != FDS:
            raise HandshakeFailed(f"the node's shm reply carried {len(fds)} descriptors, not {FDS}")
        return reply, fds
    except BaseException:
        _close_all(fds)
        raise


def _close_all(fds: list[int]) -> None:
    import os

    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
