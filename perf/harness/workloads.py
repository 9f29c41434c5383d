"""Workload drivers shared by every system: each takes an adapter and returns a RunResult.

Every driver runs a warmup phase first (same code, results thrown away), then the
measured phase between ``Meter.start()`` and ``Meter.stop()``: latencies are
``time.perf_counter_ns`` differences kept raw, CPU is read around the measured
phase only.

- closed loop: ``in_flight`` workers each doing one operation after another;
- pub/sub closed loop: publish one record, wait until every subscriber has it,
  latency per delivery = receive time - send time (stamped in the payload);
- pub/sub open loop: records are due at fixed intervals from a start time and
  carry their *intended* send time (or the real one if the timer fired early);
  latency = receive time - intended time, so a stalled publisher or broker shows
  up in the tail (no coordinated omission);
- pub/sub max rate: publish as fast as the subscribers keep up, at most
  ``window`` records ahead of the slowest delivery count; deliveries per second;
- queue: publish with a broker ack, consume and ack, at most ``in_flight`` records
  between publish and consumption (each worker waits for its record to be consumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from perf.harness import cpu
from perf.harness.stats import RunResult, as_samples
from perf.harness.systems import PubSubRig, QueueRig

_HEAD = struct.Struct(">QQ")  # stamp (perf_counter_ns), sequence number
now_ns = time.perf_counter_ns


class Meter:
    """CPU of the client (this process) and the server around the measured phase."""

    def __init__(self, server_cpu: Callable[[], float | None]) -> None:
        self.server_cpu = server_cpu

    def start(self) -> None:
        self.c0 = cpu.client_cpu()
        self.s0 = self.server_cpu()
        self.t0 = now_ns()

    def stop(self, samples: Any, ops: int, end_ns: int | None = None, **extra: Any) -> RunResult:
        end = now_ns() if end_ns is None else end_ns
        c1, s1 = cpu.client_cpu(), self.server_cpu()
        return RunResult(
            samples=as_samples(samples),
            elapsed_s=(end - self.t0) / 1e9,
            ops=ops,
            cpu_client_s=c1 - self.c0,
            cpu_server_s=None if s1 is None or self.s0 is None else s1 - self.s0,
            extra=extra,
        )


def payload(size: int, stamp: int, seq: int) -> bytes:
    return _HEAD.pack(stamp, seq) + b"x" * (size - _HEAD.size)


# --- closed loop (cache, floor) -----------------------------------------------------------


async def closed_loop(
    op: Callable[[], Awaitable[object]], n: int, in_flight: int, warmup: int, meter: Meter
) -> RunResult:
    async def phase(count: int) -> list[int]:
        samples: list[int] = []
        per_worker = max(1, count // in_flight)

        async def worker() -> None:
            for _ in range(per_worker):
                t0 = now_ns()
                await op()
                samples.append(now_ns() - t0)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return samples

    await phase(warmup)
    meter.start()
    samples = await phase(n)
    return meter.stop(samples, len(samples))


# --- pub/sub ------------------------------------------------------------------------------


class _Deliveries:
    """Receives on every subscriber; counts and records latency from the stamp."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.count = 0
        self.last_ns = 0
        self.target = 0
        self.min_seq = 0
        self.done = asyncio.Event()
        self.progress = asyncio.Event()

    def reset(self, target: int, min_seq: int = 0) -> None:
        self.samples, self.count, self.target, self.min_seq = [], 0, target, min_seq
        self.done.clear()

    def on_message(self, data: bytes) -> None:
        t = now_ns()
        stamp, seq = _HEAD.unpack_from(data)
        if seq < self.min_seq:
            return
        self.samples.append(t - stamp)
        self.count += 1
        self.last_ns = t
        self.progress.set()
        if self.count >= self.target:
            self.done.set()


async def _wait(event: asyncio.Event, what: str, timeout: float = 10.0) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise TimeoutError(f"{what}: no delivery within {timeout} s") from None


async def _until(sink: _Deliveries, count: int, what: str) -> None:
    while sink.count < count:
        sink.progress.clear()
        await _wait(sink.progress, what)


class PubSubSession:
    """One subscribed topic on a rig, for the duration of one run."""

    def __init__(self, rig: PubSubRig, topic: str) -> None:
        self.rig, self.topic = rig, topic
        self.sink = _Deliveries()

    async def __aenter__(self) -> PubSubSession:
        await self.rig.subscribe(self.topic, [self.sink.on_message] * self.rig.fanout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.rig.unsubscribe()


async def pubsub_closed(
    rig: PubSubRig, topic: str, size: int, n: int, warmup: int, meter: Meter
) -> RunResult:
    async with PubSubSession(rig, topic) as s:
        sink, seq = s.sink, 0

        async def phase(count: int) -> None:
            nonlocal seq
            for _ in range(count):
                sink.reset(rig.fanout)
                seq += 1
                await rig.publish(topic, payload(size, now_ns(), seq))
                await _wait(sink.done, "pub/sub closed loop")
                all_samples.extend(sink.samples)

        all_samples: list[int] = []
        await phase(warmup)
        all_samples = []
        meter.start()
        await phase(n)
        return meter.stop(all_samples, len(all_samples))


async def pubsub_open(
    rig: PubSubRig, topic: str, size: int, rate: float, n: int, warmup: int, meter: Meter
) -> RunResult:
    """``warmup + n`` records due every 1/rate s; the first ``warmup`` are not measured."""
    async with PubSubSession(rig, topic) as s:
        sink = s.sink
        sink.reset(n * rig.fanout, min_seq=warmup)
        interval = 1e9 / rate
        lag: list[int] = []
        start = now_ns() + 1_000_000
        for i in range(warmup + n):
            due = start + int(i * interval)
            if i == warmup:
                meter.start()
                meter.t0 = due  # elapsed counts from the first measured record's due time
            t = now_ns()
            if due > t:
                await asyncio.sleep((due - t) / 1e9)
            # The loop's timers have millisecond resolution and may fire a little early:
            # a record sent before it was due is stamped with its real send time; a late
            # one keeps its due time, so the publisher's lateness counts in the latency.
            t = now_ns()
            lag.append(t - due)
            await rig.publish(topic, payload(size, min(due, t), i))
        with contextlib.suppress(TimeoutError):  # lost records are reported, not fatal
            await _wait(sink.done, "pub/sub open loop", timeout=10.0)
        lost = n * rig.fanout - sink.count
        lags = np.asarray(lag[warmup:], dtype=np.int64)
        return meter.stop(
            sink.samples,
            sink.count,
            end_ns=sink.last_ns,
            rate=rate,
            lost=lost,
            send_lag_p50_us=float(np.percentile(lags, 50)) / 1000,
            send_lag_p99_us=float(np.percentile(lags, 99)) / 1000,
        )


async def pubsub_max(
    rig: PubSubRig,
    topic: str,
    size: int,
    n: int,
    warmup: int,
    window: int,
    meter: Meter,
    batch: int = 0,
) -> RunResult:
    """Deliveries per second with at most ``window`` records per subscriber undelivered.

    ``batch`` > 0 publishes with ``rig.publish_batch`` (felix: one acked frame per batch).
    """
    async with PubSubSession(rig, topic) as s:
        sink, fanout, seq = s.sink, rig.fanout, 0

        async def phase(count: int) -> None:
            nonlocal seq
            sink.reset(count * fanout)
            sent = 0
            step = max(1, batch)
            while sent < count:
                await _until(sink, (sent + step - window) * fanout, "pub/sub max rate")
                k = min(step, count - sent)
                if batch:
                    t = now_ns()
                    items = [payload(size, t, seq + j + 1) for j in range(k)]
                    await rig.publish_batch(topic, items)
                else:
                    await rig.publish(topic, payload(size, now_ns(), seq + 1))
                seq += k
                sent += k
            await _wait(sink.done, "pub/sub max rate")

        await phase(warmup)
        meter.start()
        await phase(n)
        return meter.stop(sink.samples, sink.count, end_ns=sink.last_ns, window=window)


# --- queue --------------------------------------------------------------------------------


async def queue_run(
    rig: QueueRig,
    size: int,
    n: int,
    warmup: int,
    in_flight: int,
    meter: Meter,
    prefetch: int | None = None,
) -> RunResult:
    """Publish-with-ack, consume-with-ack, ``in_flight`` records end to end at a time.

    ``in_flight`` workers each publish one record (waiting for the broker's ack), then
    wait until the consumer has it before publishing the next: at most ``in_flight``
    records are between the start of their publish and their consumption, so a
    consumer slower than the publishers shows as lower throughput, not as a backlog
    growing through the run. Latency: publish start -> consumed (the consumer's ack
    is not on it). ``prefetch``: the consumer's window (default ``max(64, 4 *
    in_flight)``).
    """
    sink = _Deliveries()
    waiters: dict[int, asyncio.Future[None]] = {}

    def on_message(data: bytes) -> None:
        sink.on_message(data)
        fut = waiters.pop(_HEAD.unpack_from(data)[1], None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    await rig.start(on_message, prefetch=prefetch or max(64, 4 * in_flight))
    loop = asyncio.get_running_loop()
    seq = 0

    async def phase(count: int) -> None:
        nonlocal seq
        per_worker = max(1, count // in_flight)
        sink.reset(per_worker * in_flight)

        async def worker() -> None:
            nonlocal seq
            for _ in range(per_worker):
                seq += 1
                consumed = waiters[seq] = loop.create_future()
                await rig.publish(payload(size, now_ns(), seq))
                await consumed

        async def watchdog() -> None:
            # One timer for the phase, not one per record (wait_for costs client CPU).
            seen = -1
            while sink.count != seen:
                seen = sink.count
                await asyncio.sleep(10.0)
            raise TimeoutError(f"queue: nothing consumed for 10 s ({seen} of {sink.target})")

        workers = asyncio.gather(*(worker() for _ in range(in_flight)))
        guard = asyncio.create_task(watchdog())
        both: list[asyncio.Future[Any]] = [workers, guard]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if guard.done():
                workers.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await workers
                guard.result()  # raises the watchdog's TimeoutError
            await workers
        finally:
            guard.cancel()
        await _wait(sink.done, "queue")

    await phase(warmup)
    meter.start()
    await phase(n)
    return meter.stop(sink.samples, sink.count, end_ns=sink.last_ns)
