"""Duplicate suppression by felix-msg-id: the table (window, bound, bytes, batch plans)
and the shard core (acks naming the original, batches, memory charged to the tenant,
durable streams rebuilding their ids from the log at a restart). Clocks are injected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from felix import ipc, wire
from felix.errors import BadRequest, DuplicatesInBatch
from felix.ipc import RecordType
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.dedup import ENTRY_OVERHEAD, MSG_ID_HEADER, DedupTable, msg_ids
from felix.shard.durable import DiskSettings, DurableSettings, DurableStore
from felix.shard.offsets import OffsetReservations
from felix.shard.resources import stream_settings
from felix.shard.stream_log import StreamSettings
from felix.shard.tenants import TenantQuota

T, NS = "acme", "prod"
KEY = ipc.stream_key(T, NS, "s")
S = 1_000_000  # microseconds per second


class Clock:
    def __init__(self) -> None:
        self.us = 1_700_000_000_000_000

    def __call__(self) -> int:
        return self.us


def ids(*names: str | None) -> list[dict[str, str] | None]:
    return [None if n is None else {MSG_ID_HEADER: n} for n in names]


# -- the table --------------------------------------------------------------------------


def test_the_window_forgets_ids_with_time() -> None:
    t = DedupTable(window_s=2.0, max_entries=100)
    t.add("a", 10, 0)
    t.add("b", 11, 1 * S)
    assert t.find("a", 1 * S) == 10 and t.find("b", 2 * S) == 11
    assert t.find("a", 2 * S) is None  # stamped at or before now - window: gone
    assert len(t) == 2  # find() does not change the table; expire() does
    freed = t.expire(2 * S)
    assert freed == -(ENTRY_OVERHEAD + 1) and len(t) == 1 and "b" in t and t.expired == 1
    t.expire(10 * S)
    assert len(t) == 0 and t.nbytes == 0


def test_the_entry_bound_forgets_the_oldest_first() -> None:
    t = DedupTable(window_s=60.0, max_entries=3)
    for i, name in enumerate("abcd"):
        t.add(name, i, i)
    assert len(t) == 3 and "a" not in t and t.evicted == 1
    assert [t.find(n, 5) for n in "bcd"] == [1, 2, 3]


def test_bytes_are_accounted_per_entry_and_utf8() -> None:
    t = DedupTable(window_s=60.0, max_entries=10)
    assert t.add("é", 0, 0) == ENTRY_OVERHEAD + 2
    assert t.add("é", 5, 1) == 0  # the same id again: moved, not counted twice
    assert t.add("x" * 256, 1, 2) == ENTRY_OVERHEAD + 256
    assert t.nbytes == 2 * ENTRY_OVERHEAD + 258
    assert t.trim(1) == ENTRY_OVERHEAD + 2 and t.trimmed == 1  # oldest first
    assert t.resize(60.0, 0 + 1, 3) == 0 and len(t) == 1
    assert t.clear() == -(ENTRY_OVERHEAD + 256) and t.nbytes == 0


def test_a_plan_acks_one_run_or_refuses() -> None:
    t = DedupTable(window_s=60.0, max_entries=100)
    for i, name in enumerate("abc"):
        t.add(name, 10 + i, 0)
    assert t.plan(["x", None], 13, 1) is None  # no duplicate: store as it is
    retry = t.plan(["a", "b", "c"], 13, 1)
    assert retry is not None and (retry.first, retry.keep, retry.contiguous) == (10, [], True)
    more = t.plan(["b", "c", "d", None], 13, 1)  # a retry that carries newer records too
    assert more is not None and (more.first, more.keep, more.duplicates) == (11, [2, 3], 2)
    assert more.contiguous
    moved_on = t.plan(["b", "c", "d"], 20, 1)  # other records were stored since
    assert moved_on is not None and not moved_on.contiguous
    twice = t.plan(["x", "x"], 13, 1)  # an id twice in one batch
    assert twice is not None and not twice.contiguous and twice.keep == [0]
    new_first = t.plan(["d", "a"], 13, 1)
    assert new_first is not None and not new_first.contiguous


def test_msg_ids_are_checked() -> None:
    assert msg_ids([None, {"k": "v"}]) is None
    assert msg_ids([{"k": "v"}, {MSG_ID_HEADER: "a"}]) == [None, "a"]
    assert msg_ids([{MSG_ID_HEADER: "é" * 256}]) == ["é" * 256]  # 512 bytes
    # The longest id a bridge makes (names of 64 characters, the largest offset) fits.
    bridge = "bridge:" + "r" * 64 + "/" + "/".join(["n" * 64] * 3) + "@" + str(2**63 - 1)
    assert msg_ids([{MSG_ID_HEADER: bridge}]) == [bridge]
    with pytest.raises(BadRequest, match="513 bytes"):
        msg_ids([{MSG_ID_HEADER: "x" * 513}])
    with pytest.raises(BadRequest, match="0 bytes"):
        msg_ids([None, {MSG_ID_HEADER: ""}])


def test_settings_bounds() -> None:
    assert StreamSettings(dedup_window_s=0).dedup_window_s == 0
    for bad in ({"dedup_window_s": -1}, {"dedup_window_s": 8 * 86_400}, {"dedup_max_entries": 0}):
        with pytest.raises(BadRequest):
            StreamSettings(**bad)  # type: ignore[arg-type]
    spec = {"dedup_window_s": None, "dedup_max_entries": 7}
    got = stream_settings(spec, StreamSettings(dedup_window_s=30.0))
    assert (got.dedup_window_s, got.dedup_max_entries) == (30.0, 7)


# -- the shard core, in memory ------------------------------------------------------------


def core(clock: Clock, **kw: Any) -> ShardCore:
    return ShardCore(ShardSettings(index=0, shards=1, **kw), wall_us=clock)


def request(c: ShardCore, frame: bytes, *, gateway: int = 0, token: int = 1) -> Any:
    c.handle(gateway, ipc.encode(RecordType.REQUEST, token, 0, frame), 0.0)
    out = c.flush()
    (reply,) = [r for r in out.get(gateway, []) if r[0] == RecordType.REPLY]
    return wire.decode_ext(wire.decode_frame(reply[ipc.HEADER_SIZE :], extensions=True))


def pub(c: ShardCore, rid: int, payloads: list[bytes], headers: Any, **kw: Any) -> Any:
    return request(c, wire.encode_publish(rid, T, NS, "s", payloads, headers=headers, **kw))


def test_a_duplicate_is_acked_with_the_original_offset_and_not_stored() -> None:
    clock = Clock()
    c = core(clock)
    request(c, wire.encode_subscribe(1, T, NS, "s", 7), gateway=1)
    first = pub(c, 2, [b"one"], ids("m1"))
    c.flush()
    pub(c, 3, [b"other"], None)
    again = pub(c, 4, [b"one, resent"], ids("m1"))
    assert isinstance(again, wire.PublishOffsets)
    assert (again.base_offset, again.count) == (first.base_offset, 1) == (0, 1)
    log_ = c.stream_log(KEY)
    assert log_ is not None and log_.next_offset == 2  # stored once
    assert c.flush().get(1) is None  # nothing pushed for the duplicate
    assert c.duplicates == 1 and c.published == 2
    # After the window the id is forgotten: stored again.
    clock.us += 121 * S
    later = pub(c, 5, [b"one, much later"], ids("m1"))
    assert later.base_offset == 2 and c.duplicates == 1


def test_batches_with_duplicates() -> None:
    c = core(Clock())
    assert pub(c, 1, [b"a", b"b"], ids("a", "b")).base_offset == 0
    retry = pub(c, 2, [b"a", b"b"], ids("a", "b"))
    assert (retry.base_offset, retry.count) == (0, 2)
    more = pub(c, 3, [b"b", b"c", b"d"], ids("b", "c", None))  # tail of a retry + new
    assert (more.base_offset, more.count) == (1, 3)
    log_ = c.stream_log(KEY)
    assert log_ is not None
    batch = log_.read(0, 10, 1 << 20)
    assert batch.payloads == [b"a", b"b", b"c", b"d"]
    # Not one run: refused whole, nothing stored.
    refused = pub(c, 4, [b"e", b"a"], ids("e", "a"))
    assert isinstance(refused, wire.ErrorReply)
    assert refused.code == DuplicatesInBatch.code and "one by one" in refused.message
    twice = pub(c, 5, [b"f", b"f"], ids("f", "f"))
    assert isinstance(twice, wire.ErrorReply) and twice.code == DuplicatesInBatch.code
    assert log_.next_offset == 4
    # Without an ack no offsets are owed: duplicates are dropped, the rest stored.
    ok = pub(c, 6, [b"e", b"a", b"e"], ids("e", "a", "e"), ack=wire.ACK_NONE)
    assert isinstance(ok, wire.ExtMessage) and ok.opcode == wire.OP_OK
    assert log_.read(4, 10, 1 << 20).payloads == [b"e"] and log_.next_offset == 5
    assert pub(c, 7, [b"e"], ids("e")).base_offset == 4


def test_bad_ids_are_refused_on_any_stream() -> None:
    c = core(Clock(), stream_defaults=StreamSettings(dedup_window_s=0))
    bad = pub(c, 1, [b"x"], ids("x" * 513))
    assert isinstance(bad, wire.ErrorReply) and bad.code == BadRequest.code
    assert "felix-msg-id" in bad.message and "1 to 512 bytes" in bad.message
    # Dedup off: ids are checked but not remembered.
    assert pub(c, 2, [b"x"], ids("m")).base_offset == 0
    assert pub(c, 3, [b"x"], ids("m")).base_offset == 1
    assert c.stream_status(KEY)["dedup"] == {"window_s": 0, "entries": 0}  # type: ignore[index]


def dedup_status(c: ShardCore) -> Any:
    status = c.stream_status(KEY)
    assert status is not None
    return status["dedup"]


def test_ids_are_charged_to_the_tenant_and_released() -> None:
    clock = Clock()
    c = core(clock)
    pub(c, 1, [b"x"], None)
    base = c.tenant_memory(T)
    pub(c, 2, [b"y"], ids("abc"))
    log_ = c.stream_log(KEY)
    assert log_ is not None
    assert c.tenant_memory(T) == log_.retained_bytes + ENTRY_OVERHEAD + 3
    assert c.memory_used == c.tenant_memory(T) > base
    status = dedup_status(c)
    assert status["entries"] == 1 and status["bytes"] == ENTRY_OVERHEAD + 3
    clock.us += 200 * S
    c.sweep(0.0)  # the sweep expires ids and gives their bytes back
    assert c.tenant_memory(T) == log_.retained_bytes
    pub(c, 3, [b"z"], ids("def"))
    c.delete_stream(KEY)
    assert c.memory_used == 0 and c.tenant_memory(T) == 0


def test_a_careless_tenant_pays_for_its_ids_with_its_own_memory() -> None:
    """Ids count against the tenant's quota: over it, its ids are trimmed too (after
    its replay rings), never another tenant's data."""
    quota = 64 * 1024
    c = core(Clock(), tenant_quota=TenantQuota(quota, 100))
    request(c, wire.encode_publish(1, "other", NS, "s", [b"keep"]))
    kept = c.tenant_memory("other")
    for i in range(2000):
        pub(c, 10 + i, [b"r"], ids(f"id-{i:08d}-" + "x" * 100))
        assert c.tenant_memory(T) <= quota + ENTRY_OVERHEAD + 512 + 200
    status = dedup_status(c)
    assert status["trimmed"] > 0 and status["entries"] < 2000
    assert c.tenant_memory("other") == kept
    # The newest ids are the ones kept.
    assert pub(c, 9999, [b"r"], ids(f"id-{1999:08d}-" + "x" * 100)).base_offset == 1999


def test_defining_the_window_applies_it() -> None:
    c = core(Clock())
    pub(c, 1, [b"a"], ids("a"))
    c.define_stream(KEY, StreamSettings(dedup_window_s=0))
    assert c.tenant_memory(T) == c.stream_log(KEY).retained_bytes  # type: ignore[union-attr]
    assert pub(c, 2, [b"a"], ids("a")).base_offset == 1  # off: stored again
    c.define_stream(KEY, StreamSettings(dedup_window_s=10, dedup_max_entries=1))
    pub(c, 3, [b"b"], ids("b"))
    pub(c, 4, [b"c"], ids("c"))
    assert pub(c, 5, [b"b"], ids("b")).base_offset == 4  # bound of 1: b forgotten
    assert pub(c, 6, [b"b"], ids("b")).base_offset == 4


# -- durable streams ----------------------------------------------------------------------


def durable(tmp: Path, clock: Clock, fsync: str = "commit", **stream: Any) -> ShardCore:
    store = DurableStore(
        DiskSettings(root=tmp / "streams", auto=DurableSettings(fsync=fsync))  # type: ignore[arg-type]
    )
    offsets = OffsetReservations(tmp / "shard-0.offsets", block=64)
    settings = ShardSettings(index=0, shards=1, stream_defaults=StreamSettings(**stream))
    c = ShardCore(settings, offsets, store, wall_us=clock)
    c.open_durable()
    return c


def send(c: ShardCore, frame: bytes, token: int = 1) -> None:
    c.handle(0, ipc.encode(RecordType.REQUEST, token, 0, frame), 0.0)


def acks(c: ShardCore) -> list[Any]:
    return [
        wire.decode_ext(wire.decode_frame(r[ipc.HEADER_SIZE :], extensions=True))
        for r in c.flush().get(0, [])
        if r[0] == RecordType.REPLY
    ]


def sync(c: ShardCore) -> None:
    assert c.disk is not None
    for s in c.disk.take_syncs():
        c.sync_done(s, s.log.sync(), 0.001)


def test_a_commit_duplicate_is_acked_once_the_original_is_synced(tmp_path: Path) -> None:
    c = durable(tmp_path, Clock())
    send(c, wire.encode_publish(1, T, NS, "s", [b"a"], headers=ids("a")), token=1)
    send(c, wire.encode_publish(2, T, NS, "s", [b"a"], headers=ids("a")), token=2)
    assert acks(c) == []  # neither before an fsync covers the original
    sync(c)
    got = acks(c)
    assert [(a.request_id, a.base_offset, a.durability) for a in got] == [
        (1, 0, wire.DURABILITY_SYNCED),
        (2, 0, wire.DURABILITY_SYNCED),
    ]
    send(c, wire.encode_publish(3, T, NS, "s", [b"a"], headers=ids("a")), token=3)
    assert [a.base_offset for a in acks(c)] == [0]  # synced already: at once


def test_a_restart_rebuilds_the_ids_from_the_log_tail(tmp_path: Path) -> None:
    clock = Clock()
    c = durable(tmp_path, clock, fsync="none", dedup_window_s=60.0)
    send(c, wire.encode_publish(1, T, NS, "s", [b"old"], headers=ids("old")))
    clock.us += 50 * S
    send(c, wire.encode_publish(2, T, NS, "s", [b"a", b"b", b"c"], headers=ids("a", None, "c")))
    assert [a.base_offset for a in acks(c)] == [0, 1]
    assert c.disk is not None
    c.disk.close()

    clock.us += 20 * S  # "old" is now 70 s old: outside the window of 60 s
    c2 = durable(tmp_path, clock, fsync="none", dedup_window_s=60.0)
    status = dedup_status(c2)
    assert status["entries"] == 2
    assert c2.tenant_memory(T) >= 2 * ENTRY_OVERHEAD + 2
    send(c2, wire.encode_publish(3, T, NS, "s", [b"c"], headers=ids("c")))
    send(c2, wire.encode_publish(4, T, NS, "s", [b"a", b"x"], headers=ids("a", "x")))
    send(c2, wire.encode_publish(5, T, NS, "s", [b"old"], headers=ids("old")))
    got = acks(c2)
    assert [(a.base_offset, a.count) for a in got[:1]] == [(3, 1)]
    assert isinstance(got[1], wire.ErrorReply)  # "a" at 1, then a new record at 64
    assert got[2].base_offset == 64  # the restart's offset gap; "old" stored again
    # A longer window from the control plane rebuilds with it: "old" was at offset 0.
    c2.define_stream(KEY, StreamSettings(dedup_window_s=3600.0), DurableSettings(fsync="none"))
    send(c2, wire.encode_publish(6, T, NS, "s", [b"old"], headers=ids("old")))
    assert acks(c2)[0].base_offset == 64  # the newest record with that id


def test_the_rebuild_finds_the_newest_ids_across_an_offset_gap(tmp_path: Path) -> None:
    """Offsets skip the rest of a reserved block at a restart: the rebuild's bound of
    max_entries records is counted in records, not in offsets."""
    clock = Clock()
    c = durable(tmp_path, clock, fsync="none", dedup_max_entries=2)
    send(c, wire.encode_publish(1, T, NS, "s", [b"a", b"b"], headers=ids("a", "b")))
    assert c.disk is not None
    c.disk.close()
    c = durable(tmp_path, clock, fsync="none", dedup_max_entries=2)
    send(c, wire.encode_publish(2, T, NS, "s", [b"c"], headers=ids("c")))  # at 64
    assert [a.base_offset for a in acks(c)] == [64]
    assert c.disk is not None
    c.disk.close()
    c = durable(tmp_path, clock, fsync="none", dedup_max_entries=2)
    send(c, wire.encode_publish(3, T, NS, "s", [b"b"], headers=ids("b")))
    send(c, wire.encode_publish(4, T, NS, "s", [b"c"], headers=ids("c")))
    assert [a.base_offset for a in acks(c)] == [1, 64]


def test_dead_letter_appends_are_not_deduplicated(tmp_path: Path) -> None:
    """A dead-letter append copies the id of the record it carries: two dead letters of
    records with one id are both kept, and a restart does not remember their ids."""
    clock = Clock()
    c = durable(tmp_path, clock, fsync="none")
    dead = {MSG_ID_HEADER: "m", "felix-dlq-id": "g:1"}
    for token in (1, 2):
        frame = wire.encode_publish(token, T, NS, "s", [b"dead"], headers=[dead])
        c.handle(0, ipc.encode(RecordType.REQUEST, token, ipc.AUX_DEAD_LETTER, frame), 0.0)
    assert [a.base_offset for a in acks(c)] == [0, 1]
    assert c.disk is not None
    c.disk.close()
    c = durable(tmp_path, clock, fsync="none")
    assert dedup_status(c)["entries"] == 0
    send(c, wire.encode_publish(3, T, NS, "s", [b"live"], headers=ids("m")))
    assert [a.base_offset for a in acks(c)] == [64]
