"""Stateless resets: a server restarted on the same port ends its predecessor's connections.

Real QUIC on loopback, both engines as servers, qh3 as the client: a server is stopped the way a
kill -9 stops it (its socket just goes away, no CONNECTION_CLOSE), a new one
takes the port, and the old client's next packet must end its connection at
once. With another node key the token does not match and the client must not
believe the reset (it would wait for its idle timeout). aioquic 1.x clients
ignore stateless resets altogether (it has no code to detect them), so they are
not tested as clients here: felix's client uses qh3 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from felix.errors import ConnectionLost
from felix.quic import (
    ConnectionHandler,
    QuicEngine,
    QuicServerHandle,
    QuicTransport,
    StreamTransport,
    bind_udp,
    connect,
    load_engine,
    load_reset_key,
    serve_on_socket,
)
from felix.quic.reset import KEY_FILE, MIN_RESET_SIZE, ResetBudget, reset_token, stateless_reset
from felix.tls import NodeCerts, ensure_node_certificates
from tests.aio import run

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> NodeCerts:
    return ensure_node_certificates(tmp_path_factory.mktemp("node"), hostnames=[], ips=[])


class Echo(ConnectionHandler):
    def __init__(self, transport: StreamTransport) -> None:
        super().__init__(transport)
        self.replies: dict[int, asyncio.Future[bytes]] = {}
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        reply = self.replies.pop(stream_id, None)
        if reply is not None:
            reply.set_result(data)
        elif end_stream:
            self.send_stream_data(stream_id, data, end_stream=True)

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def request(self, message: bytes) -> asyncio.Future[bytes]:
        stream_id = self.next_stream_id()
        reply = self.replies[stream_id] = asyncio.get_running_loop().create_future()
        self.send_stream_data(stream_id, message, end_stream=True)
        return reply


async def _serve(engine: QuicEngine, certs: NodeCerts, port: int, key: bytes) -> QuicServerHandle:
    sock = bind_udp("127.0.0.1", port)
    return await serve_on_socket(
        engine, sock, engine.server_configuration(certs), Echo, reset_key=key
    )


def _kill(server: QuicServerHandle) -> None:
    """Stop serving as a killed process does: the socket goes, nothing more is sent."""
    for connection in list(server._server._ids):
        connection._sendto = None  # its timers still run here; a dead process's do not
    server._transport.close()


async def _restart_scenario(
    server_engine: QuicEngine,
    client_engine: QuicEngine,
    certs: NodeCerts,
    keys: tuple[bytes, bytes],
) -> tuple[Echo, QuicServerHandle]:
    first = await _serve(server_engine, certs, 0, keys[0])
    port = first.sockname[1]
    config = client_engine.client_configuration(ca_file=certs.ca_cert, server_name="localhost")
    client = await connect(
        client_engine, "127.0.0.1", port, configuration=config, create_handler=Echo
    )
    assert await asyncio.wait_for(client.request(b"before"), 5) == b"before"
    _kill(first)
    second = await _serve(server_engine, certs, port, keys[1])
    client.request(b"after")  # its packets reach the new server, which has no such connection
    return client, second


@pytest.mark.parametrize("server_name", ["qh3", "aioquic"])
def test_restarted_server_resets_old_connections(certs: NodeCerts, server_name: str) -> None:
    # qh3 clients only (felix's default): aioquic 1.x clients never check for resets.
    key = os.urandom(32)

    async def main() -> None:
        server_engine, client_engine = load_engine(server_name), load_engine("qh3")
        client, second = await _restart_scenario(server_engine, client_engine, certs, (key, key))
        try:
            # Idle timeout is 30 s: ending within 5 s can only be the reset.
            await asyncio.wait_for(client.ended, 5)
            assert second.resets.sent >= 1
            assert client.close_reason is not None
            with pytest.raises(ConnectionLost):  # the felix error, not the engine's
                client.request(b"too late")
        finally:
            second.close()

    run(main)


def test_reset_with_another_key_is_not_believed(certs: NodeCerts) -> None:
    async def main() -> None:
        engine = load_engine("qh3")
        client, second = await _restart_scenario(
            engine, engine, certs, (os.urandom(32), os.urandom(32))
        )
        try:
            async with asyncio.timeout(10):
                while second.resets.sent == 0:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the client has had the reset for a while
            assert client.close_reason is None
            assert not client.ended.done()
        finally:
            second.close()
            client.close()

    run(main)


def test_connections_are_found_by_every_id_they_use(certs: NodeCerts) -> None:
    """No reset for a live connection: a busy connection never gets one."""

    async def main() -> None:
        engine = load_engine("qh3")
        server = await _serve(engine, certs, 0, os.urandom(32))
        config = engine.client_configuration(ca_file=certs.ca_cert, server_name="localhost")
        client = await connect(
            engine, "127.0.0.1", server.sockname[1], configuration=config, create_handler=Echo
        )
        try:
            for i in range(50):
                assert await asyncio.wait_for(client.request(b"%d" % i), 5) == b"%d" % i
            assert server.resets.sent == 0 and client.close_reason is None
            assert isinstance(client.transport, QuicTransport)
        finally:
            client.close()
            server.close()

    run(main)


# -- the parts, without sockets ------------------------------------------------------------


def test_reset_key_survives_and_is_shared(tmp_path: Path) -> None:
    key = load_reset_key(tmp_path)
    assert len(key) == 32 and load_reset_key(tmp_path) == key
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != KEY_FILE]  # no temporary left
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        load_reset_key(tmp_path)


def test_stateless_reset_packet_shape() -> None:
    token = reset_token(b"k" * 32, b"12345678")
    assert token == reset_token(b"k" * 32, b"12345678") != reset_token(b"k" * 32, b"12345679")
    packet = stateless_reset(token, 1200)
    assert packet is not None and packet.endswith(token)
    assert packet[0] & 0xC0 == 0x40  # short header form, fixed bit set
    # Always smaller than its trigger, never below the minimum: no reset loops.
    small = stateless_reset(token, MIN_RESET_SIZE + 1)
    assert small is not None and len(small) == MIN_RESET_SIZE
    assert stateless_reset(token, MIN_RESET_SIZE) is None


def test_reset_budget_bounds_resets() -> None:
    budget = ResetBudget(rate=10, burst=3)
    assert [budget.take(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert budget.take(0.05) is False  # half a token
    assert budget.take(0.1) is True
    assert (budget.sent, budget.refused) == (4, 3)


# -- a real node: kill -9 of the gateway -----------------------------------------------------


@pytest.mark.timeout(120)
def test_client_of_a_killed_gateway_fails_over_fast(tmp_path: Path) -> None:
    """kill -9 of the gateway: the restarted one resets the client's connection.

    The keepalive is set far beyond the bound, so only the reset can make the
    client notice: before it, the client kept sending into a connection nobody
    had until its 30 s idle timeout (about 15 s with the default keepalive).
    """
    import time

    import felix
    from tests.nodeproc import NodeProcess

    node = NodeProcess(tmp_path / "node", gateways=1, shards=1)

    async def main() -> float:
        async with felix.connect(
            f"felix://{node.host}:{node.port}",
            ca=node.ca_file,
            keepalive=60,
            request_timeout=1,
            reconnect_backoff=(0.05, 0.2),
        ) as client:
            cache = client.cache("c")
            assert await cache.set("k", b"v") is True
            old = node.kill_child("gateway-0")
            killed = time.monotonic()
            deadline = killed + 30
            while time.monotonic() < deadline:
                try:
                    await cache.get("k")
                    if node.refresh()["processes"]["gateway-0"] != old:
                        return time.monotonic() - killed
                except (felix.ConnectionLost, felix.FelixTimeoutError, felix.Unavailable):
                    await asyncio.sleep(0.05)
            raise AssertionError("the client never got through to the restarted gateway")

    try:
        took = run(main, timeout=60)
    finally:
        node.stop()
    print(f"client through {took:.2f} s after the kill")
    assert took < 6.0, f"the client took {took:.1f} s to get through after the kill"
