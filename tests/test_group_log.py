"""GroupLog: a queue group's state file (felix/shard/queue/group_log.py).

Round trips of every journal entry kind, torn tails at every byte, bit flips at every
bit, compaction (equivalence and crash safety), crashes during recovery, the sync
counters under a concurrent fsync thread, the layout helpers, and a file built from
docs/log-format.md ("Group state") alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felix.errors import BadRequest, DiskFull, LocalProtocolError, LogDamaged, LogPoisoned
from felix.shard.queue import group_log as gl
from felix.shard.queue.group_log import (
    FILE_HEADER_SIZE,
    GroupLog,
    decode_bytes,
    decode_file,
    discover,
    path_for,
)
from felix.shard.queue.journal import (
    Ack,
    Dead,
    Dying,
    Entry,
    EntryState,
    Fail,
    GroupSnapshot,
    JournalEntry,
    Lease,
    Release,
    Skip,
    Start,
)

# -- helpers ---------------------------------------------------------------------------

ALL_KINDS: list[JournalEntry] = [
    Start(100),
    Lease(100, 1),
    Lease(101, 1),
    Lease(103, 2),  # jumps over 102: skipped
    Fail(100, 1, 1_700_000_000_000_000, "nak: try later"),
    Dying(101, "term", "détail ✓"),
    Release(103),
    Ack(100, 1),
    Dead(101),
    Skip(104, 3),
    Lease(103, 3),
    Fail(103, 2, 0, ""),
]


def applied(entries: Sequence[JournalEntry], base: GroupSnapshot | None = None) -> GroupSnapshot:
    snap = base if base is not None else GroupSnapshot()
    for e in entries:
        snap.apply(e)
    return snap


def copy_snapshot(s: GroupSnapshot) -> GroupSnapshot:
    return decode_bytes(gl.encode_file(s)).snapshot


def digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def write_log(path: Path, batches: Sequence[Sequence[JournalEntry]]) -> list[int]:
    """Append ``batches`` to a new group file; returns each frame's start position."""
    log, _ = GroupLog.open(path)
    starts = []
    for batch in batches:
        starts.append(log.size_bytes)
        log.append(batch)
    log.close()
    return starts


def flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


# -- round trips ----------------------------------------------------------------------


def test_every_entry_kind_round_trips_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.glog"
    log, snap = GroupLog.open(path)
    assert snap == GroupSnapshot() and path.exists() and log.torn_bytes == 0
    for e in ALL_KINDS:
        log.append([e])
    log.append(ALL_KINDS)  # several kinds in one frame
    assert log.written == 2 * len(ALL_KINDS)
    log.close()
    got = decode_file(path)
    assert [e for d in got.deltas for e in d.entries] == ALL_KINDS + ALL_KINDS
    assert [type(e) for e in got.deltas[-1].entries] == [type(e) for e in ALL_KINDS]
    assert len(got.deltas) == len(ALL_KINDS) + 1 and got.torn_bytes == 0
    again, state = GroupLog.open(path)
    assert state == applied(ALL_KINDS + ALL_KINDS)
    again.close()


_offsets = st.integers(0, 40)
_text = st.text(max_size=12)
_entry = st.one_of(
    st.builds(Start, _offsets),
    st.builds(Lease, _offsets, st.integers(0, 2**32 - 1)),
    st.builds(Ack, _offsets, st.integers(0, 8)),
    st.builds(Fail, _offsets, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), _text),
    st.builds(Release, _offsets),
    st.builds(Dying, _offsets, st.sampled_from(["term", "max_deliveries", ""]), _text),
    st.builds(Dead, _offsets),
    st.builds(Skip, _offsets, st.integers(0, 5)),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.lists(_entry, min_size=1, max_size=6), max_size=12),
    compact_at=st.one_of(st.none(), st.integers(0, 12)),
)
def test_reopen_gives_exactly_the_state_of_applying_the_entries(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[JournalEntry]],
    compact_at: int | None,
) -> None:
    path = tmp_path_factory.mktemp("g") / "g.glog"
    log, state = GroupLog.open(path)
    for i, batch in enumerate(batches):
        if i == compact_at:
            log.compact(state)
        log.append(batch)
        for e in batch:
            state.apply(e)
    log.close()
    again, got = GroupLog.open(path)
    assert got == state
    assert again.torn_bytes == 0
    # Compacting the recovered state gives a file with the same state and no delta.
    again.compact(got)
    again.close()
    decoded = decode_file(path)
    assert decoded.deltas == [] and decoded.snapshot == state


def test_snapshot_with_every_entry_state_round_trips() -> None:
    snap = GroupSnapshot(
        10,
        20,
        {
            10: Entry(EntryState.AVAILABLE, 3, 2, 2**63, "", "nak ✓"),
            12: Entry(EntryState.LEASED, 1, 0, 0, "", ""),
            19: Entry(EntryState.DYING, 5, 5, 7, "max_deliveries", "x" * 1024),
        },
        acked=1,
        dead=2,
        skipped=3,
    )
    assert decode_bytes(gl.encode_file(snap)).snapshot == snap


def test_a_big_snapshot_spans_several_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gl, "SNAPSHOT_PART_BYTES", 200)
    snap = GroupSnapshot(
        0, 300, {o: Entry(attempts=o, detail="d" * (o % 7)) for o in range(0, 300, 2)}
    )
    data = gl.encode_file(snap)
    kinds = []
    pos = FILE_HEADER_SIZE
    while pos < len(data):
        length, _ = struct.unpack_from(">II", data, pos)
        kinds.append(data[pos + 8])
        pos += 8 + length
    assert kinds[0] == gl.FRAME_SNAPSHOT and len(kinds) > 10
    assert set(kinds[1:]) == {gl.FRAME_SNAPSHOT_MORE}
    assert decode_bytes(data).snapshot == snap
    # A frame of it missing, or a DELTA in the middle of it, is damage.
    with pytest.raises(LogDamaged):
        decode_bytes(data[: pos - 1])
    second = FILE_HEADER_SIZE + 8 + struct.unpack_from(">I", data, FILE_HEADER_SIZE)[0]
    with pytest.raises(LogDamaged):
        decode_bytes(data[:second] + gl.encode_frame(gl.FRAME_DELTA, gl.encode_entries([Dead(1)])))
    with pytest.raises(LogDamaged):
        decode_bytes(data[:second])


def test_an_append_over_the_frame_limit_is_split_into_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gl, "MAX_FRAME_BYTES", 100)
    entries: list[JournalEntry] = [Lease(o, 1) for o in range(40)]
    path = tmp_path / "g.glog"
    log, _ = GroupLog.open(path)
    log.append(entries)
    log.close()
    got = decode_file(path)
    assert len(got.deltas) > 3
    assert [e for d in got.deltas for e in d.entries] == entries


# -- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        Fail(1, 1, 0, "x" * 65536),
        Dying(1, "r" * 70000, ""),
        Dying(1, "term", "\ud800"),
        Lease(-1, 1),
        Lease(1, 2**32),
        Ack(2**64, 1),
        "not an entry",
    ],
)
def test_entries_the_format_cannot_hold_are_refused_before_writing(
    tmp_path: Path, entry: Any
) -> None:
    path = tmp_path / "g.glog"
    log, _ = GroupLog.open(path)
    log.append([Lease(0, 1)])
    before = path.read_bytes()
    with pytest.raises(LocalProtocolError):
        log.append([Lease(1, 1), entry])
    assert path.read_bytes() == before and log.written == 1
    log.append([Ack(0, 1)])  # still usable
    log.close()
    assert GroupLog.open(path)[1] == applied([Lease(0, 1), Ack(0, 1)])


def test_a_string_of_65535_bytes_fits() -> None:
    e = Fail(1, 1, 0, "é" * 32767 + "x")
    assert len(e.detail.encode()) == 65535
    body = gl.encode_entries([e])
    assert gl._decode_entries(body, 0, len(body)) == (e,)


def test_bad_snapshots_are_refused_on_write() -> None:
    with pytest.raises(LocalProtocolError):
        gl.encode_file(GroupSnapshot(5, 4))
    with pytest.raises(LocalProtocolError):
        gl.encode_file(GroupSnapshot(5, 8, {9: Entry()}))


def _file(snap_body: bytes, *frames: bytes) -> bytes:
    return (
        gl.encode_file_header() + gl.encode_frame(gl.FRAME_SNAPSHOT, snap_body) + b"".join(frames)
    )


def _snap_body(floor: int, nxt: int, count: int, entries: bytes = b"") -> bytes:
    return struct.pack(">QQQQQI", floor, nxt, 0, 0, 0, count) + entries


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "truncated"),
        (b"FLGS", "truncated"),
        (gl.encode_file_header(), "snapshot"),
        (b"XXXX" + gl.encode_file_header()[4:], "CRC"),
        (_file(_snap_body(5, 4, 0)), "floor"),
        (_file(_snap_body(0, 2**40, 2**32 - 1)), "count"),
        (_file(_snap_body(0, 10, 1, struct.pack(">QBIIQ", 3, 7, 0, 0, 0) + b"\0\0\0\0")), "state"),
        (
            _file(_snap_body(0, 10, 1, struct.pack(">QBIIQ", 12, 0, 0, 0, 0) + b"\0\0\0\0")),
            "window",
        ),
        (
            _file(
                _snap_body(0, 10, 0),
                gl.encode_frame(9, b"x"),
                gl.encode_frame(2, b"\x07" + bytes(8)),
            ),
            "type 9",
        ),
        (_file(_snap_body(0, 10, 0), gl.encode_frame(2, b"\x63" + bytes(8))), "tag 99"),
        (_file(_snap_body(0, 10, 0), gl.encode_frame(2, b"\x02" + bytes(8))), "runs past"),
        (
            _file(
                _snap_body(0, 10, 0), gl.encode_frame(2, b"\x04" + bytes(20) + b"\x00\x02\xff\xfe")
            ),
            "UTF-8",
        ),
        (_file(_snap_body(0, 10, 0), gl.encode_frame(2, b"")), "without entries"),
        (_file(_snap_body(0, 10, 0), gl.encode_frame(1, _snap_body(0, 10, 0))), "DELTA expected"),
        (
            gl.encode_file_header() + gl.encode_frame(2, gl.encode_entries([Dead(1)])),
            "not SNAPSHOT",
        ),
    ],
)
def test_damage_is_refused_naming_file_and_byte_and_nothing_changes(
    tmp_path: Path, data: bytes, why: str
) -> None:
    path = tmp_path / "g.glog"
    path.write_bytes(data)
    with pytest.raises(LogDamaged) as info:
        GroupLog.open(path)
    assert why in str(info.value), info.value
    assert str(path) in str(info.value) and f"at byte {info.value.position}" in str(info.value)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.glog"]


def test_a_huge_frame_length_is_damage_not_an_allocation(tmp_path: Path) -> None:
    path = tmp_path / "g.glog"
    starts = write_log(path, [[Lease(1, 1)], [Lease(2, 1)], [Lease(3, 1)]])
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, starts[1], 0xFFFFFFF0)
    path.write_bytes(bytes(data))
    with pytest.raises(LogDamaged) as info:
        GroupLog.open(path)
    assert info.value.position == starts[1] and "length" in info.value.why


# -- torn tails and bit flips ------------------------------------------------------------


BATCHES: list[list[JournalEntry]] = [
    [Start(7)],
    [Lease(7, 1), Lease(8, 1), Lease(9, 1)],
    [Fail(8, 1, 123, "boom")],
    [Ack(7, 1), Dying(9, "term", "bad")],
    [Lease(8, 2), Skip(10, 2), Lease(12, 1), Dead(9)],
]


def _compacted_then_deltas(path: Path) -> tuple[bytes, int, GroupSnapshot, GroupSnapshot]:
    """A file with a non-empty snapshot and deltas: (bytes, start of the last frame,
    state without the last frame, state with it)."""
    log, state = GroupLog.open(path)
    for batch in BATCHES[:3]:
        log.append(batch)
        applied(batch, state)
    log.compact(state)
    for batch in BATCHES[3:]:
        last = log.size_bytes
        before = copy_snapshot(state)
        log.append(batch)
        applied(batch, state)
    log.close()
    return path.read_bytes(), last, before, state


def test_a_torn_last_frame_is_cut_at_every_byte(tmp_path: Path) -> None:
    data, last, before, full = _compacted_then_deltas(tmp_path / "orig.glog")
    assert GroupLog.open(tmp_path / "orig.glog")[1] == full
    for cut in range(last, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        path = d / "g.glog"
        path.write_bytes(data[:cut])
        log, state = GroupLog.open(path)
        assert state == before, cut
        assert log.torn_bytes == cut - last and log.size_bytes == last
        log.append([Lease(20, 1)])  # appends continue after the cut
        log.close()
        assert path.stat().st_size > last
        again, state2 = GroupLog.open(path)
        assert again.torn_bytes == 0 and state2 == applied([Lease(20, 1)], copy_snapshot(before))
        again.close()


def test_recovering_twice_changes_nothing_the_second_time(tmp_path: Path) -> None:
    data, last, before, _ = _compacted_then_deltas(tmp_path / "orig.glog")
    path = tmp_path / "g.glog"
    path.write_bytes(data[: last + 5])
    log, first = GroupLog.open(path)
    log.close()
    files = digest(tmp_path)
    log, second = GroupLog.open(path)
    log.close()
    assert first == second == before and log.torn_bytes == 0
    assert digest(tmp_path) == files


def test_every_bit_flip_is_damage_or_a_cut_torn_tail(tmp_path: Path) -> None:
    """Never silently accepted with another state: a flip either raises LogDamaged or
    lies in the last frame, which is cut (the state is then the one before it)."""
    data, last, before, _ = _compacted_then_deltas(tmp_path / "g.glog")
    assert len(data) > 150
    outcomes = {"damage": 0, "torn": 0}
    for pos in range(len(data)):
        for bit in range(8):
            try:
                got = decode_bytes(flip(data, pos, bit), "g.glog")
            except LogDamaged as exc:
                assert exc.position <= pos or pos < FILE_HEADER_SIZE + 8, (pos, bit, exc)
                outcomes["damage"] += 1
                continue
            assert pos >= last, (pos, bit)
            assert got.torn_bytes == len(data) - last, (pos, bit)
            assert got.state() == before, (pos, bit)
            outcomes["torn"] += 1
    assert outcomes["torn"] == 8 * (len(data) - last)
    # And on disk: damage changes nothing, a torn flip is cut.
    path = tmp_path / "g.glog"
    for pos in (3, FILE_HEADER_SIZE + 10, last - 1):
        path.write_bytes(flip(data, pos, 1))
        with pytest.raises(LogDamaged):
            GroupLog.open(path)
        assert path.read_bytes() == flip(data, pos, 1)
    path.write_bytes(flip(data, last + 9, 1))
    log, state = GroupLog.open(path)
    log.close()
    assert state == before and path.read_bytes() == data[:last]


def test_a_bad_frame_followed_by_a_valid_one_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "g.glog"
    starts = write_log(path, BATCHES)
    data = path.read_bytes()
    bad = flip(data, starts[2] + 10, 0)
    path.write_bytes(bad)
    with pytest.raises(LogDamaged) as info:
        GroupLog.open(path)
    assert info.value.position == starts[2]
    assert f"valid frame follows at byte {starts[3]}" in info.value.why
    assert path.read_bytes() == bad


# -- compaction ----------------------------------------------------------------------------


def test_compaction_is_triggered_by_delta_growth_and_keeps_the_state(tmp_path: Path) -> None:
    path = tmp_path / "g.glog"
    log, state = GroupLog.open(path, compact_bytes=2000)
    applied([Start(0)], state)
    log.append([Start(0)])
    n = 0
    while not log.needs_compaction():
        batch: list[JournalEntry] = [Lease(n, 1), Ack(n, 1)] if n % 3 else [Lease(n, 1)]
        log.append(batch)
        applied(batch, state)
        n += 1
    assert log.size_bytes - FILE_HEADER_SIZE > 2000
    big = log.size_bytes
    log.compact(state)
    assert log.size_bytes < big and not log.needs_compaction()
    assert log.synced == log.written  # the compacted file is fsynced
    written = log.written
    log.append([Ack(0, n)])
    applied([Ack(0, n)], state)
    assert log.written == written + 1
    log.close()
    assert not (tmp_path / "g.glog.tmp").exists()
    again, got = GroupLog.open(path)
    assert got == state and again.torn_bytes == 0
    again.close()


def test_a_large_snapshot_raises_the_compaction_threshold(tmp_path: Path) -> None:
    path = tmp_path / "g.glog"
    log, _ = GroupLog.open(path, compact_bytes=100)
    snap = GroupSnapshot(0, 1000, {o: Entry() for o in range(1000)})
    log.compact(snap)
    snapshot_bytes = log.size_bytes
    while log.size_bytes - snapshot_bytes <= 4 * snapshot_bytes:
        assert not log.needs_compaction()
        log.append([Release(5)] * 100)
    assert log.needs_compaction()
    log.close()


# -- crashes at every file-changing step ---------------------------------------------------


class _Crash(BaseException):
    """The process "dies" here: what it did to the files so far stays."""


_MUTATING = (
    "write",
    "pwrite",
    "ftruncate",
    "fsync",
    "fdatasync",
    "replace",
    "rename",
    "unlink",
    "mkdir",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int | None) -> list[str]:
    """Make the k-th file-changing system call (0-based) raise _Crash before it runs
    (None: never); returns the calls seen."""
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


def _recover(path: Path) -> GroupSnapshot:
    log, state = GroupLog.open(path)
    log.close()
    return state


@pytest.mark.parametrize("case", ["missing", "torn", "stale_tmp"])
def test_a_crash_at_any_step_of_open_recovers_to_the_same_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    start = tmp_path / "start"
    path = start / "t" / "n" / "s" / "g.glog"
    if case != "missing":
        data, last, _, _ = _compacted_then_deltas(tmp_path / "orig.glog")
        path.parent.mkdir(parents=True)
        path.write_bytes(data[: last + 7] if case == "torn" else data)
        if case == "stale_tmp":
            (path.parent / "g.glog.tmp").write_bytes(data[:40])
    else:
        start.mkdir()
    reference = Path(shutil.copytree(start, tmp_path / "reference"))
    with monkeypatch.context() as m:
        steps = _crash_at(m, None)
        want = _recover(reference / path.relative_to(start))
    want_files = digest(reference)
    assert steps, steps
    for k, step in enumerate(steps):
        d = Path(shutil.copytree(start, tmp_path / f"crash{k}"))
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with pytest.raises(_Crash):
                _recover(d / path.relative_to(start))
        assert _recover(d / path.relative_to(start)) == want, f"crash before {k} ({step})"
        assert digest(d) == want_files, f"crash before step {k} ({step})"


def test_a_crash_at_any_step_of_compaction_leaves_the_old_or_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "orig" / "g.glog"
    path.parent.mkdir()
    log, state = GroupLog.open(path)
    for batch in BATCHES:
        log.append(batch)
        applied(batch, state)
    log.close()
    old = path.read_bytes()
    new = gl.encode_file(state)

    def compact(p: Path) -> None:
        log, got = GroupLog.open(p)
        try:
            log.compact(got)
        finally:
            log.close()  # os.close is not a file change

    ref = Path(shutil.copytree(path.parent, tmp_path / "ref")) / "g.glog"
    with monkeypatch.context() as m:
        steps = _crash_at(m, None)
        compact(ref)
    assert ref.read_bytes() == new and "replace" in steps, steps
    for k, step in enumerate(steps):
        p = Path(shutil.copytree(path.parent, tmp_path / f"crash{k}")) / "g.glog"
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with pytest.raises(_Crash):
                compact(p)
        assert p.read_bytes() in (old, new), f"crash before {k} ({step})"
        assert _recover(p) == state, f"crash before {k} ({step})"
        assert sorted(x.name for x in p.parent.iterdir()) == ["g.glog"]


def test_a_failed_compaction_before_the_rename_leaves_the_log_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "g.glog"
    log, state = GroupLog.open(path)
    log.append(BATCHES[0])
    applied(BATCHES[0], state)
    real = os.fsync

    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(DiskFull):
        log.compact(state)
    monkeypatch.setattr(os, "fsync", real)
    assert not (tmp_path / "g.glog.tmp").exists()
    log.append(BATCHES[1])
    applied(BATCHES[1], state)
    log.close()
    assert _recover(path) == state


# -- background compaction (no fsync on the owner thread) -------------------------------------


def _batches_with(
    state: GroupSnapshot, log: GroupLog, batches: Sequence[Sequence[JournalEntry]]
) -> None:
    for batch in batches:
        log.append(batch)
        applied(batch, state)


def test_a_background_compaction_switches_after_a_sync_and_keeps_the_state(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.glog"
    log, state = GroupLog.open(path, compact_bytes=100)
    _batches_with(state, log, BATCHES[:3])
    while not log.needs_compaction():
        _batches_with(state, log, [[Release(9)]])
    big = log.size_bytes
    log.begin_compaction(state)
    assert log.compacting and not log.needs_compaction()  # one at a time
    assert not log.compaction_ready()  # the new file is not on disk yet
    _batches_with(state, log, BATCHES[3:4])  # before the tmp's fsync: in both files
    assert log.sync() == log.written and log.compaction_ready()
    _batches_with(state, log, BATCHES[4:5])  # after the tmp's fsync: in both files
    log.finish_compaction()
    assert not log.compacting and log.size_bytes < big
    assert not (tmp_path / "g.glog.tmp").exists()
    _batches_with(state, log, [[Lease(20, 1)], [Ack(20, 1)]])  # after the rename: new file only
    assert decode_file(path).state() == state
    assert log.sync() == log.written == log.synced
    log.close()
    again, got = GroupLog.open(path)
    assert got == state and again.torn_bytes == 0
    again.close()


def test_entries_after_the_switch_are_synced_only_with_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, state = GroupLog.open(tmp_path / "g.glog")
    _batches_with(state, log, BATCHES[:2])
    log.begin_compaction(state)
    covered = log.sync()
    assert covered == log.written
    log.finish_compaction()
    _batches_with(state, log, BATCHES[2:3])
    written = log.written
    seen: list[tuple[int, int]] = []
    real = gl._fsync_dir

    def fsync_dir(p: Path) -> None:
        seen.append((log.synced, log.written))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(gl, "_fsync_dir", fsync_dir)
    with pytest.raises(OSError):
        log.sync()
    assert seen == [(covered, written)]
    assert log.synced == covered < written  # the data fsync alone claimed nothing
    with pytest.raises(LogPoisoned):
        log.sync()
    monkeypatch.setattr(gl, "_fsync_dir", real)
    log.close()
    assert _recover(tmp_path / "g.glog") == state  # kill -9: the page cache has it all


def test_a_sync_of_the_old_file_that_straddles_the_switch_claims_only_what_the_new_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, state = GroupLog.open(tmp_path / "g.glog")
    _batches_with(state, log, BATCHES[:2])
    log.begin_compaction(state)
    on_disk_in_new = log.sync()  # the tmp is durable up to here
    _batches_with(state, log, BATCHES[2:4])  # in both files, fsynced in neither
    later = log.written
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def slow(fd: int) -> None:
        entered.set()
        assert release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(log.sync()))
    t.start()
    assert entered.wait(10)  # the fsync thread holds dups of the old file and the tmp
    monkeypatch.setattr(os, "fdatasync", real)
    log.finish_compaction()  # the loop switches meanwhile
    release.set()
    t.join()
    # The old file is on disk up to ``later``; the new one (which a power loss may leave
    # under the name) only up to ``on_disk_in_new`` as far as this sync knows.
    assert got == [on_disk_in_new] and log.synced == on_disk_in_new < later
    assert log.sync() == later == log.synced  # data + directory of the new file
    log.close()
    assert _recover(tmp_path / "g.glog") == state


def test_the_owner_thread_never_fsyncs_during_a_background_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, state = GroupLog.open(tmp_path / "g.glog", compact_bytes=300)
    calls: list[tuple[str, str]] = []

    def recording(name: str, real: Any) -> Any:
        def call(fd: int) -> None:
            calls.append((name, threading.current_thread().name))
            real(fd)

        return call

    monkeypatch.setattr(os, "fsync", recording("fsync", os.fsync))
    monkeypatch.setattr(os, "fdatasync", recording("fdatasync", os.fdatasync))
    switches = 0
    for n in range(400):
        _batches_with(state, log, [[Lease(n, 1), Ack(n, 1)]])
        if log.needs_compaction():
            log.begin_compaction(state)
        if n % 7 == 0:  # a round of the fsync thread
            t = threading.Thread(target=log.sync, name="fsync-thread")
            t.start()
            t.join()
        if log.compaction_ready():
            log.finish_compaction()
            switches += 1
    assert switches >= 3, switches
    assert calls and {thread for _, thread in calls} == {"fsync-thread"}, calls[:5]
    assert ("fsync", "fsync-thread") in calls  # the directory, after a switch
    monkeypatch.undo()
    log.close()
    assert _recover(tmp_path / "g.glog") == state


def test_a_crash_at_any_step_of_a_background_compaction_recovers_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends before the tmp's fsync, between it and the rename, after the rename and
    after the directory fsync; a crash before each file-changing call of the whole run
    (the tmp's write, its fdatasync, the rename, the directory fsync, the dual writes)
    recovers the state of every append that returned (or with the one in progress)."""
    path = tmp_path / "orig" / "g.glog"
    path.parent.mkdir()
    log, _ = GroupLog.open(path)
    _batches_with(GroupSnapshot(), log, BATCHES[:2])
    log.close()
    extra: list[list[JournalEntry]] = [[Lease(200, 1)], [Ack(200, 1)], [Lease(201, 1)]]
    plan: list[list[JournalEntry]] = [*BATCHES[2:], *extra]
    prefixes = [_recover(Path(shutil.copytree(path.parent, tmp_path / "p")) / "g.glog")]
    for batch in plan:
        prefixes.append(applied(batch, copy_snapshot(prefixes[-1])))

    def run(p: Path, done: list[int]) -> None:
        log, state = GroupLog.open(p)
        log.begin_compaction(state)
        log.append(plan[0])  # before the tmp's fsync
        done[0] += 1
        log.sync()  # fdatasync old + tmp
        log.append(plan[1])  # between the tmp's fsync and the rename
        done[0] += 1
        log.finish_compaction()  # rename
        for batch in plan[2:-2]:
            log.append(batch)  # after the rename, before the directory fsync
            done[0] += 1
        log.sync()  # fdatasync new + fsync directory
        for batch in plan[-2:]:
            log.append(batch)  # after it
            done[0] += 1
        log.sync()

    ref = Path(shutil.copytree(path.parent, tmp_path / "ref")) / "g.glog"
    with monkeypatch.context() as m:
        steps = _crash_at(m, None)
        done = [0]
        run(ref, done)
    assert done == [len(plan)] and _recover(ref) == prefixes[-1]
    for want in ("fdatasync", "replace", "fsync"):
        assert want in steps, steps
    for k, step in enumerate(steps):
        p = Path(shutil.copytree(path.parent, tmp_path / f"crash{k}")) / "g.glog"
        done = [0]
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with pytest.raises(_Crash):
                run(p, done)
        got = _recover(p)
        assert got in (prefixes[done[0]], prefixes[min(done[0] + 1, len(plan))]), (
            f"crash before {k} ({step}) after {done[0]} appends"
        )
        assert sorted(x.name for x in p.parent.iterdir()) == ["g.glog"]


def test_a_failed_write_of_the_new_file_abandons_the_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "g.glog"
    log, state = GroupLog.open(path, compact_bytes=100)
    _batches_with(state, log, BATCHES[:3])
    real = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DiskFull):
        log.begin_compaction(state)
    monkeypatch.setattr(os, "write", real)
    assert not log.compacting and not (tmp_path / "g.glog.tmp").exists()
    assert not log.needs_compaction()  # not again before the deltas grew further
    log.begin_compaction(state)  # an explicit one still may
    tmp_fd = log._compaction.fd  # type: ignore[union-attr]

    def full_tmp(fd: int, data: Any) -> int:
        if fd == tmp_fd:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full_tmp)
    _batches_with(state, log, BATCHES[3:4])  # the live file takes it: no error
    monkeypatch.setattr(os, "write", real)
    assert not log.compacting and not (tmp_path / "g.glog.tmp").exists()
    _batches_with(state, log, BATCHES[4:])
    log.close()
    assert _recover(path) == state


def test_close_during_a_background_compaction_removes_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "g.glog"
    log, state = GroupLog.open(path)
    _batches_with(state, log, BATCHES[:3])
    log.begin_compaction(state)
    log.sync()
    _batches_with(state, log, BATCHES[3:])
    log.close()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["g.glog"]
    assert _recover(path) == state


# -- sync ---------------------------------------------------------------------------------


def test_sync_counts_entries_and_is_a_no_op_when_nothing_is_new(tmp_path: Path) -> None:
    log, _ = GroupLog.open(tmp_path / "g.glog")
    assert (log.written, log.synced) == (0, 0)
    log.append([Lease(0, 1), Lease(1, 1)])
    assert (log.written, log.synced) == (2, 0)
    assert log.sync() == 2 and log.synced == 2
    assert log.sync() == 2
    log.append([Ack(0, 2)])
    assert log.sync() == 3
    log.close()
    assert log.sync() == 3  # a late call from the fsync thread after close
    with pytest.raises(LogPoisoned):
        log.append([Ack(0, 1)])


def test_sync_from_another_thread_while_appending_and_compacting(tmp_path: Path) -> None:
    log, state = GroupLog.open(tmp_path / "g.glog", compact_bytes=500)
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def fsync_thread() -> None:
        try:
            while not stop.is_set():
                written_before = log.written
                covered = log.sync()
                seen.append((written_before, covered))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=fsync_thread)
    t.start()
    try:
        for n in range(600):
            batch: list[JournalEntry] = [Lease(n, 1), Ack(n, 1)]
            log.append(batch)
            applied(batch, state)
            if log.needs_compaction():
                log.compact(state)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert all(covered >= before for before, covered in seen)
    assert [c for _, c in seen] == sorted(c for _, c in seen)  # monotonic
    assert log.sync() == log.written == 1200 == log.synced
    log.close()
    assert _recover(tmp_path / "g.glog") == state


def test_a_failed_fdatasync_poisons_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, _ = GroupLog.open(tmp_path / "g.glog")
    log.append([Lease(0, 1)])

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        log.sync()
    monkeypatch.undo()
    with pytest.raises(LogPoisoned):
        log.sync()
    with pytest.raises(LogPoisoned):
        log.append([Ack(0, 1)])
    log.close()


# -- layout, delete ------------------------------------------------------------------------


def test_path_for_and_discover(tmp_path: Path) -> None:
    root = tmp_path / "groups"
    assert discover(root) == []
    p = path_for(root, "acme/prod/orders", "billing")
    assert p == root / "acme" / "prod" / "orders" / "billing.glog"
    for key, group in [
        ("acme/prod/orders", "billing"),
        ("acme/prod/orders", "ship.v2"),
        ("b/n/s", "g"),
    ]:
        GroupLog.open(path_for(root, key, group))[0].close()
    # Strays discover ignores.
    (root / "acme" / "prod" / "orders" / "billing.glog.tmp").write_bytes(b"x")
    (root / "acme" / "prod" / "orders" / ".hidden.glog").write_bytes(b"x")
    (root / "acme" / "prod" / "orders" / "notes.txt").write_bytes(b"x")
    (root / "acme" / "prod" / "orders" / "dir.glog").mkdir()
    (root / "acme" / "stray.glog").write_bytes(b"x")
    (root / "acme" / "prod" / "orders" / "deeper").mkdir()
    (root / "acme" / "prod" / "orders" / "deeper" / "x.glog").write_bytes(b"x")
    (root / ".tmp" / "n" / "s").mkdir(parents=True)
    (root / ".tmp" / "n" / "s" / "g.glog").write_bytes(b"x")
    assert discover(root) == [
        ("acme/prod/orders", "billing"),
        ("acme/prod/orders", "ship.v2"),
        ("b/n/s", "g"),
    ]
    for key, group in discover(root):
        assert path_for(root, key, group).is_file()


@pytest.mark.parametrize(
    ("key", "group"),
    [
        ("a/b", "g"),
        ("a/b/c/d", "g"),
        ("a/../c", "g"),
        ("a/b/c", "x/y"),
        ("a/b/c", ".g"),
        ("a/b/c", ""),
        ("a/.b/c", "g"),
    ],
)
def test_path_for_refuses_bad_names(tmp_path: Path, key: str, group: str) -> None:
    with pytest.raises(BadRequest):
        path_for(tmp_path, key, group)


def test_delete_removes_the_file_and_a_new_open_starts_empty(tmp_path: Path) -> None:
    path = path_for(tmp_path, "t/n/s", "g")
    log, _ = GroupLog.open(path)
    log.append([Start(5), Lease(5, 1)])
    (path.parent / "g.glog.tmp").write_bytes(b"stale")
    log.delete()
    assert list(path.parent.iterdir()) == []
    assert discover(tmp_path) == []
    with pytest.raises(LogPoisoned):
        log.append([Ack(5, 1)])
    again, state = GroupLog.open(path)
    assert state == GroupSnapshot()
    again.close()


def test_open_refuses_dot_dot(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        GroupLog.open(tmp_path / ".." / "g.glog")


# -- the specification alone -----------------------------------------------------------------


def _spec_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _spec_frame(kind: int, body: bytes) -> bytes:
    typed = bytes([kind]) + body
    return struct.pack(">II", len(typed), zlib.crc32(typed)) + typed


def test_a_file_built_from_the_documented_format_alone_is_read(tmp_path: Path) -> None:
    """docs/log-format.md, "Group state", followed by hand (no felix encoder)."""
    head = b"FLGS" + struct.pack(">HHI", 1, 0, 0)
    header = head + struct.pack(">I", zlib.crc32(head))
    snapshot = struct.pack(">QQQQQI", 10, 13, 4, 1, 2, 2)
    snapshot += struct.pack(">QBIIQ", 10, 1, 2, 1, 99) + _spec_str("") + _spec_str("nak")
    snapshot += struct.pack(">QBIIQ", 12, 2, 5, 5, 0) + _spec_str("term") + _spec_str("")
    deltas = b"".join(
        [
            struct.pack(">BQ", 1, 10) * 0,  # (no Start: it would reset the window)
            struct.pack(">BQI", 2, 13, 1),  # Lease
            struct.pack(">BQQ", 3, 10, 1),  # Ack
            struct.pack(">BQIQ", 4, 13, 1, 500) + _spec_str("x"),  # Fail
            struct.pack(">BQ", 5, 13),  # Release
            struct.pack(">BQ", 6, 13) + _spec_str("max_deliveries") + _spec_str("y"),  # Dying
            struct.pack(">BQ", 7, 12),  # Dead
            struct.pack(">BQQ", 8, 14, 2),  # Skip
        ]
    )
    path = tmp_path / "g.glog"
    path.write_bytes(
        header
        + _spec_frame(1, snapshot)
        + _spec_frame(2, deltas)
        + _spec_frame(2, struct.pack(">BQ", 1, 50))
    )
    got = decode_file(path)
    assert got.snapshot == GroupSnapshot(
        10,
        13,
        {
            10: Entry(EntryState.LEASED, 2, 1, 99, "", "nak"),
            12: Entry(EntryState.DYING, 5, 5, 0, "term", ""),
        },
        acked=4,
        dead=1,
        skipped=2,
    )
    assert got.deltas[0].entries == (
        Lease(13, 1),
        Ack(10, 1),
        Fail(13, 1, 500, "x"),
        Release(13),
        Dying(13, "max_deliveries", "y"),
        Dead(12),
        Skip(14, 2),
    )
    assert got.deltas[1].entries == (Start(50),)
    # And felix writes exactly these bytes for the same snapshot.
    assert gl.encode_file(got.snapshot) == header + _spec_frame(1, snapshot)
    assert gl.encode_entries(got.deltas[0].entries) == deltas


def test_disk_full_on_append_or_create_is_cut_back_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "g.glog"
    log, state = GroupLog.open(path)
    log.append(BATCHES[0])
    applied(BATCHES[0], state)
    size = path.stat().st_size
    real = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if len(data) > 4:
            real(fd, bytes(data)[:4])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull):
        log.append(BATCHES[1])
    with pytest.raises(DiskFull):
        GroupLog.open(tmp_path / "new" / "g.glog")
    monkeypatch.setattr(os, "write", real)
    assert path.stat().st_size == size and log.written == len(BATCHES[0])
    assert list((tmp_path / "new").iterdir()) == []
    log.append(BATCHES[1])  # still usable
    applied(BATCHES[1], state)
    log.close()
    assert _recover(path) == state
