"""What encryption at rest costs: durable publish with and without it, in the same run.

``python -m perf.bench_encryption [--reps N] [--quick]``

Two parts, each repeated ``--reps`` times with encryption on and off interleaved (the
order alternates per repetition), so both sides see the same machine state; this
2-core machine is noisy, so it prints per-repetition ratios and their median and
range, never a timed assertion:

1. **The shard's write and read path** (no network): ``DurableStore.append`` of 64 B
   and 1 KiB records, one and 64 per call, to a real log on disk without fsync
   (``--fsync none``: what the CPU pays; an fsync would hide it), and decoding them
   back (``DiskLog.read`` + ``decode_record``, what a disk READ pays). Microseconds
   per record.
2. **End to end**: two ``felix up --durable-streams`` nodes, ``--encryption on`` and
   ``off``, publish with ack from the Python client, 1 and 64 in flight, 64 B and
   1 KiB, under ``--fsync none`` and ``commit``. Acks per second and median latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from felix.keys.kek import FileKeyEncryptionKey
from felix.keys.store import KeyStore
from felix.shard.durable import DiskSettings, DurableSettings, DurableStore
from felix.shard.log_format import decode_record

SIZES = {"64B": 64, "1KiB": 1024}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


# -- part 1: the shard's path ---------------------------------------------------------------


def _store(root: Path, encrypt: bool) -> DurableStore:
    keys = KeyStore(root / "keys", FileKeyEncryptionKey(os.urandom(32), "bench"))
    return DurableStore(
        DiskSettings(root=root / "streams", segment_bytes=1 << 30, encrypt=encrypt), keys=keys
    )


def shard_path(size: int, batch: int, records: int, encrypt: bool) -> tuple[float, float]:
    """(append, decode) microseconds per record."""
    with tempfile.TemporaryDirectory(prefix="felix-enc-") as tmp:
        store = _store(Path(tmp), encrypt)
        stream = store.open("acme/ns/s", DurableSettings(fsync="none"), 0)
        payloads = [os.urandom(size) for _ in range(batch)]
        headers = [{"trace": "abc123"} for _ in range(batch)]
        calls = records // batch
        t0 = time.perf_counter_ns()
        for i in range(calls):
            store.append(stream, i * batch, payloads, headers, 1_700_000_000_000_000 + i, 0.0)
        append_us = (time.perf_counter_ns() - t0) / 1e3 / (calls * batch)
        disk_log, keys = stream.log, store.keys
        t0 = time.perf_counter_ns()
        offset, n = 0, 0
        while offset < calls * batch:
            got = disk_log.read(offset, 4096, 1 << 20)
            for rec in got:
                decode_record(rec.payload, "acme/ns/s", rec.offset, rec.timestamp_us, keys)
            n += len(got)
            offset = got[-1].offset + 1
        decode_us = (time.perf_counter_ns() - t0) / 1e3 / n
        store.close()
    return append_us, decode_us


def part_one(reps: int, records: int) -> list[str]:
    lines = [
        "### The shard's path: append without fsync, and decode (us per record; "
        "ratio = on / off per repetition, median (min-max))",
        "",
        "| record | per call | append off | append on | append ratio | decode off | "
        "decode on | decode ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, size in SIZES.items():
        for batch in (1, 64):
            got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for rep in range(reps):
                for encrypt in (rep % 2 == 0, rep % 2 == 1):
                    got[encrypt].append(shard_path(size, batch, records, encrypt))
            a_ratio = [on[0] / off[0] for on, off in zip(got[True], got[False], strict=True)]
            d_ratio = [on[1] / off[1] for on, off in zip(got[True], got[False], strict=True)]
            lines.append(
                f"| {label} | {batch} | {statistics.median(x[0] for x in got[False]):.2f} | "
                f"{statistics.median(x[0] for x in got[True]):.2f} | {_spread(a_ratio)} | "
                f"{statistics.median(x[1] for x in got[False]):.2f} | "
                f"{statistics.median(x[1] for x in got[True]):.2f} | {_spread(d_ratio)} |"
            )
            print(lines[-1], flush=True)
    return lines


# -- part 2: end to end ------------------------------------------------------------------------


async def _publish_run(url: str, ca: str, size: int, in_flight: int, n: int) -> tuple[float, float]:
    """(acks/s, median latency in us) of ``n`` publishes with ack, ``in_flight`` at once."""
    import felix

    payload = os.urandom(size)
    async with felix.connect(url, ca=ca) as client:
        stream = f"bench-{size}-{in_flight}-{time.monotonic_ns()}"
        for _ in range(50):  # warm up (creates the stream and the tenant's data key)
            await client.publish(stream, payload)
        lat: list[int] = []

        async def worker(count: int) -> None:
            for _ in range(count):
                t0 = time.perf_counter_ns()
                await client.publish(stream, payload)
                lat.append(time.perf_counter_ns() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n // in_flight) for _ in range(in_flight)))
        elapsed = time.perf_counter() - t0
    return len(lat) / elapsed, statistics.median(lat) / 1e3


def _medians(got: dict[str, list[tuple[float, float]]]) -> Callable[[str, int], float]:
    return lambda mode, i: statistics.median(x[i] for x in got[mode])


def part_two(reps: int, quick: bool) -> list[str]:
    from perf.harness.node import FelixNode

    lines = [
        "### End to end: publish with ack (Python client, one node per setting; "
        "ratio = on / off per repetition, median (min-max))",
        "",
        "| fsync | record | in flight | acks/s off | acks/s on | acks/s ratio | "
        "p50 us off | p50 us on | p50 ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy in ("none", "commit"):
        nodes = {
            mode: FelixNode(
                extra_args=["--durable-streams", "--fsync", policy, "--encryption", mode]
            )
            for mode in ("off", "on")
        }
        try:
            for label, size in SIZES.items():
                for in_flight in (1, 64):
                    n = (500 if in_flight == 1 else 4000) // (4 if quick else 1)
                    got: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
                    for rep in range(reps):
                        order = ("on", "off") if rep % 2 == 0 else ("off", "on")
                        for mode in order:
                            node = nodes[mode]
                            ca = node.info["ca"]
                            got[mode].append(
                                asyncio.run(_publish_run(node.url, ca, size, in_flight, n))
                            )
                    rate = [a[0] / b[0] for a, b in zip(got["on"], got["off"], strict=True)]
                    p50 = [a[1] / b[1] for a, b in zip(got["on"], got["off"], strict=True)]
                    med = _medians(got)
                    lines.append(
                        f"| {policy} | {label} | {in_flight} | {med('off', 0):.0f} | "
                        f"{med('on', 0):.0f} | {_spread(rate)} | {med('off', 1):.0f} | "
                        f"{med('on', 1):.0f} | {_spread(p50)} |"
                    )
                    print(lines[-1], flush=True)
        finally:
            for node in nodes.values():
                node.stop()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (5)")
    parser.add_argument("--records", type=int, default=20_000, help="part 1: records per run")
    parser.add_argument("--quick", action="store_true", help="fewer publishes per run")
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    args = parser.parse_args(argv)
    out: list[str] = []
    if args.part in ("1", "both"):
        out += [*part_one(args.reps, args.records), ""]
    if args.part in ("2", "both"):
        out += part_two(args.reps, args.quick)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
