"""QUIC for felix: engine choice (qh3 or aioquic), sockets, servers and connections.

The gateway and the client use only this package, never an engine directly.
Felix's connection objects are handlers of the transport seam
(felix/quic/transport.py), made from a transport by a create-handler callable::

    engine = load_engine()  # FELIX_QUIC_ENGINE, default "qh3"
    sock = bind_udp("127.0.0.1", 5000)  # SO_REUSEPORT: one port, many gateways
    server = await serve_on_socket(
        engine, sock, engine.server_configuration(certs), lambda t: GatewayConnection(gw, t)
    )

    config = engine.client_configuration(ca_file=certs.ca_cert, server_name="localhost")
    conn = await connect(engine, "127.0.0.1", 5000, configuration=config,
                         create_handler=ClientProtocol)
"""

from felix.quic.engine import (
    DEFAULT_ALPN,
    ENGINE_ENV,
    ENGINES,
    QuicConfiguration,
    QuicConnection,
    QuicEngine,
    QuicEventTypes,
    load_engine,
)
from felix.quic.protocol import QuicTransport
from felix.quic.reset import load_reset_key
from felix.quic.transport import (
    CLOSE_INTERNAL_ERROR,
    CloseReason,
    ConnectionHandler,
    CreateHandler,
    StreamHandler,
    StreamTransport,
)
from felix.quic.udp import QuicServerHandle, bind_udp, connect, serve_on_socket

__all__ = [
    "CLOSE_INTERNAL_ERROR",
    "DEFAULT_ALPN",
    "ENGINES",
    "ENGINE_ENV",
    "CloseReason",
    "ConnectionHandler",
    "CreateHandler",
    "QuicConfiguration",
    "QuicConnection",
    "QuicEngine",
    "QuicEventTypes",
    "QuicServerHandle",
    "QuicTransport",
    "StreamHandler",
    "StreamTransport",
    "bind_udp",
    "connect",
    "load_engine",
    "load_reset_key",
    "serve_on_socket",
]
