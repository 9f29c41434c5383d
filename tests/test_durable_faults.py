"""Faults of durable streams with real `felix up` process trees (R1, R2, R9, R11).

Every test keeps a ledger of what it published and what the broker acknowledged, then
checks the stream (through the client, and the files through tests/segfiles.py, an
independent reader of the format) afterwards: every acknowledged record is there at
its offset, offsets strictly increase, nothing appears that was never published, and
nothing appears twice. ``FELIX_FAULT_ROUNDS`` (``make faults``) scales the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

import felix
from felix.errors import FelixError, Unavailable
from felix.node.disk_io import EXIT_FSYNC_FAILED
from felix.shard.disklog import DiskLogSettings
from tests import segfiles
from tests.aio import run
from tests.nodeproc import NodeProcess

ROUNDS = int(os.environ.get("FELIX_FAULT_ROUNDS", "1"))
pytestmark = pytest.mark.timeout(240 * ROUNDS)
TENANT = NAMESPACE = "default"  # the client's defaults (no auth on loopback)
DURABLE = ("--durable-streams", "--fsync", "commit", "--segment-bytes", "64KiB")


def _stream_dir(node: NodeProcess, stream: str) -> Path:
    return node.data_dir / "streams" / TENANT / NAMESPACE / stream


def _bodies(node: NodeProcess, stream: str, recs: list[segfiles.Rec]) -> dict[int, bytes]:
    """offset -> body of records read from the files by the independent reader
    (encrypted at rest by default: opened with the data dir's keys)."""
    keys = segfiles.data_keys(node.data_dir)
    key = f"{TENANT}/{NAMESPACE}/{stream}"
    return {r.offset: segfiles.decode_record(r, key, keys)[2] for r in recs}


@dataclass
class Ledger:
    """What each publisher sent and what came back."""

    acked: dict[str, dict[int, bytes]] = field(default_factory=dict)
    # Payloads whose publish raised: the record may or may not be stored.
    unknown: dict[str, set[bytes]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Numbers payloads uniquely across every publisher and restart of a test.
    serial: Iterator[int] = field(default_factory=itertools.count)

    def count(self, stream: str) -> int:
        return len(self.acked.get(stream, {}))

    def check(self, stream: str, got: list[tuple[int, bytes]]) -> None:
        """``got`` (offset, payload) read back from earliest holds every acked record
        at its offset, in strictly increasing offsets, nothing unpublished, no repeat."""
        offsets = [o for o, _ in got]
        assert offsets == sorted(set(offsets)), f"{stream}: offsets not strictly increasing"
        at = dict(got)
        acked = self.acked.get(stream, {})
        missing = {o: p for o, p in acked.items() if at.get(o) != p}
        assert not missing, f"{stream}: {len(missing)} acked records lost, e.g. {min(missing)}"
        payloads = [p for _, p in got]
        assert len(payloads) == len(set(payloads)), f"{stream}: a record appears twice"
        known = set(acked.values()) | self.unknown.get(stream, set())
        assert set(payloads) <= known, f"{stream}: records nobody published"


async def _publisher(
    client: felix.Client,
    stream: str,
    ledger: Ledger,
    stop: asyncio.Event,
    size: int = 64,
    durability: felix.Durability = felix.Durability.SYNCED,
) -> None:
    acked = ledger.acked.setdefault(stream, {})
    unknown = ledger.unknown.setdefault(stream, set())
    while not stop.is_set():
        payload = f"{stream}:{next(ledger.serial)}:".encode().ljust(size, b".")
        try:
            ack = await client.publish(stream, payload)
        except asyncio.CancelledError:
            unknown.add(payload)
            raise
        except (FelixError, TimeoutError) as exc:
            unknown.add(payload)
            ledger.errors.append(f"{stream}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
            continue
        assert ack is not None and ack.durability == durability, ack
        assert ack.offset not in acked, f"{stream}: offset {ack.offset} acked twice"
        acked[ack.offset] = payload


async def _read_back(
    client: felix.Client, stream: str, until: int, timeout: float = 30
) -> list[tuple[int, bytes]]:
    """Every record of ``stream`` from earliest through offset ``until``."""
    got: list[tuple[int, bytes]] = []
    async with client.subscribe(stream, start="earliest", credit=4096) as sub:
        while not got or got[-1][0] < until:
            msg = await sub.next(timeout=timeout)
            got.append((msg.offset, bytes(msg.data)))
    return got


async def _follower(
    client: felix.Client, stream: str, seen: list[int], stop: asyncio.Event
) -> None:
    """A subscriber that resumes after its offset whenever its subscription ends (as a
    restarting shard ends it); ``seen`` gets every offset delivered."""
    while not stop.is_set():
        start: Literal["earliest"] | int = "earliest" if not seen else seen[-1] + 1
        try:
            async with client.subscribe(stream, start=start, credit=4096) as sub:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError, felix.FelixTimeoutError):
                        msg = await sub.next(timeout=0.5)
                        seen.append(msg.offset)
        except (FelixError, TimeoutError):
            await asyncio.sleep(0.1)


async def _until(
    predicate: Callable[[], bool], what: str, node: NodeProcess, t: float = 60
) -> None:
    deadline = time.monotonic() + t
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{node.log()[-3000:]}")
        await asyncio.sleep(0.05)


def _rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _wait_metric(node: NodeProcess, name: str, ok: Callable[[float], bool]) -> None:
    """Wait for a metric to satisfy ``ok`` (children report their counters every second)."""
    deadline = time.monotonic() + 10
    while not ok(node.metric(name)):
        assert time.monotonic() < deadline, f"{name}: {node.metric(name)}"
        time.sleep(0.1)


def _connect(node: NodeProcess):  # -> felix's connect(): an awaitable async context
    return felix.connect(
        f"felix://{node.host}:{node.port}",
        ca=node.ca_file,
        reconnect_backoff=(0.05, 0.5),
        request_timeout=5,
    )


STREAMS = ["s0", "s1", "s2", "s3"]


def _more_acks(ledger: Ledger, n: int, streams: list[str] = STREAMS) -> Callable[[], bool]:
    """True once every stream has ``n`` more acks than now."""
    marks = {s: ledger.count(s) + n for s in streams}
    return lambda: all(ledger.count(s) >= marks[s] for s in streams)


def test_kill_9_of_each_shard_under_commit_acks_loses_nothing_and_subscribers_resume(
    tmp_path: Path,
) -> None:
    """R1/R9: four publishers with commit acks, a resuming subscriber per stream; each
    shard in turn is killed with SIGKILL and restarted by the supervisor."""
    node = NodeProcess(tmp_path / "node", *DURABLE, gateways=1, shards=2)
    ledger = Ledger()
    seen: dict[str, list[int]] = {s: [] for s in STREAMS}

    async def main() -> None:
        async with _connect(node) as client:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_publisher(client, s, ledger, stop)) for s in STREAMS]
            tasks += [asyncio.create_task(_follower(client, s, seen[s], stop)) for s in STREAMS]
            for _ in range(ROUNDS):
                for shard in ("shard-0", "shard-1"):
                    await _until(_more_acks(ledger, 20), "acks", node)
                    old = node.kill_child(shard)
                    await asyncio.to_thread(node.wait_restarted, shard, old)
            await _until(_more_acks(ledger, 20), "acks", node)
            last = {s: max(ledger.acked[s]) for s in STREAMS}
            await _until(
                lambda: all(seen[s] and seen[s][-1] >= last[s] for s in STREAMS),
                "subscribers",
                node,
            )
            stop.set()
            await asyncio.gather(*tasks)
            for s in STREAMS:
                ledger.check(s, await _read_back(client, s, max(ledger.acked[s])))
                # The subscriber rode through both restarts: strictly increasing offsets
                # and every acked record up to where it got.
                assert seen[s] == sorted(set(seen[s])), f"{s}: subscriber went backward"
                assert set(ledger.acked[s]) <= set(seen[s])

    try:
        run(main, timeout=200 * ROUNDS)
        assert node.refresh()["restarts"]["shard-0"] == ROUNDS
        assert node.refresh()["restarts"]["shard-1"] == ROUNDS
    finally:
        node.stop()
    for s in STREAMS:
        on_disk = _bodies(node, s, segfiles.read_stream(_stream_dir(node, s)))
        for offset, payload in ledger.acked[s].items():
            assert on_disk[offset] == payload


def test_kill_9_of_the_whole_node_then_restart_with_a_torn_tail(tmp_path: Path) -> None:
    """R2: every process of the node dies at once under commit-ack load; one stream's
    active segment is also cut mid-record by hand. The restarted node has every acked
    record, continues the offsets, and reports the torn tail it cut."""
    data = tmp_path / "node"
    node = NodeProcess(data, *DURABLE, gateways=1, shards=2)
    ledger = Ledger()

    async def load(n: NodeProcess, per_stream: int = 30) -> None:
        async with _connect(n) as client:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_publisher(client, s, ledger, stop)) for s in STREAMS]
            await _until(_more_acks(ledger, per_stream), "acks", n)
            n.kill_all()  # mid-traffic: publishes in flight are neither acked nor lost
            stop.set()
            await asyncio.gather(*tasks)

    for round_ in range(ROUNDS):
        run(functools.partial(load, node), timeout=120 * ROUNDS)
        # The acked records are in the files (the kernel had them), maybe a torn tail.
        for s in STREAMS:
            on_disk = segfiles.read_stream(_stream_dir(node, s), allow_torn_tail=True)
            have = _bodies(node, s, on_disk)
            assert all(have.get(o) == p for o, p in ledger.acked[s].items()), s
        # Tear the active segment of s0 by hand: half a record at its end.
        active = segfiles.segment_paths(_stream_dir(node, "s0"))[-1]
        torn = segfiles.record(10**9, 1, segfiles.envelope(None, b"torn" * 30))[:57]
        with active.open("ab") as f:
            f.write(torn)
        # `felix log dump --check` reports the torn tail without calling it damage.
        code, out = _log_dump(_stream_dir(node, "s0"))
        assert code == 0 and "torn tail" in out, out
        node = NodeProcess(
            data, *DURABLE, gateways=1, shards=2, log_path=tmp_path / f"r{round_}.log"
        )

    async def after() -> dict[str, int]:
        async with _connect(node) as client:
            for s in STREAMS:
                ledger.check(s, await _read_back(client, s, max(ledger.acked[s])))
            # Offsets continue above everything issued before the crash.
            fresh = {}
            for s in STREAMS:
                ack = await client.publish(s, b"after")
                assert ack is not None
                fresh[s] = ack.offset
                assert ack.offset > max(ledger.acked[s])
            return fresh

    try:
        run(after, timeout=120 * ROUNDS)
        code, body = node.http(f"/streams/{TENANT}/{NAMESPACE}/s0")
        assert code == 200, body
        status = json.loads(body)
        assert status["recovery"]["torn_bytes_cut"] >= len(torn), status
        _wait_metric(node, "felix_log_torn_bytes_total", lambda v: v >= len(torn))
        assert "torn" in node.log()
    finally:
        node.stop()
    for s in STREAMS:
        segfiles.read_stream(_stream_dir(node, s))  # clean again: the tail was cut


def test_sigterm_under_durable_traffic_drains_exits_0_and_loses_nothing(tmp_path: Path) -> None:
    """R11: SIGTERM while four publishers wait for commit acks."""
    data = tmp_path / "node"
    node = NodeProcess(data, *DURABLE, gateways=1, shards=2)
    ledger = Ledger()

    async def load() -> None:
        async with _connect(node) as client:
            stop = asyncio.Event()
            # 1.5 KiB records: 50 of them fill more than a 64 KiB segment.
            tasks = [
                asyncio.create_task(_publisher(client, s, ledger, stop, 1536)) for s in STREAMS
            ]
            await _until(lambda: all(ledger.count(s) >= 50 * ROUNDS for s in STREAMS), "acks", node)
            node.proc.send_signal(signal.SIGTERM)
            # Publishes keep coming while the node drains, until it has exited.
            await asyncio.to_thread(node.proc.wait, 30)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    run(load, timeout=120 * ROUNDS)
    assert node.stop() == 0, node.log()[-3000:]
    # A drained node leaves whole files: no torn tail to cut.
    for s in STREAMS:
        recs = segfiles.read_stream(_stream_dir(node, s))
        have = _bodies(node, s, recs)
        assert all(have.get(o) == p for o, p in ledger.acked[s].items()), s
        sealed = segfiles.segment_paths(_stream_dir(node, s))[:-1]
        assert sealed, "no segment was sealed"
        for seg in sealed:
            segfiles.check_index(seg, DiskLogSettings().index_interval_bytes)
    node = NodeProcess(data, *DURABLE, gateways=1, shards=2, log_path=tmp_path / "again.log")

    async def after() -> None:
        async with _connect(node) as client:
            for s in STREAMS:
                ledger.check(s, await _read_back(client, s, max(ledger.acked[s])))

    try:
        run(after, timeout=60 * ROUNDS)
        code, body = node.http(f"/streams/{TENANT}/{NAMESPACE}/s1")
        assert code == 200 and '"torn_bytes_cut": 0' in body, body
    finally:
        node.stop()


def test_fsync_error_stops_acks_and_the_restart_recovers_from_disk(tmp_path: Path) -> None:
    """An injected fsync EIO: nothing published after it is acknowledged, the shard
    exits and is restarted, acked records survive, offsets keep increasing."""
    fault = tmp_path / "fsync-fault"
    node = NodeProcess(
        tmp_path / "node",
        *DURABLE,
        gateways=1,
        shards=1,
        env={"FELIX_FAULT_FSYNC_FILE": str(fault)},
    )
    ledger = Ledger()
    acked = ledger.acked.setdefault("s", {})
    unknown = ledger.unknown.setdefault("s", set())

    async def main() -> None:
        async with _connect(node) as client:
            for i in range(30):
                ack = await client.publish("s", b"before%d" % i)
                assert ack is not None
                acked[ack.offset] = b"before%d" % i
            old = node.info["processes"]["shard-0"]
            fault.touch()
            # Until the shard is seen restarting, every publish fails: none is acked.
            i = 0
            while node.refresh()["processes"]["shard-0"] == old:
                i += 1
                payload = b"faulty%d" % i
                try:
                    ack = await client.publish("s", payload)
                except (FelixError, TimeoutError):
                    unknown.add(payload)
                    await asyncio.sleep(0.05)
                    continue
                raise AssertionError(f"acked after the fsync error: {ack}")
            assert i >= 1
            fault.unlink()
            # Served again (the restart recovers from disk); offsets continue.
            deadline = time.monotonic() + 30
            i = 0
            while len(acked) < 60:
                i += 1
                payload = b"after%d" % i
                try:
                    ack = await client.publish("s", payload)
                except (FelixError, TimeoutError):
                    unknown.add(payload)
                    assert time.monotonic() < deadline, node.log()[-3000:]
                    await asyncio.sleep(0.1)
                    continue
                assert ack is not None and ack.offset > max(acked)
                acked[ack.offset] = payload
            ledger.check("s", await _read_back(client, "s", max(acked)))

    try:
        run(main, timeout=120 * ROUNDS)
        log = node.log()
        # The shard exited with the fsync-failure status and was restarted.
        assert re.search(rf"shard-0 \(pid \d+\) exited with {EXIT_FSYNC_FAILED}\b", log), log
        assert "injected fsync error" in log
        assert node.refresh()["restarts"]["shard-0"] >= 1
    finally:
        node.stop()


# `none` promises the same as `interval` minus the sync period; it runs in `make faults`
# only, to keep the quick suite under a minute.
@pytest.mark.parametrize("policy", ["interval", "none"] if ROUNDS > 1 else ["interval"])
def test_power_loss_under_interval_or_none_loses_only_unsynced_records(
    tmp_path: Path, policy: str
) -> None:
    """Publishers get WRITTEN acks; the node dies (SIGKILL of every process), then every
    byte not known to be fsynced is dropped from the files (the newest segment cut at a
    random byte past the synced offset the node reported last). After the restart every
    record below that offset is there, no offset is reused (the shard continues above
    its reservation mark) and the lost range reads as a gap."""
    data = tmp_path / "node"
    args = ["--durable-streams", "--fsync", policy, "--fsync-interval-ms", "50"]
    args += ["--segment-bytes", "64KiB"]
    rng = random.Random(policy)
    ledger = Ledger()
    node = NodeProcess(data, *args, gateways=1, shards=1)
    synced = 0

    def status() -> dict[str, Any]:
        code, body = node.http(f"/streams/{TENANT}/{NAMESPACE}/p")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    try:
        for round_ in range(ROUNDS):

            async def load(n: NodeProcess) -> int:
                async with _connect(n) as client:
                    stop = asyncio.Event()
                    written = felix.Durability.WRITTEN
                    task = asyncio.create_task(_publisher(client, "p", ledger, stop, 300, written))
                    await _until(_more_acks(ledger, 300, ["p"]), "acks", n)
                    if policy == "interval":
                        # The interval syncs really happen (while publishing goes on).
                        mark = max(ledger.acked["p"])
                        await _until(lambda: status()["synced_offset"] > mark, "interval sync", n)
                    await _until(_more_acks(ledger, 100, ["p"]), "acks", n)
                    last_synced = int(status()["synced_offset"])
                    await _until(_more_acks(ledger, 20, ["p"]), "acks", n)
                    n.kill_all()
                    stop.set()
                    await task
                    return last_synced

            async def after(n: NodeProcess, synced: int, fresh: bytes) -> None:
                async with _connect(n) as client:
                    before = max(ledger.acked["p"])
                    ack = await client.publish("p", fresh)
                    assert ack is not None and ack.offset > before, "an offset was reused"
                    got = await _read_back(client, "p", ack.offset)
                    assert got[-1] == (ack.offset, fresh)
                    ledger.acked["p"][ack.offset] = fresh
                    survivors = dict(got)
                    # Losses only above what was synced; everything acked below it is there.
                    lost = {o for o in ledger.acked["p"] if o not in survivors}
                    assert all(o >= synced for o in lost), (synced, sorted(lost)[:5])
                    ledger.acked["p"] = {
                        o: p for o, p in ledger.acked["p"].items() if o not in lost
                    }
                    ledger.check("p", got)
                    # The lost range is a gap: offsets jump, none is filled with other data.
                    if lost:
                        assert max(lost) < ack.offset and max(lost) not in survivors

            synced = run(functools.partial(load, node), timeout=120)
            segfiles.power_loss(_stream_dir(node, "p"), synced, rng, mode="sealed_whole")
            node = NodeProcess(
                data, *args, gateways=1, shards=1, log_path=tmp_path / f"r{round_}.log"
            )
            run(functools.partial(after, node, synced, b"after%d" % round_), timeout=60)
    finally:
        node.stop()


def test_replay_of_a_stream_bigger_than_the_memory_budget_then_live(tmp_path: Path) -> None:
    """A subscriber from earliest on a stream several times the node's memory budget gets
    every record exactly once, paged from disk, then live records with no gap; the
    shard's accounted memory stays within the budget meanwhile and its resident memory
    grows by less than the budget."""
    budget = 8 * 2**20
    node = NodeProcess(
        tmp_path / "node",
        "--durable-streams",
        "--fsync",
        "interval",
        "--segment-bytes",
        "1MiB",
        "--memory-budget",
        str(budget),
        "--replay-bytes",
        "1MiB",
        gateways=1,
        shards=1,
    )
    record = 4096
    # Records: 3x the budget (up to 24x with FAULT_ROUNDS).
    total = (3 * budget * min(ROUNDS, 8)) // record
    memory: list[float] = []
    rss: list[int] = []

    async def main() -> None:
        async with _connect(node) as client:
            sent = 0
            while sent < total:
                batch = [b"%010d" % (sent + i) + bytes(record - 10) for i in range(16)]
                acks = await client.publish_batch("big", batch)
                assert [a.offset for a in acks] == list(range(sent, sent + 16))
                sent += 16
            rss.append(_rss(node.info["processes"]["shard-0"]))
            got = 0
            async with client.subscribe("big", start="earliest", credit=512) as sub:
                while got < sent:
                    msg = await sub.next(timeout=30)
                    assert msg.offset == got and msg.data[:10] == b"%010d" % got
                    got += 1
                    if got % 1024 == 0:
                        memory.append(
                            await asyncio.to_thread(node.metric, "felix_memory_used_bytes")
                        )
                        rss.append(_rss(node.info["processes"]["shard-0"]))
                # Then live: published now, delivered next, no gap, no duplicate.
                for i in range(50):
                    ack = await client.publish("big", b"live%d" % i)
                    assert ack is not None and ack.offset == sent + i
                for i in range(50):
                    msg = await sub.next(timeout=10)
                    assert (msg.offset, msg.data) == (sent + i, b"live%d" % i)

    try:
        run(main, timeout=200 * ROUNDS)
        disk = sum(p.stat().st_size for p in (tmp_path / "node" / "streams").rglob("*.seg"))
        assert disk > 2 * budget
        assert memory and max(memory) <= budget, memory
        # The shard pages: its resident memory grows by less than the budget while it
        # replays a stream three times the budget (it would by the whole stream if it
        # held it).
        assert max(rss) - rss[0] < budget, [r // 1024 for r in rss]
    finally:
        node.stop()


def test_bit_flips_on_disk_refuse_only_that_stream_and_indexes_are_rebuilt(
    tmp_path: Path,
) -> None:
    """A flipped bit in a sealed segment of one stream: reading it stops before the
    damaged record with Unavailable naming the file and byte, publishing to it is
    refused, its files stay as they are. A flipped bit in another stream's index is
    rebuilt; a third stream is not affected."""
    data = tmp_path / "node"
    node = NodeProcess(data, *DURABLE, gateways=1, shards=2)

    def body(i: int) -> bytes:
        return b"%08d" % i + bytes(1000)

    headers = {"k": "v", "é": "ü"}

    async def fill() -> None:
        async with _connect(node) as client:
            await client.publish("h", b"with headers", headers=headers)
            for stream in ("d", "x", "ok"):
                for b in range(8):
                    await client.publish_batch(stream, [body(b * 32 + i) for i in range(32)])

    run(fill, timeout=60)
    assert node.stop() == 0
    # The envelope on disk, by the independent reader: encrypted (kind 1) holding the
    # headers and the body.
    (hrec,) = segfiles.read_stream(_stream_dir(node, "h"))
    keys = segfiles.data_keys(node.data_dir)
    assert segfiles.decode_record(hrec, "default/default/h", keys) == (1, headers, b"with headers")
    rng = random.Random(5)
    segs = segfiles.segment_paths(_stream_dir(node, "d"))
    assert len(segs) >= 3
    victim = segs[1]
    records = segfiles.scan_segment(victim).records
    rec = records[len(records) // 2]
    flipped = rng.randrange(
        rec.position, rec.position + segfiles.REC_HEADER_SIZE + len(rec.payload)
    )
    segfiles.flip_bit(victim, flipped, rng.randrange(8))
    index = sorted(_stream_dir(node, "x").glob("*.idx"))[0]
    segfiles.flip_bit(index, index.stat().st_size // 2)
    digest = segfiles.tree_digest(_stream_dir(node, "d"))
    node = NodeProcess(data, *DURABLE, gateways=1, shards=2, log_path=tmp_path / "again.log")

    async def check() -> str:
        async with _connect(node) as client:
            got: list[int] = []
            with pytest.raises(FelixError) as info:
                async with client.subscribe("d", start="earliest", credit=4096) as sub:
                    while True:
                        msg = await sub.next(timeout=20)
                        assert msg.data == body(msg.offset)
                        got.append(msg.offset)
            assert got == list(range(len(got))) and len(got) <= rec.offset
            with pytest.raises(Unavailable):
                await client.publish("d", b"refused")
            got_x = await _read_back(client, "x", 255)
            assert got_x == [(i, body(i)) for i in range(256)]
            ack = await client.publish("ok", b"fine")
            assert ack is not None and ack.offset >= 256
            async with client.subscribe("h", start="earliest") as sub:
                msg = await sub.next(timeout=10)
                assert (msg.offset, msg.data, msg.headers) == (0, b"with headers", headers)
            return str(info.value)

    try:
        why = run(check, timeout=90)
        assert victim.name in why, why
        match = re.search(r"byte (\d+)", why)
        assert match and rec.position <= int(match.group(1)) <= flipped, (why, rec, flipped)
        status = json.loads(node.http(f"/streams/{TENANT}/{NAMESPACE}/x")[1])
        assert status["recovery"]["rebuilt_indexes"] >= 1, status
        status = json.loads(node.http(f"/streams/{TENANT}/{NAMESPACE}/d")[1])
        assert status["damaged"] and victim.name in status["damaged"], status
        _wait_metric(node, "felix_log_damaged_streams", lambda v: v == 1)
    finally:
        node.stop()
    assert segfiles.tree_digest(_stream_dir(node, "d")) == digest, "a damaged log was changed"
    # The inspection command finds the same damage, and only reads.
    code, out = _log_dump(_stream_dir(node, "d"))
    assert code == 1 and victim.name in out and "check: 1 problem" in out, out
    assert segfiles.tree_digest(_stream_dir(node, "d")) == digest
    code, out = _log_dump(_stream_dir(node, "x"))
    assert code == 0 and "check: OK" in out, out


def _log_dump(path: Path) -> tuple[int, str]:
    """`felix log dump PATH --check`: its exit status and output."""
    cmd = [sys.executable, "-m", "felix.cli", "log", "dump", str(path), "--check", "--limit", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr
