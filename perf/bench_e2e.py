"""End-to-end latency: felix beside Redis and NATS, through their Python clients, one run.

Measures, with 64-byte payloads, on this machine, under uvloop:

- cache get p50/p99 at 1 and at 32 requests in flight: felix ``cache.get`` beside
  Redis ``GET`` (redis.asyncio + hiredis);
- pub/sub publish-to-delivery p50/p99 at fanout 1 and 16 (one connection per
  subscriber): felix ``publish``/``subscribe`` beside NATS (nats-py).

felix runs as a real `felix up` process tree (port 0, temporary data dir), once
per topology (gateways x shards) given with ``--topologies``. Redis and NATS
are the machine's local servers (127.0.0.1:6379 and :4222). Each figure is
repeated ``--repeats`` times and printed as the median with the spread
(min..max) of the repeats, because this VM's numbers move by up to 1.7x.

    .venv/bin/python perf/bench_e2e.py [--topologies 1x1,2x2] [--repeats 3] [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import felix

PAYLOAD = 64
REDIS_URL = "redis://127.0.0.1:6379"
NATS_URL = "nats://127.0.0.1:4222"


@dataclass
class Result:
    p50_us: float
    p99_us: float
    rate: float  # operations (or deliveries) per second


def summarize(samples_ns: list[int], elapsed: float, ops: int) -> Result:
    samples_ns.sort()
    p50 = samples_ns[len(samples_ns) // 2] / 1000
    p99 = samples_ns[min(len(samples_ns) - 1, int(len(samples_ns) * 0.99))] / 1000
    return Result(p50, p99, ops / elapsed)


async def closed_loop(op: Callable[[], Awaitable[object]], n: int, in_flight: int) -> Result:
    """``in_flight`` workers each doing ``op`` back to back; latency per op."""
    samples: list[int] = []
    per_worker = max(1, n // in_flight)

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter_ns()
            await op()
            samples.append(time.perf_counter_ns() - t0)

    for _ in range(min(50, n)):  # warm up
        await op()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return summarize(samples, time.perf_counter() - start, len(samples))


def stamped() -> bytes:
    return time.perf_counter_ns().to_bytes(8, "big") + b"x" * (PAYLOAD - 8)


async def fanout_loop(
    publish: Callable[[bytes], Awaitable[object]],
    receivers: list[asyncio.Queue[bytes]],
    n: int,
) -> Result:
    """Publish one message at a time and wait until every subscriber has it."""
    samples: list[int] = []
    for _ in range(20):  # warm up
        await publish(stamped())
        for q in receivers:
            await q.get()
    start = time.perf_counter()
    for _ in range(n):
        await publish(stamped())
        for q in receivers:
            data = await q.get()
            samples.append(int.from_bytes(data[:8], "big"))
    elapsed = time.perf_counter() - start
    return Result(*_fanout_percentiles(samples), len(samples) / elapsed)


def _fanout_percentiles(stamps_delta: list[int]) -> tuple[float, float]:
    r = summarize(stamps_delta, 1.0, 1)
    return r.p50_us, r.p99_us


# --- felix --------------------------------------------------------------------------------


class FelixNode:
    def __init__(self, gateways: int, shards: int, embedded: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="felix-bench-"))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "felix.cli",
                "up",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--gateways",
                str(gateways),
                "--shards",
                str(shards),
                "--data-dir",
                str(self.dir / "data"),
                "--control",
                "127.0.0.1:0",
                *(["--embedded-shards"] if embedded else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        node_json = self.dir / "data" / "node.json"
        deadline = time.monotonic() + 60
        while not node_json.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("felix up did not start")
            time.sleep(0.05)
        info = json.loads(node_json.read_text())
        self.url = f"felix://{info['quic']}"
        self.ca = info["ca"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


async def felix_cache(node: FelixNode, n: int, in_flight: int) -> Result:
    async with felix.connect(node.url, ca=node.ca) as client:
        cache = client.cache("bench")
        await cache.set("key", b"v" * PAYLOAD)
        return await closed_loop(lambda: cache.get("key"), n, in_flight)


async def felix_fanout(node: FelixNode, n: int, fanout: int) -> Result:
    stream = f"bench-{fanout}-{time.monotonic_ns()}"
    pub = await felix.connect(node.url, ca=node.ca)
    subs = [await felix.connect(node.url, ca=node.ca) for _ in range(fanout)]
    queues: list[asyncio.Queue[bytes]] = [asyncio.Queue() for _ in subs]
    ready = asyncio.Event()
    started = 0

    async def consume(client: felix.Client, q: asyncio.Queue[bytes]) -> None:
        nonlocal started
        async with client.subscribe(stream) as sub:
            started += 1
            if started == fanout:
                ready.set()
            async for msg in sub:
                q.put_nowait(
                    (time.perf_counter_ns() - int.from_bytes(msg.data[:8], "big")).to_bytes(
                        8, "big"
                    )
                )

    tasks = [asyncio.create_task(consume(c, q)) for c, q in zip(subs, queues, strict=True)]
    await ready.wait()
    try:
        return await fanout_loop(lambda d: pub.publish(stream, d), queues, n)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in [pub, *subs]:
            await c.close()


# --- peers --------------------------------------------------------------------------------


async def redis_cache(n: int, in_flight: int) -> Result:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL, max_connections=in_flight)
    await client.set("bench:key", b"v" * PAYLOAD)
    try:
        return await closed_loop(lambda: client.get("bench:key"), n, in_flight)
    finally:
        await client.aclose()


async def nats_fanout(n: int, fanout: int) -> Result:
    import nats

    pub = await nats.connect(NATS_URL)
    subs = [await nats.connect(NATS_URL) for _ in range(fanout)]
    subject = f"bench.{fanout}.{time.monotonic_ns()}"
    queues: list[asyncio.Queue[bytes]] = [asyncio.Queue() for _ in subs]
    for client, q in zip(subs, queues, strict=True):

        async def on_msg(msg: object, q: asyncio.Queue[bytes] = q) -> None:
            data: bytes = msg.data  # type: ignore[attr-defined]
            q.put_nowait(
                (time.perf_counter_ns() - int.from_bytes(data[:8], "big")).to_bytes(8, "big")
            )

        await client.subscribe(subject, cb=on_msg)
        await client.flush()

    async def publish(data: bytes) -> None:
        await pub.publish(subject, data)
        await pub.flush()

    try:
        return await fanout_loop(publish, queues, n)
    finally:
        for c in [pub, *subs]:
            await c.close()


# --- driver -------------------------------------------------------------------------------


def fmt(results: list[Result]) -> str:
    p50 = [r.p50_us for r in results]
    p99 = [r.p99_us for r in results]
    rate = [r.rate for r in results]
    return (
        f"{statistics.median(p50):7.0f} ({min(p50):.0f}..{max(p50):.0f})"
        f" {statistics.median(p99):7.0f} ({min(p99):.0f}..{max(p99):.0f})"
        f" {statistics.median(rate):9.0f}/s"
    )


async def run_all(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"python {platform.python_version()}, uvloop {importlib.metadata.version('uvloop')}"
    )
    print(
        f"{PAYLOAD}-byte payloads; {args.n} operations per run; median (min..max) of "
        f"{args.repeats} runs; latencies in microseconds"
    )
    print()
    print(f"{'what':44} {'p50 us':>22} {'p99 us':>22} {'rate':>11}")
    rows: list[tuple[str, Callable[[], Awaitable[Result]]]] = [
        ("redis GET, 1 in flight", lambda: redis_cache(args.n, 1)),
        ("redis GET, 32 in flight", lambda: redis_cache(args.n * 4, 32)),
        ("nats pub->sub, fanout 1", lambda: nats_fanout(args.n, 1)),
        ("nats pub->sub, fanout 16", lambda: nats_fanout(args.n // 4, 16)),
    ]
    await _print_rows(rows, args.repeats)
    for topology in args.topologies.split(","):
        embedded = topology.endswith("e")
        gateways, shards = (int(x) for x in topology.removesuffix("e").split("x"))
        node = FelixNode(gateways, shards, embedded)
        try:
            rows = [
                (
                    f"felix {topology} cache get, 1 in flight",
                    functools.partial(felix_cache, node, args.n, 1),
                ),
                (
                    f"felix {topology} cache get, 32 in flight",
                    functools.partial(felix_cache, node, args.n * 4, 32),
                ),
                (
                    f"felix {topology} pub->sub, fanout 1",
                    functools.partial(felix_fanout, node, args.n, 1),
                ),
                (
                    f"felix {topology} pub->sub, fanout 16",
                    functools.partial(felix_fanout, node, args.n // 4, 16),
                ),
            ]
            await _print_rows(rows, args.repeats)
        finally:
            node.stop()


async def _print_rows(
    rows: list[tuple[str, Callable[[], Awaitable[Result]]]], repeats: int
) -> None:
    for name, bench in rows:
        try:
            results = [await bench() for _ in range(repeats)]
        except Exception as exc:  # a peer that is not running is reported, not fatal
            print(f"{name:44} unavailable: {exc!r}")
            continue
        print(f"{name:44} {fmt(results)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--topologies",
        default="1x1,2x2,1x2e",
        help="gateways x shards, comma separated; a trailing e hosts the shards in the "
        "gateway (--embedded-shards)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    uvloop.run(run_all(args))


if __name__ == "__main__":
    main()
