"""The one seam between felix and a QUIC engine: qh3 (default) or aioquic.

Both engines are sans-IO QUIC stacks with the same module layout (qh3 is an
aioquic fork with a compiled core). Felix talks to whichever was chosen through
a :class:`QuicEngine`, so the gateway and the client never import an engine
directly, and every difference between the two is handled here:

* certificates: qh3 wants its own certificate/key types, aioquic cryptography
  objects. Both engines' ``load_cert_chain`` read PEM files into their own types,
  so configurations are always built from file paths.
* defaults differ (idle timeout 30 s vs 60 s, max datagram 1280 vs 1200, flow
  control windows 15/6 MiB vs 1/1 MiB): felix sets all of them explicitly, so
  both engines behave alike.
* the send-buffer size: qh3 has ``get_send_buffer_size()``; aioquic has no public
  API for it (see :func:`_aioquic_send_buffer_size`).
* ``QuicConnectionProtocol.close()`` takes no arguments on qh3: felix's protocol
  closes through the connection object, whose ``close()`` is the same on both.
* client certificates (mTLS): both engines' clients present one when a server
  asks. As a server, qh3 2.x cannot ask for one at all; aioquic can, through a
  private switch, and never checks the chain itself. So only aioquic serves mTLS
  here, with felix checking the chain (see :func:`_aioquic_mtls_server_class`).

Engine objects are typed ``Any`` at this seam (:data:`QuicConfiguration`,
:data:`QuicConnection`): the two engines' classes are distinct types with
slightly different signatures, and felix code only uses the parts both share.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeAlias, cast

from felix.tls import NodeCerts

__all__ = [
    "DEFAULT_ALPN",
    "DEFAULT_ENGINE",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DATA",
    "DEFAULT_MAX_DATAGRAM",
    "DEFAULT_MAX_STREAM_DATA",
    "ENGINES",
    "ENGINE_ENV",
    "MTLS_ENGINES",
    "QuicConfiguration",
    "QuicConnection",
    "QuicEngine",
    "QuicEventTypes",
    "load_engine",
]

#: Environment variable naming the engine when :func:`load_engine` gets None.
ENGINE_ENV = "FELIX_QUIC_ENGINE"
DEFAULT_ENGINE = "qh3"
ENGINES = ("qh3", "aioquic")
#: Engines that can require client certificates as a server (see the module doc).
MTLS_ENGINES = ("aioquic",)

DEFAULT_ALPN = "felix"
#: Seconds without any packet from the peer before a connection is dropped.
DEFAULT_IDLE_TIMEOUT = 30.0
#: UDP payload bytes per QUIC packet: fits a 1400-byte path MTU (tunnels, VPNs)
#: after IPv6 + UDP headers; larger than both engines' defaults, so fewer
#: datagrams (and their per-datagram CPU) per message.
DEFAULT_MAX_DATAGRAM = 1350
#: Flow-control windows (qh3's defaults, applied to both engines). They bound what
#: a peer may have in flight towards us: per connection and per stream.
DEFAULT_MAX_DATA = 15 * 1024 * 1024
DEFAULT_MAX_STREAM_DATA = 6 * 1024 * 1024

#: An engine's ``QuicConfiguration`` instance.
QuicConfiguration: TypeAlias = Any
#: An engine's sans-IO ``QuicConnection`` instance.
QuicConnection: TypeAlias = Any


@dataclass(frozen=True, slots=True)
class QuicEventTypes:
    """The engine's event classes that felix handles (same fields on both engines)."""

    handshake_completed: type[Any]
    stream_data_received: type[Any]
    stream_reset: type[Any]
    stop_sending_received: type[Any]
    connection_terminated: type[Any]


@dataclass(frozen=True, slots=True)
class QuicEngine:
    """One QUIC engine, as felix uses it. Get one with :func:`load_engine`.

    ``protocol_class`` is the engine's asyncio ``QuicConnectionProtocol`` and
    ``server_class`` its asyncio ``QuicServer`` (the datagram protocol that
    demultiplexes a listening socket into connections); felix combines
    ``protocol_class`` with its own protocol in :func:`felix.quic.bind_protocol`.
    """

    name: str
    configuration_class: type[Any]
    connection_class: type[Any]
    protocol_class: type[asyncio.DatagramProtocol]
    server_class: type[asyncio.DatagramProtocol]
    events: QuicEventTypes
    #: ``send_buffer_size(connection, stream_id)``: see FelixQuicProtocol.send_buffer_size.
    send_buffer_size: Callable[[QuicConnection, int | None], int]

    def server_configuration(
        self,
        certs: NodeCerts,
        *,
        alpn: str = DEFAULT_ALPN,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        max_data: int = DEFAULT_MAX_DATA,
        max_stream_data: int = DEFAULT_MAX_STREAM_DATA,
        client_ca: str | os.PathLike[str] | None = None,
    ) -> QuicConfiguration:
        """A server configuration presenting ``certs.server_cert``/``server_key``.

        The certificate file may hold a chain (leaf first); intermediates are sent
        to clients. Only ``alpn`` is offered: a client that does not offer it
        fails the handshake. 0-RTT is off: a server issues session tickets (and so
        can accept early data) only when given ticket callbacks, and felix never
        passes any (see :func:`felix.quic.serve_on_socket`). TLS 1.3 is the only
        version QUIC allows, on both engines.

        ``client_ca`` (mTLS): a PEM file of CA certificates; every client must
        then present a certificate chained to one of them, within its validity
        period and allowed for clientAuth, or the handshake fails (TLS alert
        certificate_required, bad_certificate or certificate_expired). Only the
        engines in :data:`MTLS_ENGINES` can do this; for the others it raises
        ValueError. Without ``client_ca`` no client certificate is requested
        (clients authenticate with a token inside the connection).

        Raises OSError if a file cannot be read, ValueError (engine-specific
        subclasses) if it is not a PEM certificate/key.
        """
        if client_ca is not None and self.name not in MTLS_ENGINES:
            raise ValueError(
                f"the {self.name} engine cannot require client certificates: "
                f"use {' or '.join(MTLS_ENGINES)} for mTLS"
            )
        config = self.configuration_class(
            is_client=False,
            alpn_protocols=[alpn],
            idle_timeout=idle_timeout,
            max_datagram_size=max_datagram,
            max_data=max_data,
            max_stream_data=max_stream_data,
        )
        # Both engines parse the PEM files into their own certificate/key types
        # (qh3 rejects cryptography objects), so always load from paths.
        config.load_cert_chain(str(certs.server_cert), str(certs.server_key))
        if client_ca is not None:
            ca_path = Path(client_ca)
            if not ca_path.is_file():
                raise FileNotFoundError(f"client CA file not found: {ca_path}")
            # The server class sees these two and checks every client's chain.
            config.verify_mode = ssl.CERT_REQUIRED
            config.load_verify_locations(cafile=str(ca_path))
        return config

    def client_configuration(
        self,
        *,
        ca_file: str | os.PathLike[str] | None,
        server_name: str,
        alpn: str = DEFAULT_ALPN,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
        max_data: int = DEFAULT_MAX_DATA,
        max_stream_data: int = DEFAULT_MAX_STREAM_DATA,
        client_cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    ) -> QuicConfiguration:
        """A client configuration that verifies the server and offers ALPN ``alpn``.

        The server's certificate must chain to ``ca_file`` (a PEM file of one or
        more CA certificates; None: the engine's default trust store, i.e. the
        certifi bundle) and name ``server_name`` (a DNS name or an IP literal) in
        its subject alternative names. Verification cannot be turned off here.
        ``server_name`` is required because qh3, given none, would check the
        certificate against its own first SAN, which proves nothing. No session
        ticket is used, so there is no 0-RTT.

        ``client_cert``: (certificate chain, private key) PEM files, presented
        when the server asks for a client certificate (mTLS); FileNotFoundError
        if one is missing.
        """
        if not server_name:
            raise ValueError("server_name is required to verify the server certificate")
        config = self.configuration_class(
            is_client=True,
            alpn_protocols=[alpn],
            server_name=server_name,
            verify_mode=ssl.CERT_REQUIRED,
            idle_timeout=idle_timeout,
            max_datagram_size=max_datagram,
            max_data=max_data,
            max_stream_data=max_stream_data,
        )
        if ca_file is not None:
            ca_path = Path(ca_file)
            if not ca_path.is_file():
                # Both engines would only notice at the first handshake.
                raise FileNotFoundError(f"CA file not found: {ca_path}")
            config.load_verify_locations(cafile=str(ca_path))
        if client_cert is not None:
            cert_path, key_path = Path(client_cert[0]), Path(client_cert[1])
            for path in (cert_path, key_path):
                if not path.is_file():
                    raise FileNotFoundError(f"client certificate file not found: {path}")
            config.load_cert_chain(str(cert_path), str(key_path))
        return config

    def new_connection(self, configuration: QuicConfiguration) -> QuicConnection:
        """A new sans-IO client connection (servers create theirs in ``server_class``)."""
        return self.connection_class(configuration=configuration)


def load_engine(name: str | None = None) -> QuicEngine:
    """The QUIC engine called ``name``: ``"qh3"`` or ``"aioquic"``.

    ``name`` None reads the environment variable ``FELIX_QUIC_ENGINE``, and
    falls back to ``"qh3"`` (3-5x faster here, see docs/architecture.md, "The QUIC engine") when it
    is unset or empty. The same name always returns the same object. Raises
    ValueError for any other name, before importing anything.
    """
    from_env = name is None
    if name is None:
        name = os.environ.get(ENGINE_ENV, "").strip() or DEFAULT_ENGINE
    if name not in ENGINES:
        where = f" (from {ENGINE_ENV})" if from_env else ""
        raise ValueError(
            f"unknown QUIC engine {name!r}{where}: choose one of {', '.join(map(repr, ENGINES))}"
        )
    return _load(name)


@cache
def _load(name: str) -> QuicEngine:
    # Imported here so that only the chosen engine is loaded. Both engines have the
    # same module layout (qh3 is an aioquic fork); only the send-buffer probe differs.
    def module(path: str) -> Any:
        return importlib.import_module(f"{name}.{path}")

    events = module("quic.events")
    return QuicEngine(
        name=name,
        configuration_class=module("quic.configuration").QuicConfiguration,
        connection_class=module("quic.connection").QuicConnection,
        protocol_class=module("asyncio.protocol").QuicConnectionProtocol,
        server_class=(
            _aioquic_mtls_server_class()
            if name == "aioquic"
            else module("asyncio.server").QuicServer
        ),
        events=QuicEventTypes(
            handshake_completed=events.HandshakeCompleted,
            stream_data_received=events.StreamDataReceived,
            stream_reset=events.StreamReset,
            stop_sending_received=events.StopSendingReceived,
            connection_terminated=events.ConnectionTerminated,
        ),
        send_buffer_size=_qh3_send_buffer_size if name == "qh3" else _aioquic_send_buffer_size,
    )


def _qh3_send_buffer_size(connection: QuicConnection, stream_id: int | None) -> int:
    # Public qh3 API; its internals live in the compiled core and are off limits.
    return int(connection.get_send_buffer_size(stream_id))


def _aioquic_send_buffer_size(connection: QuicConnection, stream_id: int | None) -> int:
    """qh3's ``get_send_buffer_size`` semantics, computed from aioquic 1.x private state.

    aioquic has no public API for this. Its stream senders are plain Python
    objects: ``_buffer_stop`` is the offset after the last byte written and
    ``highest_offset`` the highest offset ever put into a packet, so the
    difference is what has never been sent. Like qh3, bytes awaiting an ACK or a
    retransmission do not count, and reset streams count zero. O(streams) when
    ``stream_id`` is None. pyproject pins aioquic <2; the engine tests check this.
    """

    def unsent(stream: Any) -> int:
        sender = stream.sender
        if sender.is_finished or sender._reset_error_code is not None:
            return 0
        return int(sender._buffer_stop - sender.highest_offset)

    streams: dict[int, Any] = connection._streams
    if stream_id is not None:
        stream = streams.get(stream_id)
        return 0 if stream is None else unsent(stream)
    return sum(unsent(stream) for stream in streams.values())


# -- mTLS on aioquic -----------------------------------------------------------------------


def _aioquic_mtls_server_class() -> type[asyncio.DatagramProtocol]:
    """aioquic's QuicServer, able to require client certificates.

    aioquic 1.x has everything for a server to ask for a client certificate but
    keeps it behind a private switch (``tls.Context._request_client_certificate``,
    "for test purposes"), accepts an empty Certificate message, and checks only
    the CertificateVerify signature, never the chain. So for a configuration
    with ``verify_mode`` CERT_REQUIRED (set by ``server_configuration(client_ca=...)``)
    each new connection's TLS context gets the switch on and a subclass that
    refuses a missing certificate and checks the chain with
    :class:`felix.tls.ClientCertificateVerifier`. tests/test_mtls.py runs real
    handshakes against these private names (pyproject pins aioquic <2).
    """
    from aioquic import tls as aioquic_tls
    from aioquic.asyncio.server import QuicServer
    from aioquic.quic.connection import QuicConnection as AioquicConnection

    from felix.tls import ClientCertificateError, ClientCertificateVerifier

    class CertificateRequired(aioquic_tls.Alert):
        description = aioquic_tls.AlertDescription.certificate_required

    class ClientAuthContext(aioquic_tls.Context):
        felix_verifier: ClientCertificateVerifier

        def _server_handle_certificate(self, input_buf: Any) -> None:
            super()._server_handle_certificate(input_buf)
            if self._peer_certificate is None:  # an empty Certificate message
                raise CertificateRequired("a client certificate is required")

        def _server_handle_certificate_verify(self, input_buf: Any) -> None:
            super()._server_handle_certificate_verify(input_buf)  # the client holds the key
            if self._peer_certificate is None:  # pragma: no cover - checked above
                raise CertificateRequired("a client certificate is required")
            try:
                self.felix_verifier.verify(self._peer_certificate, self._peer_certificate_chain)
            except ClientCertificateError as exc:
                alert = (
                    aioquic_tls.AlertCertificateExpired
                    if exc.expired
                    else aioquic_tls.AlertBadCertificate
                )
                raise alert(str(exc)) from None

    class ClientAuthConnection(AioquicConnection):
        felix_verifier: ClientCertificateVerifier

        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self.tls.__class__ = ClientAuthContext
            context = cast(ClientAuthContext, self.tls)
            context._request_client_certificate = True
            context.felix_verifier = self.felix_verifier

    class MtlsQuicServer(QuicServer):
        def __init__(self, *, configuration: Any, create_protocol: Any, **kwargs: Any) -> None:
            if configuration.verify_mode == ssl.CERT_REQUIRED and not configuration.is_client:
                verifier = ClientCertificateVerifier(configuration.cafile)
                inner = create_protocol

                def create_protocol(connection: Any, **kw: Any) -> Any:
                    # The connection is new: its TLS context is made on the first packet.
                    connection.__class__ = ClientAuthConnection
                    connection.felix_verifier = verifier
                    return inner(connection, **kw)

            super().__init__(configuration=configuration, create_protocol=create_protocol, **kwargs)

    return MtlsQuicServer
