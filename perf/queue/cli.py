"""``python -m perf queue``: durable work queues end to end, felix beside RabbitMQ and JetStream.

Issue #13. Starts one felix node per fsync policy (``felix up --durable-streams
--fsync commit`` and ``--fsync interval``), probes RabbitMQ (a durable quorum queue,
persistent messages, publisher confirms, manual acks, prefetch) and NATS JetStream
(a work-queue stream with file storage, a durable pull consumer with explicit acks),
tries a private nats-server with ``sync_interval: always`` (perf/durable), then runs
``--reps`` repetitions of: publish with the broker's ack and consume with an ack at
1 and 32 publishes in flight, 64 B and 1 KiB. Latency is end to end: from the start
of the publish call to the consumer having the record. Systems run back to back
within a repetition in a rotated order; each run gets a fresh queue or stream.
Writes queue.json, queue.md, queue_latency.png and queue_raw.npz to ``--out``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf.durable.cli import (
    SIZES,
    Context,
    Kinds,
    MeteredRun,
    add_common_args,
    launch,
    run_benchmark,
)
from perf.harness.cli import Workload
from perf.harness.stats import RunResult
from perf.harness.workloads import Meter, queue_run
from perf.queue import report
from perf.queue.systems import FelixQueue, JetStreamQueue, JetStreamSyncQueue, RabbitQueue

IN_FLIGHTS = (1, 32)
#: felix's queues need durable streams: the two policies of the issue.
POLICIES = ("commit", "interval")
KINDS = Kinds(
    policies=POLICIES,
    felix=FelixQueue,
    jetstream=JetStreamQueue,
    jetstream_sync=JetStreamSyncQueue,
    rabbitmq=RabbitQueue,
)


@dataclass(frozen=True)
class Mode:
    reps: int
    n1: int  # records at 1 in flight
    n32: int  # records at 32 in flight
    warmup: int


MODES = {
    "quick": Mode(reps=3, n1=500, n32=5000, warmup=64),
    "full": Mode(reps=5, n1=2000, n32=20000, warmup=320),
}


def prefetch_for(in_flight: int) -> int:
    """The consumer's window (felix prefetch, AMQP qos, JetStream max_ack_pending)."""
    return max(64, 4 * in_flight)


def build_workloads(args: argparse.Namespace, mode: Mode, ctx: Context) -> list[Workload]:
    names = [n for n, s in ctx.systems.items() if hasattr(s, "queue_rig")]
    out: list[Workload] = []
    warm = max(32, int(mode.warmup * args.scale))
    for inf in IN_FLIGHTS:
        n = max(inf * 4, int((mode.n1 if inf == 1 else mode.n32) * args.scale))
        for size_name, size in SIZES.items():

            def run(sys_: Any, meter: Meter, inf: int = inf, size: int = size, n: int = n) -> Any:
                async def go() -> RunResult:
                    rig = await sys_.queue_rig(inf)
                    try:
                        metered = MeteredRun(meter, sys_, ctx.disk_dir)
                        res = await queue_run(
                            rig, size, n, warm, inf, metered, prefetch=prefetch_for(inf)
                        )
                        res.extra.update(rig.details(), consumed=rig.consumed)
                        return res
                    finally:
                        await rig.close()

                return go()

            out.append(
                Workload(
                    f"queue.e2e.{size_name}.if{inf}",
                    "queue",
                    f"queue {size_name}, {inf} in flight",
                    names,
                    {"size": size, "in_flight": inf, "n": n, "prefetch": prefetch_for(inf)},
                    run,
                )
            )
    return [w for w in out if w.systems]


async def main_async(args: argparse.Namespace) -> int:
    mode = MODES[args.mode]
    if args.reps:
        mode = Mode(**{**mode.__dict__, "reps": args.reps})
    run = await run_benchmark(args, mode.reps, lambda ctx: build_workloads(args, mode, ctx), KINDS)
    data = report.build(
        run.workloads,
        report.metadata(args, mode.__dict__, run.ctx.systems, run.versions, run.notes, run.elapsed),
        run.problems,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_all(data, run.workloads, out, plots=not args.no_plots)
    if args.readme:
        report.update_readme(Path(args.readme), out)
    print()
    print((out / "queue.md").read_text())
    print(f"wrote {out}/queue.json, queue.md, queue_raw.npz and plot in {run.elapsed:.0f} s")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m perf queue",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(ap, MODES, "felix commit,rabbitmq", "queue_latency.png", "queue")
    args = ap.parse_args(argv)
    args.only = ["queue"]  # no disk family: `python -m perf durable` measures fdatasync
    args.durable_replay_bytes = None  # felix's default hot tail
    return args


def main(argv: list[str] | None = None) -> int:
    return launch(main_async, parse_args(argv))
