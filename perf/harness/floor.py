"""The floor: UDP, TCP and QUIC (qh3, felix's engine) echo between two processes, uvloop.

The echo server runs in a child process (``python -m perf.harness.floor KIND CERTDIR``,
which prints ``ready PORT``); the client lives in the harness process and is used
through the same closed-loop driver as the systems, so each floor figure reads
directly against felix and its peers.

Records are fixed-size; each carries a sequence number in its first 8 bytes, so UDP
replies are matched by it and TCP/QUIC replies (one ordered byte stream) are
matched first-in first-out.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import uvloop

from perf.harness import cpu

_SEQ = struct.Struct(">Q")
KINDS = ("udp", "tcp", "quic")


# --- servers (child process) --------------------------------------------------------------


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


class _TcpEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _quic_server_protocol() -> type[Any]:
    from qh3.asyncio.protocol import QuicConnectionProtocol
    from qh3.quic.events import StreamDataReceived

    class QuicEcho(QuicConnectionProtocol):
        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, StreamDataReceived) and event.data:
                self._quic.send_stream_data(event.stream_id, event.data, False)
                self._transmit_soon()  # one transmit per loop tick, as felix does

    return QuicEcho


async def _serve(kind: str, certdir: Path) -> None:
    loop = asyncio.get_running_loop()
    port: int
    if kind == "udp":
        transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
    elif kind == "tcp":
        server = await loop.create_server(_TcpEcho, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        from qh3.asyncio.server import serve

        from felix.quic import load_engine
        from felix.tls import ensure_node_certificates

        certs = ensure_node_certificates(certdir, hostnames=["localhost"], ips=["127.0.0.1"])
        config = load_engine("qh3").server_configuration(certs)
        quic_server = await serve(
            "127.0.0.1", 0, configuration=config, create_protocol=_quic_server_protocol()
        )
        assert quic_server._transport is not None
        port = quic_server._transport.get_extra_info("sockname")[1]
    print(f"ready {port}", flush=True)
    await asyncio.Event().wait()


# --- clients (harness process) ------------------------------------------------------------


class EchoServer:
    """An echo server child process of one kind."""

    def __init__(self, kind: str, certdir: Path) -> None:
        self.kind = kind
        self.certdir = certdir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perf.harness.floor", kind, str(certdir)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            self.stop()
            raise RuntimeError(f"{kind} echo server did not start")
        self.port = int(line[1])

    def cpu(self) -> float:
        return cpu.total_cpu([self.proc.pid])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class EchoClient:
    """``await request()`` sends one record and returns when its echo is back."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._seq = 0
        self._pad = b"x" * (size - _SEQ.size)
        self._fifo: deque[asyncio.Future[None]] = deque()
        self._by_seq: dict[int, asyncio.Future[None]] = {}
        self._buf = bytearray()
        self._send: Any = None
        self._closer: Any = None

    def _record(self) -> tuple[int, bytes]:
        self._seq += 1
        return self._seq, _SEQ.pack(self._seq) + self._pad

    async def request(self) -> None:
        seq, data = self._record()
        fut = asyncio.get_running_loop().create_future()
        if self.kind == "udp":
            self._by_seq[seq] = fut
        else:
            self._fifo.append(fut)
        self._send(data)
        try:
            async with asyncio.timeout(2.0):  # a lost datagram must not hang the run
                await fut
        finally:
            self._by_seq.pop(seq, None)

    def _on_stream(self, data: bytes) -> None:
        self._buf += data
        n = len(self._buf) // self.size
        if n:
            del self._buf[: n * self.size]
            for _ in range(n):
                fut = self._fifo.popleft()
                if not fut.done():
                    fut.set_result(None)

    def _on_datagram(self, data: bytes) -> None:
        fut = self._by_seq.pop(_SEQ.unpack_from(data)[0], None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def open(self, kind: str, port: int, certdir: Path) -> None:
        self.kind = kind
        loop = asyncio.get_running_loop()
        client = self
        if kind == "udp":

            class Udp(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    client._on_datagram(data)

            transport, _ = await loop.create_datagram_endpoint(Udp, remote_addr=("127.0.0.1", port))
            self._send = transport.sendto
            self._closer = transport.close
        elif kind == "tcp":

            class Tcp(asyncio.Protocol):
                def data_received(self, data: bytes) -> None:
                    client._on_stream(data)

            tcp, _ = await loop.create_connection(Tcp, "127.0.0.1", port)
            tcp.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY (uvloop sets it too)
            self._send = tcp.write
            self._closer = tcp.close
        else:
            await self._open_quic(port, certdir)

    async def _open_quic(self, port: int, certdir: Path) -> None:
        from qh3.asyncio.client import connect
        from qh3.asyncio.protocol import QuicConnectionProtocol
        from qh3.quic.events import StreamDataReceived

        from felix.quic import load_engine

        client = self

        class Quic(QuicConnectionProtocol):
            def quic_event_received(self, event: Any) -> None:
                if isinstance(event, StreamDataReceived) and event.data:
                    client._on_stream(event.data)

        config = load_engine("qh3").client_configuration(
            ca_file=certdir / "ca-cert.pem", server_name="127.0.0.1"
        )
        ctx = connect("127.0.0.1", port, configuration=config, create_protocol=Quic)
        proto = await ctx.__aenter__()
        stream_id = proto._quic.get_next_available_stream_id()

        def send(data: bytes) -> None:
            proto._quic.send_stream_data(stream_id, data, False)
            proto._transmit_soon()

        async def close() -> None:
            await ctx.__aexit__(None, None, None)

        self._send = send
        self._closer = close

    async def close(self) -> None:
        if self._closer is not None:
            result = self._closer()
            if asyncio.iscoroutine(result):
                await result


def _x_has_ca(certdir: Path) -> bool:
    return (certdir / "ca-cert.pem").exists()


class FloorSystem:
    """An echo server of one kind as a "system" of the floor workloads."""

    workloads = frozenset({"floor"})

    def __init__(self, kind: str, certdir: Path) -> None:
        self.kind = kind
        self.name = f"{kind}-echo"
        self.certdir = certdir
        self.echo = EchoServer(kind, certdir)
        self.server = f"{kind} echo server (uvloop{', qh3' if kind == 'quic' else ''})"

    def server_cpu(self) -> float | None:
        return self.echo.cpu()

    async def client(self, size: int) -> EchoClient:
        client = EchoClient(size)
        await client.open(self.kind, self.echo.port, self.certdir)
        return client

    def stop(self) -> None:
        self.echo.stop()


if __name__ == "__main__":
    uvloop.run(_serve(sys.argv[1], Path(sys.argv[2])))
