"""The queue benchmark's systems: the durable benchmark's, each also handing out queue rigs.

A rig (``perf.harness.systems.QueueRig``) is one fresh queue: a publisher connection
whose ``publish`` returns once the broker acked the record, and a consumer on its own
connection that takes records and acks each one. The systems, their nodes and
servers, probes, versions, CPU and fsync counters are perf/durable's; this module
adds only the consume side:

- felix (``felix commit``, ``felix interval``): a stream on the node of that fsync
  policy, ``client.consume(stream, group, prefetch=N)``; each record is acked as it
  is taken, without waiting for the ack's confirmation before taking the next (acks
  of one loop tick leave as one ACK frame);
- RabbitMQ: a durable **quorum** queue (``x-queue-type: quorum``), persistent
  messages, publisher confirms, manual acks, ``basic.qos(prefetch_count=N)``;
- JetStream: a **work-queue** retention stream with file storage, a durable pull
  consumer with explicit acks and ``max_ack_pending=N``, fetching up to N at a time.

The peers' acks are fire-and-forget on the wire (AMQP ``basic.ack``, a JetStream
``+ACK`` publish), so felix's are not awaited one by one either; every system's
latency ends when the consumer has the record, before its ack.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from perf.durable.base import Publisher
from perf.durable.felix import FelixDurable
from perf.durable.peers import (
    JetStreamFile,
    JetStreamSyncAlways,
    RabbitQuorum,
    _JsPublisher,
    _RabbitPublisher,
)
from perf.harness.systems import OnMessage, QueueRig

#: The consumer group (felix) / durable consumer (JetStream) every rig uses.
GROUP = "perfq"


class _Rig(QueueRig):
    """A publisher from perf/durable plus a consumer task; counts what the consumer saw."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.task: asyncio.Task[None] | None = None
        self.consumed = 0
        self.redelivered = 0
        self.ack_errors: list[str] = []

    async def publish(self, data: bytes) -> None:
        await self.publisher.publish(data)

    def details(self) -> dict[str, Any]:
        """Facts for the report: what the acks said, redeliveries, failed acks."""
        return {
            **self.publisher.details(),
            "redelivered": self.redelivered,
            "ack_errors": len(self.ack_errors),
            **({"first_ack_error": self.ack_errors[0]} if self.ack_errors else {}),
        }

    async def _stop_consumer(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None

    async def close(self) -> None:
        await self._stop_consumer()
        await self.publisher.close()


# --- felix --------------------------------------------------------------------------------


class _FelixQueueRig(_Rig):
    def __init__(self, publisher: Any, consumer_client: Any) -> None:
        super().__init__(publisher)
        self.client = consumer_client
        self.stream: str = publisher.stream
        self.acks: set[asyncio.Future[None]] = set()

    def _acked(self, fut: asyncio.Future[None]) -> None:
        self.acks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            self.ack_errors.append(repr(fut.exception()))

    async def start(self, on_message: OnMessage, prefetch: int) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def consume() -> None:
            async with self.client.consume(self.stream, GROUP, prefetch=prefetch) as c:
                ready.set_result(None)
                async for msg in c:
                    on_message(msg.data)
                    self.consumed += 1
                    if msg.attempts > 1:
                        self.redelivered += 1
                    fut = asyncio.ensure_future(msg.ack())
                    self.acks.add(fut)
                    fut.add_done_callback(self._acked)

        self.task = asyncio.create_task(consume())
        done, _ = await asyncio.wait([self.task, ready], timeout=20, return_when="FIRST_COMPLETED")
        if ready not in done:
            await self._stop_consumer()
            raise RuntimeError(f"felix consume({self.stream!r}, {GROUP!r}) did not start")

    async def close(self) -> None:
        # Let the last acks be confirmed before the consumer leaves (else: LeaseLost).
        if self.acks:
            await asyncio.wait(list(self.acks), timeout=10)
        await self._stop_consumer()
        with contextlib.suppress(Exception):
            await self.client.close()
        await self.publisher.close()


class FelixQueue(FelixDurable):
    """A felix node of one fsync policy (``commit``, ``interval``); a stream + group per rig."""

    PROMISES = {
        "commit": "publish acked once fsynced (group commit); the group hands out only "
        "fsynced records; the consumer's ack is confirmed once the group's state file "
        "holds it, fsynced: survives power loss",
        "interval": "publish acked once written to the kernel, fsynced within the interval; "
        "consumer acks written to the group's state file: survives kill -9, not power loss",
    }

    def __init__(self, policy: str, *args: Any) -> None:
        super().__init__(policy, *args)
        self.promise = self.PROMISES.get(policy, self.promise)

    async def queue_rig(self, in_flight: int) -> _Rig:
        publisher = await self.publisher(in_flight)
        try:
            consumer = await self._connect()
        except BaseException:
            await publisher.close()
            raise
        return _FelixQueueRig(publisher, consumer)


# --- JetStream ----------------------------------------------------------------------------


class _JsQueueRig(_Rig):
    def __init__(self, publisher: _JsPublisher, consumer_conn: Any) -> None:
        super().__init__(publisher)
        self.conn = consumer_conn
        self.stream, self.subject = publisher.stream, publisher.subject

    async def start(self, on_message: OnMessage, prefetch: int) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        js = self.conn.jetstream()
        psub = await js.pull_subscribe(
            self.subject,
            durable=GROUP,
            stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=prefetch),
        )

        async def consume() -> None:
            while True:
                try:
                    msgs = await psub.fetch(prefetch, timeout=5)
                except TimeoutError:  # nats' TimeoutError is one: nothing came, ask again
                    continue
                for msg in msgs:
                    on_message(msg.data)
                    self.consumed += 1
                    if msg.metadata.num_delivered > 1:
                        self.redelivered += 1
                    try:
                        await msg.ack()  # a publish to the reply subject: not confirmed
                    except Exception as exc:
                        self.ack_errors.append(repr(exc))

        self.task = asyncio.create_task(consume())

    async def close(self) -> None:
        await self._stop_consumer()
        with contextlib.suppress(Exception):
            await self.conn.close()
        await self.publisher.close()  # deletes the stream


class _WorkQueue:
    """JetStream work-queue rigs for JetStreamFile and its private sync-always server."""

    async def queue_rig(self, in_flight: int) -> _Rig:
        from nats.js.api import RetentionPolicy

        assert isinstance(self, JetStreamFile)
        publisher = _JsPublisher(*await self._stream(retention=RetentionPolicy.WORK_QUEUE))
        try:
            conn = await self._connect()
        except BaseException:
            await publisher.close()
            raise
        return _JsQueueRig(publisher, conn)


class JetStreamQueue(_WorkQueue, JetStreamFile):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.server = (
            f"nats-server at {self.host}:{self.port} (JetStream work-queue stream, file "
            "storage, durable pull consumer, explicit acks, max_ack_pending)"
        )


class JetStreamSyncQueue(_WorkQueue, JetStreamSyncAlways):
    pass


# --- RabbitMQ -----------------------------------------------------------------------------


class _RabbitQueueRig(_Rig):
    def __init__(self, publisher: _RabbitPublisher, consumer_conn: Any) -> None:
        super().__init__(publisher)
        self.conn = consumer_conn
        self.queue_name: str = publisher.queue.name

    async def start(self, on_message: OnMessage, prefetch: int) -> None:
        channel = await self.conn.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(self.queue_name)  # passive: the publisher declared it

        async def handle(message: Any) -> None:
            on_message(message.body)
            self.consumed += 1
            if message.redelivered:
                self.redelivered += 1
            try:
                await message.ack()  # basic.ack: no reply in AMQP
            except Exception as exc:
                self.ack_errors.append(repr(exc))

        await queue.consume(handle, no_ack=False)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close()
        await self.publisher.close()  # deletes the queue


class RabbitQueue(RabbitQuorum):
    """A durable quorum queue per rig: confirms, persistent messages, manual acks, qos."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.server = (
            f"rabbitmq at {self.host}:{self.port} (durable quorum queue, persistent messages, "
            "publisher confirms, manual acks, prefetch)"
        )

    async def queue_rig(self, in_flight: int) -> _Rig:
        import aio_pika

        publisher = await self.publisher(in_flight)
        assert isinstance(publisher, _RabbitPublisher)
        try:
            conn = await aio_pika.connect(self.url, timeout=5)
        except BaseException:
            await publisher.close()
            raise
        return _RabbitQueueRig(publisher, conn)
