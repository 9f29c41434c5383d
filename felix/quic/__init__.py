"""QUIC for felix: engine choice (qh3 or aioquic), sockets, and the connection protocol.

The gateway and the client use only this package, never an engine directly::

    engine = load_engine()  # FELIX_QUIC_ENGINE, default "qh3"
    sock = bind_udp("127.0.0.1", 5000)  # SO_REUSEPORT: one port, many gateways
    server = await serve_on_socket(
        engine, sock, engine.server_configuration(certs), GatewayProtocol
    )

    config = engine.client_configuration(ca_file=certs.ca_cert, server_name="localhost")
    conn = await connect(engine, "127.0.0.1", 5000, configuration=config,
                         protocol_class=ClientProtocol)
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
from felix.quic.protocol import CLOSE_INTERNAL_ERROR, CloseReason, FelixQuicProtocol, bind_protocol
from felix.quic.udp import QuicServerHandle, bind_udp, connect, serve_on_socket

__all__ = [
    "CLOSE_INTERNAL_ERROR",
    "DEFAULT_ALPN",
    "ENGINES",
    "ENGINE_ENV",
    "CloseReason",
    "FelixQuicProtocol",
    "QuicConfiguration",
    "QuicConnection",
    "QuicEngine",
    "QuicEventTypes",
    "QuicServerHandle",
    "bind_protocol",
    "bind_udp",
    "connect",
    "load_engine",
    "serve_on_socket",
]
