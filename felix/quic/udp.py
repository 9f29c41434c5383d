"""UDP sockets felix creates itself, and starting QUIC servers and clients on them.

Why felix binds its own sockets: several gateway processes share one UDP port
through SO_REUSEPORT (the kernel spreads clients over them by a hash of the
4-tuple), and the supervisor keeps the sockets open so a restarted gateway does
not change the reuseport group (docs/architecture.md, "Sockets"). The engines'
``serve()`` binds a socket of its own without SO_REUSEPORT, so
:func:`serve_on_socket` does the few steps of ``serve()`` on a given socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any, TypeVar

from felix.errors import FelixTimeoutError, HandshakeFailed
from felix.quic.engine import QuicConfiguration, QuicEngine
from felix.quic.protocol import FelixQuicProtocol, bind_protocol

__all__ = ["DEFAULT_SOCKET_BUFFER", "QuicServerHandle", "bind_udp", "connect", "serve_on_socket"]

log = logging.getLogger(__name__)

#: Requested SO_RCVBUF/SO_SNDBUF: room for bursts of a few thousand datagrams
#: while the event loop is busy. The kernel caps it at net.core.rmem_max/wmem_max.
DEFAULT_SOCKET_BUFFER = 4 * 1024 * 1024

P = TypeVar("P", bound=FelixQuicProtocol)


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

    def __init__(self, transport: asyncio.DatagramTransport, server: Any) -> None:
        self._transport = transport
        self._server = server
        self._closed = False

    @property
    def sockname(self) -> Any:
        """The local address, as ``socket.getsockname()`` gives it (port: ``[1]``)."""
        return self._transport.get_extra_info("sockname")

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE, code 0) and the socket. Idempotent."""
        if not self._closed:
            self._closed = True
            self._server.close()


async def serve_on_socket(
    engine: QuicEngine,
    sock: socket.socket,
    configuration: QuicConfiguration,
    protocol_class: type[FelixQuicProtocol],
    *,
    retry: bool = False,
) -> QuicServerHandle:
    """Serve QUIC on ``sock`` (from :func:`bind_udp`) with ``engine``.

    Every new connection gets an instance of ``protocol_class`` bound to
    ``engine`` (:func:`bind_protocol`). ``configuration`` comes from
    ``engine.server_configuration()``. ``retry``: make clients prove their
    address with a Retry packet first (one more round trip; against spoofed
    floods). No session ticket callbacks are given to the engine, so it issues
    no tickets and never accepts 0-RTT.

    The returned server owns ``sock``: ``close()`` closes it (a process that must
    keep the port, like the supervisor, keeps its own copy of the socket).
    """
    loop = asyncio.get_running_loop()
    factory = bind_protocol(engine, protocol_class)

    def make_server() -> asyncio.DatagramProtocol:
        # The engine's QuicServer routes datagrams to connections by connection
        # id and creates a connection for each new client Initial packet.
        return engine.server_class(  # type: ignore[call-arg]
            configuration=configuration, create_protocol=factory, retry=retry
        )

    transport, server = await loop.create_datagram_endpoint(make_server, sock=sock)
    return QuicServerHandle(transport, server)


async def connect(
    engine: QuicEngine,
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    protocol_class: type[P],
    handshake_timeout: float = 10.0,
) -> P:
    """Open a QUIC connection to ``host``:``port`` and wait for the handshake.

    ``configuration`` comes from ``engine.client_configuration()`` (it names the
    server and the CA to verify against); a fresh UDP socket is bound to an
    ephemeral port of the address family ``host`` resolves to. Returns the
    connected ``protocol_class`` instance (bound to ``engine``); end it with
    ``close()``/``await aclose()``; its socket is closed when the connection has
    ended.

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

    factory = bind_protocol(engine, protocol_class)
    quic = engine.new_connection(configuration)
    transport, protocol = await loop.create_datagram_endpoint(lambda: factory(quic), sock=sock)
    protocol._own_transport(transport)
    protocol.connect(address)
    try:
        connected = await asyncio.wait_for(protocol._handshake_outcome, handshake_timeout)
    except TimeoutError:
        _abandon(protocol, transport)
        raise FelixTimeoutError(
            f"QUIC handshake with {host}:{port} took longer than {handshake_timeout} s"
        ) from None
    except BaseException:
        _abandon(protocol, transport)  # cancelled: leave no half-open connection behind
        raise
    if not connected:
        # The connection ended during the handshake; its socket closes with it.
        reason = protocol.close_reason
        detail = (
            f"{reason.reason_phrase or 'no reason given'} (error 0x{reason.error_code:x})"
            if reason is not None
            else "connection closed"
        )
        raise HandshakeFailed(f"QUIC handshake with {host}:{port} failed: {detail}")
    return protocol


def _abandon(protocol: FelixQuicProtocol, transport: asyncio.BaseTransport) -> None:
    """Give up on a connection that never completed its handshake.

    Send CONNECTION_CLOSE once and close the socket now, rather than keep it for
    the closing period: there is no established state for the peer to lose.
    """
    protocol.close()
    transport.close()
