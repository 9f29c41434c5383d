"""The peers: NATS JetStream file storage (nats-py) and a RabbitMQ quorum queue (aio-pika).

JetStream acks a publish once the record is in its file, i.e. handed to the kernel;
nats-server fsyncs on a timer (``sync_interval``, 2 minutes by default), so by default
its ack survives a crash of the server but not a power loss (like felix ``none`` /
``interval``). Newer servers take ``jetstream { sync_interval: always }``; this
benchmark starts a private nats-server with that setting and reports it when the
server refuses (JetStream has no per-stream sync setting).

A RabbitMQ quorum queue confirms a publish once its Raft log (WAL) holds it on a
majority; on one node that is after the WAL's fsync, which Ra batches across all
writers: the comparable promise to felix ``commit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from perf.durable.base import DurableSystem, Publisher, ReplaySource, unique
from perf.harness import cpu

#: JetStream replay: records the client may hold undelivered (nats-py's pending limit).
_PENDING = 1 << 20


class _ByAddress(DurableSystem):
    comm = "?"

    def __init__(self, url: str, default_port: int) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or default_port
        self._pids: list[int] | None = None

    def server_cpu(self) -> float | None:
        if self._pids is None:
            self._pids = cpu.server_pids(self.host, self.port, self.comm)
        return cpu.total_cpu(self._pids) if self._pids else None


# --- JetStream ----------------------------------------------------------------------------


class _JsPublisher(Publisher):
    def __init__(self, conn: Any, stream: str, subject: str) -> None:
        self.conn, self.stream, self.subject = conn, stream, subject
        self.js = conn.jetstream()

    async def publish(self, data: bytes) -> None:
        await self.js.publish(self.subject, data)  # returns the PubAck

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_stream(self.stream)
        with contextlib.suppress(Exception):
            await self.conn.close()


class _JsReplay(ReplaySource):
    def __init__(self, conn: Any, stream: str, subject: str, records: int, size: int) -> None:
        self.conn, self.stream, self.subject = conn, stream, subject
        self.records, self.record_bytes = records, size
        self.js = conn.jetstream()

    async def fill(self) -> None:
        """Publish ``records`` records, 256 acks outstanding at most."""
        window = 256
        body = b"r" * self.record_bytes
        per, extra = divmod(self.records, window)

        async def worker(k: int) -> None:
            for _ in range(k):
                await self.js.publish(self.subject, body)

        await asyncio.gather(*(worker(per + (1 if i < extra else 0)) for i in range(window)))

    async def read_all(self) -> int:
        # An ordered push consumer: no acks, flow control and sequence checks by the
        # client; the server reads the stream's files from the first record.
        done = asyncio.Event()
        got = 0

        async def cb(msg: Any) -> None:
            nonlocal got
            got += 1
            if got >= self.records:
                done.set()

        sub = await self.js.subscribe(
            self.subject,
            cb=cb,
            ordered_consumer=True,
            pending_msgs_limit=_PENDING,
            pending_bytes_limit=1 << 30,
        )
        try:
            await done.wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return got

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_stream(self.stream)
        with contextlib.suppress(Exception):
            await self.conn.close()


class JetStreamFile(_ByAddress):
    """A JetStream stream with file storage on a running nats-server."""

    name = "jetstream"
    comm = "nats-server"
    promise = (
        "written to the server's file (kernel), fsync every sync_interval "
        "(default 2 min): survives kill -9 of the server, not power loss"
    )

    def __init__(self, url: str, name: str = "jetstream") -> None:
        super().__init__(url, 4222)
        self.name = name
        self.server = f"nats-server at {self.host}:{self.port} (JetStream, file storage)"

    async def _connect(self) -> Any:
        import nats

        return await nats.connect(
            self.url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False
        )

    async def probe(self) -> None:
        conn = await self._connect()
        try:
            await conn.jetstream().account_info()  # fails if the server runs without -js
        finally:
            await conn.close()

    async def version(self) -> str:
        conn = await self._connect()
        try:
            return f"nats-server {conn._server_info.get('version', '?')}"
        finally:
            await conn.close()

    async def _stream(self, **config: Any) -> tuple[Any, str, str]:
        """A new file-storage stream (``config``: more StreamConfig fields, e.g. retention)."""
        from nats.js.api import StorageType

        conn = await self._connect()
        stream = unique("perfdur")
        subject = f"{stream}.s"
        await conn.jetstream().add_stream(
            name=stream, subjects=[subject], storage=StorageType.FILE, **config
        )
        return conn, stream, subject

    async def publisher(self, in_flight: int) -> Publisher:
        return _JsPublisher(*await self._stream())

    async def replay_source(self, records: int, record_bytes: int) -> ReplaySource:
        return _JsReplay(*await self._stream(), records, record_bytes)


class JetStreamSyncAlways(JetStreamFile):
    """A private nats-server with ``jetstream { sync_interval: always }`` on a temporary dir.

    ``start()`` raises ``ServerRefused`` with the server's own message when this
    nats-server does not know the setting (before v2.10 it does not).
    """

    promise = "fsynced before the ack (sync_interval: always): survives power loss"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="perfdur-nats-"))
        self.proc: subprocess.Popen[bytes] | None = None
        super().__init__("nats://127.0.0.1:0", name="jetstream sync")

    def start(self) -> None:
        exe = shutil.which(self.binary)
        if exe is None:
            raise ServerRefused(f"{self.binary!r} not found")
        with socket.socket() as s:  # a free port (the server binds it a moment later)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = self.dir / "nats.conf"
        store = self.dir / "js"
        conf.write_text(
            f'listen: "127.0.0.1:{port}"\n'
            f'jetstream {{ store_dir: "{store}", sync_interval: always }}\n'
        )
        log = (self.dir / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log.close()
                text = (self.dir / "server.log").read_text(errors="replace").strip()
                # The server names its (temporary) config file: no machine paths in reports.
                text = text.replace(str(conf), "nats.conf")
                raise ServerRefused(text.splitlines()[-1] if text else "exited")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        log.close()
        self.url, self.port = f"nats://127.0.0.1:{port}", port
        self._pids = [self.proc.pid]
        self.server = f"nats-server (private, pid {self.proc.pid}) with sync_interval: always"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class ServerRefused(RuntimeError):
    """A peer server would not start with the settings the benchmark asked for."""


# --- RabbitMQ -----------------------------------------------------------------------------


class _RabbitPublisher(Publisher):
    def __init__(self, conn: Any, channel: Any, queue: Any) -> None:
        self.conn, self.channel, self.queue = conn, channel, queue

    async def publish(self, data: bytes) -> None:
        import aio_pika

        # On a confirming channel publish() returns once the broker confirmed.
        await self.channel.default_exchange.publish(
            aio_pika.Message(data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.queue.name,
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.queue.delete(if_unused=False, if_empty=False)
        with contextlib.suppress(Exception):
            await self.conn.close()


class RabbitQuorum(_ByAddress):
    name = "rabbitmq"
    comm = "beam.smp"
    promise = "in the quorum queue's Raft WAL, fsynced (Ra batches the fsyncs): power loss"

    def __init__(self, url: str) -> None:
        super().__init__(url, 5672)
        self.server = f"rabbitmq at {self.host}:{self.port} (durable quorum queue, confirms)"

    async def version(self) -> str:
        import aio_pika

        conn = await aio_pika.connect(self.url, timeout=5)
        try:
            props = conn.transport.connection.server_properties  # type: ignore[union-attr]
            version = props.get("version", b"?")
            if isinstance(version, bytes):
                version = version.decode()
            return f"rabbitmq {version}"
        finally:
            await conn.close()

    async def probe(self) -> None:
        import aio_pika

        conn = await aio_pika.connect(self.url, timeout=5)
        await conn.close()

    async def publisher(self, in_flight: int) -> Publisher:
        import aio_pika

        conn = await aio_pika.connect(self.url, timeout=5)
        channel = await conn.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            unique("perfdur-"), durable=True, arguments={"x-queue-type": "quorum"}
        )
        return _RabbitPublisher(conn, channel, queue)

    def can_replay(self) -> bool:
        # A queue is consumed, not replayed; a RabbitMQ *stream* would be the peer here.
        return False


def nats_binary() -> str:
    """The nats-server to start privately: $NATS_SERVER or the one on PATH."""
    return os.environ.get("NATS_SERVER", "nats-server")
