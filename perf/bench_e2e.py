"""What end-to-end encryption costs: publish + receive with and without it, in one run.

    .venv/bin/python -m perf.bench_e2e                      # 64 B and 4 KiB, 5 repetitions
    .venv/bin/python -m perf.bench_e2e --sizes 64,1024,16384 --reps 3 --json out.json

One ``felix up`` node (1 gateway x 1 shard, in-memory streams). Two client pairs in
this process, made once: ``plain`` (no keys) and ``e2e`` (``E2EKeys``, AES-256-GCM),
each a publisher and a subscriber on its own stream. Each repetition runs, per payload
size, both modes back to back (the order swapped between repetitions):

A third mode, ``headers``, publishes plaintext with two headers the size of the e2e
ones: e2e records carry ``felix-e2e-key`` and ``felix-e2e-alg``, and a record with
headers takes a slower path in the broker than one without, so ``headers`` separates
that cost from the crypto's.

- closed loop: publish one record with ack, wait until the subscriber has it
  (``Message.data`` read, so the e2e subscriber decrypts); latency p50 and p99;
- max rate: ``publish_batch`` of 64 records, ``--batches`` of them, while the
  subscriber reads (``data``) every record; records/s and this process's CPU per
  record (the client side, where e2e does its work; the node's CPU per record too:
  the broker only carries 28 more bytes per record).

Also, without any I/O: seal and open of one record (``seal_record`` / ``open_record``,
what publish and receive add), microseconds each.

The machine is noisy (2 shared vCPUs): read the e2e/plain ratios, which come from the
same repetition, rather than absolute figures. No assertion on times anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import felix
from felix.client import E2EKeys
from felix.client._e2e import open_record, seal_record
from perf.harness.node import FelixNode

MODES = ("plain", "headers", "e2e")
#: ``headers``: plain records carrying two headers as large as the e2e ones, to tell
#: the cost of the headers (in the broker and on the wire) from the crypto's.
SAME_SIZE_HEADERS = {"felix-x2e-key": "bench", "felix-x2e-alg": "A256GCM"}
KEYS = E2EKeys({"bench": os.urandom(32)}, "bench")
BATCH = 64


@dataclass
class Sample:
    p50_us: float
    p99_us: float
    rate: float
    client_cpu_us: float
    node_cpu_us: float


@dataclass
class Results:
    samples: dict[tuple[int, str], list[Sample]] = field(default_factory=dict)

    def add(self, size: int, mode: str, sample: Sample) -> None:
        self.samples.setdefault((size, mode), []).append(sample)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Pair:
    """A publisher and a subscriber (one client) on one stream, both with or without keys."""

    def __init__(self, node: FelixNode, mode: str) -> None:
        self.node, self.mode = node, mode
        self.stream = f"bench-{mode}"
        self.headers = SAME_SIZE_HEADERS if mode == "headers" else None

    async def __aenter__(self) -> Pair:
        e2e = KEYS if self.mode == "e2e" else None
        self.client = await felix.connect(self.node.url, ca=self.node.ca, e2e=e2e)
        self.sub = self.client.subscribe(self.stream, credit=4096)
        await self.sub.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.close()
        await self.client.close()

    async def closed_loop(self, payload: bytes, n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            began = time.perf_counter()
            await self.client.publish(self.stream, payload, headers=self.headers)
            message = await self.sub.next(timeout=10)
            assert message.data == payload  # decrypted (e2e) and authenticated
            latencies.append((time.perf_counter() - began) * 1e6)
        return latencies

    async def max_rate(self, payload: bytes, batches: int) -> tuple[float, float, float]:
        """records/s, client CPU us per record, node CPU us per record."""
        total = batches * BATCH
        items = [payload] * BATCH
        cpu0, node0, began = time.process_time(), self.node.cpu(), time.perf_counter()

        async def receive() -> None:
            for _ in range(total):
                (await self.sub.next(timeout=10)).data  # noqa: B018

        reader = asyncio.create_task(receive())
        for _ in range(batches):
            await self.client.publish_batch(self.stream, items, headers=self.headers)
        await reader
        elapsed = time.perf_counter() - began
        client_cpu = time.process_time() - cpu0
        node_cpu = self.node.cpu() - node0
        return total / elapsed, client_cpu / total * 1e6, node_cpu / total * 1e6


def crypto_only(size: int, n: int = 5_000, rounds: int = 7) -> tuple[float, float]:
    """Microseconds per seal and per open of one ``size``-byte record, no I/O: the best
    of ``rounds`` (the machine is shared: the minimum is the least disturbed)."""
    payload = os.urandom(size)
    headers = {"kind": "bench"}
    sealed, hdrs = seal_record(KEYS, "default/default/bench", payload, headers)
    seal_us = open_us = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(n):
            sealed, hdrs = seal_record(KEYS, "default/default/bench", payload, headers)
        seal_us = min(seal_us, (time.perf_counter() - began) / n * 1e6)
        began = time.perf_counter()
        for _ in range(n):
            opened = open_record(KEYS, "bench", 0, "default/default/bench", sealed, hdrs)
        open_us = min(open_us, (time.perf_counter() - began) / n * 1e6)
    assert opened.plaintext == payload
    return seal_us, open_us


async def run(args: argparse.Namespace) -> dict[str, Any]:
    node = FelixNode(gateways=1, shards=1)
    results = Results()
    try:
        async with (
            Pair(node, "plain") as plain,
            Pair(node, "headers") as headers,
            Pair(node, "e2e") as e2e,
        ):
            pairs = {"plain": plain, "headers": headers, "e2e": e2e}
            for size in args.sizes:  # warm-up: connections, streams, code paths
                for pair in pairs.values():
                    await pair.closed_loop(os.urandom(size), 200)
            for rep in range(args.reps):
                order = MODES[rep % 3 :] + MODES[: rep % 3]
                for size in args.sizes:
                    payload = os.urandom(size)
                    for mode in order:
                        pair = pairs[mode]
                        lat = await pair.closed_loop(payload, args.closed)
                        rate, client_cpu, node_cpu = await pair.max_rate(payload, args.batches)
                        results.add(
                            size,
                            mode,
                            Sample(
                                statistics.median(lat),
                                _quantile(lat, 0.99),
                                rate,
                                client_cpu,
                                node_cpu,
                            ),
                        )
                print(f"repetition {rep + 1}/{args.reps} done", flush=True)
    finally:
        node.stop()
    crypto = {size: crypto_only(size) for size in args.sizes}
    return {"results": results, "crypto": crypto, "node": node.label}


def _ratio_text(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(out: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    results: Results = out["results"]
    lines = [
        f"node {out['node']}, in-memory streams; {args.reps} repetitions; closed loop "
        f"{args.closed} records, max rate {args.batches} x {BATCH}-record batches",
        "",
        "| size | mode | p50 us | p99 us | records/s | client CPU us/rec | node CPU us/rec |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    doc: dict[str, Any] = {"node": out["node"], "reps": args.reps, "sizes": {}}
    for size in args.sizes:
        for mode in MODES:
            s = results.samples[(size, mode)]
            lines.append(
                f"| {size} | {mode} | {statistics.median(x.p50_us for x in s):.0f} "
                f"| {statistics.median(x.p99_us for x in s):.0f} "
                f"| {statistics.median(x.rate for x in s):.0f} "
                f"| {statistics.median(x.client_cpu_us for x in s):.1f} "
                f"| {statistics.median(x.node_cpu_us for x in s):.1f} |"
            )
    names = ("p50_us", "p99_us", "rate", "client_cpu_us", "node_cpu_us")
    for base in ("plain", "headers"):
        lines += [
            "",
            f"Same-run ratios e2e/{base} (per repetition, then median (min-max)):",
            "",
            "| size | p50 latency | p99 latency | records/s | client CPU/rec | node CPU/rec |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for size in args.sizes:
            before, e2e = results.samples[(size, base)], results.samples[(size, "e2e")]
            row = {
                name: [
                    getattr(b, name) / getattr(a, name) for a, b in zip(before, e2e, strict=True)
                ]
                for name in names
            }
            lines.append(f"| {size} | " + " | ".join(_ratio_text(row[n]) for n in names) + " |")
            entry = doc["sizes"].setdefault(str(size), {})
            entry[f"ratios_e2e_{base}"] = row
            entry[base] = [vars(x) for x in before]
            entry["e2e"] = [vars(x) for x in e2e]
            entry["seal_us"], entry["open_us"] = out["crypto"][size]
    lines += ["", "Without I/O (this process, one record, best of 7 rounds):", ""]
    lines += ["| size | seal us | open us |", "|---:|---:|---:|"]
    for size in args.sizes:
        seal_us, open_us = out["crypto"][size]
        lines.append(f"| {size} | {seal_us:.1f} | {open_us:.1f} |")
    return "\n".join(lines), doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf.bench_e2e", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--sizes", default="64,4096", help="payload sizes in bytes (comma-separated)"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--closed", type=int, default=1000, help="closed-loop records per run")
    parser.add_argument("--batches", type=int, default=200, help="max-rate batches per run")
    parser.add_argument("--json", type=Path, help="also write the samples and ratios here")
    args = parser.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    out = asyncio.run(run(args))
    text, doc = report(out, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
