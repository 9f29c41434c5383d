"""``python -m perf``: felix beside Redis, NATS and RabbitMQ, with the machine's floor.

Starts a felix node on ephemeral ports, probes the peers (a peer that does not
answer is skipped with a note), then runs every workload ``--reps`` times. Within a
repetition the systems of a workload run back to back, in an order rotated per
repetition, so felix and its peers see the same machine (this VM is noisy).
Writes results.json, results.md and PNG plots to ``--out`` (and raw samples to
raw.npz), and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from felix.progress import progress
from perf.harness import report
from perf.harness.floor import KINDS, FloorSystem
from perf.harness.node import FelixNode
from perf.harness.stats import RunResult
from perf.harness.systems import (
    CacheClient,
    Felix,
    FelixShm,
    JetStream,
    Nats,
    PubSubRig,
    RabbitMQ,
    Redis,
    RedisUnix,
    System,
)
from perf.harness.workloads import (
    Meter,
    closed_loop,
    pubsub_closed,
    pubsub_max,
    pubsub_open,
    queue_run,
)

FAMILIES = ("floor", "cache", "pubsub", "queue", "knobs")
SIZES = {"64B": 64, "1KiB": 1024}


@dataclass(frozen=True)
class Mode:
    reps: int
    closed_n: int  # operations at 1 in flight
    pipelined_n: int  # operations at 32 in flight
    warmup: int
    pubsub_n: int  # records published, closed loop, fanout 1 (fanout 16: a quarter)
    open_s: float  # seconds of open-loop publishing
    max_n: int  # records, max-rate run, fanout 1 (fanout 16: a quarter)
    in_flights: tuple[int, ...]  # cache get 64 B and floor: throughput vs in-flight
    topologies: tuple[str, ...]  # knobs: gateways x shards [e = --embedded-shards]
    batches: tuple[int, ...]  # knobs: publish_batch sizes
    queue_n: int


MODES = {
    "quick": Mode(
        reps=3,
        closed_n=600,
        pipelined_n=3000,
        warmup=100,
        pubsub_n=300,
        open_s=0.5,
        max_n=3000,
        in_flights=(1, 32),
        topologies=("1x1", "1x1e"),
        batches=(1, 32),
        queue_n=300,
    ),
    "full": Mode(
        reps=5,
        closed_n=3000,
        pipelined_n=20000,
        warmup=300,
        pubsub_n=1500,
        open_s=3.0,
        max_n=20000,
        in_flights=(1, 4, 16, 32, 64),
        topologies=("1x1", "1x1e", "1x2", "2x1"),
        batches=(1, 8, 64, 256),
        queue_n=1500,
    ),
}


@dataclass
class Workload:
    id: str
    family: str
    title: str
    systems: list[str]
    params: dict[str, Any]
    run: Callable[[Any, Meter], Awaitable[RunResult]]
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)


class Context:
    """Systems and the connections kept open across repetitions."""

    def __init__(self) -> None:
        self.systems: dict[str, Any] = {}
        self.caches: dict[tuple[str, int], CacheClient] = {}
        self.rigs: dict[tuple[str, int], PubSubRig] = {}

    async def cache(self, system: System, in_flight: int) -> CacheClient:
        key = (system.name, in_flight)
        if key not in self.caches:
            self.caches[key] = await system.cache_client(in_flight)
        return self.caches[key]

    async def rig(self, system: System, fanout: int) -> PubSubRig:
        key = (system.name, fanout)
        if key not in self.rigs:
            self.rigs[key] = await system.pubsub_rig(fanout)
        return self.rigs[key]

    async def close(self) -> None:
        for c in self.caches.values():
            with contextlib.suppress(Exception):
                await c.close()
        for r in self.rigs.values():
            with contextlib.suppress(Exception):
                await r.close()
        self.caches.clear()
        self.rigs.clear()


#: Systems over the shared-memory transport (pub/sub: fanout 1 only).
SHM_SYSTEMS = ("felix-shm", "felix-shm 1x1e")


def _n(value: float, scale: float, floor: int = 20) -> int:
    return max(floor, int(value * scale))


def build_workloads(
    args: argparse.Namespace, mode: Mode, ctx: Context, felix_names: list[str]
) -> list[Workload]:
    s = args.scale
    warm = _n(mode.warmup, s, 10)
    out: list[Workload] = []
    fams = set(args.only)

    def systems_for(family: str, *peers: str) -> list[str]:
        return [x for x in ["felix", *peers] if x in ctx.systems]

    if "floor" in fams:
        floors = [f"{k}-echo" for k in KINDS if f"{k}-echo" in ctx.systems]
        for inf in mode.in_flights:
            n = _n(mode.closed_n if inf == 1 else mode.pipelined_n, s)

            def run_floor(sys_: FloorSystem, meter: Meter, inf: int = inf, n: int = n) -> Any:
                async def go() -> RunResult:
                    client = await sys_.client(64)
                    try:
                        return await closed_loop(client.request, n, inf, warm, meter)
                    finally:
                        await client.close()

                return go()

            out.append(
                Workload(
                    f"floor.echo.64B.if{inf}",
                    "floor",
                    f"echo 64 B, {inf} in flight",
                    floors,
                    {"size": 64, "in_flight": inf, "n": n},
                    run_floor,
                )
            )

    if "cache" in fams:
        for op in ("get", "set"):
            for size_name, size in SIZES.items():
                infs = mode.in_flights if (op, size) == ("get", 64) else (1, 32)
                for inf in infs:
                    n = _n(mode.closed_n if inf == 1 else mode.pipelined_n, s)

                    def run_cache(
                        sys_: System,
                        meter: Meter,
                        op: str = op,
                        size: int = size,
                        inf: int = inf,
                        n: int = n,
                    ) -> Any:
                        async def go() -> RunResult:
                            client = await ctx.cache(sys_, inf)
                            key, value = f"perf-{size}", b"v" * size
                            await client.set(key, value)
                            fn = (
                                (lambda: client.get(key))
                                if op == "get"
                                else (lambda: client.set(key, value))
                            )
                            return await closed_loop(fn, n, inf, warm, meter)

                        return go()

                    out.append(
                        Workload(
                            f"cache.{op}.{size_name}.if{inf}",
                            "cache",
                            f"cache {op} {size_name}, {inf} in flight",
                            systems_for(
                                "cache", "felix-shm", "felix-shm 1x1e", "redis", "redis-unix"
                            ),
                            {"op": op, "size": size, "in_flight": inf, "n": n},
                            run_cache,
                        )
                    )

    if "pubsub" in fams:
        for fanout in (1, 16):
            div = 1 if fanout == 1 else 4
            for size_name, size in SIZES.items():
                n = _n(mode.pubsub_n / div, s)

                def run_closed(
                    sys_: System, meter: Meter, fanout: int = fanout, size: int = size, n: int = n
                ) -> Any:
                    async def go() -> RunResult:
                        rig = await ctx.rig(sys_, fanout)
                        topic = f"perf-closed-{fanout}-{size}"
                        return await pubsub_closed(rig, topic, size, n, warm, meter)

                    return go()

                out.append(
                    Workload(
                        f"pubsub.closed.f{fanout}.{size_name}",
                        "pubsub",
                        f"pub/sub fanout {fanout} {size_name}, 1 in flight (closed loop)",
                        systems_for("pubsub", *(SHM_SYSTEMS if fanout == 1 else ()), "nats"),
                        {"fanout": fanout, "size": size, "n": n},
                        run_closed,
                    )
                )
            for size_name, size in SIZES.items():
                rate = args.rate / div
                n = _n(rate * mode.open_s * s, 1)
                warm_open = _n(rate * 0.1, 1, 5)

                def run_open(
                    sys_: System,
                    meter: Meter,
                    fanout: int = fanout,
                    size: int = size,
                    n: int = n,
                    rate: float = rate,
                    warm_open: int = warm_open,
                ) -> Any:
                    async def go() -> RunResult:
                        rig = await ctx.rig(sys_, fanout)
                        topic = f"perf-open-{fanout}-{size}"
                        return await pubsub_open(rig, topic, size, rate, n, warm_open, meter)

                    return go()

                out.append(
                    Workload(
                        f"pubsub.open.f{fanout}.{size_name}",
                        "pubsub",
                        f"pub/sub fanout {fanout} {size_name}, open loop {rate:g} msg/s",
                        systems_for("pubsub", *(SHM_SYSTEMS if fanout == 1 else ()), "nats"),
                        {"fanout": fanout, "size": size, "n": n, "rate": rate},
                        run_open,
                    )
                )
            n = _n(mode.max_n / div, s)

            def run_max(sys_: System, meter: Meter, fanout: int = fanout, n: int = n) -> Any:
                async def go() -> RunResult:
                    rig = await ctx.rig(sys_, fanout)
                    return await pubsub_max(
                        rig, f"perf-max-{fanout}", 64, n, warm, args.window, meter
                    )

                return go()

            out.append(
                Workload(
                    f"pubsub.max.f{fanout}.64B",
                    "pubsub",
                    f"pub/sub fanout {fanout} 64B, max deliveries/s (window {args.window})",
                    systems_for("pubsub", *(SHM_SYSTEMS if fanout == 1 else ()), "nats"),
                    {"fanout": fanout, "size": 64, "n": n, "window": args.window},
                    run_max,
                )
            )

    if "queue" in fams:
        for inf in (1, 32):
            n = _n(mode.queue_n * (1 if inf == 1 else 4), s)

            def run_queue(sys_: System, meter: Meter, inf: int = inf, n: int = n) -> Any:
                async def go() -> RunResult:
                    rig = await sys_.queue_rig()
                    try:
                        return await queue_run(rig, 64, n, warm, inf, meter)
                    finally:
                        await rig.close()

                return go()

            out.append(
                Workload(
                    f"queue.ack.64B.if{inf}",
                    "queue",
                    f"queue 64 B publish-with-ack + consume-with-ack, {inf} in flight "
                    "(transient references)",
                    [x for x in ["rabbitmq", "jetstream"] if x in ctx.systems],
                    {"size": 64, "in_flight": inf, "n": n},
                    run_queue,
                )
            )

    if "knobs" in fams:
        out += _knob_workloads(args, mode, ctx, felix_names, warm)
    return [w for w in out if w.systems]


def _knob_workloads(
    args: argparse.Namespace, mode: Mode, ctx: Context, felix_names: list[str], warm: int
) -> list[Workload]:
    s = args.scale
    out: list[Workload] = []
    n1, n32 = _n(mode.closed_n, s), _n(mode.pipelined_n, s)
    np_, nmax = _n(mode.pubsub_n, s), _n(mode.max_n, s)

    def cache_get(inf: int, n: int) -> Callable[[System, Meter], Any]:
        def run(sys_: System, meter: Meter) -> Any:
            async def go() -> RunResult:
                client = await ctx.cache(sys_, inf)
                await client.set("perf-64", b"v" * 64)
                return await closed_loop(lambda: client.get("perf-64"), n, inf, warm, meter)

            return go()

        return run

    def pub_closed(sys_: System, meter: Meter) -> Any:
        async def go() -> RunResult:
            rig = await ctx.rig(sys_, 1)
            return await pubsub_closed(rig, "perf-knob-closed", 64, np_, warm, meter)

        return go()

    def pub_max(batch: int) -> Callable[[System, Meter], Any]:
        def run(sys_: System, meter: Meter) -> Any:
            async def go() -> RunResult:
                rig = await ctx.rig(sys_, 1)
                topic = f"perf-knob-max-{batch}"
                window = max(args.window, 2 * batch)
                return await pubsub_max(rig, topic, 64, nmax, warm, window, meter, batch=batch)

            return go()

        return run

    out.append(
        Workload(
            "knobs.cache.get.64B.if1", "knobs", "cache get 64B, 1 in flight", felix_names,
            {"in_flight": 1}, cache_get(1, n1),
        )
    )  # fmt: skip
    out.append(
        Workload(
            "knobs.cache.get.64B.if32", "knobs", "cache get 64B, 32 in flight", felix_names,
            {"in_flight": 32}, cache_get(32, n32),
        )
    )  # fmt: skip
    out.append(
        Workload(
            "knobs.pubsub.closed.f1.64B", "knobs", "pub/sub fanout 1 64B, closed loop",
            felix_names, {"fanout": 1}, pub_closed,
        )
    )  # fmt: skip
    out.append(
        Workload(
            "knobs.pubsub.max.f1.64B", "knobs", "pub/sub fanout 1 64B, max deliveries/s",
            felix_names, {"fanout": 1, "batch": 0}, pub_max(0),
        )
    )  # fmt: skip
    for batch in mode.batches:
        out.append(
            Workload(
                f"knobs.pubsub.batch{batch}.f1.64B", "knobs",
                f"pub/sub fanout 1 64B, publish_batch({batch}) with ack, max deliveries/s",
                ["felix"], {"fanout": 1, "batch": batch}, pub_max(batch),
            )
        )  # fmt: skip
    return out


# --- running ------------------------------------------------------------------------------


async def run_one(wl: Workload, name: str, system: Any, timeout: float) -> None:
    meter = Meter(system.server_cpu)
    try:
        async with asyncio.timeout(timeout):
            result = await wl.run(system, meter)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        wl.errors.setdefault(name, []).append(msg)
        print(f"  {wl.id:34} {name:14} FAILED {msg}", flush=True)
        if os.environ.get("PERF_DEBUG"):
            traceback.print_exc()
        return
    wl.runs.setdefault(name, []).append(result)
    f = result.figures()
    p50, p99, thr = f["p50"], f["p99"], f["throughput"]
    print(
        f"  {wl.id:34} {name:14} p50 {p50 or 0:8.0f} us  p99 {p99 or 0:8.0f} us"
        f"  {thr or 0:9.0f}/s  n={result.ops}",
        flush=True,
    )


async def run_schedule(workloads: list[Workload], ctx: Context, reps: int, timeout: float) -> None:
    runs = reps * sum(len(wl.systems) for wl in workloads)
    with progress("benchmark runs", runs) as bar:
        for rep in range(reps):
            print(f"repetition {rep + 1}/{reps}", flush=True)
            for wl in workloads:
                k = rep % len(wl.systems)
                for name in wl.systems[k:] + wl.systems[:k]:  # rotate: no system always first
                    await run_one(wl, name, ctx.systems[name], timeout)
                    bar.advance()


def _parse_topology(text: str) -> tuple[int, int, bool]:
    embedded = text.endswith("e")
    g, sh = text.removesuffix("e").split("x")
    return int(g), int(sh), embedded


async def main_async(args: argparse.Namespace) -> int:
    mode = MODES[args.mode]
    if args.reps:
        mode = Mode(**{**mode.__dict__, "reps": args.reps})
    t_start = time.monotonic()
    ctx = Context()
    notes: dict[str, str] = {}
    nodes: list[FelixNode] = []
    floors: list[FloorSystem] = []
    private: list[RedisUnix] = []
    certdir = Path(tempfile.mkdtemp(prefix="perf-floor-"))
    versions: dict[str, str] = {}
    fams = set(args.only)
    try:
        g, sh, emb = _parse_topology(args.topology) if args.topology else (None, None, False)
        main_node = FelixNode(g, sh, emb)
        nodes.append(main_node)
        felix_sys = Felix(main_node)
        await felix_sys.probe()
        ctx.systems["felix"] = felix_sys
        versions["felix"] = await felix_sys.version()
        peers: list[System] = []
        for family, name, flag, url, cls in (
            ("cache", "redis", "redis", args.redis, Redis),
            ("pubsub", "nats", "nats", args.nats, Nats),
            ("queue", "rabbitmq", "rabbitmq", args.rabbitmq, RabbitMQ),
            ("queue", "jetstream", "nats", args.nats, JetStream),
        ):
            if family not in fams:
                continue
            if url == "off":
                notes[name] = f"skipped (--{flag} off)"
            else:
                peers.append(cls(url))
        for peer in peers:
            try:
                await asyncio.wait_for(peer.probe(), 10)
                versions[peer.name] = await peer.version()
                ctx.systems[peer.name] = peer
            except Exception as exc:
                notes[peer.name] = f"not reachable at {peer.url}, skipped ({exc!r})"
                print(f"note: {peer.name} {notes[peer.name]}", flush=True)
        if fams & {"cache", "pubsub"}:
            # The same node over shared memory, and Redis over its Unix socket. Beside
            # them, shm to a node whose gateway hosts its shard (no gateway-shard hop):
            # what the transport costs without the inter-process hop behind it.
            shm_nodes = [(main_node, "felix-shm")]
            main_embedded = bool(main_node.info.get("topology", {}).get("embedded_shards"))
            if args.shm_embedded and main_embedded:
                notes["felix-shm 1x1e"] = "skipped: the main node already hosts its shards"
            elif args.shm_embedded:
                embedded = FelixNode(1, 1, True)
                nodes.append(embedded)
                shm_nodes.append((embedded, "felix-shm 1x1e"))
            for node_, sysname in shm_nodes:
                try:
                    shm = FelixShm(node_)
                    shm.name = sysname
                    await shm.probe()
                    ctx.systems[sysname] = shm
                except Exception as exc:
                    notes[sysname] = f"skipped ({exc!r})"
                    print(f"note: {sysname} {notes[sysname]}", flush=True)
        if "cache" in fams:
            if args.redis_unix == "off":
                notes["redis-unix"] = "skipped (--redis-unix off)"
            else:
                try:
                    redis_unix = await RedisUnix.start(args.redis, args.redis_unix)
                    private.append(redis_unix)
                    await asyncio.wait_for(redis_unix.probe(), 10)
                    versions["redis-unix"] = await redis_unix.version()
                    ctx.systems["redis-unix"] = redis_unix
                except Exception as exc:
                    notes["redis-unix"] = f"skipped ({exc!r})"
                    print(f"note: redis-unix {notes['redis-unix']}", flush=True)
        if "floor" in fams:
            for kind in KINDS:
                fs = FloorSystem(kind, certdir)
                floors.append(fs)
                ctx.systems[fs.name] = fs
        felix_names = ["felix"]
        if "knobs" in fams:
            for topo in mode.topologies if args.topologies is None else args.topologies:
                g, sh, emb = _parse_topology(topo)
                node = FelixNode(g, sh, emb)
                nodes.append(node)
                sysname = f"felix {topo}"
                knob = Felix(node)
                knob.name = sysname
                ctx.systems[sysname] = knob
                felix_names.append(sysname)
        workloads = build_workloads(args, mode, ctx, felix_names)
        print(
            f"felix node: {main_node.url} ({main_node.label}); systems: "
            f"{', '.join(ctx.systems)}; {len(workloads)} workloads x {mode.reps} reps",
            flush=True,
        )
        await run_schedule(workloads, ctx, mode.reps, args.timeout)
    finally:
        await ctx.close()
        for node in nodes:
            node.stop()
        for fs in floors:
            fs.stop()
        for redis_unix in private:
            redis_unix.stop()
        import shutil

        shutil.rmtree(certdir, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    meta = report.metadata(args, mode.__dict__, ctx.systems, versions, notes, elapsed)
    meta["felix_node"] = {"label": main_node.label, "args": main_node.args}
    meta["felix_log_problems"] = {n.label: n.problems for n in nodes if n.problems}
    for label, lines in meta["felix_log_problems"].items():
        print(f"note: felix node {label} logged problems:\n  " + "\n  ".join(lines))
    data = report.build(workloads, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_all(data, workloads, out, plots=not args.no_plots)
    if args.readme:
        report.update_readme(Path(args.readme), out)
    print()
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, raw.npz and plots in {elapsed:.0f} s")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m perf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--mode", choices=sorted(MODES), default="quick", help="quick (default), full")
    ap.add_argument("--full", dest="mode", action="store_const", const="full", help="--mode full")
    ap.add_argument("--reps", type=int, default=0, help="repetitions (mode default: 3 / 5)")
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply every operation count (e.g. 0.2)"
    )
    ap.add_argument(
        "--only",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=list(FAMILIES),
        help=f"comma-separated workload families: {','.join(FAMILIES)} (default: all)",
    )
    ap.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis URL, or off")
    ap.add_argument(
        "--redis-unix",
        default="auto",
        help="Redis Unix socket path; auto (default): the --redis server's socket if it has "
        "one, else a private redis-server started on a temporary socket; or off",
    )
    ap.add_argument(
        "--no-shm-embedded",
        dest="shm_embedded",
        action="store_false",
        help="skip the 'felix-shm 1x1e' system (shm to a second node with embedded shards)",
    )
    ap.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL, or off")
    ap.add_argument(
        "--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/", help="AMQP URL, or off"
    )
    ap.add_argument(
        "--topology",
        default=None,
        help="main felix node: GxS[e] (gateways x shards, e = --embedded-shards); "
        "default: felix up's defaults (one gateway and one shard per core)",
    )
    ap.add_argument(
        "--topologies",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=None,
        help="knob sweep nodes, comma-separated GxS[e] (mode default)",
    )
    ap.add_argument(
        "--rate", type=float, default=2000.0, help="open loop msg/s at fanout 1 (fanout 16: /4)"
    )
    ap.add_argument("--window", type=int, default=256, help="max-rate window (records)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per run before failing")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--readme",
        metavar="PATH",
        help="also paste the table into this Markdown file between its results markers "
        "(perf/README.md)",
    )
    args = ap.parse_args(argv)
    bad = set(args.only) - set(FAMILIES)
    if bad:
        ap.error(f"unknown families {sorted(bad)}; choose from {FAMILIES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    return uvloop.run(main_async(args))
