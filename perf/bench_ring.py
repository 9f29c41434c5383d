"""Benchmark felix's shared-memory ring against os.pipe, between two processes.

    .venv/bin/python perf/bench_ring.py [--repeat N] [--quick]

Measures, each run in fresh forked processes, repeated N times:
  * one-way throughput of 64-byte records sent in batches of 256, unpinned: the ring
    (the consumer sleeps on the eventfd doorbell whenever it runs dry) against an
    os.pipe carrying length-prefixed records that the consumer splits into one
    memoryview each;
  * ping-pong round trips of one 64-byte record, two rings (one per direction):
    eventfd doorbells under uvloop (RingReader) against an os.pipe pair under uvloop
    (add_reader), with both processes pinned to one vCPU and then to two (waking a
    process on the other vCPU costs tens of us on this VM, so unpinned runs would mix
    two populations); and busy-polling rings against blocking os.pipe reads.
Every figure is printed beside its baseline from the same run, as min / median / max
over the repeats: this VM is noisy, compare within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import multiprocessing
import os
import platform
import select
import statistics
import struct
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import uvloop

from felix._ring import Ring
from felix.ring import RingReader, make_doorbell

CTX = multiprocessing.get_context("fork")
RECORD = bytes(range(64))
STOP = b"stop"
BATCH = 256
CAPACITY = 1 << 20
LENGTH = struct.Struct("<I")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
WARMUP = 100
Pipes = tuple[int, int, int, int]  # request read/write ends, reply read/write ends


def run_pair(
    first: Callable[..., None],
    first_args: tuple[Any, ...],
    second: Callable[..., None],
    second_args: tuple[Any, ...],
    parent_fds: tuple[int, ...] = (),
    cpus: tuple[int, int] | None = None,
) -> Any:
    """Run two functions in forked processes; `first` gets a Connection to send its result.

    parent_fds are closed in this process once the children hold them (pipe ends, so
    that EOF reaches the reader when the child's writer closes). cpus pins the two
    processes to those vCPUs; None leaves placement to the scheduler.
    """
    recv, send = CTX.Pipe(duplex=False)
    go = CTX.Event()
    cpu1, cpu2 = cpus if cpus is not None else (None, None)
    procs = [
        CTX.Process(target=_pinned, args=(cpu1, first, *first_args, go, send)),
        CTX.Process(target=_pinned, args=(cpu2, second, *second_args, go)),
    ]
    for proc in procs:
        proc.start()
    for fd in parent_fds:
        os.close(fd)
    time.sleep(0.05)  # both attached and waiting
    go.set()
    result = recv.recv()
    for proc in procs:
        proc.join(30)
        if proc.exitcode != 0:
            raise RuntimeError(f"{proc.name} failed with exit code {proc.exitcode}")
    return result


def _pinned(cpu: int | None, fn: Callable[..., None], *args: Any) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    fn(*args)


# --------------------------------------------------------------------------- one way


def ring_consumer(name: str, fd: int, count: int, go: Any, out: Connection) -> None:
    ring = Ring.attach(name, doorbell_fd=fd)
    go.wait()
    start = time.perf_counter()
    got = 0
    while got < count:
        views = ring.read_batch(1024)
        if views:
            got += len(views)
            del views
            ring.commit()
        elif ring.prepare_sleep():
            select.select([fd], [], [])
            ring.drain_doorbell()
    out.send(time.perf_counter() - start)
    ring.close()


def ring_producer(name: str, fd: int, count: int, go: Any) -> None:
    ring = Ring.attach(name, doorbell_fd=fd)
    batch = [RECORD] * BATCH
    go.wait()
    sent = 0
    while sent < count:
        written = ring.write_batch(batch)
        sent += written
        if written < BATCH:
            os.sched_yield()  # full: let the consumer run (a full ring never blocks)
    ring.close()


def ring_one_way(count: int) -> float:
    fd = make_doorbell()
    try:
        with Ring.create(capacity=CAPACITY, doorbell_fd=fd) as ring:
            args = (ring.name, fd, count)
            elapsed: float = run_pair(ring_consumer, args, ring_producer, args)
            return count / elapsed
    finally:
        os.close(fd)


def pipe_consumer(rfd: int, wfd: int, count: int, go: Any, out: Connection) -> None:
    os.close(wfd)
    unpack = LENGTH.unpack_from
    go.wait()
    start = time.perf_counter()
    got = 0
    rest = b""
    while got < count:
        chunk = os.read(rfd, CAPACITY)
        data = rest + chunk if rest else chunk
        view = memoryview(data)
        pos, end = 0, len(data)
        views = []
        while end - pos >= 4:
            (size,) = unpack(view, pos)
            if end - pos - 4 < size:
                break
            views.append(view[pos + 4 : pos + 4 + size])
            pos += 4 + size
        got += len(views)
        del views
        rest = bytes(view[pos:])
    out.send(time.perf_counter() - start)


def pipe_producer(rfd: int, wfd: int, count: int, go: Any) -> None:
    os.close(rfd)
    frame = (LENGTH.pack(len(RECORD)) + RECORD) * BATCH
    go.wait()
    sent = 0
    while sent < count:
        view = memoryview(frame)
        while view:
            view = view[os.write(wfd, view) :]
        sent += BATCH
    os.close(wfd)


def pipe_one_way(count: int) -> float:
    rfd, wfd = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(wfd, F_SETPIPE_SZ, CAPACITY)  # same buffer as the ring
    args = (rfd, wfd, count)
    elapsed: float = run_pair(pipe_consumer, args, pipe_producer, args, parent_fds=(rfd, wfd))
    return count / elapsed


# --------------------------------------------------------------------------- ping-pong


def ring_uvloop_pinger(
    names: tuple[str, str], fds: tuple[int, int], rounds: int, go: Any, out: Connection
) -> None:
    requests = Ring.attach(names[0], doorbell_fd=fds[0])
    replies = Ring.attach(names[1], doorbell_fd=fds[1])

    async def ping() -> list[int]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def on_batch(views: list[memoryview]) -> None:
            if not waiter.done():
                waiter.set_result(None)

        reader = RingReader(replies, on_batch)
        task = asyncio.create_task(reader.run())
        samples = []
        for _ in range(rounds):
            waiter = loop.create_future()
            start = time.perf_counter_ns()
            requests.write(RECORD)
            await waiter
            samples.append(time.perf_counter_ns() - start)
        requests.write(STOP)
        reader.stop()
        await task
        return samples

    go.wait()
    out.send(uvloop.run(ping()))


def ring_uvloop_echo(names: tuple[str, str], fds: tuple[int, int], rounds: int, go: Any) -> None:
    requests = Ring.attach(names[0], doorbell_fd=fds[0])
    replies = Ring.attach(names[1], doorbell_fd=fds[1])

    async def echo() -> None:
        reader: RingReader

        def on_batch(views: list[memoryview]) -> None:
            if views[-1] == STOP:
                reader.stop()
                return
            replies.write_batch(views)

        reader = RingReader(requests, on_batch)
        await reader.run()

    go.wait()
    uvloop.run(echo())


def ring_spin_pinger(
    names: tuple[str, str], fds: tuple[int, int], rounds: int, go: Any, out: Connection
) -> None:
    requests, replies = Ring.attach(names[0]), Ring.attach(names[1])  # no doorbells
    samples = []
    go.wait()
    for _ in range(rounds):
        start = time.perf_counter_ns()
        requests.write(RECORD)
        while not replies.read_batch():
            pass
        replies.commit()
        samples.append(time.perf_counter_ns() - start)
    requests.write(STOP)
    out.send(samples)


def ring_spin_echo(names: tuple[str, str], fds: tuple[int, int], rounds: int, go: Any) -> None:
    requests, replies = Ring.attach(names[0]), Ring.attach(names[1])
    go.wait()
    while True:
        views = requests.read_batch()
        if views:
            if views[-1] == STOP:
                break
            replies.write_batch(views)
            del views
            requests.commit()


def ring_ping_pong(
    pinger: Callable[..., None], echo: Callable[..., None], rounds: int, cpus: tuple[int, int]
) -> list[int]:
    fds = (make_doorbell(), make_doorbell())
    try:
        with (
            Ring.create(capacity=1 << 16, doorbell_fd=fds[0]) as requests,
            Ring.create(capacity=1 << 16, doorbell_fd=fds[1]) as replies,
        ):
            args = ((requests.name, replies.name), fds, rounds)
            samples: list[int] = run_pair(pinger, args, echo, args, cpus=cpus)
            return samples
    finally:
        for fd in fds:
            os.close(fd)


def pipe_uvloop_pinger(pipes: Pipes, rounds: int, go: Any, out: Connection) -> None:
    req_r, req_w, rep_r, rep_w = pipes
    os.close(req_r)
    os.close(rep_w)

    async def ping() -> list[int]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        pending = 0

        def on_readable() -> None:
            nonlocal pending
            pending -= len(os.read(rep_r, 65536))
            if pending <= 0 and not waiter.done():
                waiter.set_result(None)

        loop.add_reader(rep_r, on_readable)
        samples = []
        for _ in range(rounds):
            waiter = loop.create_future()
            pending = len(RECORD)
            start = time.perf_counter_ns()
            os.write(req_w, RECORD)
            await waiter
            samples.append(time.perf_counter_ns() - start)
        loop.remove_reader(rep_r)
        os.close(req_w)
        return samples

    go.wait()
    out.send(uvloop.run(ping()))


def pipe_uvloop_echo(pipes: Pipes, rounds: int, go: Any) -> None:
    req_r, req_w, rep_r, rep_w = pipes
    os.close(req_w)
    os.close(rep_r)

    async def echo() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            data = os.read(req_r, 65536)
            if not data:
                loop.remove_reader(req_r)
                done.set_result(None)
                return
            os.write(rep_w, data)

        loop.add_reader(req_r, on_readable)
        await done

    go.wait()
    uvloop.run(echo())


def pipe_blocking_pinger(pipes: Pipes, rounds: int, go: Any, out: Connection) -> None:
    req_r, req_w, rep_r, rep_w = pipes
    os.close(req_r)
    os.close(rep_w)
    samples = []
    go.wait()
    for _ in range(rounds):
        start = time.perf_counter_ns()
        os.write(req_w, RECORD)
        need = len(RECORD)
        while need:
            need -= len(os.read(rep_r, need))
        samples.append(time.perf_counter_ns() - start)
    os.close(req_w)
    out.send(samples)


def pipe_blocking_echo(pipes: Pipes, rounds: int, go: Any) -> None:
    req_r, req_w, rep_r, rep_w = pipes
    os.close(req_w)
    os.close(rep_r)
    go.wait()
    while data := os.read(req_r, 65536):
        os.write(rep_w, data)


def pipe_ping_pong(
    pinger: Callable[..., None], echo: Callable[..., None], rounds: int, cpus: tuple[int, int]
) -> list[int]:
    pipes = (*os.pipe(), *os.pipe())
    args = (pipes, rounds)
    samples: list[int] = run_pair(pinger, args, echo, args, parent_fds=pipes, cpus=cpus)
    return samples


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    """p50 and p99 in microseconds, after dropping the warm-up round trips."""
    ordered = sorted(samples_ns[WARMUP:])
    return ordered[len(ordered) // 2] / 1e3, ordered[int(len(ordered) * 0.99)] / 1e3


# --------------------------------------------------------------------------- report


class Comparison(NamedTuple):
    what: str
    felix: str
    felix_run: Callable[[], tuple[float, ...]]
    base: str
    base_run: Callable[[], tuple[float, ...]]
    figures: tuple[str, ...]  # what each number a run returns is
    targets: tuple[str, ...]


def comparisons(quick: bool) -> list[Comparison]:
    scale = 10 if quick else 1
    count = 3_000_000 // scale // BATCH * BATCH
    loop_rounds, spin_rounds = 3000 // scale + WARMUP, 30_000 // scale + WARMUP
    same, split = (0, 0), (0, 1)
    latency = ("p50, us", "p99, us")
    return [
        Comparison(
            f"one way, {count:,} records, unpinned",
            "ring, batches of 256",
            lambda: (ring_one_way(count) / 1e6,),
            "os.pipe, length-prefixed",
            lambda: (pipe_one_way(count) / 1e6,),
            ("M records/s",),
            (">= 2 M/s",),
        ),
        Comparison(
            "ping-pong, one vCPU",
            "ring + eventfd, uvloop",
            lambda: percentiles(
                ring_ping_pong(ring_uvloop_pinger, ring_uvloop_echo, loop_rounds, same)
            ),
            "os.pipe, uvloop",
            lambda: percentiles(
                pipe_ping_pong(pipe_uvloop_pinger, pipe_uvloop_echo, loop_rounds, same)
            ),
            latency,
            ("<= pipe", "<= pipe"),
        ),
        Comparison(
            "ping-pong, two vCPUs",
            "ring + eventfd, uvloop",
            lambda: percentiles(
                ring_ping_pong(ring_uvloop_pinger, ring_uvloop_echo, loop_rounds, split)
            ),
            "os.pipe, uvloop",
            lambda: percentiles(
                pipe_ping_pong(pipe_uvloop_pinger, pipe_uvloop_echo, loop_rounds, split)
            ),
            latency,
            ("<= pipe", "<= pipe"),
        ),
        Comparison(
            "ping-pong, two vCPUs",
            "ring, busy-poll",
            lambda: percentiles(
                ring_ping_pong(ring_spin_pinger, ring_spin_echo, spin_rounds, split)
            ),
            "os.pipe, blocking",
            lambda: percentiles(
                pipe_ping_pong(pipe_blocking_pinger, pipe_blocking_echo, loop_rounds, split)
            ),
            latency,
            ("< 5 us", ""),
        ),
    ]


def machine_info() -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return [
        f"machine : {platform.node()}, {os.cpu_count()} vCPU, {model}",
        f"kernel  : {platform.system()} {platform.release()}",
        f"python  : {platform.python_implementation()} {sys.version.split()[0]}, "
        f"uvloop {version('uvloop')}, Cython {version('Cython')}, "
        f"posix_ipc {version('posix_ipc')}",
    ]


def spread(values: list[float], digits: str) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return " / ".join(format(v, digits) for v in (low, mid, high))


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the shared-memory ring.")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    parser.add_argument("--quick", action="store_true", help="a tenth of the work: smoke run")
    opts = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs at least two vCPUs")

    print("felix shared-memory ring vs os.pipe, between two forked processes")
    print("\n".join(machine_info()))
    print(
        f"settings: {len(RECORD)}-byte records, ring and pipe buffers {CAPACITY >> 10} KiB, "
        f"ping-pong rings 64 KiB, first {WARMUP} round trips dropped; {opts.repeat} runs "
        "of each, felix and baseline alternating; min / med / max over the runs"
    )
    started = time.perf_counter()
    header = ["measurement", "felix", "min / med / max", "baseline", "min / med / max"]
    rows = [[*header, "ratio", "target"]]
    for c in comparisons(opts.quick):
        felix: list[tuple[float, ...]] = []
        base: list[tuple[float, ...]] = []
        for _ in range(opts.repeat):
            felix.append(c.felix_run())
            base.append(c.base_run())
        for i, figure in enumerate(c.figures):
            f = [run[i] for run in felix]
            b = [run[i] for run in base]
            digits = ".2f" if figure == "M records/s" else ".1f"
            ratio = statistics.median(f) / statistics.median(b)
            rows.append(
                [
                    f"{c.what}: {figure}",
                    c.felix,
                    spread(f, digits),
                    c.base,
                    spread(b, digits),
                    f"{ratio:.2f}x",
                    c.targets[i],
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rows.insert(1, ["-" * w for w in widths])
    print()
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
