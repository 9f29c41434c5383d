"""felix.quic: both engines over real loopback QUIC, on sockets felix binds itself."""

from __future__ import annotations

import asyncio
import errno
import socket
from pathlib import Path
from typing import Any

import pytest

from felix.errors import FelixTimeoutError
from felix.quic import (
    CLOSE_INTERNAL_ERROR,
    ENGINE_ENV,
    ConnectionHandler,
    CreateHandler,
    QuicEngine,
    QuicServerHandle,
    QuicTransport,
    StreamTransport,
    bind_udp,
    connect,
    load_engine,
    serve_on_socket,
)
from felix.tls import NodeCerts, ensure_node_certificates
from tests.aio import run

pytestmark = pytest.mark.timeout(60)

ENGINE_NAMES = ["qh3", "aioquic"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> NodeCerts:
    return ensure_node_certificates(tmp_path_factory.mktemp("node"), hostnames=[], ips=[])


@pytest.fixture(params=ENGINE_NAMES)
def engine(request: pytest.FixtureRequest) -> QuicEngine:
    return load_engine(request.param)


# -- protocols used by the tests -----------------------------------------------------------


class Handler(ConnectionHandler):
    @property
    def quic_transport(self) -> QuicTransport:
        assert isinstance(self.transport, QuicTransport)
        return self.transport

    async def wait_closed(self) -> None:
        await self.quic_transport.wait_closed()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()


class EchoServer(Handler):
    """Echoes each stream's whole message back once the client sent FIN."""

    #: Every connection this class accepted, in order (reset by each test).
    accepted: list[EchoServer] = []

    def __init__(self, transport: StreamTransport) -> None:
        super().__init__(transport)
        self.buffers: dict[int, bytearray] = {}
        self.alpn: str | None = None
        type(self).accepted.append(self)

    def _on_handshake_completed(self, alpn_protocol: str | None) -> None:
        self.alpn = alpn_protocol

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        buffer = self.buffers.setdefault(stream_id, bytearray())
        buffer += data
        if end_stream:
            message = bytes(self.buffers.pop(stream_id))
            if message == b"boom":
                raise RuntimeError("hook failure on purpose")
            self.send_stream_data(stream_id, message, end_stream=True)


class EchoClient(Handler):
    def __init__(self, transport: StreamTransport) -> None:
        super().__init__(transport)
        self.buffers: dict[int, bytearray] = {}
        self.replies: dict[int, asyncio.Future[bytes]] = {}
        self.terminated = asyncio.get_running_loop().create_future()
        self.transmits = 0

    def start(self, message: bytes) -> asyncio.Future[bytes]:
        stream_id = self.next_stream_id()
        reply = self.replies[stream_id] = asyncio.get_running_loop().create_future()
        self.send_stream_data(stream_id, message, end_stream=True)
        return reply

    async def request(self, message: bytes) -> bytes:
        return await self.start(message)

    def transmitted(self) -> None:
        self.transmits += 1

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        buffer = self.buffers.setdefault(stream_id, bytearray())
        buffer += data
        if end_stream:
            self.replies.pop(stream_id).set_result(bytes(self.buffers.pop(stream_id)))

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        self.terminated.set_result(error_code)


async def start_server(
    engine: QuicEngine, certs: NodeCerts, protocol: CreateHandler = EchoServer
) -> tuple[QuicServerHandle, int]:
    sock = bind_udp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = await serve_on_socket(engine, sock, engine.server_configuration(certs), protocol)
    return server, port


async def open_client(
    engine: QuicEngine, certs: NodeCerts, port: int, *, server_name: str = "localhost"
) -> EchoClient:
    config = engine.client_configuration(ca_file=certs.ca_cert, server_name=server_name)
    return await connect(engine, "127.0.0.1", port, configuration=config, create_handler=EchoClient)


# -- load_engine ---------------------------------------------------------------------------


def test_load_engine_reads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    assert load_engine().name == "qh3"
    monkeypatch.setenv(ENGINE_ENV, "")
    assert load_engine().name == "qh3"
    monkeypatch.setenv(ENGINE_ENV, "aioquic")
    assert load_engine().name == "aioquic"
    assert load_engine("qh3").name == "qh3"  # an explicit name wins over the env
    assert load_engine("aioquic") is load_engine("aioquic")


def test_load_engine_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"unknown QUIC engine 'quiche'.*'qh3', 'aioquic'"):
        load_engine("quiche")
    monkeypatch.setenv(ENGINE_ENV, "QH3")
    with pytest.raises(ValueError, match=f"'QH3' \\(from {ENGINE_ENV}\\)"):
        load_engine()


def test_engines_expose_their_own_classes() -> None:
    import aioquic.quic.events
    import qh3.quic.events

    qh3_engine, aioquic_engine = load_engine("qh3"), load_engine("aioquic")
    assert qh3_engine.events.stream_data_received is qh3.quic.events.StreamDataReceived
    assert aioquic_engine.events.stream_data_received is aioquic.quic.events.StreamDataReceived
    assert qh3_engine.configuration_class.__module__.startswith("qh3.")
    assert aioquic_engine.connection_class.__module__.startswith("aioquic.")


# -- the engine is held, not built around, and bind_udp ------------------------------------


def test_connections_hold_the_engine_connection(engine: QuicEngine, certs: NodeCerts) -> None:
    """Felix's classes subclass no engine class: the transport holds the sans-IO connection."""
    EchoServer.accepted = []

    async def main() -> None:
        server, port = await start_server(engine, certs)
        client = await open_client(engine, certs, port)
        try:
            assert await client.request(b"held") == b"held"
            (accepted,) = EchoServer.accepted
            for handler in (client, accepted):
                assert type(handler.transport) is QuicTransport
                assert isinstance(handler.quic_transport.quic, engine.connection_class)
                assert not any(
                    cls.__module__.startswith(engine.name) for cls in type(handler).__mro__
                )
            assert type(client.quic_transport.quic) is engine.connection_class
            assert client.peer == "127.0.0.1" and accepted.peer == "127.0.0.1"
            await client.aclose()
        finally:
            server.close()

    run(main)


def test_bind_udp_reuseport_shares_the_picked_port() -> None:
    first = bind_udp("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = bind_udp("127.0.0.1", port)
    try:
        assert second.getsockname() == ("127.0.0.1", port)
        assert not first.getblocking() and not second.getblocking()
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        with pytest.raises(OSError) as exc:
            bind_udp("127.0.0.1", port, reuseport=False).close()
        assert exc.value.errno == errno.EADDRINUSE
    finally:
        first.close()
        second.close()


def test_bind_udp_ipv6() -> None:
    sock = bind_udp("::1", 0)
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockname()[0] == "::1"
    finally:
        sock.close()


# -- real connections, both engines --------------------------------------------------------


def test_echo_small_and_large_then_clean_close(engine: QuicEngine, certs: NodeCerts) -> None:
    EchoServer.accepted = []

    async def main() -> None:
        server, port = await start_server(engine, certs)
        client = await open_client(engine, certs, port)
        try:
            assert await client.request(b"hello") == b"hello"
            big = bytes(range(256)) * 4096  # 1 MiB
            assert await client.request(big) == big
            # Several streams in flight at once, replies matched by stream.
            messages = [bytes([i]) * (1000 + i) for i in range(8)]
            assert await asyncio.gather(*(client.request(m) for m in messages)) == messages
            # Everything was sent: no backlog left (both engines' implementation).
            assert client.send_buffer_size() == 0

            (accepted,) = EchoServer.accepted
            assert accepted.alpn == "felix"
            await client.aclose()
            assert client.close_reason is not None and client.close_reason.error_code == 0
            await asyncio.wait_for(accepted.wait_closed(), 5)
            assert accepted.close_reason is not None
            assert accepted.close_reason.error_code == 0
            assert await client.terminated == 0
        finally:
            client.close()
            server.close()

    run(main)


def test_server_close_ends_its_connections(engine: QuicEngine, certs: NodeCerts) -> None:
    EchoServer.accepted = []

    async def main() -> None:
        server, port = await start_server(engine, certs)
        client = await open_client(engine, certs, port)
        assert await client.request(b"x") == b"x"
        server.close()
        server.close()  # idempotent
        assert await asyncio.wait_for(client.terminated, 5) == 0
        # The server side runs out its closing period on the closed socket quietly.
        (accepted,) = EchoServer.accepted
        await asyncio.wait_for(accepted.wait_closed(), 10)

    run(main)


def test_ip_address_server_name(engine: QuicEngine, certs: NodeCerts) -> None:
    async def main() -> None:
        server, port = await start_server(engine, certs)
        try:
            client = await open_client(engine, certs, port, server_name="127.0.0.1")
            assert await client.request(b"by ip") == b"by ip"
            await client.aclose()
        finally:
            server.close()

    run(main)


def test_ipv6(engine: QuicEngine, certs: NodeCerts) -> None:
    async def main() -> None:
        sock = bind_udp("::1", 0)
        port = sock.getsockname()[1]
        server = await serve_on_socket(engine, sock, engine.server_configuration(certs), EchoServer)
        try:
            config = engine.client_configuration(ca_file=certs.ca_cert, server_name="::1")
            client = await connect(
                engine, "::1", port, configuration=config, create_handler=EchoClient
            )
            assert await client.request(b"over v6") == b"over v6"
            await client.aclose()
        finally:
            server.close()

    run(main)


def test_wrong_ca_fails_the_handshake(engine: QuicEngine, certs: NodeCerts, tmp_path: Path) -> None:
    other_ca = ensure_node_certificates(tmp_path, hostnames=[], ips=[]).ca_cert

    async def main() -> None:
        server, port = await start_server(engine, certs)
        try:
            config = engine.client_configuration(ca_file=other_ca, server_name="localhost")
            with pytest.raises(ConnectionError, match=r"handshake .* failed"):
                await connect(
                    engine, "127.0.0.1", port, configuration=config, create_handler=EchoClient
                )
            # The server is unharmed: a client with the right CA still gets through.
            client = await open_client(engine, certs, port)
            assert await client.request(b"ok") == b"ok"
            await client.aclose()
        finally:
            server.close()

    run(main)


def test_wrong_server_name_fails_the_handshake(engine: QuicEngine, certs: NodeCerts) -> None:
    async def main() -> None:
        server, port = await start_server(engine, certs)
        try:
            with pytest.raises(ConnectionError):
                await open_client(engine, certs, port, server_name="not-this-node.example")
        finally:
            server.close()

    run(main)


def test_other_alpn_is_refused(engine: QuicEngine, certs: NodeCerts) -> None:
    async def main() -> None:
        server, port = await start_server(engine, certs)
        try:
            config = engine.client_configuration(
                ca_file=certs.ca_cert, server_name="localhost", alpn="h3"
            )
            with pytest.raises(ConnectionError):
                await connect(
                    engine, "127.0.0.1", port, configuration=config, create_handler=EchoClient
                )
        finally:
            server.close()

    run(main)


def test_server_issues_no_session_tickets(engine: QuicEngine, certs: NodeCerts) -> None:
    """0-RTT is off: without tickets a client can neither resume nor send early data."""
    import aioquic.asyncio.client
    import qh3.asyncio.client

    engine_connect: Any = {
        "qh3": qh3.asyncio.client.connect,
        "aioquic": aioquic.asyncio.client.connect,
    }[engine.name]
    tickets: list[Any] = []

    async def main() -> None:
        server, port = await start_server(engine, certs)
        try:
            config = engine.client_configuration(ca_file=certs.ca_cert, server_name="localhost")
            # The engine's own client, because it can take a ticket handler.
            async with engine_connect(
                "127.0.0.1", port, configuration=config, session_ticket_handler=tickets.append
            ) as client:
                await client.ping()
                await asyncio.sleep(0.1)  # tickets follow the handshake; give them time
        finally:
            server.close()

    run(main)
    assert tickets == []


def test_handshake_timeout(engine: QuicEngine, certs: NodeCerts) -> None:
    class Recorded(EchoClient):
        created: list[EchoClient] = []

        def __init__(self, transport: StreamTransport) -> None:
            super().__init__(transport)
            type(self).created.append(self)

    async def main() -> None:
        # A bound socket nobody reads: the Initial packet goes unanswered.
        silent = bind_udp("127.0.0.1", 0)
        try:
            config = engine.client_configuration(ca_file=certs.ca_cert, server_name="localhost")
            with pytest.raises(FelixTimeoutError):
                await connect(
                    engine,
                    "127.0.0.1",
                    silent.getsockname()[1],
                    configuration=config,
                    create_handler=Recorded,
                    handshake_timeout=0.3,
                )
            # The abandoned connection still runs out its closing period (timers
            # on a closed socket): that must end quietly, with nothing swallowed.
            (abandoned,) = Recorded.created
            await asyncio.wait_for(abandoned.terminated, 10)
        finally:
            silent.close()

    run(main)


def test_two_servers_share_one_port(engine: QuicEngine, certs: NodeCerts) -> None:
    class First(EchoServer):
        accepted: list[EchoServer] = []

    class Second(EchoServer):
        accepted: list[EchoServer] = []

    async def main() -> None:
        first_sock = bind_udp("127.0.0.1", 0)
        port = first_sock.getsockname()[1]
        second_sock = bind_udp("127.0.0.1", port)
        config = engine.server_configuration(certs)
        servers = [
            await serve_on_socket(engine, first_sock, config, First),
            await serve_on_socket(engine, second_sock, config, Second),
        ]
        try:
            # The kernel picks a socket per client 4-tuple: with 16 clients the
            # chance that one server gets none is 2 * 2**-16.
            clients = await asyncio.gather(*(open_client(engine, certs, port) for _ in range(16)))
            replies = await asyncio.gather(*(c.request(b"%d" % i) for i, c in enumerate(clients)))
            assert replies == [b"%d" % i for i in range(16)]
            assert len(First.accepted) + len(Second.accepted) == 16
            assert First.accepted and Second.accepted
            await asyncio.gather(*(c.aclose() for c in clients))
        finally:
            for server in servers:
                server.close()

    run(main)


def test_transmit_soon_coalesces_sends_into_one_transmit(
    engine: QuicEngine, certs: NodeCerts
) -> None:
    async def main() -> None:
        server, port = await start_server(engine, certs)
        client = await open_client(engine, certs, port)
        try:
            await client.request(b"warm-up")
            await asyncio.sleep(0.05)  # let ACKs and timers settle
            client.transmits = 0
            replies = [client.start(b"message %d" % i) for i in range(50)]
            # 50 sends queued, nothing transmitted yet: one transmit is pending.
            assert client.transmits == 0
            await asyncio.sleep(0)  # the pending transmit runs before this task resumes
            assert client.transmits == 1
            assert await asyncio.gather(*replies) == [b"message %d" % i for i in range(50)]
            await client.aclose()
        finally:
            client.close()
            server.close()

    run(main)


def test_send_buffer_size_counts_unsent_bytes(engine: QuicEngine, certs: NodeCerts) -> None:
    async def main() -> None:
        server, port = await start_server(engine, certs)
        client = await open_client(engine, certs, port)
        try:
            stream_id = client.next_stream_id()
            other = stream_id + 4
            reply = client.start(b"x" * 500_000)  # stream_id, not transmitted yet
            assert client.next_stream_id() == other
            assert client.send_buffer_size(stream_id) == 500_000
            assert client.send_buffer_size(other) == 0  # not opened
            assert client.send_buffer_size() == 500_000
            assert await reply == b"x" * 500_000
            assert client.send_buffer_size(stream_id) == 0
            await client.aclose()
        finally:
            client.close()
            server.close()

    run(main)


def test_hook_error_closes_only_that_connection(
    engine: QuicEngine, certs: NodeCerts, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        server, port = await start_server(engine, certs)
        bad = await open_client(engine, certs, port)
        good = await open_client(engine, certs, port)
        try:
            bad.start(b"boom")
            assert await asyncio.wait_for(bad.terminated, 5) == CLOSE_INTERNAL_ERROR
            assert await good.request(b"still fine") == b"still fine"
            await good.aclose()
        finally:
            server.close()

    run(main)
    assert "error in a connection hook" in caplog.text


def test_stream_limits_are_what_the_engines_advertise(engine: QuicEngine, certs: NodeCerts) -> None:
    """peer_stream_limits and streams_available agree with a real peer's limits."""
    EchoServer.accepted = []

    async def main() -> None:
        server, port = await start_server(engine, certs)
        client = await open_client(engine, certs, port)
        try:
            assert await client.request(b"x") == b"x"
            (accepted,) = EchoServer.accepted
            bidi, uni = engine.peer_stream_limits
            server_side = accepted.quic_transport
            assert server_side.streams_available(unidirectional=True) == uni
            assert client.quic_transport.streams_available() == bidi - 1  # one used above
            assert client.quic_transport.max_peer_streams(unidirectional=True) == uni
            for _ in range(uni):
                server_side.send_stream_data(server_side.next_stream_id(True), b"e")
            assert server_side.streams_available(unidirectional=True) == 0
            if engine.name == "qh3":  # aioquic queues the stream until the limit rises
                with pytest.raises(ValueError):
                    server_side.send_stream_data(server_side.next_stream_id(True), b"e")
            await client.aclose()
        finally:
            server.close()

    run(main)


def test_engine_failure_ends_only_that_connection(
    engine: QuicEngine, certs: NodeCerts, caplog: pytest.LogCaptureFixture
) -> None:
    """An engine raising in a transmit (no felix call on the stack) ends that connection."""

    async def main() -> None:
        server, port = await start_server(engine, certs)
        broken = await open_client(engine, certs, port)
        good = await open_client(engine, certs, port)
        try:
            quic = broken.quic_transport.quic

            def fail(now: float) -> Any:
                raise engine.connection_error(0x1, None, "broken on purpose")

            quic.datagrams_to_send = fail
            broken.start(b"never sent")
            assert await asyncio.wait_for(broken.terminated, 5) == CLOSE_INTERNAL_ERROR
            await asyncio.wait_for(broken.wait_closed(), 5)
            assert await good.request(b"still fine") == b"still fine"
            await good.aclose()
        finally:
            server.close()

    run(main)
    assert "the QUIC engine failed" in caplog.text
