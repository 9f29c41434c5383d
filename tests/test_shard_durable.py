"""Durable streams in the shard core: acks per fsync policy, group commit, restart,
reads from disk joining the hot tail, retention, budgets, damage (real DiskLogs in a
temp dir; the I/O driver's threads are replaced by running its jobs inline)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from felix import ipc, wire
from felix.errors import NotFound, Overloaded, Unavailable
from felix.ipc import RecordType
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.durable import DiskSettings, DurableSettings, DurableStore
from felix.shard.offsets import OffsetReservations
from felix.shard.resources import durable_settings, stream_settings, tenant_quota
from felix.shard.stream_log import StreamSettings
from felix.shard.tenants import TenantQuota

T, NS = "acme", "prod"
KEY = ipc.stream_key(T, NS, "s")
BLOCK = 64  # offset reservation block: small, so a restart's gap is small and visible


class Clock:
    def __init__(self) -> None:
        self.us = 1_700_000_000_000_000

    def __call__(self) -> int:
        return self.us


def make(
    tmp: Path,
    *,
    fsync: str = "commit",
    auto: bool = True,
    clock: Clock | None = None,
    stream_defaults: StreamSettings | None = None,
    **disk: Any,
) -> ShardCore:
    store = DurableStore(
        DiskSettings(
            root=tmp / "streams",
            auto=DurableSettings(fsync=fsync, fsync_interval_ms=50) if auto else None,  # type: ignore[arg-type]
            **disk,
        )
    )
    offsets = OffsetReservations(tmp / "shard-0.offsets", block=BLOCK)
    settings = ShardSettings(index=0, shards=1, stream_defaults=stream_defaults or StreamSettings())
    c = ShardCore(settings, offsets, store, wall_us=clock or Clock())
    c.open_durable()
    return c


def store_of(c: ShardCore) -> DurableStore:
    assert c.disk is not None
    return c.disk


def send(c: ShardCore, frame: bytes, *, token: int = 1, gateway: int = 0, now: float = 0.0) -> None:
    c.handle(gateway, ipc.encode(RecordType.REQUEST, token, 0, frame), now)


def replies(c: ShardCore, gateway: int = 0) -> list[tuple[int, Any]]:
    out = []
    for rec in c.flush().get(gateway, []):
        kind, token, _ = ipc.decode_header(rec)
        if kind == RecordType.REPLY:
            msg = wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
            out.append((token, msg))
    return out


def sync_all(c: ShardCore) -> int:
    """Run one fsync round as the fsync thread would; returns the streams synced."""
    streams = store_of(c).take_syncs()
    for s in streams:
        c.sync_done(s, s.log.sync(), 0.001)
    return len(streams)


def publish(c: ShardCore, payloads: list[bytes], *, token: int = 1, stream: str = "s", **kw: Any):
    send(c, wire.encode_publish(token, T, NS, stream, payloads, **kw), token=token)
    sync_all(c)
    ((tok, ack),) = replies(c)
    assert tok == token
    return ack


def read(c: ShardCore, from_offset: int, *, key: str = KEY, max_records: int = 100) -> Any:
    """One READ as a gateway sends it; disk jobs run inline. Returns (tail, reply)."""
    c.handle(0, ipc.encode_read(7, key, from_offset, max_records, 1 << 20), 0.0)
    for job in store_of(c).take_reads():
        job.run()
        c.read_done(job)
    (rec,) = c.flush()[0]
    kind, token, tail = ipc.decode_header(rec)
    assert (kind, token) == (RecordType.READ_REPLY, 7)
    return tail, wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))


def consume(c: ShardCore, start: int, *, key: str = KEY) -> tuple[list[int], list[bytes], int]:
    """Read from ``start`` to the tail like a lagging gateway subscription (gaps jump)."""
    offsets: list[int] = []
    payloads: list[bytes] = []
    nxt = start
    gaps = 0
    while True:
        tail, ev = read(c, nxt, key=key, max_records=3)
        assert isinstance(ev, wire.Events), ev
        if ev.base_offset > nxt:
            gaps += ev.base_offset - nxt
        assert ev.base_offset >= nxt
        offsets += range(ev.base_offset, ev.base_offset + len(ev.payloads))
        payloads += ev.payloads
        nxt = ev.base_offset + len(ev.payloads)
        if nxt >= tail:
            return offsets, payloads, gaps


def test_commit_acks_wait_for_one_fsync_that_covers_every_waiting_publish(tmp_path: Path) -> None:
    c = make(tmp_path)
    for i in range(5):
        send(c, wire.encode_publish(i, T, NS, "s", [b"r%d" % i]), token=10 + i)
    assert replies(c) == []  # nothing acked before an fsync
    assert sync_all(c) == 1  # one round, one stream: one fdatasync for all five
    acks = replies(c)
    assert [tok for tok, _ in acks] == [10, 11, 12, 13, 14]
    assert [(a.base_offset, a.count, a.durability) for _, a in acks] == [
        (i, 1, wire.DURABILITY_SYNCED) for i in range(5)
    ]
    store = store_of(c)
    assert (store.fsyncs, store.fsync_acks) == (1, 5)
    assert store.streams[KEY].log.synced_offset == 5
    assert sync_all(c) == 0  # nothing left to sync


def test_writes_after_a_round_started_wait_for_the_next(tmp_path: Path) -> None:
    c = make(tmp_path)
    send(c, wire.encode_publish(1, T, NS, "s", [b"a"]), token=1)
    (stream,) = store_of(c).take_syncs()
    synced = stream.log.sync()  # the round syncs offset 0 ...
    send(c, wire.encode_publish(2, T, NS, "s", [b"b"]), token=2)  # ... while this is written
    c.sync_done(stream, synced, 0.001)
    assert [tok for tok, _ in replies(c)] == [1]
    assert sync_all(c) == 1
    assert [tok for tok, _ in replies(c)] == [2]


@pytest.mark.parametrize("fsync", ["none", "interval"])
def test_none_and_interval_ack_written_at_once(tmp_path: Path, fsync: str) -> None:
    c = make(tmp_path, fsync=fsync)
    send(c, wire.encode_publish(1, T, NS, "s", [b"a", b"b"]), token=1)
    ((_, ack),) = replies(c)
    assert (ack.base_offset, ack.count, ack.durability) == (0, 2, wire.DURABILITY_WRITTEN)
    store = store_of(c)
    assert store.take_syncs() == []
    due = store.due(0.0)
    if fsync == "none":
        assert due is None and store.take_syncs() == []
    else:
        assert due == pytest.approx(0.05)  # fsync_interval_ms=50 after the first write
        assert store.take_syncs() == []
        assert store.due(0.06) is None
        (stream,) = store.take_syncs()
        c.sync_done(stream, stream.log.sync(), 0.001)
        assert stream.log.synced_offset == 2


def test_memory_streams_ack_memory(tmp_path: Path) -> None:
    c = make(tmp_path, auto=False)
    ack = publish(c, [b"x"])
    assert ack.durability == wire.DURABILITY_MEMORY
    assert not (tmp_path / "streams").exists()
    assert c.stream_status(KEY) == {
        "durable": False,
        "fsync": "none",
        "memory": {"earliest": 0, "next_offset": 1, "retained_records": 1, "retained_bytes": 97},
        "gateways_watching": 0,
        "dedup": {
            "window_s": 120.0,
            "max_entries": 100_000,
            "entries": 0,
            "bytes": 0,
            "evicted": 0,
            "expired": 0,
            "trimmed": 0,
        },
    }


def test_restart_brings_records_back_and_offsets_continue_above_the_mark(tmp_path: Path) -> None:
    c = make(tmp_path)
    publish(c, [b"a", b"b"], headers=[{"k": "v"}, None])
    publish(c, [b"c"], token=2)
    store_of(c).close()

    c2 = make(tmp_path)
    sub = wire.decode_ext(
        wire.decode_frame(
            _request(c2, wire.encode_subscribe(1, T, NS, "s", 9, start="earliest")),
            extensions=True,
        )
    )
    assert isinstance(sub, wire.Subscribed) and sub.start_offset == 0
    tail, ev = read(c2, 0)
    assert tail == BLOCK  # the hot tail starts at the reservation mark, above the disk
    assert (ev.base_offset, ev.payloads, ev.headers) == (
        0,
        [b"a", b"b", b"c"],
        [{"k": "v"}, None, None],
    )
    ack = publish(c2, [b"d"])
    assert ack.base_offset == BLOCK  # never reused; 3..BLOCK-1 is a gap
    offsets, payloads, gaps = consume(c2, 0)
    assert offsets == [0, 1, 2, BLOCK] and payloads == [b"a", b"b", b"c", b"d"]
    assert gaps == BLOCK - 3


def _request(c: ShardCore, frame: bytes) -> bytes:
    send(c, frame)
    (rec,) = c.flush()[0]
    return bytes(rec[ipc.HEADER_SIZE :])


def test_power_loss_under_interval_loses_only_unsynced_and_shows_a_gap(tmp_path: Path) -> None:
    c = make(tmp_path, fsync="interval")
    publish(c, [b"a", b"b"])
    store = store_of(c)
    store.due(1.0)
    (stream,) = store.take_syncs()
    c.sync_done(stream, stream.log.sync(), 0.001)
    seg = next((tmp_path / "streams" / T / NS / "s").glob("*.seg"))
    synced_size = seg.stat().st_size
    publish(c, [b"lost1", b"lost2"], token=2)  # WRITTEN, never synced
    # Power loss: every byte not fsynced is gone (the process never closed anything).
    os.truncate(seg, synced_size)
    c2 = make(tmp_path, fsync="interval")
    ack = publish(c2, [b"e"])
    assert ack.base_offset == BLOCK
    offsets, payloads, gaps = consume(c2, 0)
    assert offsets == [0, 1, BLOCK] and payloads == [b"a", b"b", b"e"]
    assert gaps == BLOCK - 2  # the lost range 2..3 and the never-assigned rest


def test_a_laggard_below_the_hot_tail_reads_from_disk_then_memory(tmp_path: Path) -> None:
    c = make(tmp_path, stream_defaults=StreamSettings(replay_max_records=4))
    for i in range(10):
        publish(c, [b"%d" % i], token=i + 1)
    log_ = c.stream_log(KEY)
    assert log_ is not None and log_.earliest == 6  # memory holds only 6..9
    offsets, payloads, gaps = consume(c, 0)
    assert offsets == list(range(10)) and gaps == 0  # no gap, no duplicate at the seam
    assert payloads == [b"%d" % i for i in range(10)]
    assert store_of(c).disk_reads >= 2
    # A subscriber at an offset below the hot tail is accepted (drop_old is for memory).
    sub = wire.decode_ext(
        wire.decode_frame(
            _request(c, wire.encode_subscribe(1, T, NS, "s", 9, start=2)), extensions=True
        )
    )
    assert isinstance(sub, wire.Subscribed) and sub.start_offset == 2


def test_subscribe_at_a_time(tmp_path: Path) -> None:
    clock = Clock()
    c = make(tmp_path, clock=clock)
    t0 = clock.us
    publish(c, [b"a", b"b"])
    clock.us = t0 + 1_000_000
    publish(c, [b"c"], token=2)

    def start_at(us: int) -> int:
        frame = _request(c, wire.encode_subscribe(1, T, NS, "s", 9, start=wire.StartAtTime(us)))
        sub = wire.decode_ext(wire.decode_frame(frame, extensions=True))
        assert isinstance(sub, wire.Subscribed)
        return sub.start_offset

    assert start_at(t0 - 1) == 0
    assert start_at(t0 + 1) == 2
    assert start_at(t0 + 5_000_000) == 3  # after everything: the tail


def test_start_at_a_time_on_a_memory_stream_is_refused(tmp_path: Path) -> None:
    c = make(tmp_path, auto=False)
    publish(c, [b"a"])
    frame = _request(c, wire.encode_subscribe(1, T, NS, "s", 9, start=wire.StartAtTime(1)))
    err = wire.decode_ext(wire.decode_frame(frame, extensions=True))
    assert isinstance(err, wire.ErrorReply) and "timestamps" in err.message


def test_an_fsync_error_stops_every_ack(tmp_path: Path) -> None:
    c = make(tmp_path)
    send(c, wire.encode_publish(1, T, NS, "s", [b"a"]), token=1)
    (stream,) = store_of(c).take_syncs()
    c.sync_failed(stream, OSError(5, "Input/output error"))
    assert c.fatal is not None and "fsync of stream acme/prod/s failed" in c.fatal
    assert replies(c) == []  # the waiting ack is never sent
    send(c, wire.encode_publish(2, T, NS, "s", [b"b"]), token=2)
    ((_, err),) = replies(c)
    assert isinstance(err, wire.ErrorReply) and err.code == Unavailable.code
    assert "stopped acknowledging" in err.message
    assert store_of(c).take_syncs() == []  # never retried


def test_disk_budget_and_reserve_refuse_with_a_clear_error(tmp_path: Path) -> None:
    c = make(tmp_path, budget_bytes=200)
    publish(c, [b"x" * 10])
    send(c, wire.encode_publish(2, T, NS, "s", [b"y" * 100]), token=2)
    ((_, err),) = replies(c)
    assert isinstance(err, wire.ErrorReply) and err.code == Overloaded.code
    assert "--disk-budget" in err.message
    (tmp_path / "b").mkdir()
    c2 = make(tmp_path / "b", reserve_bytes=1 << 20)
    store_of(c2).free_bytes = 1000
    send(c2, wire.encode_publish(1, T, NS, "s", [b"x"]), token=1)
    ((_, err),) = replies(c2)
    assert err.code == Overloaded.code and "--disk-reserve" in err.message
    c2.disk_sweep()  # measures the real free space: the tmp dir has room
    free = store_of(c2).free_bytes
    assert free is not None and free > 1000


def test_durable_streams_per_shard_are_capped(tmp_path: Path) -> None:
    c = make(tmp_path, max_streams=1)
    publish(c, [b"x"])
    send(c, wire.encode_publish(2, T, NS, "other", [b"y"]), token=2)
    ((_, err),) = replies(c)
    assert err.code == Overloaded.code and "--max-durable-streams-per-shard" in err.message
    assert not (tmp_path / "streams" / T / NS / "other").exists()
    assert c.streams == 1


def test_delete_removes_the_files_and_fails_waiting_acks(tmp_path: Path) -> None:
    c = make(tmp_path)
    publish(c, [b"x"])
    send(c, wire.encode_publish(2, T, NS, "s", [b"y"]), token=2)
    directory = tmp_path / "streams" / T / NS / "s"
    assert directory.is_dir()
    assert c.delete_stream(KEY)
    assert not directory.exists()
    ((tok, err),) = replies(c)
    assert tok == 2 and isinstance(err, wire.ErrorReply) and err.code == NotFound.code
    assert store_of(c).disk_used == 0 and store_of(c).streams == {}


def test_a_damaged_log_refuses_its_stream_only(tmp_path: Path) -> None:
    c = make(tmp_path, segment_bytes=4096)
    for i in range(40):  # several segments of 4 KiB
        publish(c, [bytes([i]) * 200], token=i + 1)
    publish(c, [b"fine"], stream="other", token=99)
    store_of(c).close()
    directory = tmp_path / "streams" / T / NS / "s"
    sealed = sorted(directory.glob("*.seg"))[0]
    data = bytearray(sealed.read_bytes())
    data[100] ^= 0xFF  # a bit flip inside the first sealed segment's first record
    sealed.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    c2 = make(tmp_path, segment_bytes=4096)
    # Damage is found when opening (header/index) or by the first read: either way the
    # stream answers Unavailable naming the file and the byte.
    _tail, reply = read(c2, 0)
    if isinstance(reply, wire.ErrorReply):
        message = reply.message
    else:
        send(c2, wire.encode_publish(5, T, NS, "s", [b"z"]), token=5)
        ((_, err),) = replies(c2)
        message = err.message
    assert sealed.name in message and "byte" in message
    send(c2, wire.encode_publish(6, T, NS, "s", [b"z"]), token=6)
    sync_all(c2)
    ((_, err),) = replies(c2)
    assert isinstance(err, wire.ErrorReply) and err.code == Unavailable.code
    assert sealed.name in err.message
    assert store_of(c2).damaged == 1
    # The other stream serves; nothing of the damaged one was deleted or rewritten.
    ack = publish(c2, [b"still"], stream="other", token=7)
    assert ack.durability == wire.DURABILITY_SYNCED
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    # Only an explicit delete removes a damaged stream's files.
    assert c2.delete_stream(KEY) and not directory.exists()


def test_a_torn_tail_is_cut_and_reported(tmp_path: Path) -> None:
    c = make(tmp_path)
    publish(c, [b"a", b"b"])
    store_of(c).close()
    seg = next((tmp_path / "streams" / T / NS / "s").glob("*.seg"))
    with seg.open("ab") as f:
        f.write(b"\x00\x00\x00\x10" + b"\x01" * 10)  # half a record header
    c2 = make(tmp_path)
    store = store_of(c2)
    assert store.torn_bytes == 14
    status = c2.stream_status(KEY)
    assert status is not None
    recovery: Any = status["recovery"]
    assert recovery["torn_bytes_cut"] == 14
    assert status["durable"] is True and status["fsync"] == "commit"
    # The log continues at the reservation mark; everything recovered is on disk.
    assert status["next_offset"] == BLOCK and status["synced_offset"] == 2
    _offsets, payloads, _ = consume(c2, 0)
    assert payloads == [b"a", b"b"]


def test_retention_by_bytes_deletes_whole_sealed_segments(tmp_path: Path) -> None:
    c = make(tmp_path, segment_bytes=4096)
    hot_tail = StreamSettings(replay_max_records=4)  # memory holds the last 4 only
    c.define_stream(KEY, hot_tail, DurableSettings(fsync="none", retention_bytes=10_000))
    for i in range(100):
        publish(c, [bytes([i]) * 300], token=i + 1)
    store = store_of(c)
    before = store.disk_used
    freed = c.disk_sweep()
    assert freed > 0 and store.disk_used == before - freed <= 10_000 + 4096
    assert store.tenant_disk == {T: store.disk_used}  # the tenant's count went down too
    _tail, err = read(c, 0)
    assert isinstance(err, wire.CursorErrorReply) and err.reason == "too_old"
    offsets, _, gaps = consume(c, err.available)
    assert offsets == list(range(err.available, 100)) and gaps == 0


def test_control_plane_specs_map_to_durable_settings(tmp_path: Path) -> None:
    assert durable_settings({"durable": False, "fsync": "none"}) is None
    assert durable_settings({"durable": True}) == DurableSettings(fsync="commit")
    legacy = durable_settings({"durable": True, "fsync": "batch", "fsync_interval_ms": 250})
    assert legacy == DurableSettings(fsync="interval", fsync_interval_ms=250)
    assert durable_settings({"durable": True, "fsync": "always"}) == DurableSettings()
    spec = {"durable": True, "fsync": "none", "retention_age_s": 60, "retention_bytes": 1 << 30}
    assert durable_settings(spec) == DurableSettings(
        fsync="none", retention_age_s=60.0, retention_bytes=1 << 30
    )
    # retention_bytes bounds a durable stream's files, and its hot tail in memory too.
    spec["retention_bytes"] = 1 << 20
    assert stream_settings(spec, StreamSettings()).replay_max_bytes == 1 << 20
    # A stream defined durable by the control plane on a node without --durable-streams.
    c = make(tmp_path, auto=False)
    c.define_stream(KEY, StreamSettings(), durable_settings({"durable": True, "fsync": "none"}))
    ack = publish(c, [b"x"])
    assert ack.durability == wire.DURABILITY_WRITTEN
    assert (tmp_path / "streams" / T / NS / "s").is_dir()


# -- the I/O driver with its real threads (felix/node/disk_io.py) ---------------------------


def _driven(
    tmp: Path, fault: Path | None = None, **kw: Any
) -> tuple[ShardCore, list[bytes], list[str], Any]:
    from felix.node.disk_io import DiskIO

    c = make(tmp, **kw)
    out: list[bytes] = []
    fatal: list[str] = []

    def deliver() -> None:
        out.extend(c.flush().get(0, []))

    io = DiskIO(c, deliver, fatal.append, fault_file=fault)
    return c, out, fatal, io


async def _until(check: Any, timeout: float = 5.0) -> None:
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)


def test_the_fsync_thread_acks_a_batch_of_publishers_with_one_round(tmp_path: Path) -> None:
    from tests.aio import run

    async def main() -> None:
        c, out, fatal, io = _driven(tmp_path)
        try:
            for i in range(20):
                send(c, wire.encode_publish(i, T, NS, "s", [b"%d" % i]), token=100 + i)
            io.kick()
            await _until(lambda: len(out) == 20)
            tokens = [ipc.decode_header(r)[1] for r in out]
            assert tokens == list(range(100, 120)) and fatal == []
            assert store_of(c).fsyncs == 1 and store_of(c).fsync_acks == 20
            # Several streams in one round: synced side by side, every ack released.
            for i in range(6):
                send(c, wire.encode_publish(i, T, NS, f"m{i % 3}", [b"x"]), token=200 + i)
            io.kick()
            await _until(lambda: len(out) == 26)
            assert sorted(ipc.decode_header(r)[1] for r in out[20:]) == list(range(200, 206))
            assert store_of(c).fsyncs == 4
            # A READ below a tiny hot tail is answered from the reader pool.
            c.stream_log(KEY).trim(1 << 30)  # type: ignore[union-attr]
            c.handle(0, ipc.encode_read(7, KEY, 0, 100, 1 << 20), 0.0)
            io.kick()
            await _until(lambda: len(out) == 27)
            ev = wire.decode_ext(wire.decode_frame(out[-1][ipc.HEADER_SIZE :], extensions=True))
            assert isinstance(ev, wire.Events) and len(ev.payloads) == 20
        finally:
            io.close()

    run(main)


def test_interval_streams_are_synced_by_the_timer(tmp_path: Path) -> None:
    from tests.aio import run

    async def main() -> None:
        c, out, _, io = _driven(tmp_path, fsync="interval")
        try:
            send(c, wire.encode_publish(1, T, NS, "s", [b"a"]), token=1, now=time.monotonic())
            io.kick()  # acked WRITTEN at once; the timer syncs within 50 ms
            assert len(out) == 0 and len(c.flush()[0]) == 1
            disk = store_of(c).streams[KEY]
            assert disk.log.synced_offset == 0
            await _until(lambda: disk.log.synced_offset == 1)
        finally:
            io.close()

    run(main)


def test_an_injected_fsync_error_is_fatal_and_acks_nothing(tmp_path: Path) -> None:
    from tests.aio import run

    fault = tmp_path / "fail"
    fault.touch()

    async def main() -> None:
        c, out, fatal, io = _driven(tmp_path, fault=fault)
        try:
            send(c, wire.encode_publish(1, T, NS, "s", [b"a"]), token=1)
            io.kick()
            await _until(lambda: bool(fatal))
            assert "injected fsync error" in fatal[0] and out == []
            assert c.fatal == fatal[0]
        finally:
            io.close()

    run(main)


def test_a_refused_batch_never_reaches_the_disk(tmp_path: Path) -> None:
    c = make(tmp_path, stream_defaults=StreamSettings(max_record_bytes=100))
    publish(c, [b"ok"])
    disk = store_of(c).streams[KEY]
    size, end = disk.log.size_bytes, disk.log.next_offset
    for token, payloads, headers in (
        (2, [b"fine", b"x" * 101], None),  # one record over max_record_bytes
        (3, [b"a"], [{"k": "v" * 200}]),  # its header makes it too large
    ):
        send(c, wire.encode_publish(token, T, NS, "s", payloads, headers=headers), token=token)
        ((_, err),) = replies(c)
        assert isinstance(err, wire.ErrorReply) and err.code == 7  # TooLarge
    assert (disk.log.size_bytes, disk.log.next_offset) == (size, end)
    ack = publish(c, [b"next"], token=4)
    assert ack.base_offset == 1  # no offset was used by the refused batches
    assert consume(c, 0)[1] == [b"ok", b"next"]


def test_retention_by_age_deletes_sealed_segments_older_than_it(tmp_path: Path) -> None:
    clock = Clock()
    c = make(
        tmp_path,
        clock=clock,
        segment_bytes=4096,
        stream_defaults=StreamSettings(replay_max_records=4),
    )
    c.define_stream(KEY, StreamSettings(replay_max_records=4), DurableSettings(retention_age_s=60))
    for i in range(30):  # old records: several sealed segments
        publish(c, [bytes([i]) * 300], token=i + 1)
    clock.us += 30_000_000
    assert c.disk_sweep() == 0  # 30 s old: kept
    for i in range(30, 60):
        publish(c, [bytes([i]) * 300], token=i + 1)
    clock.us += 45_000_000  # the first 30 are 75 s old, the rest 45 s
    assert c.disk_sweep() > 0
    status = c.stream_status(KEY)
    assert status is not None
    first = status["first_offset"]
    assert isinstance(first, int) and 0 < first <= 30  # only whole segments of old records
    offsets, _, gaps = consume(c, first)
    assert offsets == list(range(first, 60)) and gaps == 0


def test_a_delete_cut_short_by_a_crash_never_brings_the_stream_back(tmp_path: Path) -> None:
    c = make(tmp_path)
    publish(c, [b"gone"])
    ns_dir = tmp_path / "streams" / T / NS
    assert c.delete_stream(KEY)
    assert list(ns_dir.iterdir()) == []  # renamed aside, then removed
    # A crash between the rename and the removal leaves the renamed directory: the
    # next start removes it and does not open it as a stream.
    publish(c, [b"again"], stream="t2")
    store_of(c).close()
    (ns_dir / "t2").rename(ns_dir / ".deleted.0123456789abcdef.t2")
    c2 = make(tmp_path)
    assert store_of(c2).streams == {} and list(ns_dir.iterdir()) == []


def test_a_tenant_disk_quota_bounds_that_tenant_only(tmp_path: Path) -> None:
    """A careless tenant filling its durable streams is refused at its own quota; another
    tenant's durable writes on the same shard go on. Deletes and retention give the room
    back, and a restart counts what is on disk."""

    def core() -> ShardCore:
        c = make(tmp_path, fsync="none", segment_bytes=4096)
        c.define_tenant(T, TenantQuota(1 << 30, 100, disk_bytes=10_000))
        return c

    c = core()
    stored = 0
    for i in range(100):
        send(c, wire.encode_publish(i + 1, T, NS, "s", [b"x" * 500]), token=i + 1)
        ((_, reply),) = replies(c)
        if isinstance(reply, wire.ErrorReply):
            break
        stored += 1
    assert isinstance(reply, wire.ErrorReply) and reply.code == Overloaded.code
    assert f"tenant {T} has used its disk quota" in reply.message
    store = store_of(c)
    assert 9000 < store.tenant_disk[T] <= 10_000 and 16 <= stored <= 20
    log = c.stream_log(KEY)
    assert log is not None and log.next_offset == stored  # nothing of the refused batch
    # Another tenant (no quota) is not refused, on the same shard.
    for i in range(24):
        send(c, wire.encode_publish(i + 1, "other", NS, "s", [b"y" * 500]), token=i + 1)
        ((_, reply),) = replies(c)
        assert isinstance(reply, wire.PublishOffsets), reply
    assert store.tenant_disk["other"] > 10_000 - 2 * 500
    # Restarted, the bytes on disk count at once.
    c = core()
    send(c, wire.encode_publish(1, T, NS, "s", [b"x" * 500]), token=1)
    ((_, reply),) = replies(c)
    assert isinstance(reply, wire.ErrorReply) and "disk quota" in reply.message
    # Deleting the stream gives the room back.
    assert c.delete_stream(KEY)
    assert T not in store_of(c).tenant_disk
    send(c, wire.encode_publish(2, T, NS, "s2", [b"x" * 500]), token=2)
    ((_, reply),) = replies(c)
    assert isinstance(reply, wire.PublishOffsets)


def test_a_tenant_disk_quota_below_two_segments_counts_as_two(tmp_path: Path) -> None:
    """Retention deletes whole sealed segments and keeps the active one: a smaller share
    could fill up and never be freed (a review finding), so it counts as two segments,
    and a stream with retention keeps being written."""
    c = make(tmp_path, fsync="none", segment_bytes=4096)
    c.define_tenant(T, TenantQuota(1 << 30, 100, disk_bytes=100))
    c.define_stream(KEY, StreamSettings(), DurableSettings(fsync="none", retention_bytes=4096))
    for i in range(100):
        send(c, wire.encode_publish(i + 1, T, NS, "s", [b"x" * 500]), token=i + 1)
        ((_, reply),) = replies(c)
        assert isinstance(reply, wire.PublishOffsets), (i, reply)
        c.disk_sweep()  # retention gives the room back
    assert store_of(c).tenant_disk[T] <= 2 * 4096


def test_a_tenant_disk_quota_comes_from_the_spec_or_the_node(tmp_path: Path) -> None:
    node = TenantQuota(1 << 30, 100, disk_bytes=8 << 20)
    assert tenant_quota({}, node, 4).disk_bytes == 2 << 20
    assert tenant_quota({"disk_quota_bytes": 4 << 20}, node, 4).disk_bytes == 1 << 20
    assert tenant_quota({}, TenantQuota(1 << 30, 100), 4).disk_bytes is None
