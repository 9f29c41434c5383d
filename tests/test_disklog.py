"""DiskLog: append/read/roll/gaps/skip_to/time lookup/retention/delete/recovery."""

from __future__ import annotations

import errno
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from felix.errors import DiskFull, LogDamaged, LogPoisoned, TooLarge
from felix.shard.disklog import DiskLog, DiskLogSettings, DiskRecord
from felix.shard.log_format import (
    MAX_PAYLOAD_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    EnvelopeError,
    decode_envelope,
    encode_envelope,
)
from felix.shard.log_index import IndexInfo, SparseIndex, decode_index, encode_index

SMALL = DiskLogSettings(segment_bytes=4096, index_interval_bytes=256)


def payload(i: int, n: int = 40) -> bytes:
    return (b"%08d" % i) * (n // 8) + b"#" * (n % 8)


def fill(log: DiskLog, start: int, count: int, *, step: int = 1, ts0: int = 1_000) -> list[int]:
    offsets = [start + i * step for i in range(count)]
    log.append([(o, ts0 + o, payload(o)) for o in offsets])
    return offsets


def all_records(log: DiskLog) -> list[DiskRecord]:
    out: list[DiskRecord] = []
    at = 0
    while True:
        page = log.read(at, 7, 1000)
        if not page:
            return out
        out.extend(page)
        at = page[-1].offset + 1


def segs(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def test_append_read_roll_and_reopen(tmp_path: Path) -> None:
    d = tmp_path / "t" / "ns" / "s"
    log = DiskLog.open(d, SMALL, first_offset=10)
    assert (log.first_offset, log.next_offset, log.synced_offset) == (10, 10, 10)
    written = []
    for b in range(30):
        written += fill(log, 10 + b * 5, 5)
    assert log.next_offset == 160 and log.segments >= 3
    assert [r.offset for r in all_records(log)] == written
    r = log.read(77, 1, 10**6)
    assert r == [DiskRecord(77, 1077, payload(77))]
    assert log.size_bytes == sum(p.stat().st_size for p in segs(d))
    log.close()
    again = DiskLog.open(d, SMALL, first_offset=0)
    rep = again.recovery
    assert (rep.torn_bytes_cut, rep.records, rep.first_offset, rep.next_offset) == (0, 150, 10, 160)
    assert rep.segments == len(segs(d)) and rep.rebuilt_indexes == 0
    assert [r.offset for r in all_records(again)] == written
    again.close()


def test_gaps_skip_to_and_bad_offsets(tmp_path: Path) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    log.append([(0, 1, b"a"), (5, 2, b"b")])
    log.skip_to(100)
    assert log.next_offset == 100
    with pytest.raises(ValueError, match="below"):
        log.append([(99, 3, b"c")])
    with pytest.raises(ValueError, match="below"):
        log.append([(100, 3, b"c"), (100, 4, b"d")])  # not increasing: nothing written
    with pytest.raises(ValueError):
        log.skip_to(50)
    log.append([(100, 3, b"c")])
    assert [(r.offset, r.payload) for r in log.read(1, 10, 100)] == [(5, b"b"), (100, b"c")]
    assert log.read(101, 10, 100) == []
    log.close()
    again = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    assert again.next_offset == 101  # a skip_to without records is not on disk
    again.close()


def test_first_offset_raises_an_existing_log(tmp_path: Path) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    fill(log, 0, 3)
    log.close()
    again = DiskLog.open(tmp_path / "s", SMALL, first_offset=50)
    assert (again.first_offset, again.next_offset) == (0, 50)
    again.close()


def test_huge_record_refused_and_nothing_written(tmp_path: Path) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    size = log.size_bytes
    with pytest.raises(TooLarge, match="limit"):
        log.append([(0, 1, b"ok"), (1, 1, bytes(MAX_PAYLOAD_BYTES + 1))])
    assert log.size_bytes == size and log.next_offset == 0
    log.append([(0, 1, b"ok")])
    assert log.read(0, 5, 100)[0].payload == b"ok"
    log.close()


def test_batch_bigger_than_a_segment(tmp_path: Path) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    fill(log, 0, 1)
    big = [(i, i, bytes(500)) for i in range(1, 20)]  # ~10 KiB > segment_bytes
    log.append(big)
    assert log.segments == 2
    assert [r.offset for r in all_records(log)] == list(range(20))
    log.close()


def test_torn_tail_is_cut_and_reported(tmp_path: Path) -> None:
    d = tmp_path / "s"
    log = DiskLog.open(d, SMALL, first_offset=0)
    fill(log, 0, 10)
    log.close()
    active = segs(d)[-1]
    size = active.stat().st_size
    os.truncate(active, size - 7)  # cut the last record mid-payload
    again = DiskLog.open(d, SMALL, first_offset=0)
    rec_size = RECORD_HEADER_SIZE + len(payload(9))
    assert again.recovery.torn_bytes_cut == rec_size - 7
    assert again.next_offset == 9 and [r.offset for r in all_records(again)] == list(range(9))
    assert active.stat().st_size == size - rec_size
    again.append([(9, 5, b"new")])
    again.close()
    third = DiskLog.open(d, SMALL, first_offset=0)
    assert third.recovery.torn_bytes_cut == 0
    assert third.read(9, 1, 100)[0].payload == b"new"
    third.close()


def test_flip_in_sealed_segment_raises_on_read_and_full_check(tmp_path: Path) -> None:
    d = tmp_path / "s"
    log = DiskLog.open(d, SMALL, first_offset=0)
    for b in range(20):
        fill(log, b * 5, 5)
    log.close()
    first = segs(d)[0]
    before = first.read_bytes()
    pos = SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 3  # payload of offset 0
    flipped = bytearray(before)
    flipped[pos] ^= 0x10
    first.write_bytes(bytes(flipped))
    log = DiskLog.open(d, SMALL, first_offset=0)  # header + index check only: opens
    with pytest.raises(LogDamaged) as info:
        log.read(0, 10, 10_000)
    assert info.value.file == str(first) and info.value.position == SEGMENT_HEADER_SIZE
    assert "payload CRC" in info.value.why
    log.close()
    with pytest.raises(LogDamaged) as info:
        DiskLog.open(d, SMALL, first_offset=0, full_check=True)
    assert str(first) in str(info.value) and str(SEGMENT_HEADER_SIZE) in str(info.value)
    assert first.read_bytes() == bytes(flipped)  # nothing rewritten


def test_sync_error_poisons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    fill(log, 0, 3)
    assert log.sync() == 3

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")

    fill(log, 3, 3)
    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(OSError, match="Input/output"):
        log.sync()
    monkeypatch.undo()
    assert log.synced_offset == 3
    for call in (log.sync, lambda: fill(log, 6, 1), lambda: log.read(0, 1, 1)):
        with pytest.raises(LogPoisoned, match="Input/output"):
            call()
    log.close()


def test_concurrent_read_while_appending(tmp_path: Path) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        at = 0
        while not stop.is_set() or at < log.next_offset:
            for rec in log.read(at, 50, 5000):
                if rec.offset != at or rec.payload != payload(at):
                    problems.append(f"at {at}: got {rec.offset}")
                at = rec.offset + 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for b in range(300):
        fill(log, b * 3, 3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not problems
    log.close()


def test_time_lookup_retention_and_delete(tmp_path: Path) -> None:
    d = tmp_path / "s"
    log = DiskLog.open(d, SMALL, first_offset=0)
    for b in range(40):
        fill(log, b * 5, 5)  # timestamp = 1000 + offset
    assert log.offset_for_time(0) == 0
    assert log.offset_for_time(1123) == 123
    assert log.offset_for_time(10**9) == log.next_offset
    assert log.enforce_retention(now_us=10**9) == 0  # no caps set
    n = log.segments
    log.close()
    log = DiskLog.open(d, DiskLogSettings(4096, 256, retention_bytes=1), first_offset=0)
    freed = log.enforce_retention(now_us=0, keep_from=60)
    assert freed > 0 and 1 < log.segments < n
    assert 0 < log.first_offset <= 60 and log.read(0, 1, 100)[0].offset == log.first_offset
    assert log.size_bytes == sum(p.stat().st_size for p in segs(d))
    log.close()
    log = DiskLog.open(d, DiskLogSettings(4096, 256, retention_age_s=1.0), first_offset=0)
    log.enforce_retention(now_us=10**9)
    assert log.segments == 1 and log.first_offset == all_records(log)[0].offset
    log.delete()
    assert not d.exists()


def test_envelope_round_trip() -> None:
    for headers in (None, {"a": "b", "ключ": "значение"}):
        assert decode_envelope(encode_envelope(headers, b"body")) == (headers, b"body")
    assert encode_envelope({}, b"x") == b"\x00\x00\x00x"  # no headers: 3 bytes of envelope
    assert decode_envelope(encode_envelope({"k": ""}, b"")) == ({"k": ""}, b"")


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\x00\x00", "shorter than"),
        (b"\x01\x00\x00", "kind 1 is encrypted"),
        (b"\x02\x00\x00", "unknown record kind 2"),
        (b"\x00\x00\x01\x00\x05ab", "run past"),
        (b"\x00\x00\x01\x00\x01a\x00\x03b", "run past"),
        (b"\x00\x00\x01\x00\x01\xff\x00\x00", "not UTF-8"),
    ],
)
def test_bad_envelopes_are_refused(payload: bytes, why: str) -> None:
    with pytest.raises(EnvelopeError, match=why):
        decode_envelope(payload)


def test_envelope_limits() -> None:
    with pytest.raises(TooLarge):
        encode_envelope({"k": "v" * 70_000}, b"")
    with pytest.raises(TooLarge):
        encode_envelope({str(i): "" for i in range(70_000)}, b"")


def build(d: Path, batches: int = 20) -> list[int]:
    log = DiskLog.open(d, SMALL, first_offset=0)
    written = []
    for b in range(batches):
        written += fill(log, b * 5, 5)
    log.close()
    return written


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_damage_inside_the_active_segment_is_not_a_torn_tail(tmp_path: Path) -> None:
    d = tmp_path / "s"
    build(d)
    active = segs(d)[-1]
    data = bytearray(active.read_bytes())
    data[SEGMENT_HEADER_SIZE + 2] ^= 0x01  # first record's length: a valid record follows
    active.write_bytes(bytes(data))
    before = snapshot(d)
    with pytest.raises(LogDamaged) as info:
        DiskLog.open(d, SMALL, first_offset=0)
    assert info.value.file == str(active) and info.value.position == SEGMENT_HEADER_SIZE
    assert "not a torn tail" in info.value.why
    assert snapshot(d) == before  # nothing cut, nothing rewritten


def test_garbage_tail_without_a_valid_record_is_cut(tmp_path: Path) -> None:
    d = tmp_path / "s"
    written = build(d)
    active = segs(d)[-1]
    good = active.stat().st_size
    with active.open("ab") as f:
        f.write(bytes(3000))  # zeros, as a filesystem may show after power loss
    log = DiskLog.open(d, SMALL, first_offset=0)
    assert log.recovery.torn_bytes_cut == 3000 and active.stat().st_size == good
    assert [r.offset for r in all_records(log)] == written
    log.close()


def test_megabytes_of_zeros_after_the_last_record_are_a_torn_tail(tmp_path: Path) -> None:
    d = tmp_path / "s"
    written = build(d)
    active = segs(d)[-1]
    good = active.stat().st_size
    with active.open("ab") as f:
        f.write(bytes(3 * 2**20))  # blocks allocated but never written (power loss)
    log = DiskLog.open(d, SMALL, first_offset=0)
    assert log.recovery.torn_bytes_cut == 3 * 2**20 and active.stat().st_size == good
    assert [r.offset for r in all_records(log)] == written
    log.close()


def test_unfinished_roll_header_is_rewritten(tmp_path: Path) -> None:
    d = tmp_path / "s"
    written = build(d)
    torn = d / f"{written[-1] + 1:020d}.seg"
    torn.write_bytes(b"FLSG\x00")  # a roll cut off while writing the header
    log = DiskLog.open(d, SMALL, first_offset=0)
    assert log.recovery.torn_bytes_cut == 5
    assert torn.stat().st_size == SEGMENT_HEADER_SIZE and log.next_offset == written[-1] + 1
    log.append([(log.next_offset, 1, b"after")])
    assert all_records(log)[-1].payload == b"after"
    log.close()


@pytest.mark.parametrize("how", ["missing", "other", "stale", "flipped", "garbage"])
def test_bad_index_is_rebuilt(tmp_path: Path, how: str) -> None:
    d = tmp_path / "s"
    written = build(d, 40)
    idx = sorted(d.glob("*.idx"))
    assert len(idx) == len(segs(d)) - 1  # every sealed segment has one
    good = idx[0].read_bytes()
    if how == "missing":
        idx[0].unlink()
    elif how == "other":
        idx[0].write_bytes(idx[1].read_bytes())  # another segment's index
    elif how == "stale":  # whole and CRC-valid, but written for a shorter segment
        info = decode_index(good, int(idx[0].stem), segs(d)[0].stat().st_size)
        assert isinstance(info, IndexInfo)
        info.segment_size -= 1
        idx[0].write_bytes(encode_index(info))
    elif how == "flipped":
        flipped = bytearray(good)
        flipped[60] ^= 0x04
        idx[0].write_bytes(bytes(flipped))
    else:
        idx[0].write_bytes(b"\xff" * 7)
    (d / (idx[0].name + ".tmp")).write_bytes(b"half an index")  # left by a crash
    log = DiskLog.open(d, SMALL, first_offset=0)
    assert log.recovery.rebuilt_indexes == 1
    assert idx[0].read_bytes() == good
    assert [r.offset for r in all_records(log)] == written
    assert log.read(33, 1, 100)[0].offset == 33
    log.close()
    assert DiskLog.open(d, SMALL, first_offset=0).recovery.rebuilt_indexes == 0


def test_sealed_segment_header_or_size_damage_refused_at_open(tmp_path: Path) -> None:
    d = tmp_path / "s"
    build(d)
    first = segs(d)[0]
    data = bytearray(first.read_bytes())
    data[9] ^= 0x80  # base offset in the header
    first.write_bytes(bytes(data))
    with pytest.raises(LogDamaged) as info:
        DiskLog.open(d, SMALL, first_offset=0)
    assert info.value.file == str(first) and info.value.position == 0
    data[9] ^= 0x80
    first.write_bytes(bytes(data[:-10]))  # a sealed segment lost its end
    with pytest.raises(LogDamaged) as info:
        DiskLog.open(d, SMALL, first_offset=0)
    assert info.value.file == str(first) and "runs past the end" in info.value.why
    assert first.stat().st_size == len(data) - 10


def test_recovery_is_idempotent(tmp_path: Path) -> None:
    d = tmp_path / "s"
    build(d)
    active = segs(d)[-1]
    os.truncate(active, active.stat().st_size - 3)
    for idx in d.glob("*.idx"):
        idx.unlink()
    first = DiskLog.open(d, SMALL, first_offset=0)
    report = first.recovery
    first.close()
    after = snapshot(d)
    second = DiskLog.open(d, SMALL, first_offset=0)
    assert snapshot(d) == after
    assert second.recovery.torn_bytes_cut == 0 and second.recovery.rebuilt_indexes == 0
    assert (second.recovery.records, second.recovery.next_offset) == (
        report.records,
        report.next_offset,
    )
    second.close()


def test_disk_full_cuts_the_batch_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    fill(log, 0, 3)
    size = log.size_bytes
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 100:
            return real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull, match="disk full"):
        fill(log, 3, 3)
    monkeypatch.undo()
    assert log.size_bytes == size and log.next_offset == 3
    assert (tmp_path / "s" / segs(tmp_path / "s")[-1].name).stat().st_size == size
    fill(log, 3, 3)
    log.close()
    again = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    assert [r.offset for r in all_records(again)] == list(range(6))
    again.close()


def test_fsync_error_at_roll_poisons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    fill(log, 0, 50)

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(OSError):
        for b in range(50):
            fill(log, 50 + b * 5, 5)
    monkeypatch.undo()
    with pytest.raises(LogPoisoned):
        log.sync()
    log.close()


def test_reads_survive_retention_under_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "s"
    build(d, 40)
    log = DiskLog.open(d, DiskLogSettings(4096, 256, retention_bytes=1), first_offset=0)
    old = log._view
    assert log.enforce_retention(now_us=0) > 0
    new = log._view
    log._view = old  # a reader took its view just before retention deleted files
    real = log._read_view

    def read_view(view: Any, *args: int) -> list[DiskRecord]:
        log._view = new  # ... and retention's publish landed meanwhile
        return real(view, *args)

    monkeypatch.setattr(log, "_read_view", read_view)
    got = log.read(0, 5, 10**6)
    assert got and got[0].offset == log.first_offset > 0
    log.close()


def test_roll_syncs_the_sealed_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real(fd)

    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    monkeypatch.setattr(os, "fdatasync", spy)
    fill(log, 0, 20)
    assert log.segments == 1 and synced == [] and log.synced_offset == 0
    fill(log, 20, 60)  # rolls: the old segment is flushed first
    assert log.segments == 2 and len(synced) == 1
    assert synced[0] == segs(tmp_path / "s")[0].stat().st_size
    assert log.synced_offset == 20  # everything in sealed segments is on disk
    assert log.sync() == 80 and len(synced) == 2
    assert log.sync() == 80 and len(synced) == 2  # nothing new: no fdatasync
    log.close()
    assert log.sync() == 80  # a late call after close changes nothing


def test_open_flushes_what_a_killed_writer_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    fill(log, 0, 5)  # written, never synced; the writer "dies" here
    log.close()

    def boom(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(OSError):  # open never calls unflushed records synced
        DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    monkeypatch.undo()
    again = DiskLog.open(tmp_path / "s", SMALL, first_offset=0)
    assert again.synced_offset == again.next_offset == 5
    again.close()


def test_sparse_index_round_trip_and_bounds() -> None:
    index = SparseIndex()
    index.add([(10, 32, 0), (15, 4200, 99), (30, 9000, 120)])
    info = IndexInfo(10, 10_000, 40, 130, 25, index)
    back = decode_index(encode_index(info), 10, 10_000)
    assert isinstance(back, IndexInfo) and back == info
    assert list(back.index) == [(10, 32, 0), (15, 4200, 99), (30, 9000, 120)]
    assert index.position_for(14, 10_000) == 32 and index.position_for(15, 10_000) == 4200
    assert index.position_for(99, 5000) == 4200  # entries at or past `end` are not used
    assert index.position_for_time(99, 10_000) == 32  # records before 4200 may hold ts 99
    assert index.position_for_time(100, 10_000) == 4200
    data = bytearray(encode_index(info))
    data[48] = 0x80  # first offset >= 2**63 on disk: damage, not a huge number
    body = bytes(data[:-4])
    assert "out of order" in str(
        decode_index(body + zlib.crc32(body).to_bytes(4, "big"), 10, 10_000)
    )


def test_readers_and_a_sync_thread_while_the_writer_rolls_and_deletes(tmp_path: Path) -> None:
    conf = DiskLogSettings(segment_bytes=4096, index_interval_bytes=256, retention_bytes=20_000)
    log = DiskLog.open(tmp_path / "s", conf, first_offset=0)
    stop = threading.Event()
    problems: list[str] = []
    synced: list[int] = []

    def reader() -> None:
        at = 0
        while not stop.is_set() or at < log.next_offset:
            page = log.read(at, 50, 5000)
            for rec in page:
                # a jump forward only past what retention deleted
                if rec.offset != at and rec.offset > log.first_offset:
                    problems.append(f"at {at}: got {rec.offset} (first {log.first_offset})")
                if rec.payload != payload(rec.offset):
                    problems.append(f"bad payload at {rec.offset}")
                at = rec.offset + 1

    def syncer() -> None:
        while not stop.is_set():
            synced.append(log.sync())

    threads = [threading.Thread(target=reader) for _ in range(2)]
    threads.append(threading.Thread(target=syncer))
    for t in threads:
        t.start()
    for b in range(400):
        fill(log, b * 3, 3)
        if b % 20 == 0:
            log.enforce_retention(now_us=0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not problems
    assert synced == sorted(synced) and synced[-1] <= log.next_offset
    assert log.sync() == log.next_offset == 1200
    assert log.size_bytes <= 20_000 + 4096
    log.close()


def test_disk_full_when_a_roll_creates_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "s"
    log = DiskLog.open(d, SMALL, first_offset=0)
    fill(log, 0, 40)
    real_open = os.open

    def no_space(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_CREAT and str(path).endswith(".seg"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_space)
    with pytest.raises(DiskFull, match="starting a segment"):
        fill(log, 40, 40)
    monkeypatch.undo()
    assert len(segs(d)) == 1 and log.next_offset == 40 and log.segments == 1
    fill(log, 40, 40)  # room again: the roll goes through
    assert log.segments == 2
    assert [r.offset for r in all_records(log)] == list(range(80))
    log.close()
