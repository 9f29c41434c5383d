"""Fault tests of the DiskLog engine: power loss, bit flips, kill -9 of a writer.

Every check of what is on disk goes through tests/segfiles.py, an independent reader
of the format, besides felix's own reader. ``FELIX_FAULT_ROUNDS`` scales the number
of random rounds (``make faults`` runs many; ``make test`` a few).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from felix.errors import LogDamaged
from felix.shard.disklog import DiskLog, DiskLogSettings
from felix.shard.offsets import OffsetReservations
from tests import segfiles
from tests.disklog_appender import payload_for, timestamp_for

ROUNDS = int(os.environ.get("FELIX_FAULT_ROUNDS", "1"))
SMALL = DiskLogSettings(segment_bytes=4096, index_interval_bytes=512)
# What tests/disklog_appender.py uses.
CHILD = DiskLogSettings(segment_bytes=8192, index_interval_bytes=1024)
REPO = Path(__file__).resolve().parent.parent


def _read_all(log: DiskLog, start: int = 0) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    while True:
        page = log.read(start, 100, 1 << 20)
        if not page:
            return out
        out += [(r.offset, r.timestamp_us, r.payload) for r in page]
        start = page[-1].offset + 1


def _on_disk(directory: Path) -> list[tuple[int, int, bytes]]:
    return [(r.offset, r.timestamp_us, r.payload) for r in segfiles.read_stream(directory)]


def _fill(
    log: DiskLog, rng: random.Random, batches: int, reservations: OffsetReservations | None = None
) -> list[tuple[int, int, bytes]]:
    """Append random batches (with gaps) and sync now and then; returns what was written."""
    written: list[tuple[int, int, bytes]] = []
    for _ in range(batches):
        start = log.next_offset + (rng.randint(1, 5) if rng.random() < 0.1 else 0)
        batch = [
            (o, timestamp_for(o), payload_for(o)) for o in range(start, start + rng.randint(1, 6))
        ]
        if reservations is not None:
            reservations.ensure("t/n/s", batch[-1][0] + 1)
        log.append(batch)
        written += batch
        if rng.random() < 0.2:
            log.sync()
    return written


# -- simulated power loss ------------------------------------------------------------


# DiskLog fdatasyncs a segment when it seals it and synced_offset then covers it, so
# even cutting every segment independently past the synced offset (per_segment) only
# ever cuts the newest one; sealed_whole says so explicitly.
@pytest.mark.parametrize("mode", ["prefix", "sealed_whole", "per_segment"])
def test_power_loss_loses_only_unsynced_records_and_never_reuses_offsets(
    tmp_path: Path, mode: str
) -> None:
    for seed in range(8 * ROUNDS):
        rng = random.Random(seed)
        live, crashed = tmp_path / f"live{seed}", tmp_path / f"crash{seed}"
        live.mkdir()
        reservations = OffsetReservations(tmp_path / f"offsets{seed}", block=64)
        log = DiskLog.open(live / "log", SMALL, first_offset=0)
        written = _fill(log, rng, rng.randint(5, 80), reservations)
        synced = log.synced_offset
        assert synced <= log.next_offset
        # The machine stops here: copy the files as they are, drop what was not fsynced.
        segfiles.copy_tree(live, crashed)
        log.close()
        segfiles.power_loss(crashed / "log", synced, rng, mode=mode)
        # Indexes are written without fsync (derived data): any may come back short.
        for idx in (crashed / "log").glob("*.idx"):
            if rng.random() < 0.3:
                os.truncate(idx, rng.randrange(idx.stat().st_size))

        after = DiskLog.open(crashed / "log", SMALL, first_offset=0)
        got = _read_all(after)
        want_synced = [r for r in written if r[0] < synced]
        assert [r for r in got if r[0] < synced] == want_synced, f"seed {seed}"
        assert set(got) <= set(written)
        assert after.next_offset >= synced
        assert after.synced_offset == after.next_offset  # recovered data is on disk
        assert _on_disk(crashed / "log") == got  # felix's reader and ours agree
        digest = segfiles.tree_digest(crashed / "log")
        after.close()

        # Recovery is idempotent: a second open finds nothing to cut, changes nothing.
        again = DiskLog.open(crashed / "log", SMALL, first_offset=0)
        assert again.recovery.torn_bytes_cut == 0
        assert _read_all(again) == got
        assert segfiles.tree_digest(crashed / "log") == digest

        # The shard continues at max(log end, reservation mark): no offset is reused
        # and the lost range reads as a gap.
        marks = OffsetReservations(tmp_path / f"offsets{seed}", block=64)
        resume = max(again.next_offset, marks.start_offset("t/n/s"))
        assert resume > max((r[0] for r in written), default=-1)
        again.skip_to(resume)
        again.append([(resume, timestamp_for(resume), b"after")])
        assert _read_all(again)[-1] == (resume, timestamp_for(resume), b"after")
        again.close()


def test_empty_or_half_written_new_segment_is_a_torn_tail(tmp_path: Path) -> None:
    log = DiskLog.open(tmp_path / "log", SMALL, first_offset=0)
    written = _fill(log, random.Random(1), 60)
    log.sync()
    log.close()
    base = written[-1][0] + 1
    for size in (0, 5, 31):
        seg = tmp_path / "log" / f"{base:020d}.seg"
        seg.write_bytes(segfiles.segment_header(base, 1)[:size])
        again = DiskLog.open(tmp_path / "log", SMALL, first_offset=0)
        assert _read_all(again) == written
        assert again.next_offset >= base
        again.close()


# -- bit flips -----------------------------------------------------------------------


def _sealed_log(directory: Path, rng: random.Random) -> list[tuple[int, int, bytes]]:
    log = DiskLog.open(directory, SMALL, first_offset=0)
    written = _fill(log, rng, 150)
    log.sync()
    log.close()
    assert len(segfiles.segment_paths(directory)) >= 3
    # Every sealed segment's index is right, by the independent reader.
    for seg in segfiles.segment_paths(directory)[:-1]:
        segfiles.check_index(seg, SMALL.index_interval_bytes)
    return written


def test_bit_flip_in_a_sealed_segment_is_refused_naming_file_and_byte(tmp_path: Path) -> None:
    for seed in range(6 * ROUNDS):
        rng = random.Random(seed)
        d = tmp_path / f"log{seed}"
        written = _sealed_log(d, rng)
        sealed = segfiles.segment_paths(d)[:-1]
        victim = rng.choice(sealed)
        scan = segfiles.scan_segment(victim)
        rec = rng.choice(scan.records)
        end = rec.position + segfiles.REC_HEADER_SIZE + len(rec.payload)
        pos = rng.randrange(rec.position, end)
        segfiles.flip_bit(victim, pos, rng.randrange(8))
        digest = segfiles.tree_digest(d)

        with pytest.raises(LogDamaged) as info:
            log = DiskLog.open(d, SMALL, first_offset=0)
            try:
                _read_all(log)
            finally:
                log.close()
        err = info.value
        assert victim.name in str(err.file) and victim.name in str(err)
        assert rec.position <= err.position <= pos, (seed, rec.position, pos, err)
        assert f"byte {err.position}" in str(err)
        assert segfiles.tree_digest(d) == digest, "a damaged log was modified"
        # Before the flip the victim held exactly what was written there.
        assert [(r.offset, r.timestamp_us, r.payload) for r in scan.records] == [
            w for w in written if scan.records[0].offset <= w[0] <= scan.records[-1].offset
        ]


def test_bit_flip_inside_the_active_segment_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    log = DiskLog.open(tmp_path / "log", SMALL, first_offset=0)
    _fill(log, random.Random(3), 150)
    log.sync()
    log.close()
    active = segfiles.segment_paths(tmp_path / "log")[-1]
    records = segfiles.scan_segment(active).records
    assert len(records) >= 3
    segfiles.flip_bit(active, records[0].position + segfiles.REC_HEADER_SIZE - 1)
    digest = segfiles.tree_digest(tmp_path / "log")
    with pytest.raises(LogDamaged) as info:
        DiskLog.open(tmp_path / "log", SMALL, first_offset=0).close()
    assert info.value.position == records[0].position and active.name in str(info.value)
    assert segfiles.tree_digest(tmp_path / "log") == digest


def test_bit_flip_in_segment_header_is_refused(tmp_path: Path) -> None:
    written = _sealed_log(tmp_path / "log", random.Random(4))
    victim = segfiles.segment_paths(tmp_path / "log")[1]
    segfiles.flip_bit(victim, 10)
    digest = segfiles.tree_digest(tmp_path / "log")
    with pytest.raises(LogDamaged) as info:
        log = DiskLog.open(tmp_path / "log", SMALL, first_offset=0)
        try:
            _read_all(log)
        finally:
            log.close()
    assert victim.name in str(info.value) and info.value.position < segfiles.SEG_HEADER_SIZE
    assert segfiles.tree_digest(tmp_path / "log") == digest
    assert written


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete", "garbage"])
def test_damaged_index_is_rebuilt_and_segments_untouched(tmp_path: Path, fault: str) -> None:
    for seed in range(3 * ROUNDS):
        rng = random.Random(seed)
        d = tmp_path / f"log{seed}"
        written = _sealed_log(d, rng)
        indexes = sorted(d.glob("*.idx"))
        assert indexes, "no index files written"
        victim = rng.choice(indexes)
        size = victim.stat().st_size
        if fault == "flip":
            segfiles.flip_bit(victim, rng.randrange(size), rng.randrange(8))
        elif fault == "truncate":
            os.truncate(victim, rng.randrange(size))
        elif fault == "delete":
            victim.unlink()
        else:
            victim.write_bytes(rng.randbytes(size))
        segs = {p.name: h for p, h in _seg_digests(d).items()}
        log = DiskLog.open(d, SMALL, first_offset=0)
        assert log.recovery.rebuilt_indexes >= 1
        assert _read_all(log) == written
        # Reads from the middle go through the (rebuilt) index.
        for rec in rng.sample(written, 10):
            assert log.read(rec[0], 1, 1 << 20)[0].payload == rec[2]
        log.close()
        assert {p.name: h for p, h in _seg_digests(d).items()} == segs
        for seg in segfiles.segment_paths(d)[:-1]:
            segfiles.check_index(seg, SMALL.index_interval_bytes)
        again = DiskLog.open(d, SMALL, first_offset=0)
        assert again.recovery.rebuilt_indexes == 0
        again.close()


def _seg_digests(d: Path) -> dict[Path, str]:
    return {d / name: h for name, h in segfiles.tree_digest(d).items() if name.endswith(".seg")}


# -- kill -9 of a writer -------------------------------------------------------------


def _run_until_killed(directory: Path, rng: random.Random) -> tuple[int, int, int]:
    """Start an appender child, SIGKILL it at a random moment; return (offset at open,
    highest acknowledged next_offset, highest synced_offset) from its output."""
    cmd = [sys.executable, "-m", "tests.disklog_appender", str(directory), "5"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    opened = acked = synced = -1
    stop_after = rng.randint(1, 400)
    seen = 0
    while True:
        line = proc.stdout.readline().decode()
        if not line:
            raise AssertionError(
                f"appender died: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        kind, *nums = line.split()
        if kind == "O":
            opened = int(nums[0])
        elif kind == "A":
            acked = int(nums[0])
            seen += 1
        elif kind == "S":
            synced = int(nums[0])
        if seen >= stop_after:
            break
    if rng.random() < 0.5:
        time.sleep(rng.random() * 0.01)  # let it run on unobserved for a moment
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if proc.stderr is not None:
        proc.stderr.close()
    return opened, acked, synced


def test_kill_9_of_an_appending_process_loses_nothing_written(tmp_path: Path) -> None:
    rng = random.Random(12)
    directory = tmp_path / "log"
    acked_ever = 0
    for _ in range(3 * ROUNDS):
        opened, acked, _synced = _run_until_killed(directory, rng)
        # A restart continues where the previous run's acknowledged records end.
        assert opened >= acked_ever
        acked_ever = max(acked_ever, acked)
        recs = segfiles.read_stream(directory, allow_torn_tail=True)
        offsets = [r.offset for r in recs]
        assert offsets == list(range(len(offsets))), "lost or reordered records"
        assert len(offsets) >= acked, "an acknowledged (written) record is missing"
        for r in recs:
            assert (r.timestamp_us, r.payload) == (timestamp_for(r.offset), payload_for(r.offset))
    log = DiskLog.open(directory, CHILD, first_offset=0)
    for seg in segfiles.segment_paths(directory)[:-1]:
        segfiles.check_index(seg, CHILD.index_interval_bytes)
    got = _read_all(log)
    assert [r[0] for r in got] == list(range(len(got))) and len(got) >= acked_ever
    assert all(r[2] == payload_for(r[0]) for r in got)
    log.close()


# -- a crash during recovery -----------------------------------------------------------


class _Crash(BaseException):
    """The process "dies" here: what it did to the files so far stays."""


_MUTATING = ("write", "pwrite", "ftruncate", "fsync", "fdatasync", "replace", "unlink", "rename")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int | None) -> list[str]:
    """Make the k-th file-changing system call (0-based) raise _Crash before it runs
    (None: never); returns the log of calls seen."""
    calls: list[str] = []

    def wrap(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name != "open" or (len(args) > 1 and args[1] & _WRITE_FLAGS):
                if len(calls) == k:
                    raise _Crash(name)
                calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in (*_MUTATING, "open"):
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return calls


def test_a_crash_at_any_step_of_recovery_recovers_to_the_same_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery is idempotent: stopped before any one of its file changes, the next open
    ends with exactly the records and files an uninterrupted recovery gives."""
    damaged = tmp_path / "damaged"
    _sealed_log(damaged, random.Random(9))
    indexes = sorted(damaged.glob("*.idx"))
    indexes[0].unlink()  # missing
    indexes[-1].write_bytes(b"stale" * 40)  # damaged
    active = segfiles.segment_paths(damaged)[-1]
    with active.open("ab") as f:  # a torn tail
        f.write(segfiles.record(10**6, 1, b"x" * 300)[:100])

    def recover(directory: Path) -> tuple[list[tuple[int, int, bytes]], int]:
        log = DiskLog.open(directory, SMALL, first_offset=0)
        try:
            return _read_all(log), log.recovery.torn_bytes_cut
        finally:
            log.close()

    reference = segfiles.copy_tree(damaged, tmp_path / "reference")
    with monkeypatch.context() as m:
        steps = _crash_at(m, None)
        want, cut = recover(reference)
    assert cut == 100 and len(steps) >= 3, steps
    want_files = segfiles.tree_digest(reference)
    for k in range(len(steps)):
        d = segfiles.copy_tree(damaged, tmp_path / f"crash{k}")
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with pytest.raises(_Crash):
                recover(d)
        got, cut_again = recover(d)
        assert got == want, f"crash before step {k} ({steps[k]})"
        assert cut_again in (0, 100)
        assert segfiles.tree_digest(d) == want_files, f"crash before step {k} ({steps[k]})"


def test_a_crash_at_any_step_of_retention_loses_only_whole_old_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes whole sealed segments, oldest first, one file at a time: a crash
    before any of those deletions leaves a log that opens (no orphan index or hole is
    damage), holds a suffix of the records from a segment boundary, and the next
    retention run ends with the same files as an uninterrupted one."""
    settings = DiskLogSettings(segment_bytes=4096, index_interval_bytes=512, retention_bytes=9000)
    full = tmp_path / "full"
    log = DiskLog.open(full, settings, first_offset=0)
    written = _fill(log, random.Random(11), 150)
    log.sync()
    log.close()
    # The first offset of every segment: where a log cut at a segment boundary starts.
    firsts = [segfiles.scan_segment(p).records[0].offset for p in segfiles.segment_paths(full)]
    assert len(firsts) >= 5

    def retain(directory: Path) -> list[tuple[int, int, bytes]]:
        log = DiskLog.open(directory, settings, first_offset=0)
        try:
            log.enforce_retention(10**18)
            return _read_all(log)
        finally:
            log.close()

    reference = segfiles.copy_tree(full, tmp_path / "reference")
    with monkeypatch.context() as m:
        steps = _crash_at(m, None)
        want = retain(reference)
    assert want and len(want) < len(written) and "unlink" in steps, steps
    want_files = segfiles.tree_digest(reference)
    for k, step in enumerate(steps):
        d = segfiles.copy_tree(full, tmp_path / f"crash{k}")
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with pytest.raises(_Crash):
                retain(d)
        log = DiskLog.open(d, settings, first_offset=0)
        got = _read_all(log)
        log.close()
        assert got == written[len(written) - len(got) :], f"crash before step {k} ({step})"
        assert got and got[0][0] in firsts, (k, step, got[:1])
        assert retain(d) == want
        assert segfiles.tree_digest(d) == want_files, f"crash before step {k} ({step})"


# -- the specification both ways -----------------------------------------------------


def test_files_written_by_the_specification_alone_are_read_by_disklog(tmp_path: Path) -> None:
    """Segments written by tests/segfiles.py (no index) open, rebuild their indexes and
    read back record for record: felix's reader follows the format as documented."""
    for seed in range(3 * ROUNDS):
        rng = random.Random(seed)
        d = tmp_path / f"spec{seed}"
        written: list[tuple[int, int, bytes]] = []
        offset = rng.randrange(0, 1000)
        for _ in range(rng.randint(1, 5)):
            base = offset
            recs = []
            for _ in range(rng.randint(1, 40)):
                offset += rng.choice((1, 1, 1, 2, 7))  # gaps allowed
                recs.append((offset, rng.randrange(2**40), rng.randbytes(rng.randrange(300))))
            segfiles.write_segment(d, base, recs)
            written += recs
            offset += 1
        log = DiskLog.open(d, SMALL, first_offset=0)
        assert _read_all(log) == written
        assert log.next_offset == written[-1][0] + 1
        assert log.recovery.torn_bytes_cut == 0
        log.close()
        for seg in segfiles.segment_paths(d)[:-1]:
            segfiles.check_index(seg, SMALL.index_interval_bytes)
