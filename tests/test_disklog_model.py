"""DiskLog against a model: random appends, gaps, rolls, crashes that cut the active
segment at a random byte, reopens, reads and retention (hypothesis state machine)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from felix.shard.disklog import DiskLog, DiskLogSettings
from felix.shard.log_format import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE

SEGMENT_BYTES = 4096
CONF = DiskLogSettings(segment_bytes=SEGMENT_BYTES, index_interval_bytes=128)


class ModelSegment:
    def __init__(self, base: int) -> None:
        self.base = base
        self.size = SEGMENT_HEADER_SIZE
        #: (offset, timestamp_us, payload, end position)
        self.records: list[tuple[int, int, bytes, int]] = []


class DiskLogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="disklog-model-"))
        self.dir = self.tmp / "s"
        self.log = DiskLog.open(self.dir, CONF, first_offset=0)
        self.segments = [ModelSegment(0)]
        self.next_offset = 0
        self.clock = 1_000

    def teardown(self) -> None:
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
