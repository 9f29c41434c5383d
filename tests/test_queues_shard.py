"""Queue groups in the shard core (felix/shard/core.py + felix/shard/queue/manager.py),
driven directly with real DiskLogs and group files in a temp dir, the fsync thread run
inline (docs/queues.md): what is handed out under ``commit``, when an ack is answered,
recovery after a crash, the gap a restart's offset reservation leaves, and retention
against what a group still needs."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from felix import ipc, wire
from felix.errors import Overloaded
from felix.ipc import RecordType
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.durable import DiskSettings, DurableSettings, DurableStore
from felix.shard.offsets import OffsetReservations
from felix.shard.queue import manager as manager_module
from felix.shard.queue.group import Role
from felix.shard.queue.group_log import GroupLog
from felix.shard.queue.journal import JournalEntry, Skip
from felix.shard.queue.settings import MAX_GROUPS_PER_STREAM, GroupSettings
from felix.shard.stream_log import StreamSettings
from tests.test_shard_durable import KEY, NS, Clock, T

MEMBER = 501  # the member token a gateway gave the consumer
CONSUMER = 7  # the client's consumer id


def make(tmp: Path, *, fsync: str = "commit", block: int = 64, **disk: Any) -> ShardCore:
    store = DurableStore(
        DiskSettings(
            root=tmp / "streams",
            auto=DurableSettings(fsync=fsync, fsync_interval_ms=50),  # type: ignore[arg-type]
            **disk,
        )
    )
    offsets = OffsetReservations(tmp / "shard-0.offsets", block=block)
    settings = ShardSettings(index=0, shards=1, stream_defaults=StreamSettings())
    c = ShardCore(settings, offsets, store, wall_us=Clock())
    c.open_durable()
    c.handle(0, ipc.encode(RecordType.HELLO, 0, 0, b""), 0.0)  # gateway 0 is up
    c.flush()
    return c


class Out:
    """What one flush() sent gateway 0: replies by ring token, deliveries by member."""

    def __init__(self, c: ShardCore) -> None:
        self.replies: dict[int, Any] = {}
        self.delivered: dict[int, list[Any]] = {}
        self.notices: list[Any] = []
        for rec in c.flush().get(0, []):
            kind, token, _ = ipc.decode_header(rec)
            msg = wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
            if kind == RecordType.REPLY:
                self.replies[token] = msg
            elif kind == RecordType.DELIVER and isinstance(msg, wire.Deliveries):
                self.delivered.setdefault(token, []).extend(msg.records)
            elif kind == RecordType.DELIVER:
                self.notices.append(msg)

    def offsets(self, member: int = MEMBER) -> list[int]:
        return [d.offset for d in self.delivered.get(member, [])]


def request(c: ShardCore, frame: bytes, token: int, aux: int = 0, now: float = 0.0) -> None:
    c.handle(0, ipc.encode(RecordType.REQUEST, token, aux, frame), now)


def sync(c: ShardCore) -> int:
    """One round of the fsync thread: stream logs and group files; returns how many."""
    syncs = c.take_syncs()
    for s in syncs:
        c.sync_done(s, s.log.sync(), 0.001)
    return len(syncs)


def publish(c: ShardCore, payloads: list[bytes], token: int = 1) -> None:
    request(c, wire.encode_publish(token, T, NS, "s", payloads), token)


def consume(c: ShardCore, records: int = 64, member: int = MEMBER) -> Out:
    frame = wire.encode_consume(
        99, T, NS, "s", "g", CONSUMER, credit_records=records, credit_bytes=1 << 20
    )
    request(c, frame, member)
    out = Out(c)
    assert isinstance(out.replies[member], wire.Consuming), out.replies
    return out


def ack(c: ShardCore, offsets: list[int], token: int = 900, member: int = MEMBER) -> None:
    ranges = [(o, 1) for o in offsets]
    request(c, wire.encode_ack(token, CONSUMER, ranges), token, aux=member)


def status(c: ShardCore) -> dict[str, Any]:
    st = c.stream_status(KEY)
    assert st is not None
    group: dict[str, Any] = st["groups"]["g"]  # type: ignore[index]
    return group


def test_under_commit_only_fsynced_records_are_handed_out(tmp_path: Path) -> None:
    c = make(tmp_path)
    publish(c, [b"a", b"b", b"c"])
    out = consume(c)
    assert out.offsets() == []  # written, not fsynced: nothing handed out
    assert sync(c) >= 1
    out = Out(c)
    assert 1 in out.replies  # the publish's commit ack
    assert out.offsets() == [0, 1, 2]
    publish(c, [b"d"], token=2)
    assert Out(c).offsets() == []
    sync(c)
    out = Out(c)
    assert out.offsets() == [3] and 2 in out.replies
    assert [d.payload for d in out.delivered[MEMBER]] == [b"d"]


def test_an_ack_under_commit_is_answered_after_the_group_file_fsync(tmp_path: Path) -> None:
    c = make(tmp_path)
    publish(c, [b"a", b"b"])
    consume(c)
    sync(c)
    assert Out(c).offsets() == [0, 1]
    ack(c, [0, 1], token=900)
    assert 900 not in Out(c).replies  # the Ack entry is written, not yet fsynced
    handle = c.queues.groups[(KEY, "g")]
    syncs = c.take_syncs()
    assert handle in syncs  # the group's file is what the fsync thread syncs next
    for s in syncs:
        c.sync_done(s, s.log.sync(), 0.001)
    reply = Out(c).replies[900]
    assert isinstance(reply, wire.Settled) and reply.refused == []
    assert handle.state_log.synced == handle.state_log.written
    assert status(c)["acked"] == 2


def test_an_ack_under_interval_is_answered_at_once(tmp_path: Path) -> None:
    c = make(tmp_path, fsync="interval")
    publish(c, [b"a"])
    assert consume(c).offsets() == [0]  # written is readable under interval
    ack(c, [0], token=901)
    assert isinstance(Out(c).replies[901], wire.Settled)


def test_a_restart_recovers_the_group(tmp_path: Path) -> None:
    """Acked records never come back; leased ones come back with one failure more."""
    c = make(tmp_path)
    publish(c, [b"%d" % i for i in range(5)])
    consume(c)
    sync(c)
    assert Out(c).offsets() == [0, 1, 2, 3, 4]
    ack(c, [0, 1], token=900)
    sync(c)
    assert isinstance(Out(c).replies[900], wire.Settled)
    # kill -9: nothing is shut down or synced further; a new core on the same files.
    c2 = make(tmp_path)
    st = status(c2)
    assert (st["floor"], st["next"], st["acked"], st["leased"], st["available"]) == (
        2,
        5,
        2,
        0,
        3,
    ), st
    out = consume(c2, member=MEMBER + 1)
    assert out.offsets(MEMBER + 1) == [2, 3, 4]
    assert {(d.attempts, d.failures) for d in out.delivered[MEMBER + 1]} == {(2, 1)}
    ack(c2, [2, 3, 4], member=MEMBER + 1)
    sync(c2)
    Out(c2)
    publish(c2, [b"new"], token=3)
    sync(c2)
    assert Out(c2).offsets(MEMBER + 1) == [64]  # above the reservation mark; 0..4 never again


def test_a_graceful_shutdown_releases_leases_without_a_failure(tmp_path: Path) -> None:
    c = make(tmp_path)
    publish(c, [b"a", b"b"])
    consume(c)
    sync(c)
    assert Out(c).offsets() == [0, 1]
    c.shutdown(0.0)
    c2 = make(tmp_path)
    out = consume(c2)
    assert {(d.offset, d.attempts, d.failures) for d in out.delivered[MEMBER]} == {
        (0, 2, 0),
        (1, 2, 0),
    }


def test_the_gap_of_a_restart_is_skipped_in_one_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = 1_000_000  # a restart jumps a million offsets
    c = make(tmp_path, block=block)
    publish(c, [b"a", b"b", b"c"])
    consume(c)
    sync(c)
    assert Out(c).offsets() == [0, 1, 2]
    ack(c, [0, 1, 2])
    sync(c)
    Out(c)
    c2 = make(tmp_path, block=block)
    handle = c2.queues.groups[(KEY, "g")]
    written: list[JournalEntry] = []
    append = handle.state_log.append

    def spy(entries: Any) -> None:
        written.extend(entries)
        append(entries)

    monkeypatch.setattr(handle.state_log, "append", spy)
    fetched: list[int] = []
    fetch = manager_module._fetch

    def counting_fetch(view: Any, offset: int, **kw: Any) -> Any:
        fetched.append(offset)
        return fetch(view, offset, **kw)

    monkeypatch.setattr(manager_module, "_fetch", counting_fetch)
    publish(c2, [b"d"])
    sync(c2)
    Out(c2)
    out = consume(c2, member=MEMBER + 1)
    assert out.offsets(MEMBER + 1) == [block]
    skips = [e for e in written if isinstance(e, Skip)]
    assert skips == [Skip(3, block - 3)], written
    assert len(fetched) <= 4, "the gap was looked at offset by offset"
    st = status(c2)
    assert (st["floor"], st["next"], st["skipped"]) == (block, block + 1, block - 3), st


def test_retention_never_deletes_a_segment_a_group_still_needs(tmp_path: Path) -> None:
    c = make(tmp_path, fsync="none", segment_bytes=4096)
    c.define_stream(
        KEY,
        StreamSettings(replay_max_records=4),
        DurableSettings(fsync="none", retention_bytes=8000),
    )
    for i in range(100):  # ~30 KB: several sealed segments, well over the retention
        publish(c, [bytes([i]) * 300], token=i + 1)
    Out(c)
    out = consume(c, records=100)
    assert out.offsets() == list(range(100))
    assert c.disk_sweep() == 0  # the group needs offset 0: nothing deleted
    ack(c, list(range(60)))
    Out(c)
    assert status(c)["floor"] == 60
    freed = c.disk_sweep()
    assert freed > 0
    st = c.stream_status(KEY)
    assert st is not None
    first = st["first_offset"]
    assert isinstance(first, int) and 0 < first <= 60, st  # only segments below the floor
    # What the group still needs is readable: nack one leased record, it comes back.
    request(c, wire.encode_release(902, CONSUMER, [(60, 1)]), 902, aux=MEMBER)
    out = Out(c)
    assert out.offsets() == [60] and out.delivered[MEMBER][0].payload == bytes([60]) * 300
    ack(c, list(range(60, 100)))
    Out(c)
    assert c.disk_sweep() > 0  # everything settled: down to the retention bound
    store = c.disk
    assert store is not None
    assert store.disk_used <= 8000 + 2 * 4096


def test_making_a_group_exclusive_tells_its_members_their_roles_at_once(tmp_path: Path) -> None:
    c = make(tmp_path, fsync="interval")
    publish(c, [b"a", b"b", b"c", b"d"])
    Out(c)
    first = consume(c, records=1)
    second = consume(c, records=1, member=MEMBER + 1)
    assert first.offsets() == [0] and second.offsets(MEMBER + 1) == [1]
    c.define_group(KEY, "g", GroupSettings(exclusive=True))
    out = Out(c)
    roles = [m.role for m in out.notices if isinstance(m, wire.ConsumerRole)]
    assert roles == [Role.ACTIVE, Role.STANDBY]  # the first joined is active
    ack(c, [0], token=903)
    ack(c, [1], token=904, member=MEMBER + 1)  # a standby may settle what it holds
    out = Out(c)
    assert isinstance(out.replies[903], wire.Settled) and isinstance(out.replies[904], wire.Settled)
    assert out.offsets() == [2] and out.offsets(MEMBER + 1) == []  # the active one only


def test_a_lagging_group_at_the_retention_cap_refuses_publishes(tmp_path: Path) -> None:
    c = make(tmp_path, fsync="none", segment_bytes=4096)
    c.define_stream(
        KEY,
        StreamSettings(replay_max_records=4),
        DurableSettings(fsync="none", retention_bytes=4096),
    )
    publish(c, [b"x" * 300])
    Out(c)
    consume(c, records=1)  # the group needs offset 0 and nobody acks it
    token = 10
    refused = None
    for _ in range(200):  # far past retention + two segments
        token += 1
        publish(c, [b"y" * 300], token=token)
        reply = Out(c).replies[token]
        if isinstance(reply, wire.ErrorReply):
            refused = reply
            break
    assert refused is not None and refused.code == Overloaded.code
    assert "queue group still needs its records from offset 0" in refused.message
    store = c.disk
    assert store is not None and store.disk_used <= 4096 + 3 * 4096  # bounded
    assert c.disk_sweep() == 0  # nothing pending was deleted
    assert c.queues.refused == 1
    # The group catches up (a bigger window, everything acked): retention frees the
    # space and publishes go on.
    request(c, wire.encode_consumer_window(904, CONSUMER, 1000, 1 << 20), 904, aux=MEMBER)
    delivered = Out(c).offsets()
    ack(c, [0, *delivered])
    Out(c)
    assert status(c)["floor"] == status(c)["next"]
    assert c.disk_sweep() > 0
    publish(c, [b"z" * 300], token=token + 1)
    assert isinstance(Out(c).replies[token + 1], wire.PublishOffsets)


def test_groups_opened_by_consumers_are_bounded_per_stream(tmp_path: Path) -> None:
    c = make(tmp_path, fsync="none")
    publish(c, [b"a"])
    Out(c)
    for i in range(MAX_GROUPS_PER_STREAM):
        frame = wire.encode_consume(99, T, NS, "s", f"g{i}", CONSUMER + i)
        request(c, frame, MEMBER + i)
        assert isinstance(Out(c).replies[MEMBER + i], wire.Consuming)
    frame = wire.encode_consume(99, T, NS, "s", "one-more", CONSUMER + 999)
    request(c, frame, MEMBER + 999)
    reply = Out(c).replies[MEMBER + 999]
    assert isinstance(reply, wire.ErrorReply) and reply.code == Overloaded.code
    assert f"maximum of {MAX_GROUPS_PER_STREAM} queue groups" in reply.message
    assert not (tmp_path / "groups" / T / NS / "s" / "one-more.glog").exists()


def test_a_long_run_of_acks_compacts_off_the_loop_and_a_restart_recovers_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny compaction threshold: the group's file is compacted many times while acks
    flow; the loop thread never fsyncs the group's files (the fsync thread, run here
    in a thread of its own, makes the new file durable and fsyncs the directory), every
    ack is answered only once synced, and a kill -9 restart recovers the exact state."""
    c = make(tmp_path)
    c.queues.compact_bytes = 64  # at least 4x the snapshot: a few hundred bytes
    switches = 0
    real_finish = GroupLog.finish_compaction

    def finish(self: GroupLog) -> None:
        nonlocal switches
        switches += 1
        real_finish(self)

    monkeypatch.setattr(GroupLog, "finish_compaction", finish)
    group_fsyncs: list[tuple[str, str]] = []

    def recording(real: Any) -> Any:
        def call(fd: int) -> None:
            where = os.readlink(f"/proc/self/fd/{fd}")
            if "/groups/" in where:
                group_fsyncs.append((threading.current_thread().name, where))
            real(fd)

        return call

    def threaded_sync() -> None:
        for s in c.take_syncs():
            got: list[int] = []
            t = threading.Thread(
                target=lambda s=s, got=got: got.append(s.log.sync()), name="fsync-t"
            )
            t.start()
            t.join()
            c.sync_done(s, got[0], 0.001)

    publish(c, [b"x"])
    consume(c, records=32)
    sync(c)
    Out(c)
    monkeypatch.setattr(os, "fsync", recording(os.fsync))
    monkeypatch.setattr(os, "fdatasync", recording(os.fdatasync))
    handle = c.queues.groups[(KEY, "g")]
    acked = 0
    token = 1000
    for i in range(40):
        publish(c, [b"%d" % n for n in range(20)], token=2 + i)
        threaded_sync()
        offsets = Out(c).offsets()
        for off in offsets:
            token += 1
            ack(c, [off], token=token)
            assert token not in Out(c).replies  # waits for the group file's fsync
            acked += 1
        for _ in range(3):  # the ack's sync; a switch; the directory's sync
            threaded_sync()
        replies = Out(c).replies
        assert all(isinstance(r, wire.Settled) for r in replies.values()), replies
        assert handle.state_log.synced == handle.state_log.written
    assert switches >= 5, switches
    assert group_fsyncs and {t for t, _ in group_fsyncs} == {"fsync-t"}, group_fsyncs[:3]
    assert any(not w.endswith((".glog", ".tmp")) for _, w in group_fsyncs)  # a directory
    monkeypatch.undo()
    before = status(c)
    assert before["acked"] == acked >= 790
    # kill -9: no shutdown; a new core on the same files.
    c2 = make(tmp_path)
    after = status(c2)
    for field in ("floor", "next", "acked"):
        assert after[field] == before[field], (field, before, after)
    # The one record never acked (offset 0) was leased: it is available again.
    assert (before["leased"], after["leased"]) == (1, 0)
    assert after["available"] == before["available"] + 1
    assert not list((tmp_path / "groups").rglob("*.tmp"))
