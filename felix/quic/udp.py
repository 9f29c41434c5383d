"""UDP sockets felix creates itself, and starting QUIC servers and clients on them.

Why felix binds its own sockets: several gateway processes share one UDP port
through SO_REUSEPORT (the kernel spreads clients over them by a hash of the
4-tuple), and the supervisor keeps the sockets open so a restarted gateway does
not change the reuseport group (docs/architecture.md, "Sockets"). The QUIC server on
a socket is felix's own (felix/quic/server.py), as is the client's shell
(felix/quic/protocol.py): engines only provide the sans-IO connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from felix.errors import FelixTimeoutError, HandshakeFailed
from felix.quic.batch import DatagramBatch
from felix.quic.engine import QuicConfiguration, QuicEngine
from felix.quic.protocol import QuicTransport
from felix.quic.reset import ResetBudget
from felix.quic.server import QuicServer
from felix.quic.spin import SpinningProtocol
from felix.quic.transport import CreateHandler, StreamHandler, StreamTransport

__all__ = ["DEFAULT_SOCKET_BUFFER", "QuicServerHandle", "bind_udp", "connect", "serve_on_socket"]

log = logging.getLogger(__name__)

#: Requested SO_RCVBUF/SO_SNDBUF: room for bursts of a few thousand datagrams
#: while the event loop is busy. The kernel caps it at net.core.rmem_max/wmem_max.
DEFAULT_SOCKET_BUFFER = 4 * 1024 * 1024

H = TypeVar("H", bound=StreamHandler)


def bind_udp(
    host: str, port: int, *, reuseport: bool = True, buffer_size: int = DEFAULT_SOCKET_BUFFER
) -> socket.socket:
    """A non-blocking UDP socket bound to ``host``:``port``.

    ``host`` is an IPv4 or IPv6 literal (the socket's family follows it; ``""``
    means all IPv4 addresses) or a name, resolved with getaddrinfo (first
    result). ``"::"`` accepts IPv4 too (IPV6_V6ONLY off, where the system
    allows). With ``reuseport`` (SO_REUSEPORT), further sockets of the same user
    may bind the same address and port, including the actual port picked for
    ``port`` 0 (read it with ``sock.getsockname()[1]``). ``buffer_size`` is asked
    for SO_RCVBUF/SO_SNDBUF, best effort (the kernel may grant less; failure to
    set it is ignored). Raises OSError if binding fails (e.g. the port is
    taken by a socket without SO_REUSEPORT), ValueError on a platform without
    SO_REUSEPORT when ``reuseport`` is asked.
    """
    family, address = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise ValueError("SO_REUSEPORT is not available on this platform")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(address[0]).is_unspecified:
            # v6-only systems refuse: the socket still serves IPv6.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _set_buffers(sock, buffer_size)
        sock.setblocking(False)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    try:
        ip = ipaddress.ip_address(host) if host else ipaddress.IPv4Address(0)
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        return family, address
    if ip.version == 6:
        return socket.AF_INET6, (str(ip), port, 0, 0)
    return socket.AF_INET, (str(ip), port)


def _set_buffers(sock: socket.socket, size: int) -> None:
    # Best effort: the default buffers still work, they just drop sooner.
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)


class QuicServerHandle:
    """A QUIC server running on one socket (see :func:`serve_on_socket`)."""

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        server: QuicServer,
        protocol: asyncio.DatagramProtocol | None = None,
    ) -> None:
        self._transport = transport
        self._server = server
        #: What the loop feeds: the server, or a SpinningProtocol around it.
        self.protocol = protocol or server
        self._closed = False

    @property
    def sockname(self) -> Any:
        """The local address, as ``socket.getsockname()`` gives it (port: ``[1]``)."""
        return self._transport.get_extra_info("sockname")

    @property
    def batch(self) -> DatagramBatch | None:
        """The socket's batch of outgoing datagrams and its counters (None: batching off)."""
        return self._server.batch

    @property
    def resets(self) -> ResetBudget:
        """Stateless resets sent and refused (``.sent``, ``.refused``)."""
        return self._server.resets

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE, code 0) and the socket. Idempotent."""
        if not self._closed:
            self._closed = True
            self._server.close()


async def serve_on_socket(
    engine: QuicEngine,
    sock: socket.socket,
    configuration: QuicConfiguration,
    create_handler: CreateHandler,
    *,
    reset_key: bytes | None = None,
    batch: bool | int | None = None,
    spin: float = 0.0,
) -> QuicServerHandle:
    """Serve QUIC on ``sock`` (from :func:`bind_udp`) with ``engine``.

    Every new connection gets a :class:`QuicTransport` and a handler made by
    ``create_handler(transport)`` (felix/quic/transport.py). ``configuration``
    comes from ``engine.server_configuration()``. No session ticket callbacks
    are given to the engine, so it issues no tickets and never accepts 0-RTT.
    ``reset_key`` (from :func:`felix.quic.reset.load_reset_key`): answer
    packets of unknown connections with a stateless reset (felix/quic/server.py).
    ``batch``: send the datagrams of each loop tick together with sendmmsg
    (felix/quic/batch.py), at most that many per flush if an int; None reads
    ``FELIX_UDP_BATCH`` (default on).

    ``spin`` > 0: after each datagram keep polling the socket that many seconds
    before the loop may sleep (felix/quic/spin.py: lower latency for CPU).

    The returned server owns ``sock``: ``close()`` closes it (a process that must
    keep the port, like the supervisor, keeps its own copy of the socket).
    """
    loop = asyncio.get_running_loop()
    server = QuicServer(engine, configuration, create_handler, reset_key=reset_key, batch=batch)
    protocol: asyncio.DatagramProtocol = (
        SpinningProtocol(server, sock, spin) if spin > 0 else server
    )
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    return QuicServerHandle(transport, server, protocol)


async def connect(
    engine: QuicEngine,
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    create_handler: Callable[[StreamTransport], H],
    handshake_timeout: float = 10.0,
) -> H:
    """Open a QUIC connection to ``host``:``port``, wait for the handshake, return its handler.

    ``configuration`` comes from ``engine.client_configuration()`` (it names the
    server and the CA to verify against); a fresh UDP socket is bound to an
    ephemeral port of the address family ``host`` resolves to. The handler is
    made by ``create_handler(transport)``; end the connection with the
    transport's ``close()``; its socket is closed when the connection has ended.

    Raises FelixTimeoutError if the handshake does not complete within
    ``handshake_timeout`` seconds, HandshakeFailed (a ConnectionError) if it fails (certificate not
    trusted, wrong server name, no common ALPN, refused), with the reason in the
    message, and OSError if ``host`` does not resolve.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _set_buffers(sock, DEFAULT_SOCKET_BUFFER)
        sock.setblocking(False)
        sock.bind(("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
    except BaseException:
        sock.close()
        raise

    connection = QuicTransport(
        engine, engine.client_connection(configuration), address, create_handler
    )
    transport, _ = await loop.create_datagram_endpoint(lambda: connection, sock=sock)
    connection.own_transport(transport)
    connection.connect(address)
    try:
        connected = await asyncio.wait_for(
            asyncio.shield(connection.handshake_outcome), handshake_timeout
        )
    except TimeoutError:
        _abandon(connection, transport)
        raise FelixTimeoutError(
            f"QUIC handshake with {host}:{port} took longer than {handshake_timeout} s"
        ) from None
    except BaseException:
        _abandon(connection, transport)  # cancelled: leave no half-open connection behind
        raise
    if not connected:
        # The connection ended during the handshake; its socket closes with it.
        reason = connection.close_reason
        detail = (
            f"{reason.reason_phrase or 'no reason given'} (error 0x{reason.error_code:x})"
            if reason is not None
            else "connection closed"
        )
        raise HandshakeFailed(f"QUIC handshake with {host}:{port} failed: {detail}")
    return connection.handler  # type: ignore[return-value]


def _abandon(connection: QuicTransport, transport: asyncio.BaseTransport) -> None:
    """Give up on a connection that never completed its handshake.

    Send CONNECTION_CLOSE once and close the socket now, rather than keep it for
    the closing period: there is no established state for the peer to lose.
    """
    connection.close()
    transport.close()
