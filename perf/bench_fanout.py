"""Pub/sub fanout with the gateway's datagram batching on and off, in one run.

    .venv/bin/python -m perf.bench_fanout                  # fanout 16 and 64, 3 repetitions
    .venv/bin/python -m perf.bench_fanout --reps 5 --size 1024 --modes on,nogso,off,1024

One ``felix up`` node per mode runs side by side, identical but for the
environment (felix/quic/batch.py): ``on`` is felix's default (a gateway sends
its datagrams with sendmmsg, every 16 or at the end of the loop tick, and merges
a connection's runs with UDP GSO), ``nogso`` the same without GSO
(``FELIX_UDP_GSO=0``), ``N`` batches of up to N without GSO
(``FELIX_UDP_BATCH=N``), ``off`` one sendto per datagram as before
(``FELIX_UDP_BATCH=0``; always run: the ratios divide by it). Each repetition
runs, per fanout, every node back to back (the order rotated between
repetitions) through the harness's own drivers (perf/harness/workloads.py):

- closed loop: publish one record (``--size``, default 64 B), wait until every
  subscriber has it; latency per delivery (p50, p99), server CPU per delivery;
- max rate: publish as fast as the subscribers keep up (window 256 records per
  subscriber); deliveries/s, server CPU per delivery.

Subscribers are one QUIC connection each, in this process (as ``python -m perf``
does), made once per node and fanout and reused. Server CPU is the node's whole
process tree (supervisor, gateways, shards) from /proc schedstat.

Then, unless ``--no-strace``, one more closed-loop and one more max-rate run per
node and fanout, each with ``strace -c -f`` attached to the node's gateway
processes, count their system calls per delivery (all calls, and the sending
ones: sendto, sendmsg, sendmmsg). strace slows the gateway a lot, so these runs
give counts only, never times.

The machine is noisy (2 shared vCPUs): read the batched/unbatched ratios, which
come from the same repetition, rather than absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from perf.harness.node import FelixNode
from perf.harness.stats import RunResult
from perf.harness.systems import Felix, PubSubRig
from perf.harness.workloads import Meter, pubsub_closed, pubsub_max

BASELINE = "unbatched"


def _modes(text: str) -> dict[str, dict[str, str]]:
    """``off,on,16,nogso`` -> {"unbatched": ..., "batched": ..., "batched-16": ...,
    "batched-nogso": ...} (node environments; "on" is felix's default: with GSO)."""
    modes: dict[str, dict[str, str]] = {}
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("off", "0"):
            modes[BASELINE] = {"FELIX_UDP_BATCH": "0"}
        elif item in ("on", "1"):
            modes["batched"] = {"FELIX_UDP_BATCH": "1", "FELIX_UDP_GSO": "1"}
        elif item == "nogso":
            modes["batched-nogso"] = {"FELIX_UDP_BATCH": "1", "FELIX_UDP_GSO": "0"}
        else:
            modes[f"batched-{int(item)}"] = {
                "FELIX_UDP_BATCH": str(int(item)),
                "FELIX_UDP_GSO": "0",
            }
    if BASELINE not in modes:
        modes[BASELINE] = {"FELIX_UDP_BATCH": "0"}
    return modes


SEND_CALLS = ("sendto", "sendmsg", "sendmmsg")


@dataclass
class Cell:
    """The runs of one (fanout, mode)."""

    closed: list[RunResult] = field(default_factory=list)
    max: list[RunResult] = field(default_factory=list)
    syscalls: dict[str, float] = field(default_factory=dict)


def _parse_topology(text: str | None) -> tuple[int | None, int | None, bool]:
    """``GxS`` or ``GxSe`` (shards embedded in the gateway); empty: felix up's defaults."""
    if not text:
        return None, None, False
    embedded = text.lower().endswith("e")
    g, s = text.lower().rstrip("e").split("x")
    return int(g), int(s), embedded


def _gateway_pids(node: FelixNode) -> list[int]:
    info = json.loads((node.dir / "data" / "node.json").read_text())
    return [int(pid) for name, pid in info["processes"].items() if name.startswith("gateway")]


class Strace:
    """``strace -c -f`` on some processes while a block runs: calls per syscall name."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.calls: dict[str, int] = {}

    async def __aenter__(self) -> Strace:
        fd, name = tempfile.mkstemp(prefix="felix-strace-", suffix=".txt")
        os.close(fd)
        self._out = Path(name)
        args = ["strace", "-c", "-f", "-q", "-o", str(self._out)]
        for pid in self.pids:
            args += ["-p", str(pid)]
        self._proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1.0)  # attaching takes a moment; calls before it are not counted
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        text = self._out.read_text()
        self._out.unlink(missing_ok=True)
        for line in text.splitlines():
            parts = line.split()
            # "% time  seconds  usecs/call  calls  [errors]  syscall"
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                with contextlib.suppress(ValueError):
                    self.calls[parts[-1]] = int(parts[3])


def _count(cell: Cell, workload: str, trace: Strace, deliveries: int) -> None:
    """System calls and sending calls per delivery (``deliveries`` includes the warmup's)."""
    total = sum(trace.calls.values())
    sends = sum(trace.calls.get(name, 0) for name in SEND_CALLS)
    cell.syscalls[workload] = round(total / deliveries, 3)
    cell.syscalls[workload + "_send"] = round(sends / deliveries, 3)


async def _run(args: argparse.Namespace) -> dict[tuple[int, str], Cell]:
    gateways, shards, embedded = _parse_topology(args.topology)
    modes = args.modes
    nodes = {mode: FelixNode(gateways, shards, embedded, env=env) for mode, env in modes.items()}
    cells: dict[tuple[int, str], Cell] = {(f, m): Cell() for f in args.fanouts for m in modes}
    rigs: dict[tuple[int, str], PubSubRig] = {}
    try:
        systems = {mode: Felix(node) for mode, node in nodes.items()}
        for mode, node in nodes.items():
            print(f"{mode:9}: felix up {' '.join(node.args)} ({node.label})", flush=True)
        for fanout in args.fanouts:
            for mode, system in systems.items():
                rigs[fanout, mode] = await system.pubsub_rig(fanout)

        def counts(fanout: int) -> tuple[int, int]:
            scale = 16 / fanout  # the same deliveries per run at every fanout
            return max(20, int(args.closed * scale)), max(100, int(args.max * scale))

        for rep in range(args.reps):
            for fanout in args.fanouts:
                n_closed, n_max = counts(fanout)
                # Rotated per repetition, so no mode always runs first (or after another).
                order = list(modes)[rep % len(modes) :] + list(modes)[: rep % len(modes)]
                for mode in order:
                    rig, node = rigs[fanout, mode], nodes[mode]
                    topic = f"fan-{fanout}-{mode}-{rep}"
                    closed = await pubsub_closed(
                        rig, topic + "-closed", args.size, n_closed, args.warmup, Meter(node.cpu)
                    )
                    top = await pubsub_max(
                        rig,
                        topic + "-max",
                        args.size,
                        n_max,
                        args.warmup,
                        args.window,
                        Meter(node.cpu),
                    )
                    cells[fanout, mode].closed.append(closed)
                    cells[fanout, mode].max.append(top)
                    c, m = closed.figures(), top.figures()
                    print(
                        f"rep {rep + 1} fanout {fanout:3} {mode:9}"
                        f"  closed p50 {c['p50'] or 0:7.0f} us p99 {c['p99'] or 0:7.0f} us"
                        f" cpu {c['cpu_server_us'] or 0:5.1f} us/dlv"
                        f" | max {m['throughput'] or 0:8.0f} dlv/s"
                        f" cpu {m['cpu_server_us'] or 0:5.1f} us/dlv",
                        flush=True,
                    )

        if args.strace:
            if shutil.which("strace") is None:
                print("strace not found: no system call counts", flush=True)
            else:
                for fanout in args.fanouts:
                    n_closed, n_max = counts(fanout)
                    for mode in modes:
                        rig, node = rigs[fanout, mode], nodes[mode]
                        topic = f"fan-{fanout}-{mode}-strace"
                        pids = _gateway_pids(node)
                        async with Strace(pids) as trace:
                            closed = await pubsub_closed(
                                rig, topic + "-closed", args.size, n_closed // 2, 2, Meter(node.cpu)
                            )
                        _count(cells[fanout, mode], "closed", trace, closed.ops + 2 * fanout)
                        async with Strace(pids) as trace:
                            top = await pubsub_max(
                                rig, topic + "-max", args.size, n_max // 4, 2, args.window,
                                Meter(node.cpu),
                            )  # fmt: skip
                        _count(cells[fanout, mode], "max", trace, top.ops + 2 * fanout)
                        print(f"strace fanout {fanout:3} {mode:9}: {cells[fanout, mode].syscalls}")
    finally:
        for rig in rigs.values():
            with contextlib.suppress(Exception):
                await rig.close()
        for node in nodes.values():
            node.stop()
            for line in node.problems:
                print(f"node problem: {line}", flush=True)
    return cells


def _med(values: list[float | None]) -> tuple[float, float, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.median(present), min(present), max(present)


def _fmt(spread: tuple[float, float, float] | None, digits: int = 0) -> str:
    if spread is None:
        return "-"
    med, low, high = spread
    return f"{med:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def _ratio(runs_b: list[RunResult], runs_u: list[RunResult], name: str) -> str:
    """Median (min-max) over the repetitions of batched / unbatched, paired by repetition."""
    values: list[float | None] = []
    for rb, ru in zip(runs_b, runs_u, strict=True):
        fb, fu = rb.figures()[name], ru.figures()[name]
        if fb is not None and fu:
            values.append(fb / fu)
    return _fmt(_med(values), 2)


def report(cells: dict[tuple[int, str], Cell], fanouts: list[int], modes: list[str]) -> str:
    """A markdown table: medians over the repetitions (min-max), ratios per repetition."""
    lines = [
        "| fanout | gateway sends | deliveries/s (max rate) | p50 us | p99 us"
        " | server CPU us/delivery (max rate) | server CPU us/delivery (closed loop)"
        " | gateway syscalls/delivery, closed loop (sends) | same, max rate (sends) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fanout in fanouts:
        for mode in modes:
            cell = cells[fanout, mode]
            closed = [r.figures() for r in cell.closed]
            top = [r.figures() for r in cell.max]
            sc = cell.syscalls
            syscalls = " | ".join(
                f"{sc[w]:.2f} ({sc[w + '_send']:.3f})" if w in sc else "-"
                for w in ("closed", "max")
            )
            lines.append(
                f"| {fanout} | {mode} | {_fmt(_med([f['throughput'] for f in top]))}"
                f" | {_fmt(_med([f['p50'] for f in closed]))}"
                f" | {_fmt(_med([f['p99'] for f in closed]))}"
                f" | {_fmt(_med([f['cpu_server_us'] for f in top]), 1)}"
                f" | {_fmt(_med([f['cpu_server_us'] for f in closed]), 1)}"
                f" | {syscalls} |"
            )
        # Ratios within each repetition (batched / unbatched), then their median and range.
        u = cells[fanout, BASELINE]
        for mode in modes:
            if mode == BASELINE:
                continue
            b = cells[fanout, mode]
            sb, su = b.syscalls, u.syscalls
            sys_ratio = " | ".join(
                f"{sb[w] / su[w]:.2f} ({sb[w + '_send'] / su[w + '_send']:.2f})"
                if w in sb and w in su and su[w] and su[w + "_send"]
                else "-"
                for w in ("closed", "max")
            )
            lines.append(
                f"| {fanout} | **{mode} / {BASELINE}** | {_ratio(b.max, u.max, 'throughput')}"
                f" | {_ratio(b.closed, u.closed, 'p50')} | {_ratio(b.closed, u.closed, 'p99')}"
                f" | {_ratio(b.max, u.max, 'cpu_server_us')}"
                f" | {_ratio(b.closed, u.closed, 'cpu_server_us')} | {sys_ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_fanout", description=__doc__)
    parser.add_argument("--fanouts", default="16,64", help="comma-separated (default 16,64)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--topology",
        default="1x1",
        help="GxS[e] of every node (e: shards embedded in the gateway; default 1x1: one"
        " gateway socket, shard processes)",
    )
    parser.add_argument(
        "--closed", type=int, default=400, help="closed-loop records at fanout 16 (scaled by 16/F)"
    )
    parser.add_argument(
        "--max", type=int, default=8000, help="max-rate records at fanout 16 (scaled by 16/F)"
    )
    parser.add_argument("--size", type=int, default=64, help="record size in bytes (default 64)")
    parser.add_argument("--warmup", type=int, default=20, help="warmup records per run")
    parser.add_argument("--window", type=int, default=256, help="max-rate window per subscriber")
    parser.add_argument(
        "--modes",
        default="on,nogso,off",
        help="nodes: on (the default: batches with GSO), nogso, off, N (every N, no GSO)",
    )
    parser.add_argument("--no-strace", dest="strace", action="store_false")
    args = parser.parse_args(argv)
    args.fanouts = [int(f) for f in args.fanouts.split(",")]
    args.modes = _modes(args.modes)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the perf extra brings it
        sys.exit("uvloop is needed (the perf extra)")
    load = os.getloadavg()
    start = time.monotonic()
    cells = uvloop.run(_run(args))
    print()
    print(
        f"fanout, {args.reps} repetitions, topology {args.topology}, {args.size} B records,"
        f" load average {load[0]:.2f} at the start, {time.monotonic() - start:.0f} s;"
        " medians (min-max)"
    )
    print()
    print(report(cells, args.fanouts, list(args.modes)))


if __name__ == "__main__":
    main()
