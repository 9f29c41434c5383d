"""Micro-benchmark of the queue group engine (felix/shard/queue/group.py), in-process.

    .venv/bin/python perf/bench_queue_group.py [--records N] [--repeat R]

A busy group: M members (1 and 32), each with a window of 64 records; every round
plans (hands out what the members have room for), then each member acks its batch as
one range, and the core drains the journal. Prints the cost per record of plan() and
of settle(ACK), min / median / max over the repeats, and the same loop with 1 in 50
records nak'ed (delay 0) and redelivered. A last row keeps 9000 leases outstanding
(one member, window 10000, acking its oldest 64 per round) to show that the cost
does not grow with the window. No peer to compare with (the engine is felix's own);
compare runs within one machine only.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time

from felix.shard.queue.group import Group, SettleOp
from felix.shard.queue.journal import GroupSnapshot, Start
from felix.shard.queue.settings import GroupSettings

WINDOW = 64
SIZE = 200


def size_of(offset: int) -> int | None:
    return SIZE


def run(members: int, records: int, nak_every: int) -> tuple[float, float, int]:
    """Seconds in plan(), seconds in settle(), records acked."""
    state = GroupSnapshot()
    state.apply(Start(0))
    group = Group("bench", GroupSettings(), state, 0.0, 0, rng=random.Random(1))
    for token in range(members):
        group.join((0, token), token, WINDOW, 1 << 20, 0.0)
    plan_s = settle_s = 0.0
    acked = 0
    now = 0.0
    clock = time.perf_counter
    ack, nak = SettleOp.ACK, SettleOp.NAK
    while acked < records:
        now += 0.001
        t0 = clock()
        out = group.plan(records, size_of, now, 0)
        t1 = clock()
        for member, _, batch in out:
            ranges: list[tuple[int, int]] = []
            naks: list[tuple[int, int]] = []
            for offset, _, _ in batch:
                if nak_every and offset % nak_every == 0 and len(naks) < 1:
                    naks.append((offset, 1))
                elif ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
                else:
                    ranges.append((offset, 1))
            group.settle(member, ack, ranges, now, 0)
            if naks:
                group.settle(member, nak, naks, now, 0, delay_ms=0)
            acked += sum(count for _, count in ranges)
        group.journal.clear()
        t2 = clock()
        plan_s += t1 - t0
        settle_s += t2 - t1
        if not out:
            break
    return plan_s, settle_s, acked


def run_deep(records: int, outstanding: int = 9000, batch: int = 64) -> tuple[float, float, int]:
    """plan + ack with ``outstanding`` leases held throughout (oldest acked first)."""
    state = GroupSnapshot()
    state.apply(Start(0))
    group = Group("bench", GroupSettings(), state, 0.0, 0, rng=random.Random(1))
    member = (0, 0)
    group.join(member, 0, outstanding, 1 << 30, 0.0)
    group.plan(outstanding, size_of, 0.0, 0)
    group.journal.clear()
    group.set_window(member, outstanding + batch, 1 << 30)
    plan_s = settle_s = 0.0
    oldest = acked = 0
    clock = time.perf_counter
    while acked < records:
        t0 = clock()
        out = group.plan(outstanding + acked + batch, size_of, 0.0, 0)
        t1 = clock()
        group.settle(member, SettleOp.ACK, [(oldest, batch)], 0.0, 0)
        group.journal.clear()
        t2 = clock()
        assert sum(len(b) for _, _, b in out) == batch
        oldest += batch
        acked += batch
        plan_s += t1 - t0
        settle_s += t2 - t1
    return plan_s, settle_s, acked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(
        f"# queue group engine: {platform.python_implementation()} "
        f"{platform.python_version()} on {platform.machine()}, {args.records} records, "
        f"window {WINDOW} per member, {args.repeat} repeats (min / median / max)"
    )
    print(f"{'members':>7} {'naks':>7} {'plan ns/rec':>22} {'ack ns/rec':>22} {'total':>22}")
    for nak_every in (0, 50):
        for members in (1, 32):
            plans, settles, totals = [], [], []
            for _ in range(args.repeat):
                plan_s, settle_s, acked = run(members, args.records, nak_every)
                plans.append(plan_s / acked * 1e9)
                settles.append(settle_s / acked * 1e9)
                totals.append((plan_s + settle_s) / acked * 1e9)
            print(
                f"{members:>7} {('1/' + str(nak_every)) if nak_every else '-':>7} "
                f"{_fmt(plans):>22} {_fmt(settles):>22} {_fmt(totals):>22}"
            )
    plans, settles, totals = [], [], []
    for _ in range(args.repeat):
        plan_s, settle_s, acked = run_deep(args.records)
        plans.append(plan_s / acked * 1e9)
        settles.append(settle_s / acked * 1e9)
        totals.append((plan_s + settle_s) / acked * 1e9)
    print(
        f"{'1 deep':>7} {'-':>7} {_fmt(plans):>22} {_fmt(settles):>22} {_fmt(totals):>22}"
        "   (9000 leases outstanding)"
    )
    sys.stdout.flush()


def _fmt(values: list[float]) -> str:
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


if __name__ == "__main__":
    main()
