"""What a cluster costs: throughput through 1, 2 and 3 `felix up --cluster` nodes beside a
standalone node, and the price of one REDIRECT, in one run.

    .venv/bin/python -m perf.bench_cluster                   # 5 repetitions, 3 s per run
    .venv/bin/python -m perf.bench_cluster --quick           # 3 repetitions, 1.5 s per run
    .venv/bin/python -m perf.bench_cluster --json out.json

Needs a PostgreSQL server (``--pg``, default ``$FELIX_TEST_PG`` or the local one the
tests use): the benchmark creates a database for the cluster and drops it afterwards.

Nodes: a standalone node (``baseline``: no ``--cluster``, the same flags otherwise) runs
all along; the cluster grows from 1 to 2 to 3 nodes on one database (each 1 gateway x 2
shards, embedded topology, 256 logical shards; its certificate from one CA). At each size,
once the shards have settled, every repetition runs, in an order rotated between
repetitions, the baseline and the cluster through one client each, made once per size
and warmed (the cluster's client was given node n0's address and holds the shard map,
so every request goes straight to its owner's node):

- cache gets: ``--workers`` tasks each getting keys of one cache spread over the
  logical shards (every node's), for ``--seconds``; gets/s;
- publishes with acks: the same over in-memory streams spread over the shards; acks/s.

Then the redirect cost, at 3 nodes: the latency of a cache get sent to a node that does
not own its key, which answers REDIRECT, and followed to the owner (the client's map
entry for that shard is pointed at the wrong node before each call, the connections
are warm), against the same get sent straight to the owner; p50 and p99 of
``--samples`` calls each, interleaved.

This machine has 2 shared vCPUs, and every node, the database and the client share
them: more nodes here measure the overhead of routing and of more processes on the same
cores, not scale-out. The client (one Python process) is also a bottleneck. Read the
cluster/baseline ratios, which come from the same repetition. No assertion on times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import felix
from felix.client import Client
from felix.tls import ensure_node_certificates
from perf.harness.node import FelixNode

L = 256
TENANT, NS = "default", "default"
NODE_ARGS = ["--topology", "embedded", "--gateways", "1", "--shards", "2"]
KEYS = 256  # cache keys and streams, spread over the logical shards


def shard(key: str) -> int:
    return zlib.crc32(key.encode()) % L


# -- the database ------------------------------------------------------------------------


def admin_dsn(arg: str | None) -> str:
    return arg or os.environ.get("FELIX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def create_db(admin: str) -> str:
    name = f"felix_bench_cluster_{os.getpid()}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return urlunsplit(urlsplit(admin)._replace(path="/" + name))


async def drop_db(admin: str, dsn: str) -> None:
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        name = urlsplit(dsn).path.lstrip("/")
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- nodes -------------------------------------------------------------------------------


def start_node(ca: Path, dsn: str | None, node_id: str | None = None) -> FelixNode:
    args = list(NODE_ARGS)
    if dsn is not None:
        args += ["--cluster", dsn, "--node-id", str(node_id), "--logical-shards", str(L)]
    return FelixNode(extra_args=args, ca_dir=ca)


def cluster_doc(node: FelixNode) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://{node.info['http']}/cluster", timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def wait_settled(nodes: list[FelixNode], timeout: float = 120) -> dict[str, Any]:
    """Until every node serves and sees every shard owned by a live node, none moving, each
    node owning some; the first node's /cluster."""
    from felix.cluster.placement import rendezvous_owner

    deadline = time.monotonic() + timeout
    while True:
        docs = [cluster_doc(n) for n in nodes]
        live = sorted(row[0] for row in docs[0]["nodes"] if row[3])
        ok = len(live) == len(nodes) and all(d.get("serving") for d in docs)
        ok = ok and all(
            row[0] == rendezvous_owner(i, live) and row[2] is None
            for i, row in enumerate(docs[0]["shards"])
        )
        ok = ok and all([r[0] for r in d["shards"]] == [r[0] for r in docs[0]["shards"]]
                        for d in docs)  # fmt: skip
        if ok:
            return docs[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not settle on {len(nodes)} nodes")
        time.sleep(0.2)


# -- workloads ---------------------------------------------------------------------------


async def connect(node: FelixNode, ca: Path) -> Client:
    client = await felix.connect(node.url, ca=str(ca / "ca-cert.pem"), request_timeout=10.0)
    cache = client.cache("bench")
    for i in range(KEYS):  # warm: every key and stream once (the map comes meanwhile)
        await cache.set(f"k{i}", b"v" * 16)
        await client.publish(f"s{i}", b"warm")
    for _ in range(100):
        if client.shard_map is not None or client.redirects == 0:
            break
        await asyncio.sleep(0.05)
    return client


async def rate(client: Client, op: str, workers: int, seconds: float) -> float:
    """Calls per second of ``op`` ("get" or "publish") by ``workers`` tasks."""
    cache = client.cache("bench")
    payload = b"x" * 64
    done = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.monotonic() < stop:
            if op == "get":
                await cache.get(f"k{i % KEYS}")
            else:
                await client.publish(f"s{i % KEYS}", payload)
            done += 1
            i += workers

    began = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return done / (time.monotonic() - began)


async def redirect_cost(client: Client, samples: int) -> dict[str, list[float]]:
    """Latencies (us) of a get that is redirected once, and of the same get sent straight
    to its owner, interleaved."""
    shard_map = client.shard_map
    assert shard_map is not None
    cache = client.cache("bench")
    out: dict[str, list[float]] = {"direct": [], "redirected": []}
    keys = []
    for i in range(KEYS):
        s = shard(f"{TENANT}/{NS}/bench/k{i}")
        owner = shard_map.owners[s]
        wrong = next(a for a in sorted(shard_map.addresses) if a != owner)
        keys.append((f"k{i}", s, owner, wrong))
    before = client.redirects
    for n in range(samples):
        key, s, owner, wrong = keys[n % len(keys)]
        began = time.perf_counter()
        await cache.get(key)
        out["direct"].append((time.perf_counter() - began) * 1e6)
        # Point this shard at another node (epoch 0: the REDIRECT's epoch wins again).
        shard_map.owners[s], shard_map.epochs[s] = wrong, 0
        began = time.perf_counter()
        await cache.get(key)
        out["redirected"].append((time.perf_counter() - began) * 1e6)
        assert shard_map.owners[s] == owner  # learnt back from the REDIRECT
    assert client.redirects - before == samples, "every tampered call followed one REDIRECT"
    return out


# -- report ------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def measure_size(
    baseline: Client, cluster: Client, reps: int, workers: int, seconds: float
) -> dict[str, dict[str, list[float]]]:
    """Per workload: the baseline's and the cluster's rates and their ratio, per rep."""
    out: dict[str, dict[str, list[float]]] = {}
    for op in ("get", "publish"):
        got: dict[str, list[float]] = {"baseline": [], "cluster": [], "ratio": []}
        for rep in range(reps):
            order = [("baseline", baseline), ("cluster", cluster)]
            if rep % 2:
                order.reverse()
            this: dict[str, float] = {}
            for name, client in order:
                this[name] = await rate(client, op, workers, seconds)
            got["baseline"].append(this["baseline"])
            got["cluster"].append(this["cluster"])
            got["ratio"].append(this["cluster"] / this["baseline"])
        out[op] = got
    return out


async def run_size(
    base: FelixNode, entry: FelixNode, ca: Path, size: int, args: Any, results: dict[str, Any]
) -> None:
    """The workloads at one cluster size (and the redirect cost at 3), printed."""
    b = await connect(base, ca)
    c = await connect(entry, ca)
    try:
        got = await measure_size(b, c, args.reps, args.workers, args.seconds)
        results["sizes"][size] = got
        held = "held" if c.shard_map else "none"
        print(f"(client: {c.redirects} redirects while warming, map {held}, "
              f"{c.connected} connections)")  # fmt: skip
        print("| workload | baseline: standalone node /s | cluster /s | cluster/baseline |")
        print("|---|---:|---:|---:|")
        for op, label in (("get", "cache get"), ("publish", "publish with ack")):
            g = got[op]
            print(f"| {label} | {spread(g['baseline'])} | {spread(g['cluster'])} | "
                  f"{spread(g['ratio'], '{:.2f}')} |")  # fmt: skip
        if size == 3:
            lat = await redirect_cost(c, args.samples)
            results["redirect"] = lat
            d, r = lat["direct"], lat["redirected"]
            print(f"\n## redirect cost (3 nodes, cache get, {args.samples} each, "
                  "interleaved; us)")  # fmt: skip
            print("| path | p50 | p99 |")
            print("|---|---:|---:|")
            print(f"| straight to the owner | {pct(d, 0.5):.0f} | {pct(d, 0.99):.0f} |")
            print(f"| to a non-owner, one REDIRECT, then the owner | "
                  f"{pct(r, 0.5):.0f} | {pct(r, 0.99):.0f} |")  # fmt: skip
            print(f"redirected/direct p50: {pct(r, 0.5) / pct(d, 0.5):.2f}")
    finally:
        await b.close()
        await c.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", help="admin DSN of the PostgreSQL server")
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 1.5 s")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.seconds, args.samples = 3, 1.5, 500
    admin = admin_dsn(args.pg)
    dsn = asyncio.run(create_db(admin))
    ca = Path(tempfile.mkdtemp(prefix="felix-bench-ca-"))
    ensure_node_certificates(ca, hostnames=["localhost"], ips=["127.0.0.1"])
    nodes: list[FelixNode] = []
    base: FelixNode | None = None
    results: dict[str, Any] = {"sizes": {}, "redirect": {}}
    print(f"# felix cluster benchmark: {os.cpu_count()} CPUs; {args.reps} repetitions of "
          f"{args.seconds:g} s, {args.workers} concurrent calls, {KEYS} keys/streams")  # fmt: skip
    print("# 2 shared vCPUs: more nodes measure routing and process overhead, not scale-out.")
    try:
        base = start_node(ca, None)
        for size in (1, 2, 3):
            nodes.append(start_node(ca, dsn, f"n{size - 1}"))
            began = time.monotonic()
            doc = wait_settled(nodes)
            print(f"\n## {size} node(s): settled in {time.monotonic() - began:.1f} s, "
                  f"owned {doc['balance']['owned']}")  # fmt: skip

            asyncio.run(run_size(base, nodes[0], ca, size, args, results))
    finally:
        for node in [*reversed(nodes), *([base] if base else [])]:
            node.stop()
            if node.problems:
                print(f"node problems: {node.problems}", file=sys.stderr)
        asyncio.run(drop_db(admin, dsn))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
