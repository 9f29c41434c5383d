"""One adapter per system behind a common async interface, used by the shared workloads.

- cache: ``await c.get(key)``, ``await c.set(key, value)`` (felix cache, Redis GET/SET);
- pub/sub: a rig of one publisher connection and ``fanout`` subscriber connections;
  ``await rig.subscribe(topic, callbacks)`` (one callback per subscriber, called
  with each payload), ``await rig.publish(topic, data)`` (fire and forget: felix
  ``ack=False``, NATS ``publish``), ``await rig.publish_batch(topic, items)``;
- queue: publish with a broker ack, consume with an ack: *transient* references only
  (a RabbitMQ transient queue, a JetStream memory stream); felix's queues need durable
  streams and are measured beside durable peers by ``python -m perf queue`` (perf/queue/).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from perf.harness import cpu
from perf.harness.node import FelixNode

OnMessage = Callable[[bytes], None]
_topics = itertools.count()


class CacheClient:
    async def get(self, key: str) -> object:
        raise NotImplementedError

    async def set(self, key: str, value: bytes) -> object:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class PubSubRig:
    fanout: int

    async def subscribe(self, topic: str, callbacks: Sequence[OnMessage]) -> None:
        raise NotImplementedError

    async def unsubscribe(self) -> None:
        raise NotImplementedError

    async def publish(self, topic: str, data: bytes) -> None:
        raise NotImplementedError

    async def publish_batch(self, topic: str, items: list[bytes]) -> None:
        for item in items:
            await self.publish(topic, item)

    async def close(self) -> None:
        raise NotImplementedError


class QueueRig:
    async def start(self, on_message: OnMessage, prefetch: int) -> None:
        raise NotImplementedError

    async def publish(self, data: bytes) -> None:
        """Publish and wait for the broker's ack."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class System:
    name = "?"
    url = "?"
    #: What the server side is, for the report.
    server = "?"
    workloads: frozenset[str] = frozenset()

    def server_cpu(self) -> float | None:
        """CPU seconds of the server's processes so far; None when they are not visible."""
        return None

    def topic(self) -> str:
        return f"perf-{next(_topics)}"

    async def probe(self) -> None:
        """Raise if the system cannot be reached."""

    async def version(self) -> str:
        return "?"

    async def cache_client(self, in_flight: int) -> CacheClient:
        raise NotImplementedError

    async def pubsub_rig(self, fanout: int) -> PubSubRig:
        raise NotImplementedError

    async def queue_rig(self) -> QueueRig:
        raise NotImplementedError


class _ServerByAddress(System):
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

    async def probe(self) -> None:
        _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 2.0)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# --- felix --------------------------------------------------------------------------------


class _FelixCache(CacheClient):
    def __init__(self, client: Any) -> None:
        self.client = client
        self.cache = client.cache("perf")

    async def get(self, key: str) -> object:
        return await self.cache.get(key)

    async def set(self, key: str, value: bytes) -> object:
        return await self.cache.set(key, value)

    async def close(self) -> None:
        await self.client.close()


class _FelixRig(PubSubRig):
    def __init__(self, pub: Any, subs: list[Any]) -> None:
        self.pub, self.subs, self.fanout = pub, subs, len(subs)
        self.tasks: list[asyncio.Task[None]] = []

    async def subscribe(self, topic: str, callbacks: Sequence[OnMessage]) -> None:
        loop = asyncio.get_running_loop()
        ready = [loop.create_future() for _ in self.subs]

        async def consume(client: Any, on_msg: OnMessage, ready: asyncio.Future[None]) -> None:
            async with client.subscribe(topic) as sub:
                ready.set_result(None)
                async for msg in sub:
                    on_msg(msg.data)

        self.tasks = [
            asyncio.create_task(consume(c, cb, r))
            for c, cb, r in zip(self.subs, callbacks, ready, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*ready), 20)

    async def unsubscribe(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pub.publish(topic, data, ack=False)

    async def publish_batch(self, topic: str, items: list[bytes]) -> None:
        await self.pub.publish_batch(topic, items)

    async def close(self) -> None:
        await self.unsubscribe()
        await asyncio.gather(*(c.close() for c in [self.pub, *self.subs]))


class Felix(System):
    name = "felix"
    workloads = frozenset({"cache", "pubsub"})

    def __init__(self, node: FelixNode) -> None:
        self.node = node
        self.server = f"felix up {' '.join(node.args)}"

    def server_cpu(self) -> float | None:
        return self.node.cpu()

    async def version(self) -> str:
        import felix

        return felix.__version__

    async def _connect(self, **kw: Any) -> Any:
        import felix

        return await felix.connect(self.node.url, ca=self.node.ca, **kw)

    async def probe(self) -> None:
        client = await self._connect()
        await client.close()

    async def cache_client(self, in_flight: int) -> CacheClient:
        return _FelixCache(await self._connect(max_in_flight=max(256, in_flight)))

    async def pubsub_rig(self, fanout: int) -> PubSubRig:
        # In waves: a gateway takes at most 64 unauthenticated connections per source
        # address (GatewayLimits.max_unauthenticated_per_source), and 65 handshakes at
        # once can all complete before the first authenticates.
        clients: list[Any] = []
        while len(clients) < fanout + 1:
            wave = min(32, fanout + 1 - len(clients))
            clients += await asyncio.gather(*(self._connect() for _ in range(wave)))
        return _FelixRig(clients[0], clients[1:])


class FelixShm(Felix):
    """The same node as ``felix``, reached over shared memory (felix+shm://, felix/shm)."""

    name = "felix-shm"
    workloads = frozenset({"cache", "pubsub"})

    def __init__(self, node: FelixNode) -> None:
        super().__init__(node)
        if not node.info.get("shm"):
            raise RuntimeError("the felix node serves no shm socket (--shm-socket off)")
        self.url = f"felix+shm://{node.info['shm']}"
        self.server = f"felix up {' '.join(node.args)} (shm socket)"

    async def _connect(self, **kw: Any) -> Any:
        import felix

        return await felix.connect(self.url, **kw)


# --- Redis --------------------------------------------------------------------------------


class _RedisCache(CacheClient):
    def __init__(self, client: Any) -> None:
        self.client = client

    async def get(self, key: str) -> object:
        return await self.client.get(key)

    async def set(self, key: str, value: bytes) -> object:
        return await self.client.set(key, value)

    async def close(self) -> None:
        await self.client.aclose()


class Redis(_ServerByAddress):
    name = "redis"
    comm = "redis-server"
    workloads = frozenset({"cache"})

    def __init__(self, url: str) -> None:
        super().__init__(url, 6379)
        self.server = f"redis-server at {self.host}:{self.port}"

    def _client(self, in_flight: int) -> Any:
        import redis.asyncio as redis

        return redis.Redis.from_url(self.url, max_connections=max(1, in_flight))

    async def version(self) -> str:
        client = self._client(1)
        try:
            info = await client.info("server")
            return f"redis-server {info.get('redis_version', '?')}"
        finally:
            await client.aclose()

    async def probe(self) -> None:
        await super().probe()
        client = self._client(1)
        try:
            await asyncio.wait_for(client.ping(), 2.0)
        finally:
            await client.aclose()

    async def cache_client(self, in_flight: int) -> CacheClient:
        return await _warm_redis_cache(self._client(in_flight), in_flight)


async def _warm_redis_cache(client: Any, in_flight: int) -> CacheClient:
    """A redis-py client as a CacheClient, its pool's connections opened before timing
    (redis-py opens them lazily)."""
    conns = [await client.connection_pool.get_connection() for _ in range(in_flight)]
    for c in conns:
        await client.connection_pool.release(c)
    return _RedisCache(client)


class RedisUnix(System):
    """Redis over a Unix socket: the machine's Redis if it serves one, else a private
    ``redis-server --port 0 --unixsocket ...`` started (and stopped) by the harness."""

    name = "redis-unix"
    workloads = frozenset({"cache"})

    def __init__(self, path: str, pid: int | None, proc: subprocess.Popen[bytes] | None) -> None:
        self.path = path
        self.url = f"unix://{path}"
        self._pid = pid
        self._proc = proc
        self.server = (
            f"private redis-server on {path}" if proc is not None else f"redis-server on {path}"
        )

    @classmethod
    async def start(cls, tcp_url: str, given: str) -> RedisUnix:
        """``given``: a socket path, or ``auto`` (the TCP Redis's socket, else a private one)."""
        if given != "auto":
            return cls(given, None, None)
        if tcp_url != "off":
            import redis.asyncio as redis

            client = redis.Redis.from_url(tcp_url)
            try:
                conf = await asyncio.wait_for(client.config_get("unixsocket"), 2.0)
                info = await client.info("server")
                path = conf.get("unixsocket") or ""
                if path and os.path.exists(path):
                    return cls(path, int(info.get("process_id", 0)) or None, None)
            except Exception:  # unreachable, or CONFIG refused: start a private one
                pass
            finally:
                await client.aclose()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server binary to start a private Unix-socket Redis")
        tmp = tempfile.mkdtemp(prefix="perf-redis-")
        path = os.path.join(tmp, "redis.sock")
        proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the private redis-server did not start")
            await asyncio.sleep(0.02)
        return cls(path, proc.pid, proc)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def server_cpu(self) -> float | None:
        return cpu.total_cpu([self._pid]) if self._pid else None

    def _client(self, in_flight: int) -> Any:
        import redis.asyncio as redis

        return redis.Redis(unix_socket_path=self.path, max_connections=max(1, in_flight))

    async def version(self) -> str:
        client = self._client(1)
        try:
            info = await client.info("server")
            return f"redis-server {info.get('redis_version', '?')} (unix socket)"
        finally:
            await client.aclose()

    async def probe(self) -> None:
        client = self._client(1)
        try:
            await asyncio.wait_for(client.ping(), 2.0)
        finally:
            await client.aclose()

    async def cache_client(self, in_flight: int) -> CacheClient:
        return await _warm_redis_cache(self._client(in_flight), in_flight)


# --- NATS ---------------------------------------------------------------------------------


class _NatsRig(PubSubRig):
    def __init__(self, pub: Any, subs: list[Any]) -> None:
        self.pub, self.subs, self.fanout = pub, subs, len(subs)
        self.handles: list[Any] = []

    async def subscribe(self, topic: str, callbacks: Sequence[OnMessage]) -> None:
        for client, on_msg in zip(self.subs, callbacks, strict=True):

            async def cb(msg: Any, on_msg: OnMessage = on_msg) -> None:
                on_msg(msg.data)

            # Generous pending limits: the max-rate run is windowed, nothing should drop.
            self.handles.append(
                await client.subscribe(
                    topic, cb=cb, pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30
                )
            )
        await asyncio.gather(*(c.flush() for c in self.subs))

    async def unsubscribe(self) -> None:
        for h in self.handles:
            with contextlib.suppress(Exception):
                await h.unsubscribe()
        self.handles = []

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pub.publish(topic, data)

    async def close(self) -> None:
        await self.unsubscribe()
        for c in [self.pub, *self.subs]:
            with contextlib.suppress(Exception):
                await c.close()


class Nats(_ServerByAddress):
    name = "nats"
    comm = "nats-server"
    workloads = frozenset({"pubsub"})

    def __init__(self, url: str) -> None:
        super().__init__(url, 4222)
        self.server = f"nats-server at {self.host}:{self.port}"

    async def _connect(self) -> Any:
        import nats

        return await nats.connect(
            self.url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False
        )

    async def version(self) -> str:
        client = await self._connect()
        try:
            return f"nats-server {client._server_info.get('version', '?')}"
        finally:
            await client.close()

    async def probe(self) -> None:
        await super().probe()
        client = await self._connect()
        await client.close()

    async def pubsub_rig(self, fanout: int) -> PubSubRig:
        clients = [await self._connect() for _ in range(fanout + 1)]
        return _NatsRig(clients[0], clients[1:])


class _JetStreamQueue(QueueRig):
    """A memory-storage JetStream stream; push consumer with explicit acks."""

    def __init__(self, nats_sys: JetStream) -> None:
        self.sys = nats_sys
        self.conns: list[Any] = []

    async def open(self) -> None:
        from nats.js.api import StorageType

        self.pub_conn = await self.sys._connect()
        self.sub_conn = await self.sys._connect()
        self.conns = [self.pub_conn, self.sub_conn]
        self.js_pub = self.pub_conn.jetstream()
        self.js_sub = self.sub_conn.jetstream()
        n = next(_topics)
        self.stream, self.subject = f"perfq{n}", f"perfq.{n}"
        await self.js_pub.add_stream(
            name=self.stream, subjects=[self.subject], storage=StorageType.MEMORY
        )

    async def start(self, on_message: OnMessage, prefetch: int) -> None:
        from nats.js.api import ConsumerConfig

        async def handle(msg: Any) -> None:
            on_message(msg.data)
            await msg.ack()

        await self.js_sub.subscribe(
            self.subject,
            cb=handle,
            manual_ack=True,
            stream=self.stream,
            config=ConsumerConfig(max_ack_pending=prefetch),
        )

    async def publish(self, data: bytes) -> None:
        await self.js_pub.publish(self.subject, data)  # waits for the PubAck

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.js_pub.delete_stream(self.stream)
        for c in self.conns:
            with contextlib.suppress(Exception):
                await c.close()


class JetStream(Nats):
    """NATS JetStream as a queue reference (same server as ``nats``)."""

    name = "jetstream"
    workloads = frozenset({"queue"})

    async def probe(self) -> None:
        await super().probe()
        client = await self._connect()
        try:
            await client.jetstream().account_info()  # fails if the server runs without -js
        finally:
            await client.close()

    async def queue_rig(self) -> QueueRig:
        rig = _JetStreamQueue(self)
        await rig.open()
        return rig


# --- RabbitMQ -----------------------------------------------------------------------------


class _RabbitQueue(QueueRig):
    def __init__(self, url: str) -> None:
        self.url = url
        self.conns: list[Any] = []

    async def open(self) -> None:
        import aio_pika

        self.pub_conn = await aio_pika.connect(self.url, timeout=5)
        self.sub_conn = await aio_pika.connect(self.url, timeout=5)
        self.conns = [self.pub_conn, self.sub_conn]
        self.pub_ch = await self.pub_conn.channel(publisher_confirms=True)
        self.sub_ch = await self.sub_conn.channel()
        self.queue_name = f"perf-{next(_topics)}"
        self.queue = await self.sub_ch.declare_queue(self.queue_name, auto_delete=True)

    async def start(self, on_message: OnMessage, prefetch: int) -> None:
        await self.sub_ch.set_qos(prefetch_count=prefetch)

        async def handle(message: Any) -> None:
            on_message(message.body)
            await message.ack()

        await self.queue.consume(handle)

    async def publish(self, data: bytes) -> None:
        import aio_pika

        await self.pub_ch.default_exchange.publish(
            aio_pika.Message(data), routing_key=self.queue_name
        )

    async def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                await c.close()


class RabbitMQ(_ServerByAddress):
    name = "rabbitmq"
    comm = "beam.smp"
    workloads = frozenset({"queue"})

    def __init__(self, url: str) -> None:
        super().__init__(url, 5672)
        self.server = f"rabbitmq at {self.host}:{self.port}"

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
        await super().probe()
        import aio_pika

        conn = await aio_pika.connect(self.url, timeout=5)
        await conn.close()

    async def queue_rig(self) -> QueueRig:
        rig = _RabbitQueue(self.url)
        await rig.open()
        return rig
