"""`felix up --spin-us`: cache get latency and CPU with the spin off and on, in one run.

    .venv/bin/python perf/bench_spin.py [--spins 0,100,300] [--topology 1x2e]
                                        [--reps 4] [--seconds 2] [--in-flight 1]

Starts one felix node per spin setting (same topology; `e` = shards in the gateway),
then runs closed-loop cache gets of 64 B against each in turn, the order reversed every
other repetition, and prints per setting the median (min-max) over repetitions of p50,
p99, gets/s, and CPU per get of the client (this process) and of the node's processes.
The spin trades server CPU for the wake-up of a sleeping gateway or shard: read the
CPU column beside the latency ones, and only compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import numpy as np
import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf.harness.node import FelixNode


async def measure(node: FelixNode, seconds: float, in_flight: int) -> dict[str, float]:
    import felix

    client = await felix.connect(node.url, ca=node.ca, max_in_flight=max(256, in_flight))
    cache = client.cache("perf")
    await cache.set("k", b"x" * 64)
    samples: list[int] = []

    async def worker(end: float) -> None:
        while time.monotonic() < end:
            t = time.perf_counter_ns()
            await cache.get("k")
            samples.append(time.perf_counter_ns() - t)

    await worker(time.monotonic() + 0.5)  # warmup
    samples.clear()
    server0, client0, t0 = node.cpu(), time.process_time(), time.monotonic()
    await asyncio.gather(*(worker(t0 + seconds) for _ in range(in_flight)))
    elapsed, n = time.monotonic() - t0, len(samples)
    result = {
        "p50": float(np.percentile(samples, 50)) / 1e3,
        "p99": float(np.percentile(samples, 99)) / 1e3,
        "rate": n / elapsed,
        "client_cpu": (time.process_time() - client0) / n * 1e6,
        "server_cpu": (node.cpu() - server0) / n * 1e6,
    }
    await client.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spins", default="0,100,300", help="--spin-us values (0,100,300)")
    parser.add_argument("--topology", default="1x2e", help="GxS, e: embedded shards (1x2e)")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--in-flight", type=int, default=1)
    args = parser.parse_args()
    spins = [int(s) for s in args.spins.split(",")]
    g, s = args.topology.rstrip("e").split("x")
    embedded = args.topology.endswith("e")
    nodes = {
        spin: FelixNode(int(g), int(s), embedded=embedded, extra_args=["--spin-us", str(spin)])
        for spin in spins
    }

    async def run() -> dict[int, list[dict[str, float]]]:
        out: dict[int, list[dict[str, float]]] = {spin: [] for spin in spins}
        for rep in range(args.reps):
            for spin in spins if rep % 2 == 0 else spins[::-1]:
                out[spin].append(await measure(nodes[spin], args.seconds, args.in_flight))
        return out

    try:
        results = uvloop.run(run())
    finally:
        for node in nodes.values():
            node.stop()
    print(
        f"cache get 64 B, {args.in_flight} in flight, {args.topology}, {args.reps} reps "
        f"of {args.seconds} s: median (min-max)"
    )
    print("| spin us | p50 us | p99 us | gets/s | client CPU us/get | server CPU us/get |")
    print("|---|---|---|---|---|---|")
    for spin in spins:
        cells = []
        for key in ("p50", "p99", "rate", "client_cpu", "server_cpu"):
            values = [r[key] for r in results[spin]]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"| {spin} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
