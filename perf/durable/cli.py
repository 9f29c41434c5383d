"""``python -m perf durable``: durable publish and replay, felix beside JetStream and RabbitMQ.

Starts one felix node per fsync policy (``commit``, ``interval``, ``none``; skipped
when this felix has no durable streams) and one in-memory node (the baseline),
probes NATS JetStream (file storage) and RabbitMQ (a durable quorum queue with
publisher confirms), tries a private nats-server with ``sync_interval: always``,
then runs ``--reps`` repetitions of: publish-with-ack at 1 and 64 in flight, 64 B
and 1 KiB (latency of each ack, acks/s); replay of a big stream from the earliest
record (records/s); fdatasync on this disk. Systems run back to back within a
repetition in a rotated order. Writes durable.json, durable.md, durable_latency.png
and durable_raw.npz to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from perf.durable import report
from perf.durable.base import DurableSystem, ReplaySource
from perf.durable.disk import DiskProbe, device_counters, fdatasync_run, idle_flushes
from perf.durable.felix import POLICIES, FelixDurable, supports_durable
from perf.durable.peers import (
    JetStreamFile,
    JetStreamSyncAlways,
    RabbitQuorum,
    ServerRefused,
    nats_binary,
)
from perf.harness.cli import Workload, _parse_topology, run_one
from perf.harness.stats import RunResult
from perf.harness.workloads import Meter, closed_loop

SIZES = {"64B": 64, "1KiB": 1024}
IN_FLIGHTS = (1, 64)
FAMILIES = ("publish", "replay", "disk")


@dataclass(frozen=True)
class Mode:
    reps: int
    n1: int  # acked publishes at 1 in flight
    n64: int  # acked publishes at 64 in flight
    warmup: int
    replay_bytes: int  # size of the replay stream
    disk_n: int  # fdatasync calls per size


MODES = {
    "quick": Mode(reps=3, n1=500, n64=5000, warmup=50, replay_bytes=64 * 2**20, disk_n=300),
    "full": Mode(reps=5, n1=2000, n64=20000, warmup=200, replay_bytes=2**30, disk_n=1000),
}


def parse_bytes(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1, "": 1}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    if unit not in units or not num.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16MiB, 1GiB)")
    return int(num) * units[unit]


class MeteredRun(Meter):
    """A Meter that also differences server and device counters around the run.

    felix nodes publish their children's counters once a second (the workers'
    stats interval), so a scrape may lag the run; after the run the scrape is
    repeated until it changes (at most ``STATS_WAIT`` s). The figures kept are
    ratios of counters from the same scrapes (acks per fsync, mean fsync time),
    which a lag does not skew; the window may also hold the warmup's fsyncs.
    """

    STATS_WAIT = 1.3

    def __init__(self, meter: Meter, system: DurableSystem, disk_dir: Path | None) -> None:
        super().__init__(meter.server_cpu)
        self.system, self.disk_dir = system, disk_dir

    def _device(self) -> dict[str, int]:
        return device_counters(self.disk_dir) if self.disk_dir is not None else {}

    def start(self) -> None:
        self.m0 = self.system.metrics()
        self.d0 = self._device()
        super().start()

    def stop(self, samples: Any, ops: int, end_ns: int | None = None, **extra: Any) -> RunResult:
        result = super().stop(samples, ops, end_ns, **extra)
        d1 = self._device()
        if d1 and self.d0:
            flushes = d1["dev_flushes"] - self.d0["dev_flushes"]
            result.extra.update(
                dev_flushes=flushes,
                dev_writes=d1["dev_writes"] - self.d0["dev_writes"],
                acks_per_dev_flush=ops / flushes if flushes else None,
            )
        m1 = self.system.metrics()
        if not m1:
            return result
        deadline = time.monotonic() + self.STATS_WAIT
        while time.monotonic() < deadline:  # between runs: blocking here times nothing
            time.sleep(0.1)
            fresh = self.system.metrics()
            if fresh != m1:
                m1 = fresh
                break
        fsyncs = m1.get("fsyncs", 0.0) - self.m0.get("fsyncs", 0.0)
        acks = m1.get("fsync_acks", 0.0) - self.m0.get("fsync_acks", 0.0)
        secs = m1.get("fsync_seconds", 0.0) - self.m0.get("fsync_seconds", 0.0)
        result.extra["fsyncs"] = int(fsyncs)
        if "disk_reads" in m1:
            result.extra["disk_reads"] = int(m1["disk_reads"] - self.m0.get("disk_reads", 0.0))
        if fsyncs > 0:
            result.extra.update(
                acks_per_fsync=acks / fsyncs if acks else None,
                fsync_mean_us=secs * 1e6 / fsyncs,
            )
        return result


class Context:
    def __init__(self) -> None:
        self.systems: dict[str, Any] = {}
        self.replays: dict[str, ReplaySource] = {}
        #: Everything started (nodes, servers), stopped at the end even if never probed.
        self.started: list[Any] = []
        #: A directory on the disk the felix nodes write to (device flush counters).
        self.disk_dir: Path | None = Path(tempfile.gettempdir())

    async def close(self) -> None:
        for src in self.replays.values():
            try:
                await src.close()
            except Exception as exc:  # closing is best effort; the run is over
                print(f"note: closing a replay stream: {exc!r}", flush=True)
        self.replays.clear()


def replay_records(system: DurableSystem, total: int, size: int) -> int:
    cap = system.replay_cap()
    return max(1, (min(total, cap) if cap else total) // size)


def build_workloads(args: argparse.Namespace, mode: Mode, ctx: Context) -> list[Workload]:
    out: list[Workload] = []
    durable = [n for n, s in ctx.systems.items() if isinstance(s, DurableSystem)]
    if "publish" in args.only:
        for inf in IN_FLIGHTS:
            n = max(20, int((mode.n1 if inf == 1 else mode.n64) * args.scale))
            warm = max(10, int(mode.warmup * args.scale))
            for size_name, size in SIZES.items():

                def run_pub(
                    sys_: DurableSystem, meter: Meter, inf: int = inf, size: int = size,
                    n: int = n, warm: int = warm,
                ) -> Any:  # fmt: skip
                    async def go() -> RunResult:
                        pub = await sys_.publisher(inf)
                        try:
                            body = b"p" * size
                            metered = MeteredRun(meter, sys_, ctx.disk_dir)
                            res = await closed_loop(
                                lambda: pub.publish(body), n, inf, warm, metered
                            )
                            res.extra.update(pub.details())
                            return res
                        finally:
                            await pub.close()

                    return go()

                out.append(
                    Workload(
                        f"durable.publish.{size_name}.if{inf}",
                        "publish",
                        f"publish {size_name} with ack, {inf} in flight",
                        durable,
                        {"size": size, "in_flight": inf, "n": n},
                        run_pub,
                    )
                )
    if "replay" in args.only:
        rsize = args.replay_record_bytes
        # One durable felix node is enough: the read path does not depend on the fsync
        # policy, and each replay stream costs its size in disk and fill time.
        felix_disk = [f"felix {p}" for p in POLICIES if f"felix {p}" in durable][:1]
        skipped = {f"felix {p}" for p in POLICIES} - set(felix_disk)
        names = [n for n in durable if ctx.systems[n].can_replay() and n not in skipped]

        def run_replay(sys_: DurableSystem, meter: Meter, size: int = rsize) -> Any:
            async def go() -> RunResult:
                src = ctx.replays.get(sys_.name)
                extra: dict[str, Any] = {}
                if src is None:
                    records = replay_records(sys_, args.replay_bytes, size)
                    t0 = time.perf_counter()
                    src = await sys_.replay_source(records, size)
                    # Registered first: closed (deleted) at the end if the run is
                    # interrupted; a failed fill is deleted now, the next repetition
                    # starts a new one.
                    ctx.replays[sys_.name] = src
                    try:
                        await src.fill()
                    except Exception:
                        del ctx.replays[sys_.name]
                        await src.close()
                        raise
                    extra["fill_records_per_s"] = records / (time.perf_counter() - t0)
                metered = MeteredRun(meter, sys_, ctx.disk_dir)
                metered.start()
                got = await src.read_all()
                res = metered.stop([], got)
                res.extra.update(
                    extra,
                    records=src.records,
                    mib_per_s=got * size / 2**20 / res.elapsed_s,
                )
                if got != src.records:
                    raise RuntimeError(f"replay read {got} of {src.records} records")
                return res

            return go()

        out.append(
            Workload(
                f"durable.replay.{rsize}B",
                "replay",
                f"replay from earliest, {rsize} B records, {args.replay_bytes / 2**20:g} MiB",
                names,
                {"record_bytes": rsize, "bytes": args.replay_bytes, "timeout": args.replay_timeout},
                run_replay,
            )
        )
    if "disk" in args.only and "fdatasync" in ctx.systems:
        out.append(
            Workload(
                "disk.idle",
                "disk",
                "device flushes while the benchmark sleeps (the machine's background)",
                ["fdatasync"],
                {"seconds": 1.0},
                lambda probe, meter: idle_flushes(probe, 1.0, meter),
            )
        )
        n = max(20, int(mode.disk_n * args.scale))
        cases = [(*kv, False) for kv in [*SIZES.items(), ("64KiB", 65536)]]
        cases.append(("64B", 64, True))
        for size_name, size, pre in cases:

            def run_disk(
                probe: DiskProbe, meter: Meter, size: int = size, n: int = n, pre: bool = pre
            ) -> Any:
                return fdatasync_run(probe, size, n, max(5, n // 10), meter, prealloc=pre)

            out.append(
                Workload(
                    f"disk.fdatasync.{size_name}{'.prealloc' if pre else ''}",
                    "disk",
                    f"{'write' if pre else 'append'} {size_name} + fdatasync"
                    + (" (preallocated file)" if pre else ""),
                    ["fdatasync"],
                    {"size": size, "n": n, "prealloc": pre},
                    run_disk,
                )
            )
    return [w for w in out if w.systems]


async def run_schedule(workloads: list[Workload], ctx: Context, reps: int, timeout: float) -> None:
    for rep in range(reps):
        print(f"repetition {rep + 1}/{reps}", flush=True)
        for wl in workloads:
            k = rep % len(wl.systems)
            for name in wl.systems[k:] + wl.systems[:k]:  # rotate: no system always first
                limit = max(timeout, float(wl.params.get("timeout", 0)))
                await run_one(wl, name, ctx.systems[name], limit)


@dataclass(frozen=True)
class Kinds:
    """The systems ``start_systems`` starts: felix policies and the peer classes.

    The durable benchmark uses the defaults; the queue benchmark (perf/queue/) passes
    subclasses that also hand out queue rigs, and only the durable policies.
    """

    policies: tuple[str, ...] = (*POLICIES, "memory")
    felix: Callable[..., FelixDurable] = FelixDurable
    jetstream: Callable[[str], JetStreamFile] = JetStreamFile
    jetstream_sync: Callable[[str], JetStreamSyncAlways] = JetStreamSyncAlways
    rabbitmq: Callable[[str], RabbitQuorum] = RabbitQuorum


async def start_systems(
    args: argparse.Namespace,
    ctx: Context,
    notes: dict[str, str],
    versions: dict[str, str],
    kinds: Kinds = Kinds(),
) -> None:
    topology = _parse_topology(args.topology) if args.topology else (None, None, False)
    wanted = set(args.systems) if args.systems else None
    policies = list(kinds.policies)
    if not supports_durable():
        for p in POLICIES:
            if p in policies:
                notes[f"felix {p}"] = (
                    "this felix has no durable streams (no `felix up --durable-streams`)"
                )
        policies = [p for p in policies if p == "memory"]
    candidates = ctx.started
    for p in policies:
        if wanted is None or f"felix {p}" in wanted:
            candidates.append(
                kinds.felix(
                    p, topology, args.fsync_interval_ms, getattr(args, "durable_replay_bytes", None)
                )
            )
    if args.nats != "off":
        candidates.append(kinds.jetstream(args.nats))
        if args.nats_sync_server != "off" and (wanted is None or "jetstream sync" in wanted):
            sync = kinds.jetstream_sync(args.nats_sync_server)
            candidates.append(sync)
            try:
                sync.start()
            except ServerRefused as exc:
                candidates.remove(sync)
                sync.stop()
                notes["jetstream sync"] = (
                    f"nats-server refused `jetstream {{ sync_interval: always }}`: {exc}; "
                    "JetStream has no per-stream sync setting, so only the default "
                    "(fsync every 2 min) is measured"
                )
    else:
        notes["jetstream"] = "skipped (--nats off)"
    if args.rabbitmq != "off":
        candidates.append(kinds.rabbitmq(args.rabbitmq))
    else:
        notes["rabbitmq"] = "skipped (--rabbitmq off)"
    for system in candidates:
        if wanted is not None and system.name not in wanted:
            system.stop()
            continue
        try:
            await asyncio.wait_for(system.probe(), 20)
            versions[system.name] = await system.version()
            ctx.systems[system.name] = system
        except Exception as exc:
            notes[system.name] = f"not reachable at {system.url}, skipped ({exc!r})"
            print(f"note: {system.name} {notes[system.name]}", flush=True)
            system.stop()
    if "disk" in args.only:
        ctx.systems["fdatasync"] = DiskProbe()


@dataclass
class Outcome:
    """What ``run_benchmark`` hands back for the report."""

    workloads: list[Workload]
    ctx: Context
    notes: dict[str, str]
    versions: dict[str, str]
    problems: dict[str, list[str]]
    elapsed: float


async def run_benchmark(
    args: argparse.Namespace,
    reps: int,
    build: Callable[[Context], list[Workload]],
    kinds: Kinds = Kinds(),
) -> Outcome:
    """Start the systems, build the workloads, run ``reps`` repetitions, stop everything.

    SIGTERM (e.g. `timeout`) and SIGINT cancel the run, so the finally below stops the
    felix nodes and the private nats-server instead of leaving them running.
    """
    t_start = time.monotonic()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if task is not None:
            loop.add_signal_handler(sig, task.cancel)
    ctx = Context()
    notes: dict[str, str] = {}
    versions: dict[str, str] = {}
    problems: dict[str, list[str]] = {}
    try:
        await start_systems(args, ctx, notes, versions, kinds)
        workloads = build(ctx)
        print(
            f"systems: {', '.join(ctx.systems)}; {len(workloads)} workloads x {reps} reps",
            flush=True,
        )
        await run_schedule(workloads, ctx, reps, args.timeout)
    finally:
        await ctx.close()
        for system in ctx.started:
            system.stop()  # idempotent; systems that failed their probe are stopped already
        for name, system in ctx.systems.items():
            system.stop()
            node = getattr(system, "node", None)
            if node is not None and node.problems:
                problems[name] = node.problems
    return Outcome(workloads, ctx, notes, versions, problems, time.monotonic() - t_start)


async def main_async(args: argparse.Namespace) -> int:
    mode = MODES[args.mode]
    if args.reps:
        mode = Mode(**{**mode.__dict__, "reps": args.reps})
    if args.replay_bytes is None:
        args.replay_bytes = mode.replay_bytes
    run = await run_benchmark(args, mode.reps, lambda ctx: build_workloads(args, mode, ctx))
    workloads, elapsed = run.workloads, run.elapsed
    disk = run.ctx.systems.get("fdatasync")
    data = report.build(
        workloads,
        report.metadata(args, mode.__dict__, run.ctx.systems, run.versions, run.notes, elapsed),
        run.problems,
        disk.filesystem() if isinstance(disk, DiskProbe) else {},
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_all(data, workloads, out, plots=not args.no_plots)
    if args.readme:
        report.update_readme(Path(args.readme), out)
    print()
    print((out / "durable.md").read_text())
    print(f"wrote {out}/durable.json, durable.md, durable_raw.npz and plot in {elapsed:.0f} s")
    return 0


def add_common_args(
    ap: argparse.ArgumentParser, modes: dict[str, Any], example: str, plot: str, markers: str
) -> None:
    """The options the durable and queue benchmarks share (modes, systems, peers, output)."""
    ap.add_argument("--mode", choices=sorted(modes), default="quick", help="quick (default), full")
    ap.add_argument("--full", dest="mode", action="store_const", const="full", help="--mode full")
    ap.add_argument("--reps", type=int, default=0, help="repetitions (mode default: 3 / 5)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the operation counts")
    ap.add_argument(
        "--systems",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=None,
        help=f"comma-separated system names to run (default: all), e.g. {example!r}",
    )
    ap.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL, or off")
    ap.add_argument(
        "--nats-sync-server",
        default=nats_binary(),
        help="nats-server binary to start privately with sync_interval: always, or off",
    )
    ap.add_argument(
        "--rabbitmq", default="amqp://guest:guest@127.0.0.1:5672/", help="AMQP URL, or off"
    )
    ap.add_argument(
        "--topology",
        default=None,
        help="felix nodes: GxS[e] (default: felix up's defaults, "
        "one gateway and one shard per core)",
    )
    ap.add_argument(
        "--fsync-interval-ms", type=int, default=None, help="felix interval nodes (default 100)"
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run before failing")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--no-plots", action="store_true", help=f"skip {plot}")
    ap.add_argument(
        "--readme",
        metavar="PATH",
        help=f"also paste the table into this file between its {markers} markers (perf/README.md)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m perf durable",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(
        ap, MODES, "felix commit,felix memory,rabbitmq", "durable_latency.png", "durable"
    )
    ap.add_argument(
        "--only",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=list(FAMILIES),
        help=f"comma-separated families: {','.join(FAMILIES)} (default: all)",
    )
    ap.add_argument(
        "--replay-bytes",
        type=parse_bytes,
        default=None,
        help="size of the replay stream (quick 64MiB, full 1GiB)",
    )
    ap.add_argument("--replay-record-bytes", type=int, default=1024, help="replay record size")
    ap.add_argument(
        "--durable-replay-bytes",
        default="8MiB",
        help="`felix up --replay-bytes` of the durable nodes: the in-memory hot tail per "
        "stream, kept small so a replay reads from disk in quick mode too (8MiB; the "
        "memory node keeps felix's default); 'default' for felix's default",
    )
    ap.add_argument(
        "--replay-timeout", type=float, default=900.0, help="seconds for a replay run and its fill"
    )
    args = ap.parse_args(argv)
    bad = set(args.only) - set(FAMILIES)
    if bad:
        ap.error(f"unknown families {sorted(bad)}; choose from {FAMILIES}")
    return args


def launch(
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace
) -> int:
    """Run a benchmark's ``main_async(args)`` on uvloop, from the repository root."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return uvloop.run(run(args))


def main(argv: list[str] | None = None) -> int:
    return launch(main_async, parse_args(argv))
