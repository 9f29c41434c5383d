"""QuicServer: one listening socket, many QUIC connections, routed by connection id.

How it works: every datagram's destination connection id (DCID) is read from
its header (the version-independent layout of RFC 8999: no decryption) and
looked up in a table of the connections' ids. A known id goes to that
connection's :class:`~felix.quic.protocol.QuicTransport`. An unknown id is:

* a client's first Initial packet (long header, at least 1200 bytes): a new
  engine connection, a new transport, and a handler from ``create_handler``;
* a short-header packet: a connection this process does not know, typically
  one of a gateway that was killed and restarted on the same socket. With a
  node reset key the server answers with a stateless reset (felix/quic/reset.py)
  so the client ends the connection at once instead of at its idle timeout;
* anything else: dropped. A long-header packet of another QUIC version gets a
  Version Negotiation packet (only when large enough to start a connection,
  so it cannot be used for amplification; never in reply to one).

The table holds each connection's ids as the engine issues and retires them,
and loses them all when the connection ends.

Sending: with batching on (the default; felix/quic/batch.py), connections do not
call the socket's ``sendto`` themselves: their datagrams of one loop tick are
collected into one :class:`~felix.quic.batch.DatagramBatch` for the socket and
leave in one sendmmsg call per 16 datagrams, so a fanout to N subscribers costs
about N/16 system calls instead of N.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from felix.quic.batch import DatagramBatch, batch_limit, gso_wanted
from felix.quic.engine import QuicConfiguration, QuicEngine
from felix.quic.protocol import QuicTransport
from felix.quic.reset import MIN_TRIGGER_SIZE, ResetBudget, reset_token, stateless_reset
from felix.quic.transport import CreateHandler

__all__ = ["QuicServer"]

log = logging.getLogger(__name__)

#: A client's first datagram must be at least this large (RFC 9000, 14.1).
MIN_INITIAL_SIZE = 1200
#: Connection ids are at most this long in QUIC version 1 (RFC 9000, 17.2).
MAX_CID_LENGTH = 20
QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF


class QuicServer(asyncio.DatagramProtocol):
    """The datagram protocol of a listening socket (see the module doc)."""

    def __init__(
        self,
        engine: QuicEngine,
        configuration: QuicConfiguration,
        create_handler: CreateHandler,
        *,
        reset_key: bytes | None = None,
        reset_budget: ResetBudget | None = None,
        batch: bool | int | None = None,
    ) -> None:
        self._engine = engine
        self._configuration = configuration
        self._create_handler = create_handler
        self._cid_length = int(configuration.connection_id_length)
        self._versions: list[int] = list(configuration.supported_versions)
        self._reset_key = reset_key
        #: Stateless resets sent and refused (bounded: 100/s by default).
        self.resets = reset_budget or ResetBudget()
        self._connections: dict[bytes, QuicTransport] = {}
        self._ids: dict[QuicTransport, set[bytes]] = {}
        self._sendto: Any = None
        self._transport: asyncio.DatagramTransport | None = None
        self._batch_limit = batch_limit(batch)
        #: The socket's batch of outgoing datagrams (None: batching off).
        self.batch: DatagramBatch | None = None
        #: What connections send with: the batch's ``sendto`` or the transport's.
        self._connection_sendto: Any = None
        self._time = asyncio.get_running_loop().time

    @property
    def connections(self) -> int:
        """Connections currently routed by this server."""
        return len(self._ids)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._sendto = transport.sendto  # type: ignore[attr-defined]
        self._connection_sendto = self._sendto
        if self._batch_limit:
            try:
                self.batch = DatagramBatch(
                    self._transport,  # type: ignore[arg-type]
                    max_pending=self._batch_limit,
                    gso=gso_wanted(),
                )
            except Exception:  # no socket to write to: send as before
                log.exception("cannot batch datagrams on %s; sending one at a time", transport)
            else:
                self._connection_sendto = self.batch.sendto

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE, code 0), then the socket."""
        for connection in list(self._ids):
            connection.close()
        self._connections.clear()
        self._ids.clear()
        if self.batch is not None:
            self.batch.close()  # the CONNECTION_CLOSEs just queued leave before the socket shuts
        if self._transport is not None:
            self._transport.close()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not data:
            return
        if not data[0] & 0x80:  # short header: the DCID is ours, of our length
            dcid = data[1 : 1 + self._cid_length]
            connection = self._connections.get(dcid)
            if connection is not None:
                connection.datagram_received(data, addr)
            elif self._reset_key is not None and len(data) >= MIN_TRIGGER_SIZE:
                self._send_reset(dcid, len(data), addr)
            return
        header = _long_header(data)
        if header is None:
            return
        version, packet_type, dcid, scid = header
        connection = self._connections.get(dcid)
        if connection is not None:
            connection.datagram_received(data, addr)
            return
        if version == 0:  # a Version Negotiation packet is never answered
            return
        if version not in self._versions:
            if len(data) >= MIN_INITIAL_SIZE:
                self._sendto(
                    self._engine.encode_version_negotiation(
                        source_cid=dcid, destination_cid=scid, supported_versions=self._versions
                    ),
                    addr,
                )
            return
        if packet_type != _INITIAL_TYPE.get(version) or len(data) < MIN_INITIAL_SIZE:
            return
        connection = self._accept(dcid, addr)
        connection.datagram_received(data, addr)

    def _accept(self, odcid: bytes, addr: Any) -> QuicTransport:
        quic = self._engine.server_connection(self._configuration, odcid, self._reset_key)
        connection = QuicTransport(
            self._engine,
            quic,
            addr,
            self._create_handler,
            on_connection_id=self._connection_id,
            on_ended=self._ended,
        )
        connection.send_with(self._connection_sendto)
        self._ids[connection] = set()
        self._connection_id(connection, odcid, True)
        self._connection_id(connection, quic.host_cid, True)
        return connection

    def _connection_id(self, connection: QuicTransport, cid: bytes, issued: bool) -> None:
        ids = self._ids.get(connection)
        if ids is None:  # already ended
            return
        if issued:
            ids.add(cid)
            self._connections[cid] = connection
        else:
            ids.discard(cid)
            if self._connections.get(cid) is connection:
                del self._connections[cid]

    def _ended(self, connection: QuicTransport) -> None:
        for cid in self._ids.pop(connection, ()):
            if self._connections.get(cid) is connection:
                del self._connections[cid]

    def _send_reset(self, dcid: bytes, size: int, addr: Any) -> None:
        assert self._reset_key is not None
        if not self.resets.take(self._time()):
            return
        packet = stateless_reset(reset_token(self._reset_key, dcid), size)
        if packet is not None:
            self._sendto(packet, addr)


#: The Initial packet type's bits (0x30 of the first byte) per version (RFC 9000, RFC 9369).
_INITIAL_TYPE = {QUIC_V1: 0, QUIC_V2: 1}


def _long_header(data: bytes) -> tuple[int, int, bytes, bytes] | None:
    """(version, packet type bits, DCID, SCID) of a long-header packet; None if malformed."""
    if len(data) < 7:
        return None
    version = int.from_bytes(data[1:5], "big")
    dcid_end = 6 + data[5]
    if data[5] > MAX_CID_LENGTH or len(data) < dcid_end + 1:
        return None
    scid_end = dcid_end + 1 + data[dcid_end]
    if data[dcid_end] > MAX_CID_LENGTH or len(data) < scid_end:
        return None
    return version, (data[0] & 0x30) >> 4, data[6:dcid_end], data[dcid_end + 1 : scid_end]
