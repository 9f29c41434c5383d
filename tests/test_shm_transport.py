"""The shared-memory transport in one process: framing and stream rules (sans-IO),
handshake bytes, and ShmServer + shm_connect over a real Unix socket and memfd rings
with a small echo handler (a hostile peer, backpressure, the peer going away)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.errors import FelixTimeoutError, HandshakeFailed, Overloaded, ShmProtocolError
from felix.quic.transport import CloseReason, ConnectionHandler, StreamTransport
from felix.shm import framing
from felix.shm import handshake as hs
from felix.shm.client import shm_connect
from felix.shm.framing import DATA, RESET_STREAM, STOP_SENDING, Frame, ShmStreams
from felix.shm.server import DEFAULT_MAX_TOTAL_BACKLOG, ShmServer
from felix.shm.transport import DEFAULT_MAX_BACKLOG, ShmTransport
from tests.aio import run

# -- framing ---------------------------------------------------------------------------------


def test_frames_round_trip() -> None:
    raw = framing.encode(DATA, 4, b"abc", flags=framing.FLAG_FIN)
    assert len(raw) == framing.FRAME_HEADER + 3
    assert framing.parse(memoryview(raw)) == Frame(DATA, framing.FLAG_FIN, 0, 4, b"abc")
    close = framing.parse(framing.encode_close(0x105, "bye" * 1000))
    assert close.kind == framing.CLOSE and close.error_code == 0x105
    assert len(close.payload) == framing.MAX_CLOSE_REASON
    with pytest.raises(ValueError):
        framing.encode(DATA, 0, code=2**32)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x01" * 15, "shorter than its header"),
        (struct.pack("<BBHIQ", 9, 0, 0, 0, 0), "unknown shm frame kind"),
        (struct.pack("<BBHIQ", DATA, 0x2, 0, 0, 0), "reserved"),
        (struct.pack("<BBHIQ", DATA, 0, 1, 0, 0), "reserved"),
        (struct.pack("<BBHIQ", RESET_STREAM, 0, 0, 0, 0) + b"x", "with a payload"),
        (struct.pack("<BBHIQ", DATA, 0, 0, 0, 2**63), "out of range"),
    ],
)
def test_malformed_frames_are_protocol_errors(raw: bytes, match: str) -> None:
    with pytest.raises(ShmProtocolError, match=match):
        framing.parse(raw)


def frame(kind: int, stream_id: int, fin: bool = False, payload: bytes = b"") -> Frame:
    return Frame(kind, framing.FLAG_FIN if fin else 0, 0, stream_id, payload)


def test_streams_enforce_the_limits_and_free_ended_streams() -> None:
    node = ShmStreams(is_client=False, local_limits=(2, 1), peer_limits=(1, 2))
    assert node.receive(frame(DATA, 0)) == framing.DELIVER
    assert node.receive(frame(DATA, 4)) == framing.DELIVER
    with pytest.raises(ShmProtocolError, match="more than 2 bidirectional") as err:
        node.receive(frame(DATA, 8))
    assert err.value.transport_code == framing.STREAM_LIMIT_ERROR
    # Stream 0 ends both ways: a new one fits again.
    node.receive(frame(DATA, 0, fin=True))
    node.send_data(0, end_stream=True)
    assert node.open_streams() == 1
    assert node.receive(frame(DATA, 8)) == framing.DELIVER
    # The node's own unidirectional streams: 2 at once, ids 3, 7, 11.
    assert node.next_stream_id(unidirectional=True) == 3
    node.send_data(3, False)
    node.send_data(7, False)
    assert node.streams_available(unidirectional=True) == 0
    with pytest.raises(ValueError, match="allows 2 open"):
        node.send_data(11, False)
    node.send_data(3, True)  # ends it (no receive side)
    assert node.streams_available(unidirectional=True) == 1


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([frame(DATA, 0, fin=True), frame(DATA, 0)], "after its end"),
        ([frame(DATA, 1)], "never opened"),  # a server-initiated id from the client
        ([frame(DATA, 2), frame(STOP_SENDING, 2)], "STOP_SENDING on the peer's unidirectional"),
        ([frame(DATA, 0), frame(DATA, 8), frame(DATA, 4)], "after its end"),  # 4 was skipped
    ],
)
def test_stream_rule_violations(frames: list[Frame], match: str) -> None:
    node = ShmStreams(is_client=False, local_limits=(8, 8), peer_limits=(8, 8))
    with pytest.raises(ShmProtocolError, match=match):
        for f in frames:
            node.receive(f)


def test_stop_sending_asks_for_a_reset_once_and_late_frames_are_ignored() -> None:
    client = ShmStreams(is_client=True, local_limits=(8, 8), peer_limits=(8, 8))
    client.send_data(0, False)
    assert client.receive(Frame(STOP_SENDING, 0, 7, 0, b"")) == framing.DELIVER_AND_RESET
    assert client.receive(Frame(STOP_SENDING, 0, 7, 0, b"")) == framing.IGNORE
    with pytest.raises(ValueError):
        client.send_data(0, False)
    assert not client.send_reset(0)
    assert client.receive(frame(DATA, 0, fin=True)) == framing.DELIVER
    assert client.open_streams() == 0
    assert client.receive(frame(RESET_STREAM, 0)) == framing.IGNORE  # ended: harmless
    # This side stopped reading: what still arrives is dropped, its FIN ends the stream.
    client.send_data(4, True)
    assert client.send_stop(4)
    assert client.receive(frame(DATA, 4, payload=b"x")) == framing.IGNORE
    assert client.receive(frame(DATA, 4, fin=True)) == framing.IGNORE
    assert client.open_streams() == 0


# -- handshake bytes ---------------------------------------------------------------------------


def test_hello_and_reply_round_trip() -> None:
    hello = hs.Hello(1 << 20, 16, 1024)
    raw = hs.encode_hello(hello)
    assert raw[:8] == b"FLXSHM1\0" and len(raw) == hs.HELLO_SIZE
    assert hs.decode_hello(raw) == hello
    reply = hs.Reply(hs.BUSY, reason="full")
    assert hs.decode_reply(hs.encode_reply(reply)) == reply
    ok = hs.Reply(hs.OK, 1 << 16, 128, 16)
    assert hs.decode_reply(hs.encode_reply(ok)) == ok
    assert isinstance(hs.refusal_error(reply), Overloaded)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"FLXSHM1\0" + b"\0" * 15, "expected 24"),
        (b"GET / HTTP/1.1\r\n\r\n\0\0\0\0\0\0", "bad magic"),
        (struct.pack("<8sHHIII", hs.MAGIC, 2, 0, 0, 1, 1), "version 2"),
        (struct.pack("<8sHHIII", hs.MAGIC, 1, 1, 0, 1, 1), "flags"),
        (struct.pack("<8sHHIII", hs.MAGIC, 1, 0, 1000, 1, 1), "power of two"),
        (struct.pack("<8sHHIII", hs.MAGIC, 1, 0, 1 << 30, 1, 1), "power of two"),
        (struct.pack("<8sHHIII", hs.MAGIC, 1, 0, 0, 0, 1), "stream limits"),
    ],
)
def test_bad_hellos(raw: bytes, match: str) -> None:
    with pytest.raises(HandshakeFailed, match=match):
        hs.decode_hello(raw)


def test_bad_replies() -> None:
    with pytest.raises(HandshakeFailed, match="truncated"):
        hs.decode_reply(b"FLXSHM1\0")
    with pytest.raises(HandshakeFailed, match="status"):
        hs.decode_reply(struct.pack("<8sHHIIIH", hs.MAGIC, 1, 9, 0, 0, 0, 0))
    with pytest.raises(HandshakeFailed, match="reason"):
        hs.decode_reply(struct.pack("<8sHHIIIH", hs.MAGIC, 1, 1, 0, 0, 0, 5000))
    with pytest.raises(HandshakeFailed, match="bad shm reply"):
        hs.decode_reply(struct.pack("<8sHHIIIH", hs.MAGIC, 1, 0, 4096, 1, 1, 0))


# -- a server and clients in one process -------------------------------------------------------


class Echo(ConnectionHandler):
    """Echoes every stream's bytes back on it (FIN for FIN); records what happened."""

    def __init__(self, transport: StreamTransport) -> None:
        super().__init__(transport)
        self.received: dict[int, bytearray] = {}
        self.ended: asyncio.Future[CloseReason] = asyncio.get_running_loop().create_future()
        self.fins: set[int] = set()
        self.echo = True

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.received.setdefault(stream_id, bytearray()).extend(data)
        if end_stream:
            self.fins.add(stream_id)
        if self.echo and (data or end_stream):
            self.send_stream_data(stream_id, data, end_stream)

    def connection_terminated(self, reason: CloseReason) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@asynccontextmanager
async def serving(
    tmp_path: Path, **options: int
) -> AsyncIterator[tuple[ShmServer, str, list[Echo]]]:
    path = str(tmp_path / "felix.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    handlers: list[Echo] = []

    def make(transport: StreamTransport) -> Echo:
        handler = Echo(transport)
        handlers.append(handler)
        return handler

    server = ShmServer(
        listener,
        make,
        max_connections=options.get("max_connections", 8),
        max_backlog=options.get("max_backlog", DEFAULT_MAX_BACKLOG),
        max_total_backlog=options.get("max_total_backlog", DEFAULT_MAX_TOTAL_BACKLOG),
    )
    server.start()
    try:
        yield server, path, handlers
    finally:
        server.close()
        await asyncio.sleep(0.05)
        listener.close()


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_echo_large_and_small_both_ways_then_close(tmp_path: Path) -> None:
    async def main() -> None:
        before = fd_count()
        async with serving(tmp_path) as (server, path, handlers):
            client = await shm_connect(path, Echo, 2.0, ring_capacity=1 << 16)
            client.echo = False
            transport = client.transport
            assert isinstance(transport, ShmTransport)
            big = os.urandom(3 * 1024 * 1024)  # far more than the 64 KiB ring: backpressure
            transport.send_stream_data(0, big, end_stream=True)
            assert transport.send_buffer_size() > 0 and transport.send_buffer_size(0) > 0
            for i in range(50):
                transport.send_stream_data(4, b"m%d;" % i)
            await wait_for(lambda: 0 in client.fins)
            assert bytes(client.received[0]) == big
            await wait_for(lambda: len(client.received.get(4, b"")) >= 190)
            assert bytes(client.received[4]).split(b";")[:50] == [b"m%d" % i for i in range(50)]
            assert transport.send_buffer_size() == 0
            assert server.connections == 1 and handlers[0].peer.startswith("unix:pid=")
            assert f"uid={os.getuid()}" in handlers[0].peer
            transport.close(0, "done")
            reason = await asyncio.wait_for(handlers[0].ended, 2)
            assert (reason.error_code, reason.reason_phrase) == (0, "done")
            await client.ended
            await wait_for(lambda: server.connections == 0)
        await asyncio.sleep(0.05)
        assert fd_count() == before

    run(main, timeout=30)


def test_client_socket_closing_ends_the_node_side(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, path, handlers):
            client = await shm_connect(path, Echo, 2.0)
            await wait_for(lambda: server.connections == 1)
            transport = client.transport
            assert isinstance(transport, ShmTransport)
            transport._sock.shutdown(socket.SHUT_RDWR)  # as the kernel does for a killed client
            reason = await asyncio.wait_for(handlers[0].ended, 2)
            assert "closed the shm socket" in reason.reason_phrase
            await wait_for(lambda: server.connections == 0)
            await asyncio.wait_for(client.ended, 2)  # and the client sees its end too

    run(main, timeout=30)


def test_a_hostile_peer_is_closed_and_others_keep_working(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_server, path, handlers):
            good = await shm_connect(path, Echo, 2.0)
            good.echo = False
            bad = await shm_connect(path, Echo, 2.0)
            bad_transport = bad.transport
            assert isinstance(bad_transport, ShmTransport)
            # A frame of an unknown kind, written straight into the ring.
            bad_transport._out.write(struct.pack("<BBHIQ", 77, 0, 0, 0, 0))
            reason = await asyncio.wait_for(handlers[1].ended, 2)
            assert reason.error_code == framing.FRAME_ENCODING_ERROR
            assert "unknown shm frame kind" in reason.reason_phrase
            bad_reason = await asyncio.wait_for(bad.ended, 2)
            assert bad_reason.frame_type is not None  # a transport error, told to the client
            # A scribbled head: a corrupt ring.
            worse = await shm_connect(path, Echo, 2.0)
            worse_transport = worse.transport
            assert isinstance(worse_transport, ShmTransport)
            import mmap

            ring = worse_transport._out
            shared = mmap.mmap(ring.fd, os.fstat(ring.fd).st_size, flags=mmap.MAP_SHARED)
            struct.pack_into("<Q", shared, 128, 1 << 40)
            shared.close()
            os.eventfd_write(ring.doorbell_fd, 1)
            reason = await asyncio.wait_for(handlers[2].ended, 2)
            assert "corrupt ring" in reason.reason_phrase
            # The good one still echoes.
            good_transport = good.transport
            good_transport.send_stream_data(0, b"still here", end_stream=True)
            await wait_for(lambda: 0 in good.fins)
            assert bytes(good.received[0]) == b"still here"
            worse_transport.abort()

    run(main, timeout=30)


def test_refusals(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_connections=1) as (server, path, _handlers):
            first = await shm_connect(path, Echo, 2.0)
            with pytest.raises(Overloaded, match="limit of 1 shm connections"):
                await shm_connect(path, Echo, 2.0)
            assert server.refused_busy == 1
            # Not a felix hello: a clear refusal, no descriptors.
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 2)
            assert hs.decode_reply(answer).status == hs.REFUSED
            assert b"bad magic" in answer
            writer.close()
            first.transport.close()
        with pytest.raises(Exception, match="cannot connect"):
            await shm_connect(str(tmp_path / "nothing.sock"), Echo, 1.0)

    run(main, timeout=30)


def test_a_silent_client_is_dropped_after_the_handshake_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "felix.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(8)
        server = ShmServer(listener, Echo, max_connections=2, handshake_timeout=0.2)
        server.start()
        reader, writer = await asyncio.open_unix_connection(path)
        answer = await asyncio.wait_for(reader.read(), 2)
        assert b"no hello within" in answer
        writer.close()
        # And a node that never answers: the client's deadline.
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mute.bind(str(tmp_path / "mute.sock"))
        mute.listen(1)
        with pytest.raises(FelixTimeoutError):
            await shm_connect(str(tmp_path / "mute.sock"), Echo, 0.2)
        mute.close()
        server.close()
        listener.close()

    run(main, timeout=30)


def test_a_peer_that_stops_reading_is_closed_at_the_backlog_bound(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, max_connections=2, max_backlog=256 * 1024) as (
            server,
            path,
            handlers,
        ):
            client = await shm_connect(path, Echo, 2.0, ring_capacity=1 << 16)
            transport = client.transport
            assert isinstance(transport, ShmTransport)
            # The client stops reading its ring: the node's echo backs up.
            asyncio.get_running_loop().remove_reader(transport._in.doorbell_fd)
            transport.send_stream_data(0, b"x" * (1 << 20))
            reason = await asyncio.wait_for(handlers[0].ended, 5)
            assert reason.error_code == 0x109 and "stopped reading" in reason.reason_phrase
            assert server.connections == 0
            transport.abort()

    run(main, timeout=30)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([DATA, RESET_STREAM, STOP_SENDING, 0, 5]),
            st.integers(0, 3),
            st.integers(0, 40),
            st.binary(max_size=4),
        ),
        max_size=40,
    ),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_any_frame_sequence_is_applied_or_refused_cleanly(
    frames: list[tuple[int, int, int, bytes]], is_client: bool
) -> None:
    """Whatever a peer sends, the stream state answers or raises ShmProtocolError,
    and its counts stay within the announced limits."""
    streams = ShmStreams(is_client=is_client, local_limits=(3, 2), peer_limits=(2, 2))
    for kind, flags, stream_id, payload in frames:
        raw = struct.pack("<BBHIQ", kind, flags, 0, 0, stream_id) + payload
        try:
            frame = framing.parse(raw)
            if frame.kind != framing.CLOSE:
                assert streams.receive(frame) in (
                    framing.IGNORE,
                    framing.DELIVER,
                    framing.DELIVER_AND_RESET,
                )
        except ShmProtocolError:
            return
        assert streams._open_peer[0] <= 3 and streams._open_peer[1] <= 2
        assert streams.open_streams() <= 5


# -- review findings: what a local client must not be able to do ----------------------------


def test_a_client_ringing_for_nothing_is_closed(tmp_path: Path) -> None:
    """Doorbell spam without records would pin the gateway's loop: closed as a violation."""

    async def main() -> None:
        async with serving(tmp_path) as (_server, path, handlers):
            good = await shm_connect(path, Echo, 2.0)
            good.echo = False
            spammer = await shm_connect(path, Echo, 2.0)
            transport = spammer.transport
            assert isinstance(transport, ShmTransport)
            bell = transport._out.doorbell_fd
            for _ in range(2000):
                if handlers[1].ended.done():
                    break
                os.eventfd_write(bell, 1)
                await asyncio.sleep(0)  # let the node wake for each ring
            reason = await asyncio.wait_for(handlers[1].ended, 5)
            assert "doorbell rung" in reason.reason_phrase
            good.transport.send_stream_data(0, b"fine", end_stream=True)
            await wait_for(lambda: 0 in good.fins)
            assert bytes(good.received[0]) == b"fine"

    run(main, timeout=30)


def test_one_user_cannot_hold_every_pending_handshake(tmp_path: Path) -> None:
    """Silent connections of one uid fill at most MAX_PENDING_PER_UID slots; beyond, its
    newcomers are closed at once (the global MAX_PENDING is left for other users)."""
    from felix.shm import server as shm_server

    async def main() -> None:
        async with serving(tmp_path) as (server, path, _handlers):
            silent = []
            for _ in range(shm_server.MAX_PENDING_PER_UID + 4):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                silent.append(sock)
            await wait_for(lambda: server.refused_bad >= 4)
            assert len(server._pending) == shm_server.MAX_PENDING_PER_UID
            for sock in silent:
                sock.close()
            await wait_for(lambda: not server._pending)
            assert not server._pending_by_uid
            client = await shm_connect(path, Echo, 2.0)  # a real client gets in again
            client.transport.close()

    run(main, timeout=30)


def test_the_gateway_wide_backlog_budget_bounds_many_non_readers(tmp_path: Path) -> None:
    """Each connection under its own bound, together over the gateway's: the one whose
    frame would cross the total is closed; the budget is returned when connections end."""

    async def main() -> None:
        async with serving(
            tmp_path,
            max_connections=4,
            max_backlog=8 << 20,  # each alone could hold 8 MiB...
            max_total_backlog=1 << 20,  # ...but the gateway holds 1 MiB in all
        ) as (server, path, handlers):
            clients = []
            for _ in range(3):
                client = await shm_connect(path, Echo, 2.0, ring_capacity=1 << 16)
                transport = client.transport
                assert isinstance(transport, ShmTransport)
                # This client stops reading.
                asyncio.get_running_loop().remove_reader(transport._in.doorbell_fd)
                clients.append(transport)
            for transport in clients:
                transport.send_stream_data(0, b"x" * (500 << 10))  # echoed: ~436 KiB backlog each
            ended = await asyncio.wait_for(
                asyncio.wait([h.ended for h in handlers], return_when=asyncio.FIRST_COMPLETED), 5
            )
            assert ended[0]
            await asyncio.sleep(0.1)
            closed = [h for h in handlers if h.ended.done()]
            assert len(closed) == 1  # the third one crossed the total; two fit under it
            assert closed[0].ended.result().error_code == 0x109
            assert 0 < server.backlog.used <= server.backlog.total
            for transport in clients:
                transport.abort()
            await wait_for(lambda: server.connections == 0)
            assert server.backlog.used == 0

    run(main, timeout=30)
