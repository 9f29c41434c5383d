"""DiskLog against a model: random appends, gaps, rolls, crashes that cut the active
segment at a random byte, reopens, reads and retention (hypothesis state machine)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from felix import _logscan
from felix.errors import TooLarge
from felix.logdump import dump
from felix.shard.disklog import DiskLog, DiskLogSettings
from felix.shard.log_format import (
    MAX_PAYLOAD_BYTES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    encode_batch,
)
from felix.shard.log_segment import Scanner

SEGMENT_BYTES = 4096
CONF = DiskLogSettings(segment_bytes=SEGMENT_BYTES, index_interval_bytes=128)


def _no_flush(fd: Any) -> None:
    os.fstat(fd)  # still fails on a bad fd, as the real call would


class ModelSegment:
    def __init__(self, base: int) -> None:
        self.base = base
        self.size = SEGMENT_HEADER_SIZE
        #: (offset, timestamp_us, payload, end position)
        self.records: list[tuple[int, int, bytes, int]] = []


class DiskLogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # The model checks what the log returns, not what survives a power loss (the
        # fault tests do): flushes are no-ops here, or the run is slow on a busy disk.
        self.flushes = (os.fsync, os.fdatasync)
        os.fsync = os.fdatasync = _no_flush
        self.tmp = Path(tempfile.mkdtemp(prefix="disklog-model-"))
        self.dir = self.tmp / "s"
        self.log = DiskLog.open(self.dir, CONF, first_offset=0)
        self.segments = [ModelSegment(0)]
        self.next_offset = 0
        self.clock = 1_000

    def teardown(self) -> None:
        os.fsync, os.fdatasync = self.flushes
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model -------------------------------------------------------------------

    def records(self) -> list[tuple[int, int, bytes]]:
        return [(o, t, p) for s in self.segments for (o, t, p, _e) in s.records]

    @rule(
        sizes=st.lists(st.integers(0, 700), min_size=1, max_size=12),
        gaps=st.lists(st.integers(0, 3), min_size=12, max_size=12),
        clock_step=st.integers(-5, 50),
    )
    def append(self, sizes: list[int], gaps: list[int], clock_step: int) -> None:
        batch = []
        offset = self.next_offset
        for i, n in enumerate(sizes):
            offset += gaps[i]
            self.clock = max(0, self.clock + clock_step)  # the clock may step back
            batch.append((offset, self.clock, bytes([offset % 251]) * n))
            offset += 1
        self.log.append(batch)
        nbytes = sum(RECORD_HEADER_SIZE + len(p) for _o, _t, p in batch)
        active = self.segments[-1]
        if active.records and active.size + nbytes > SEGMENT_BYTES:
            active = ModelSegment(self.next_offset)
            self.segments.append(active)
        for o, t, p in batch:
            active.size += RECORD_HEADER_SIZE + len(p)
            active.records.append((o, t, p, active.size))
        self.next_offset = offset

    @rule(by=st.integers(1, 1000))
    def skip(self, by: int) -> None:
        self.next_offset += by
        self.log.skip_to(self.next_offset)

    @rule()
    def sync(self) -> None:
        assert self.log.sync() == self.next_offset

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self.log = DiskLog.open(self.dir, CONF, first_offset=0)
        assert self.log.recovery.torn_bytes_cut == 0
        self.after_reopen()

    @rule()
    def full_check_and_dump(self) -> None:
        """Every record of every segment verifies, by the log and by felix log dump."""
        self.log.close()
        out = io.StringIO()
        assert dump(self.dir, check=True, limit=0, out=out) == 0, out.getvalue()
        assert "check: OK" in out.getvalue()
        self.log = DiskLog.open(self.dir, CONF, first_offset=0, full_check=True)
        assert self.log.recovery.torn_bytes_cut == 0
        assert self.log.recovery.rebuilt_indexes == len(self.segments) - 1
        self.after_reopen()

    @rule(cut=st.floats(0, 1))
    def crash_cutting_the_active_segment(self, cut: float) -> None:
        """kill -9 / power loss: the active segment keeps only its first bytes."""
        self.log.close()
        active = self.segments[-1]
        path = self.dir / f"{active.base:020d}.seg"
        size = path.stat().st_size
        assert size == active.size
        keep = int(size * cut)
        with path.open("r+b") as f:
            f.truncate(keep)
        if keep < SEGMENT_HEADER_SIZE:
            expect_torn = keep
            active.records = []
            active.size = SEGMENT_HEADER_SIZE
        else:
            active.records = [r for r in active.records if r[3] <= keep]
            active.size = active.records[-1][3] if active.records else SEGMENT_HEADER_SIZE
            expect_torn = keep - active.size
        self.log = DiskLog.open(self.dir, CONF, first_offset=0)
        assert self.log.recovery.torn_bytes_cut == expect_torn
        self.after_reopen()

    def after_reopen(self) -> None:
        # an un-persisted skip_to is forgotten: the log ends at its last record
        last = [r[0] for r in self.segments[-1].records]
        self.next_offset = max(last[-1] + 1 if last else 0, self.segments[-1].base)
        assert self.log.next_offset == self.next_offset
        assert self.log.recovery.records == len(self.records())

    @precondition(lambda self: len(self.segments) > 1)
    @rule(keep=st.integers(0, 3))
    def retention(self, keep: int) -> None:
        """Drop the oldest sealed segments, keeping at most the last ``keep`` sealed."""
        self.log.close()
        conf = DiskLogSettings(SEGMENT_BYTES, 128, retention_bytes=0)
        k = max(len(self.segments) - 1 - keep, 1)
        keep_from = self.segments[k].base
        self.log = DiskLog.open(self.dir, conf, first_offset=0)
        freed = self.log.enforce_retention(now_us=0, keep_from=keep_from)
        assert freed == sum(s.size for s in self.segments[:k])
        self.segments = self.segments[k:]
        self.log.close()
        self.log = DiskLog.open(self.dir, CONF, first_offset=0)
        self.after_reopen()

    @rule(start=st.integers(0, 3000), n=st.integers(1, 40), max_bytes=st.integers(0, 5000))
    def read(self, start: int, n: int, max_bytes: int) -> None:
        want = [r for r in self.records() if r[0] >= start][:n]
        got = self.log.read(start, n, max_bytes)
        assert [tuple(r) for r in got] == want[: len(got)]
        assert got or not want
        if len(got) < len(want):  # stopped by max_bytes, never before the first record
            assert sum(len(r[2]) for r in want[: len(got) + 1]) > max_bytes

    @rule(t=st.integers(0, 3000))
    def time_lookup(self, t: int) -> None:
        want = next((o for o, ts, _p in self.records() if ts >= t), self.next_offset)
        assert self.log.offset_for_time(t) == want

    @invariant()
    def shape(self) -> None:
        recs = self.records()
        assert self.log.next_offset == self.next_offset
        assert self.log.first_offset == (recs[0][0] if recs else self.next_offset)
        assert self.log.segments == len(self.segments)
        assert self.log.size_bytes == sum(s.size for s in self.segments)


DiskLogMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_disklog_model = DiskLogMachine.TestCase


# -- the compiled scanner against a reference parser ------------------------------------

_HEAD = struct.Struct(">IQQII")


def reference_scan(
    data: bytes, last: int
) -> tuple[list[tuple[int, int, int, bytes]], int, str | None]:
    """Straight from docs/log-format.md: (records as (pos, offset, ts, payload), where
    the scan stopped, why or None)."""
    out: list[tuple[int, int, int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 28 > len(data):
            return out, pos, "short"
        length, offset, ts, pcrc, hcrc = _HEAD.unpack_from(data, pos)
        if hcrc != zlib.crc32(data[pos : pos + 24]) or length > MAX_PAYLOAD_BYTES:
            return out, pos, "bad"
        if pos + 28 + length > len(data):
            return out, pos, "short"
        payload = data[pos + 28 : pos + 28 + length]
        if zlib.crc32(payload) != pcrc or offset <= last or offset >= 2**63 or ts >= 2**63:
            return out, pos, "bad"
        out.append((pos, offset, ts, payload))
        last = offset
        pos += 28 + length
    return out, pos, None


@given(
    sizes=st.lists(st.integers(0, 300), min_size=0, max_size=30),
    gaps=st.lists(st.integers(0, 5), min_size=30, max_size=30),
    damage=st.one_of(
        st.none(),
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
        st.tuples(st.just("cut"), st.floats(0, 1), st.just(0)),
    ),
    chunk=st.sampled_from([28, 29, 64, 100, 4096, 1 << 20]),
)
@settings(max_examples=300, deadline=None)
def test_compiled_scanner_matches_the_reference(
    sizes: list[int], gaps: list[int], damage: tuple[str, float, int] | None, chunk: int
) -> None:
    records: list[tuple[int, int, bytes]] = []
    offset = 10
    for i, n in enumerate(sizes):
        offset += gaps[i] + 1
        records.append((offset, 7 * i, bytes([i % 256]) * n))
    data = bytearray(encode_batch(records, 0, 0, 1 << 62, 4096, 0)[0])
    if damage is not None and data:
        kind, where, bit = damage
        at = min(int(where * len(data)), len(data) - 1)
        if kind == "flip":
            data[at] ^= 1 << bit
        else:
            del data[at:]
    want, stop, why = reference_scan(bytes(data), 9)
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 32 + data)  # as in a segment: records start after a header
        f.flush()
        fd = f.fileno()
        scanner = Scanner(fd, 32, 32 + len(data), 9, chunk=chunk)
        got = [(pos - 32, off, ts, p) for pos, off, ts, p in scanner]
        assert got == want
        assert scanner.stopped_at - 32 == stop
        assert (scanner.error is None) == (why is None)
        for min_offset, max_records, max_bytes in ((0, 10**6, 10**9), (20, 3, 400)):
            picked = Scanner(fd, 32, 32 + len(data), 9, chunk=chunk).collect(
                min_offset, max_records, max_bytes
            )
            expect: list[tuple[int, int, bytes]] = []
            total = 0
            for _pos, off, ts, p in want:
                if off < min_offset:
                    continue
                if len(expect) >= max_records or (expect and total + len(p) > max_bytes):
                    break
                expect.append((off, ts, p))
                total += len(p)
            assert [tuple(r) for r in picked] == expect
        entries = Scanner(fd, 32, 32 + len(data), 9, chunk=chunk).index(256, 32)
        assert entries == index_entries(want, 256)


def index_entries(
    records: list[tuple[int, int, int, bytes]], interval: int
) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    mark, max_ts = 32, 0
    for pos, off, ts, _p in records:
        if pos + 32 >= mark:
            out.append((off, pos + 32, max_ts))
            mark = pos + 32 + interval
        max_ts = max(max_ts, ts)
    return out


def reference_encode(records: list[tuple[int, int, bytes]]) -> bytes:
    """Straight from docs/log-format.md."""
    out = b""
    for offset, ts, payload in records:
        head = struct.pack(">IQQI", len(payload), offset, ts, zlib.crc32(payload))
        out += head + struct.pack(">I", zlib.crc32(head)) + payload
    return out


@given(
    sizes=st.lists(st.integers(0, 600), max_size=40),
    gaps=st.lists(st.integers(0, 2**40), min_size=40, max_size=40),
    stamps=st.lists(st.integers(0, 2**63 - 1), min_size=40, max_size=40),
    start=st.integers(32, 10_000),
    interval=st.integers(1, 2000),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
@settings(max_examples=200, deadline=None)
def test_compiled_encoder_matches_the_reference(
    sizes: list[int],
    gaps: list[int],
    stamps: list[int],
    start: int,
    interval: int,
    kind: type,
) -> None:
    records: list[tuple[int, int, bytes]] = []
    offset = 5
    for i, n in enumerate(sizes):
        offset += gaps[i] + (1 if i else 0)
        records.append((offset, stamps[i], bytes([i % 256]) * n))
    if records and records[-1][0] >= 2**63:
        return
    data, entries, mark, max_ts = encode_batch(
        [(o, t, kind(p)) for o, t, p in records], 5, start, start, interval, 3
    )
    assert data == reference_encode(records)
    expect_entries, expect_mark, expect_ts, pos = [], start, 3, start
    for o, t, p in records:
        if pos >= expect_mark:
            expect_entries.append((o, pos, expect_ts))
            expect_mark = pos + interval
        expect_ts = max(expect_ts, t)
        pos += 28 + len(p)
    assert (entries, mark, max_ts) == (expect_entries, expect_mark, expect_ts)


@pytest.mark.parametrize(
    ("records", "error"),
    [
        ([(4, 0, b"")], "below the log's next offset 5"),
        ([(5, 0, b""), (5, 0, b"")], "below the log's next offset 6"),
        ([(2**63, 0, b"")], "offset .* out of range"),
        ([(5, -1, b"")], "timestamp -1 out of range"),
        ([(5, 2**63, b"")], "out of range"),
        ([(5, 0, bytes(MAX_PAYLOAD_BYTES + 1))], "exceeds the log's limit"),
    ],
)
def test_encoder_refuses_bad_records(records: list[tuple[int, int, bytes]], error: str) -> None:
    with pytest.raises((ValueError, TooLarge), match=error):
        encode_batch(records, 5, 32, 32, 4096, 0)


def reference_find(data: bytes, after: int) -> int:
    for i in range(1, len(data) - 27):
        length, offset, _ts, pcrc, hcrc = _HEAD.unpack_from(data, i)
        if length > MAX_PAYLOAD_BYTES or i + 28 + length > len(data):
            continue
        if hcrc != zlib.crc32(data[i : i + 24]) or offset <= after or offset >= 2**63:
            continue
        if zlib.crc32(data[i + 28 : i + 28 + length]) == pcrc:
            return i
    return -1


@given(
    noise=st.binary(max_size=200),
    tail=st.binary(max_size=100),
    record=st.one_of(st.none(), st.tuples(st.integers(0, 30), st.binary(max_size=50))),
    after=st.integers(-1, 40),
    zeros=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_find_record_matches_the_reference(
    noise: bytes,
    tail: bytes,
    record: tuple[int, bytes] | None,
    after: int,
    zeros: bool,
) -> None:
    data = bytes(len(noise)) if zeros else noise
    if record is not None:
        data += encode_batch([(record[0], 1, record[1])], 0, 0, 1 << 62, 4096, 0)[0]
    data += tail
    assert _logscan.find_record(data, 0, after, MAX_PAYLOAD_BYTES) == reference_find(data, after)
