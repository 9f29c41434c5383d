"""The client side of the shared-memory transport: :func:`shm_connect`.

Connects to a node's Unix socket, does the handshake (felix/shm/handshake.py),
maps the two rings the node made and returns the handler of a running
:class:`~felix.shm.transport.ShmTransport`, as ``felix.quic.connect`` returns
the handler of a QUIC connection. Imports nothing server-side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import TypeVar

from felix.errors import ConnectionLost, FelixError, FelixTimeoutError, HandshakeFailed, RingError
from felix.quic.transport import StreamHandler, StreamTransport
from felix.ring import Ring
from felix.shm import handshake as hs
from felix.shm.framing import ShmStreams
from felix.shm.transport import ShmTransport

__all__ = ["CLIENT_LIMITS", "shm_connect"]

#: Streams the node may hold open towards the client: (bidirectional, unidirectional).
#: Unidirectional ones are event streams, one per subscription.
CLIENT_LIMITS = (16, 1024)

H = TypeVar("H", bound=StreamHandler)


async def shm_connect(
    path: str,
    create_handler: Callable[[StreamTransport], H],
    timeout: float,
    *,
    ring_capacity: int = 0,
) -> H:
    """Open a shared-memory connection to the node serving the Unix socket ``path``.

    ``create_handler(transport)`` makes the connection's handler, which is
    returned; the transport is ``handler.transport``-like (it is what the handler
    was made with). ``ring_capacity``: bytes per direction to ask for (0: the
    node's default). Raises ConnectionLost (no such socket, refused, reset),
    FelixTimeoutError, Overloaded (the node is at its connection limit),
    HandshakeFailed (not a felix shm endpoint, a bad reply).
    """
    if ring_capacity:
        hs.encode_hello(hs.Hello(ring_capacity, 1, 1))  # ValueError for a bad size, early
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    fds: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, path)
            except OSError as exc:
                raise ConnectionLost(f"cannot connect to felix+shm://{path}: {exc}") from exc
            hello = hs.Hello(ring_capacity, *CLIENT_LIMITS)
            await loop.sock_sendall(sock, hs.encode_hello(hello))
            reply, fds = await hs.recv_reply(sock)
        c2n_fd, n2c_fd, c2n_bell, n2c_bell = fds
        outbound = _attach(c2n_fd, c2n_bell, reply.ring_capacity)
        fds.remove(c2n_fd)  # the ring owns it now
        try:
            inbound = _attach(n2c_fd, n2c_bell, reply.ring_capacity)
        except BaseException:
            outbound.close()
            raise
        fds.remove(n2c_fd)
        streams = ShmStreams(
            is_client=True,
            local_limits=CLIENT_LIMITS,
            peer_limits=(reply.max_bidi_streams, reply.max_uni_streams),
        )
        transport = ShmTransport(
            sock=sock,
            outbound=outbound,
            inbound=inbound,
            doorbells=(c2n_bell, n2c_bell),
            streams=streams,
            peer="unix",
            create_handler=create_handler,
        )
        fds = []
    except TimeoutError:
        _close(sock, fds)
        raise FelixTimeoutError(
            f"shm handshake with felix+shm://{path} took longer than {timeout} s"
        ) from None
    except FelixError:
        _close(sock, fds)
        raise
    except OSError as exc:
        _close(sock, fds)
        raise ConnectionLost(f"shm connection to felix+shm://{path} failed: {exc}") from exc
    except BaseException:
        _close(sock, fds)
        raise
    transport.start()
    return transport.handler  # type: ignore[return-value]


def _attach(fd: int, bell: int, capacity: int) -> Ring:
    try:
        ring = Ring.attach_fd(fd, doorbell_fd=bell)
    except RingError as exc:
        raise HandshakeFailed(f"the node's shm ring is unusable: {exc}") from None
    if ring.capacity != capacity:
        ring.close()
        raise HandshakeFailed(
            f"the node's shm ring holds {ring.capacity} bytes, its reply said {capacity}"
        )
    return ring


def _close(sock: socket.socket, fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    sock.close()
