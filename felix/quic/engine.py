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
* felix uses only the engines' sans-IO layer (``QuicConnection`` and its
  events): the asyncio shell around a connection (felix/quic/protocol.py) and
  the server that routes datagrams to connections (felix/quic/server.py) are
  felix's own, the same for both engines.
* stateless-reset tokens: neither engine lets a caller choose them; felix sets
  the one of the handshake connection id just before it is announced (see
  "server connections" below and felix/quic/reset.py).
* client certificates (mTLS): both engines' clients present one when a server
  asks. As a server, qh3 2.x cannot ask for one at all; aioquic can, through a
  private switch, and never checks the chain itself. So only aioquic serves mTLS
  here, with felix checking the chain: the patch is isolated in felix/quic/mtls.py.

Engine objects are typed ``Any`` at this seam (:data:`QuicConfiguration`,
:data:`QuicConnection`): the two engines' classes are distinct types with
slightly different signatures, and felix code only uses the parts both share.
"""

from __future__ import annotations

import importlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeAlias

from felix.quic.reset import reset_token
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
    connection_id_issued: type[Any]
    connection_id_retired: type[Any]
    ping_acknowledged: type[Any]


#: Makes a server connection: (configuration, original destination connection id,
#: stateless-reset key or None) -> the engine's QuicConnection.
ServerConnectionFactory: TypeAlias = Callable[[QuicConfiguration, bytes, bytes | None], Any]


@dataclass(frozen=True, slots=True)
class QuicEngine:
    """One QUIC engine, as felix uses it. Get one with :func:`load_engine`.

    Felix uses only the engine's sans-IO layer (``QuicConnection`` and its
    events); the asyncio side (felix/quic/protocol.py, felix/quic/server.py) is
    felix's own, the same for both engines.
    """

    name: str
    configuration_class: type[Any]
    connection_class: type[Any]
    events: QuicEventTypes
    #: ``send_buffer_size(connection, stream_id)``: see QuicTransport.send_buffer_size.
    send_buffer_size: Callable[[QuicConnection, int | None], int]
    #: ``encode_version_negotiation(source_cid=, destination_cid=, supported_versions=)``.
    encode_version_negotiation: Callable[..., bytes]
    #: The engine's QuicConnectionError: raised by a connection that is closing or closed.
    connection_error: type[Exception]
    #: ``streams_available(connection, unidirectional)``: see QuicTransport.streams_available.
    streams_available: Callable[[QuicConnection, bool], int]
    #: (bidirectional, unidirectional): streams a peer may have open towards one of this
    #: engine's connections at once. Both engines advertise fixed numbers and raise
    #: the peer's limit as streams end; neither lets a caller choose them.
    peer_stream_limits: tuple[int, int]
    _server_connection: ServerConnectionFactory

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

    def client_connection(self, configuration: QuicConfiguration) -> QuicConnection:
        """A new sans-IO client connection."""
        return self.connection_class(configuration=configuration)

    def server_connection(
        self,
        configuration: QuicConfiguration,
        original_destination_connection_id: bytes,
        reset_key: bytes | None = None,
    ) -> QuicConnection:
        """A new sans-IO server connection for a client's first Initial packet.

        ``reset_key``: the connection id this server picks gets the stateless
        reset token derived from it (felix/quic/reset.py), so the node can still
        reset the connection after a restart. A configuration requiring client
        certificates gets felix's mTLS connection (aioquic only, felix/quic/mtls.py).
        """
        return self._server_connection(configuration, original_destination_connection_id, reset_key)


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
    # same module layout (qh3 is an aioquic fork).
    def module(path: str) -> Any:
        return importlib.import_module(f"{name}.{path}")

    events = module("quic.events")
    return QuicEngine(
        name=name,
        configuration_class=module("quic.configuration").QuicConfiguration,
        connection_class=module("quic.connection").QuicConnection,
        events=QuicEventTypes(
            handshake_completed=events.HandshakeCompleted,
            stream_data_received=events.StreamDataReceived,
            stream_reset=events.StreamReset,
            stop_sending_received=events.StopSendingReceived,
            connection_terminated=events.ConnectionTerminated,
            connection_id_issued=events.ConnectionIdIssued,
            connection_id_retired=events.ConnectionIdRetired,
            ping_acknowledged=events.PingAcknowledged,
        ),
        send_buffer_size=_qh3_send_buffer_size if name == "qh3" else _aioquic_send_buffer_size,
        encode_version_negotiation=module("quic.packet").encode_quic_version_negotiation,
        connection_error=module("quic.connection").QuicConnectionError,
        streams_available=_streams_available(
            _qh3_peer_max_streams if name == "qh3" else _aioquic_peer_max_streams
        ),
        # qh3: quic/tls_bridge.py and quic/connection.py; aioquic: quic/connection.py.
        # tests/test_quic_engine.py checks them against real connections.
        peer_stream_limits=(100, 103) if name == "qh3" else (128, 128),
        _server_connection=_qh3_server_connection()
        if name == "qh3"
        else _aioquic_server_connection,
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


# Streams this side may still open: the peer's cumulative MAX_STREAMS limit minus the
# streams opened so far (a stream's index is its id // 4). qh3 refuses a stream past
# the limit (ValueError); aioquic queues it until the peer raises the limit.


def _qh3_peer_max_streams(connection: QuicConnection, unidirectional: bool) -> int:
    # Public qh3 properties, despite their names the cumulative MAX_STREAMS limits.
    if unidirectional:
        return int(connection.max_concurrent_uni_streams)
    return int(connection.max_concurrent_bidi_streams)


def _aioquic_peer_max_streams(connection: QuicConnection, unidirectional: bool) -> int:
    # aioquic has no public accessor for the peer's limit (pinned <2, see above).
    if unidirectional:
        return int(connection._remote_max_streams_uni)
    return int(connection._remote_max_streams_bidi)


def _streams_available(
    peer_max_streams: Callable[[QuicConnection, bool], int],
) -> Callable[[QuicConnection, bool], int]:
    def available(connection: QuicConnection, unidirectional: bool) -> int:
        next_id = connection.get_next_available_stream_id(is_unidirectional=unidirectional)
        return max(0, peer_max_streams(connection, unidirectional) - int(next_id) // 4)

    return available


# -- server connections: the stateless-reset token of the handshake connection id ------------
#
# Neither engine lets a caller choose reset tokens; both draw them from os.urandom.
# The token of the connection id a server picks is announced in its transport
# parameters, built when the first Initial is processed: qh3 serializes them when
# it makes its TLS bridge (``_create_tls``), so the token is set on the bridge and
# the parameters serialized again; aioquic reads its first host connection id's
# token later, so setting that is enough. tests/test_quic_reset.py pins both
# through real resets.


def _qh3_server_connection() -> ServerConnectionFactory:
    from qh3 import tls as qh3_tls
    from qh3.quic.connection import QuicConnection as Qh3Connection

    class ResettableConnection(Qh3Connection):
        felix_reset_key: bytes | None = None

        def _create_tls(self, remote_source_cid: bytes | None) -> Any:
            bridge = super()._create_tls(remote_source_cid)
            if self.felix_reset_key is not None:
                bridge.stateless_reset_token = reset_token(self.felix_reset_key, self.host_cid)
                # The bridge serialized its transport parameters when it was made:
                # serialize them again, now carrying the derived token.
                bridge.tls.handshake_extensions = [
                    (
                        qh3_tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS,
                        bridge.serialize_transport_parameters(),
                    )
                ]
            return bridge

    def create(configuration: QuicConfiguration, odcid: bytes, reset_key: bytes | None) -> Any:
        connection = ResettableConnection(
            configuration=configuration, original_destination_connection_id=odcid
        )
        connection.felix_reset_key = reset_key
        return connection

    return create


def _aioquic_server_connection(
    configuration: QuicConfiguration, odcid: bytes, reset_key: bytes | None
) -> Any:
    if configuration.verify_mode == ssl.CERT_REQUIRED:
        from felix.quic.mtls import client_auth_connection

        connection = client_auth_connection(configuration)(original_destination_connection_id=odcid)
    else:
        from aioquic.quic.connection import QuicConnection as AioquicConnection

        connection = AioquicConnection(
            configuration=configuration, original_destination_connection_id=odcid
        )
    if reset_key is not None:
        connection._host_cids[0].stateless_reset_token = reset_token(reset_key, connection.host_cid)
    return connection
