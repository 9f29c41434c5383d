"""A shard core in cluster mode (felix/shard/cluster.py): it stores writes only for the
logical shards its node serves, and drops the in-memory state of those a map takes away
(durable streams stay; offsets never go back)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from felix import ipc, wire
from felix.cluster.ownership import ClusterNode, OwnershipMap, ShardState, logical_shard
from felix.errors import NotFound, Unavailable
from felix.ipc import RecordType
from felix.shard.cache import entry_size
from felix.shard.core import RECLAIM_PER_SWEEP, ShardCore, ShardSettings
from felix.shard.durable import DiskSettings, DurableSettings, DurableStore
from felix.shard.offsets import OffsetReservations
from felix.shard.queue.group_log import path_for
from felix.shard.stream_log import StreamSettings
from tests.test_queues_shard import CONSUMER, MEMBER, Out

T, NS = "acme", "prod"
L = 8
ME, OTHER = "a", "b"
BLOCK = 64


def shard_map(
    version: int,
    owners: dict[int, str | None] | None = None,
    *,
    epochs: dict[int, int] | None = None,
    handoff: dict[int, str] | None = None,
    serve_until: float = 1e9,
    unpinned: frozenset[int] = frozenset(),
) -> OwnershipMap:
    """Every logical shard ``ME``'s at epoch 1 and pinned to its owner (its durable acks
    are not held), but for ``owners``/``epochs``/``handoff``/``unpinned``."""
    owners = owners or {}
    epochs = epochs or {}
    handoff = handoff or {}
    shards = tuple(
        ShardState(
            owners.get(s, ME),
            epochs.get(s, 1),
            handoff.get(s),
            None if s in unpinned else owners.get(s, ME),
        )
        for s in range(L)
    )
    nodes = tuple(ClusterNode(n, f"{n}:1", "", True, 1, 0.0) for n in (ME, OTHER))
    return OwnershipMap(version, ME, L, serve_until, nodes, shards)


def key_in(shard: int, prefix: str) -> str:
    """A stream name whose key ``acme/prod/<name>`` is in logical ``shard``."""
    for i in range(10_000):
        if logical_shard(ipc.stream_key(T, NS, f"{prefix}{i}"), L) == shard:
            return f"{prefix}{i}"
    raise AssertionError


def cache_key_in(shard: int, cache: str = "c") -> str:
    for i in range(10_000):
        if logical_shard(f"{T}/{NS}/{cache}/k{i}", L) == shard:
            return f"k{i}"
    raise AssertionError


def make(tmp: Path, **settings: Any) -> ShardCore:
    store = DurableStore(DiskSettings(root=tmp / "streams"))  # durable only when defined so
    offsets = OffsetReservations(tmp / "shard-0.offsets", block=BLOCK)
    c = ShardCore(ShardSettings(index=0, shards=1, **settings), offsets, store)
    c.open_durable()
    c.join_cluster()
    return c


def request(c: ShardCore, frame: bytes, *, gateway: int = 0, now: float = 0.0) -> Any:
    c.handle(gateway, ipc.encode(RecordType.REQUEST, 1, 0, frame), now)
    sync(c)  # a durable stream's commit ack waits for an fsync
    out = c.flush()
    for rec in out.get(gateway, []):
        if rec[0] == RecordType.REPLY:
            return wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
    raise AssertionError(out)


def publish(c: ShardCore, stream: str, payloads: list[bytes], **kw: Any) -> Any:
    return request(c, wire.encode_publish(1, T, NS, stream, payloads, **kw))


def sync(c: ShardCore) -> None:
    assert c.disk is not None
    for s in c.disk.take_syncs():
        c.sync_done(s, s.log.sync(), 0.001)


def test_writes_wait_for_the_first_map_and_go_only_to_served_shards(tmp_path: Path) -> None:
    c = make(tmp_path)
    s0 = key_in(0, "s")
    refused = publish(c, s0, [b"x"])
    assert isinstance(refused, wire.ErrorReply) and refused.code == Unavailable.code
    assert "no cluster shard map" in refused.message
    assert c.stream_log(ipc.stream_key(T, NS, s0)) is None  # nothing created
    assert c.apply_ownership(shard_map(1, {1: OTHER}, handoff={2: OTHER})) == set()
    assert isinstance(publish(c, s0, [b"x"]), wire.PublishOffsets)
    for shard in (1, 2):  # owned elsewhere; a handoff under way
        name = key_in(shard, "s")
        reply = publish(c, name, [b"x"])
        assert isinstance(reply, wire.ErrorReply) and reply.code == Unavailable.code
        assert f"logical shard {shard} is not served" in reply.message
        assert c.stream_log(ipc.stream_key(T, NS, name)) is None
        k = cache_key_in(shard)
        reply = request(c, wire.encode_cache_set(1, T, NS, "c", k, b"v"))
        assert isinstance(reply, wire.ErrorReply) and reply.code == Unavailable.code
    assert c.caches == 0
    assert c.cluster is not None and c.cluster.refused == 5
    # An older (or the same) map is ignored.
    assert c.apply_ownership(shard_map(1)) is None


def test_a_shard_taken_away_drops_its_memory_but_not_durable_streams(tmp_path: Path) -> None:
    c = make(tmp_path, stream_defaults=StreamSettings(dedup_window_s=60.0))
    c.apply_ownership(shard_map(1))
    lost, kept = 3, 5
    mem_lost, mem_kept = key_in(lost, "m"), key_in(kept, "m")
    defined, durable = key_in(lost, "d"), key_in(lost, "durable")
    c.define_stream(ipc.stream_key(T, NS, defined), StreamSettings(replay_max_records=7))
    c.define_stream(ipc.stream_key(T, NS, durable), StreamSettings(), DurableSettings())
    for name in (mem_lost, mem_kept, defined, durable):
        for i in range(3):
            reply = publish(c, name, [b"r%d" % i], headers=[{"felix-msg-id": f"id{i}"}])
            assert isinstance(reply, wire.PublishOffsets), reply
    # A subscriber of the lost stream (gateway 1), and one of a stream not created yet.
    watched = key_in(lost, "w")
    assert isinstance(request(c, wire.encode_subscribe(2, T, NS, mem_lost, 9), gateway=1),
                      wire.Subscribed)  # fmt: skip
    assert isinstance(request(c, wire.encode_subscribe(3, T, NS, watched, 9), gateway=1),
                      wire.Subscribed)  # fmt: skip
    c_lost, c_kept = cache_key_in(lost), cache_key_in(kept)
    for k in (c_lost, c_kept):
        assert request(c, wire.encode_cache_set(1, T, NS, "c", k, b"v" * 100)).result
    before = c.memory_used
    ends = {name: c.stream_log(ipc.stream_key(T, NS, name)).next_offset  # type: ignore[union-attr]
            for name in (mem_lost, mem_kept, defined, durable)}  # fmt: skip
    assert set(ends.values()) == {3}

    # The shard moves to another node.
    assert c.apply_ownership(shard_map(2, {lost: OTHER}, epochs={lost: 2})) == {lost}
    out = c.flush()
    gone = sorted(
        ipc.decode_key(rec[ipc.HEADER_SIZE :])[0]
        for rec in out.get(1, [])
        if ipc.decode_header(rec) == (RecordType.END, 0, ipc.END_MOVED)
    )
    assert gone == sorted(ipc.stream_key(T, NS, n) for n in (mem_lost, watched))
    assert c.stream_log(ipc.stream_key(T, NS, mem_lost)) is None
    kept_log = c.stream_log(ipc.stream_key(T, NS, mem_kept))
    assert kept_log is not None and kept_log.retained_records == 3
    # A stream the control plane defined keeps its definition, empty.
    defined_log = c.stream_log(ipc.stream_key(T, NS, defined))
    assert defined_log is not None and defined_log.retained_records == 0
    assert defined_log.next_offset == 3 and defined_log.settings.replay_max_records == 7
    durable_log = c.stream_log(ipc.stream_key(T, NS, durable))
    assert durable_log is not None and durable_log.retained_records == 3
    # The lost cache entry is gone at once; its memory goes with the next sweep.
    assert request(c, wire.encode_cache_get(1, T, NS, "c", c_lost)).value is None
    assert request(c, wire.encode_cache_get(1, T, NS, "c", c_kept)).value == b"v" * 100
    c.sweep(1.0)
    assert c.moved_streams == 2 and c.moved_cache_entries == 1
    assert c.memory_used < before
    held = sum(
        log_.retained_bytes
        for n in (mem_kept, defined, durable)
        if (log_ := c.stream_log(ipc.stream_key(T, NS, n))) is not None
    )
    assert c.memory_used >= held + c.cache_status((T, NS, "c"))["used_bytes"]  # type: ignore[index]

    # It comes back: empty, offsets continuing upward, message ids forgotten.
    c.apply_ownership(shard_map(3, epochs={lost: 3}))
    for name in (mem_lost, defined):
        reply = publish(c, name, [b"again"], headers=[{"felix-msg-id": "id0"}])
        assert isinstance(reply, wire.PublishOffsets), reply
        assert reply.count == 1 and reply.base_offset >= ends[name], (name, reply)
        # A new record, not the duplicate of record 0.
        assert c.stream_log(ipc.stream_key(T, NS, name)).retained_records == 1  # type: ignore[union-attr]
    assert request(c, wire.encode_cache_get(1, T, NS, "c", c_lost)).value is None
    # Kept: still duplicates of their record 0; the durable stream's records all there.
    for name in (mem_kept, durable):
        again = publish(c, name, [b"x"], headers=[{"felix-msg-id": "id0"}])
        assert (again.base_offset, again.count) == (0, 1), (name, again)
    assert publish(c, durable, [b"y"]).base_offset == 3


def test_offsets_of_a_dropped_stream_never_go_back(tmp_path: Path) -> None:
    """With and without an entry in the offsets table (a stream past its first block
    has one): a stream created again continues above what it issued."""
    c = make(tmp_path)
    c.apply_ownership(shard_map(1))
    small, big = key_in(6, "small"), key_in(6, "big")
    publish(c, small, [b"x"] * 3)
    for _ in range(3):
        publish(c, big, [b"x"] * 50)
    assert c._offsets is not None and c._offsets.reserved(ipc.stream_key(T, NS, big)) is not None
    c.apply_ownership(shard_map(2, {6: OTHER}, epochs={6: 2}))
    c.apply_ownership(shard_map(3, epochs={6: 3}))
    assert publish(c, small, [b"y"]).base_offset >= 3
    assert publish(c, big, [b"y"]).base_offset >= 150


def test_an_epoch_change_drops_too_and_a_handoff_keeps_the_data(tmp_path: Path) -> None:
    c = make(tmp_path)
    c.apply_ownership(shard_map(1))
    name = key_in(2, "s")
    publish(c, name, [b"x"])
    key = ipc.stream_key(T, NS, name)
    # A handoff starts: writes refused, the records stay (it may be cleared).
    assert c.apply_ownership(shard_map(2, handoff={2: OTHER})) == set()
    assert isinstance(publish(c, name, [b"y"]), wire.ErrorReply)
    assert c.stream_log(key) is not None and c.stream_log(key).retained_records == 1  # type: ignore[union-attr]
    assert c.apply_ownership(shard_map(3)) == set()  # cleared: served again
    assert publish(c, name, [b"y"]).base_offset == 1
    # The shard left and came back between two maps seen here: its epoch says so.
    assert c.apply_ownership(shard_map(4, epochs={2: 3})) == {2}
    assert c.stream_log(key) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_durable_publish_is_fenced_by_serve_until(tmp_path: Path) -> None:
    store = DurableStore(DiskSettings(root=tmp_path / "streams"))
    c = ShardCore(ShardSettings(index=0, shards=1), None, store)
    clock = Clock()
    c.join_cluster(clock)
    c.apply_ownership(shard_map(1, {4: OTHER}, serve_until=110.0))
    durable, memory = key_in(0, "durable"), key_in(0, "memory")
    c.define_stream(ipc.stream_key(T, NS, durable), StreamSettings(), DurableSettings())
    disk_log = c.stream_log(ipc.stream_key(T, NS, durable))
    assert isinstance(publish(c, durable, [b"a"]), wire.PublishOffsets)
    clock.now = 110.0  # the lease ran out (the supervisor could not renew it)
    reply = publish(c, durable, [b"b"])
    assert isinstance(reply, wire.ErrorReply) and reply.code == Unavailable.code
    assert "lease is not valid" in reply.message
    assert disk_log is not None and disk_log.next_offset == 1  # nothing written
    assert store.status(ipc.stream_key(T, NS, durable))["next_offset"] == 1  # type: ignore[index]
    # A dead-letter append (to a stream created durable if missing) is a disk write too.
    dead = key_in(0, "dead")
    c.handle(
        0,
        ipc.encode(
            RecordType.REQUEST,
            1,
            ipc.AUX_DEAD_LETTER,
            wire.encode_publish(1, T, NS, dead, [b"x"]),
        ),
        0.0,
    )
    (rec,) = c.flush()[0]
    reply = wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
    assert isinstance(reply, wire.ErrorReply) and reply.code == Unavailable.code
    assert c.stream_log(ipc.stream_key(T, NS, dead)) is None
    # An in-memory publish is not a durable write: its gateway checked the lease.
    assert isinstance(publish(c, memory, [b"m"]), wire.PublishOffsets)
    assert c.cluster is not None and c.cluster.fenced == 2
    # A newer map (the renewal went through) moves the deadline on.
    c.apply_ownership(shard_map(2, {4: OTHER}, serve_until=120.0))
    assert publish(c, durable, [b"b"]).base_offset == 1
    # Ownership first: a durable stream of a shard owned elsewhere is refused whatever
    # the lease says.
    other = key_in(4, "durable")
    c.define_stream(ipc.stream_key(T, NS, other), StreamSettings(), DurableSettings())
    reply = publish(c, other, [b"x"])
    assert isinstance(reply, wire.ErrorReply) and "not served" in reply.message


def test_an_auto_durable_stream_is_not_created_past_serve_until(tmp_path: Path) -> None:
    store = DurableStore(DiskSettings(root=tmp_path / "streams", auto=DurableSettings()))
    c = ShardCore(ShardSettings(index=0, shards=1), None, store)
    clock = Clock()
    c.join_cluster(clock)
    c.apply_ownership(shard_map(1, serve_until=50.0))
    name = key_in(1, "auto")
    reply = publish(c, name, [b"x"])
    assert isinstance(reply, wire.ErrorReply) and reply.code == Unavailable.code
    assert c.stream_log(ipc.stream_key(T, NS, name)) is None
    assert not (tmp_path / "streams" / T / NS / name).exists()


# -- the pin: acks of a logical shard's first durable records wait for it -------------


def replies(c: ShardCore, gateway: int = 0) -> list[Any]:
    """The replies the core has for ``gateway`` now (after an fsync round)."""
    sync(c)
    return [
        wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
        for rec in c.flush().get(gateway, [])
        if rec[0] == RecordType.REPLY
    ]


def send_publish(c: ShardCore, stream: str, payloads: list[bytes], rid: int, **kw: Any) -> None:
    frame = wire.encode_publish(rid, T, NS, stream, payloads, **kw)
    c.handle(0, ipc.encode(RecordType.REQUEST, rid, 0, frame), 0.0)


def pinned_core(tmp_path: Path, clock: Clock) -> tuple[ShardCore, str, str]:
    """A core serving every logical shard, 2 and 3 not pinned yet, with a durable stream
    in each of them."""
    store = DurableStore(DiskSettings(root=tmp_path / "streams"))
    c = ShardCore(
        ShardSettings(index=0, shards=1, stream_defaults=StreamSettings(dedup_window_s=60.0)),
        None,
        store,
    )
    c.join_cluster(clock)
    c.apply_ownership(shard_map(1, unpinned=frozenset({2, 3}), serve_until=200.0))
    a, b = key_in(2, "durable"), key_in(3, "durable")
    for name in (a, b):
        c.define_stream(ipc.stream_key(T, NS, name), StreamSettings(), DurableSettings())
    return c, a, b


def test_the_first_durable_acks_of_an_unpinned_shard_wait_for_the_pin(tmp_path: Path) -> None:
    clock = Clock()
    c, a, _ = pinned_core(tmp_path, clock)
    send_publish(c, a, [b"1", b"2"], 7)
    assert replies(c) == []  # written, but not acknowledged
    log_a = c.stream_log(ipc.stream_key(T, NS, a))
    assert log_a is not None and log_a.next_offset == 2
    assert c.pins.take_wanted() == [2] and not c.pins.wanted
    # A retry with the same message id is a duplicate: its ack waits too.
    send_publish(c, a, [b"1"], 8, headers=[{"felix-msg-id": "m1"}])
    assert replies(c) == []
    send_publish(c, a, [b"1"], 9, headers=[{"felix-msg-id": "m1"}])
    assert replies(c) == []
    # No ack to hold: the pin is still wanted.
    send_publish(c, a, [b"3"], 10, ack=wire.ACK_NONE)
    assert [(r.opcode, r.request_id) for r in replies(c)] == [(0x80, 10)]  # OK
    assert c.pins.take_wanted() == [2]
    # A shard pinned here already answers at once; so does an in-memory stream.
    pinned = key_in(5, "durable")
    c.define_stream(ipc.stream_key(T, NS, pinned), StreamSettings(), DurableSettings())
    send_publish(c, pinned, [b"p"], 11)
    assert [r.base_offset for r in replies(c)] == [0]
    assert not c.pins.wanted
    # A map that still does not pin shard 2 changes nothing; the one that does sends
    # every held ack, in order, each with its own offsets.
    c.apply_ownership(shard_map(2, unpinned=frozenset({2, 3}), serve_until=200.0))
    assert replies(c) == []
    c.apply_ownership(shard_map(3, unpinned=frozenset({3}), serve_until=200.0))
    acks = replies(c)
    assert [(r.request_id, r.base_offset, r.count) for r in acks] == [
        (7, 0, 2),
        (8, 2, 1),
        (9, 2, 1),
    ]
    assert c.pins.held == 3 and c.pins.failed == 0
    send_publish(c, a, [b"4"], 12)
    assert [r.base_offset for r in replies(c)] == [4]  # pinned now: no more waiting


def test_held_acks_fail_when_the_shard_leaves_or_the_lease_lapses(tmp_path: Path) -> None:
    clock = Clock()
    c, a, b = pinned_core(tmp_path, clock)
    send_publish(c, a, [b"x"], 1)
    send_publish(c, b, [b"y"], 2)
    assert replies(c) == []
    # A handoff of shard 2 (still owned here): its ack keeps waiting for the pin.
    c.apply_ownership(
        shard_map(2, handoff={2: OTHER}, unpinned=frozenset({2, 3}), serve_until=200.0)
    )
    assert replies(c) == []
    # Shard 3 moved to another node before its pin: the ack fails, retryable.
    c.apply_ownership(
        shard_map(3, {3: OTHER}, handoff={2: OTHER}, unpinned=frozenset({2, 3}), serve_until=200.0)
    )
    [lost] = replies(c)
    assert isinstance(lost, wire.ErrorReply) and lost.request_id == 2
    assert lost.code == Unavailable.code and "left this node before it was pinned" in lost.message
    # The lease lapses before shard 2's pin: its ack fails at the next sweep.
    c.sweep(0.0)
    assert replies(c) == []
    clock.now = 200.0
    c.sweep(0.0)
    [fenced] = replies(c)
    assert isinstance(fenced, wire.ErrorReply) and fenced.request_id == 1
    assert "lease lapsed" in fenced.message
    assert c.pins.failed == 2 and not c.pins


def test_a_held_commit_ack_still_waits_for_its_fsync(tmp_path: Path) -> None:
    clock = Clock()
    c, a, _ = pinned_core(tmp_path, clock)
    send_publish(c, a, [b"x"], 1)
    assert c.flush() == {}  # no fsync round yet either
    c.apply_ownership(shard_map(2, unpinned=frozenset({3}), serve_until=200.0))
    assert c.flush() == {}  # pinned, but not synced yet: the ack waits for the fsync
    [ack] = replies(c)
    assert isinstance(ack, wire.PublishOffsets) and ack.base_offset == 0


# -- queue groups (felix/shard/queue/manager.py): fenced like writes --------------------

Q = 5  # the logical shard of the queue tests' stream


class Wall:
    """The wall clock of retry times (microseconds), moved by hand."""

    def __init__(self) -> None:
        self.us = 1_000_000_000

    def __call__(self) -> int:
        return self.us


def queue_core(
    tmp: Path, clock: Clock | None = None, wall: Wall | None = None, *, first_map: bool = True
) -> tuple[ShardCore, str]:
    """A cluster core as a shard process starts it (joined before its durable streams
    and groups are opened), gateway 0 up, and a durable stream in logical shard ``Q``."""
    store = DurableStore(DiskSettings(root=tmp / "streams"))
    offsets = OffsetReservations(tmp / "shard-0.offsets", block=BLOCK)
    c = ShardCore(ShardSettings(index=0, shards=1), offsets, store, wall_us=wall or Wall())
    c.join_cluster(clock or Clock())
    c.open_durable()
    c.handle(0, ipc.encode(RecordType.HELLO, 0, 0, b""), 0.0)
    c.flush()
    name = key_in(Q, "q")
    if first_map:
        c.apply_ownership(shard_map(1))
        c.define_stream(
            ipc.stream_key(T, NS, name), StreamSettings(), DurableSettings(fsync="none")
        )
    return c, name


def send(c: ShardCore, frame: bytes, token: int, aux: int = 0, now: float = 0.0) -> None:
    c.handle(0, ipc.encode(RecordType.REQUEST, token, aux, frame), now)


def consume_frame(name: str, credit: int = 64) -> bytes:
    return wire.encode_consume(
        99, T, NS, name, "g", CONSUMER, credit_records=credit, credit_bytes=1 << 20
    )


def group_file(tmp: Path, name: str) -> Path:
    return path_for(tmp / "groups", ipc.stream_key(T, NS, name), "g")


def group_status(c: ShardCore, name: str) -> dict[str, Any]:
    st = c.stream_status(ipc.stream_key(T, NS, name))
    assert st is not None
    return st["groups"]["g"]  # type: ignore[index,no-any-return]


def refused(reply: Any, why: str) -> bool:
    return (
        isinstance(reply, wire.ErrorReply)
        and reply.code == Unavailable.code
        and why in reply.message
    )


def test_a_moved_shard_ends_its_consumers_and_writes_nothing_of_its_groups(
    tmp_path: Path,
) -> None:
    c, name = queue_core(tmp_path)
    assert isinstance(publish(c, name, [b"a", b"b", b"c"]), wire.PublishOffsets)
    send(c, consume_frame(name), MEMBER)
    out = Out(c)
    assert isinstance(out.replies[MEMBER], wire.Consuming) and out.offsets() == [0, 1, 2]
    glog = group_file(tmp_path, name)
    size = glog.stat().st_size

    # The shard moves to another node: the consumer is told, its leases released.
    assert c.apply_ownership(shard_map(2, {Q: OTHER}, epochs={Q: 2})) == {Q}
    out = Out(c)
    (end,) = out.notices
    assert refused(end, "moved") and c.moved_consumers == 1
    st = group_status(c, name)
    assert (st["leased"], st["available"], st["members"]) == (0, 3, 0), st
    assert glog.stat().st_size == size  # nothing written: the shard is not served here

    # Requests admitted by a gateway under the previous map reach the core now.
    send(c, wire.encode_ack(5, CONSUMER, [(0, 3)]), 5, aux=MEMBER)
    send(c, wire.encode_nak(6, CONSUMER, [(1, 1)]), 6, aux=MEMBER)
    send(c, wire.encode_term(7, CONSUMER, [(2, 1)], detail="x"), 7, aux=MEMBER)
    send(c, consume_frame(name), MEMBER + 1)
    out = Out(c)
    for token in (5, 6, 7, MEMBER + 1):
        assert refused(out.replies[token], f"logical shard {Q} is not served"), out.replies
    # Far past every lease deadline and retry time: no timer writes or delivers.
    c.sweep(1e6)
    assert Out(c).delivered == {} and glog.stat().st_size == size
    assert c.queues.groups  # the group stays: its state is on disk, with the stream

    # The shard comes back: the releases are written, the records go out again with
    # no failure counted.
    c.apply_ownership(shard_map(3, epochs={Q: 3}))
    send(c, consume_frame(name), MEMBER + 1)
    out = Out(c)
    assert isinstance(out.replies[MEMBER + 1], wire.Consuming)
    got = {(d.offset, d.attempts, d.failures) for d in out.delivered[MEMBER + 1]}
    assert got == {(0, 2, 0), (1, 2, 0), (2, 2, 0)}
    assert glog.stat().st_size > size
    # A late settle of the ended consumer is now an unknown member, as on any node.
    send(c, wire.encode_ack(8, CONSUMER, [(0, 1)]), 8, aux=MEMBER)
    reply = Out(c).replies[8]
    assert isinstance(reply, wire.ErrorReply) and reply.code != Unavailable.code


def test_a_handoff_refuses_settles_and_parks_timers_until_it_is_cleared(tmp_path: Path) -> None:
    """A handoff keeps the shard's state here (it may be cleared) but nothing of its
    groups is written meanwhile: settles and windows are refused, a redelivery that
    comes due does not go out, and a consumer's LEAVE only changes memory."""
    wall = Wall()
    c, name = queue_core(tmp_path, wall=wall)
    publish(c, name, [b"a", b"b", b"c"])
    send(c, consume_frame(name), MEMBER)
    assert Out(c).offsets() == [0, 1, 2]
    send(c, wire.encode_nak(5, CONSUMER, [(1, 1)], delay_ms=1000), 5, aux=MEMBER)
    assert isinstance(Out(c).replies[5], wire.Settled)
    glog = group_file(tmp_path, name)
    size = glog.stat().st_size

    assert c.apply_ownership(shard_map(2, handoff={Q: OTHER})) == set()
    send(c, wire.encode_ack(6, CONSUMER, [(0, 1)]), 6, aux=MEMBER)
    send(c, wire.encode_consumer_window(7, CONSUMER, 100, 1 << 20), 7, aux=MEMBER)
    out = Out(c)
    assert refused(out.replies[6], "not served") and refused(out.replies[7], "not served")
    wall.us += 10_000_000  # the nak's retry is due: it does not go out
    c.sweep(1.0)
    assert Out(c).delivered == {} and glog.stat().st_size == size
    st = group_status(c, name)
    assert (st["leased"], st["acked"]) == (2, 0), st  # the refused ack changed nothing
    # The gateway ended the consumer (its map refuses the shard): a graceful LEAVE.
    c.handle(0, ipc.encode(RecordType.LEAVE, MEMBER, 1, b""), 2.0)
    assert group_status(c, name)["leased"] == 0
    assert glog.stat().st_size == size

    # The handoff is cleared: what waited is written, and delivered.
    c.apply_ownership(shard_map(3))
    send(c, consume_frame(name), MEMBER + 1)
    out = Out(c)
    assert sorted(out.offsets(MEMBER + 1)) == [0, 1, 2]
    assert glog.stat().st_size > size


def test_group_writes_are_fenced_by_serve_until(tmp_path: Path) -> None:
    clock = Clock()
    c, name = queue_core(tmp_path, clock)
    c.apply_ownership(shard_map(2, serve_until=110.0))
    publish(c, name, [b"a", b"b", b"c"])
    send(c, consume_frame(name, credit=1), MEMBER)
    assert Out(c).offsets() == [0]
    glog = group_file(tmp_path, name)
    size = glog.stat().st_size

    clock.now = 110.0  # the lease ran out: still the owner, but nothing may be written
    send(c, wire.encode_ack(5, CONSUMER, [(0, 1)]), 5, aux=MEMBER)
    send(c, consume_frame(name), MEMBER + 1)
    # A window writes nothing itself: accepted, but its hand-outs wait.
    send(c, wire.encode_consumer_window(6, CONSUMER, 10, 1 << 20), 6, aux=MEMBER)
    out = Out(c)
    assert refused(out.replies[5], "lease is not valid")
    assert refused(out.replies[MEMBER + 1], "lease is not valid")
    assert not isinstance(out.replies[6], wire.ErrorReply) and out.delivered == {}
    c.sweep(1e6)  # past the lease of offset 0: it does not expire now
    assert Out(c).delivered == {} and glog.stat().st_size == size
    assert group_status(c, name)["leased"] == 1
    assert c.cluster is not None and c.cluster.fenced == 2

    # The renewal went through: the next map moves the deadline on.
    c.apply_ownership(shard_map(3, serve_until=1e9))
    out = Out(c)
    assert out.offsets() == [1, 2] and glog.stat().st_size > size


def test_groups_recovered_before_the_first_map_write_nothing_until_it(tmp_path: Path) -> None:
    """A shard process opens its groups before its node's first shard map reached it:
    recovery's journal entries (a lease held at the crash fails) and its dead-letter
    appends wait for a map that serves the shard."""
    c, name = queue_core(tmp_path)
    publish(c, name, [b"a", b"b"])
    send(c, consume_frame(name), MEMBER)
    assert Out(c).offsets() == [0, 1]
    send(c, wire.encode_term(5, CONSUMER, [(0, 1)], detail="poison"), 5, aux=MEMBER)
    out = c.flush()[0]
    assert any(ipc.decode_header(r)[0] == RecordType.RELAY for r in out)  # not answered
    glog = group_file(tmp_path, name)
    size = glog.stat().st_size

    # kill -9, and a new shard process on the same files, before its first map.
    c2, _ = queue_core(tmp_path, first_map=False)
    assert (ipc.stream_key(T, NS, name), "g") in c2.queues.groups
    c2.sweep(1e6)
    assert not any(ipc.decode_header(r)[0] == RecordType.RELAY for r in c2.flush().get(0, []))
    assert glog.stat().st_size == size
    c2.apply_ownership(shard_map(1))
    assert any(ipc.decode_header(r)[0] == RecordType.RELAY for r in c2.flush().get(0, []))
    assert glog.stat().st_size > size  # offset 1's failure ("shard restarted")


def test_a_dead_letter_stream_is_checked_on_its_sources_logical_shard(tmp_path: Path) -> None:
    """``<stream>.dlq`` lives on the logical shard of ``<stream>`` (gateways and clients
    hash it so): the core checks its appends there too, not on crc32 of the full key."""
    for i in range(10_000):
        name = f"orders{i}"
        source = logical_shard(ipc.stream_key(T, NS, name), L)
        plain = zlib.crc32(ipc.stream_key(T, NS, f"{name}.dlq").encode()) % L
        if source != plain:
            break
    c, _ = queue_core(tmp_path, first_map=False)
    c.apply_ownership(shard_map(1, {plain: OTHER}))
    c.handle(
        0,
        ipc.encode(
            RecordType.REQUEST,
            1,
            ipc.AUX_DEAD_LETTER,
            wire.encode_publish(1, T, NS, f"{name}.dlq", [b"x"]),
        ),
        0.0,
    )
    sync(c)  # created durable (commit): the ack waits for an fsync
    (rec,) = c.flush()[0]
    reply = wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
    assert isinstance(reply, wire.PublishOffsets), reply


# -- cache entries of a lost logical shard: fenced at once, reclaimed by the sweep ------


def cache_set_many(c: ShardCore, cache: str, keys: list[str], value: bytes = b"v") -> None:
    for key in keys:
        frame = wire.encode_cache_set(1, T, NS, cache, key, value)
        c.handle(0, ipc.encode(RecordType.REQUEST, 1, 0, frame), 0.0)
    replies = c.flush()[0]
    assert len(replies) == len(keys)
    for rec in replies:
        reply = wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
        assert isinstance(reply, wire.CacheResult) and reply.result, reply


def cache_get(c: ShardCore, key: str, cache: str = "c") -> bytes | None:
    value: bytes | None = request(c, wire.encode_cache_get(1, T, NS, cache, key)).value
    return value


def keys_in(shard: int, n: int, cache: str = "c") -> list[str]:
    keys = (f"k{i}" for i in range(n * L * 4))
    out = [k for k in keys if logical_shard(f"{T}/{NS}/{cache}/{k}", L) == shard]
    assert len(out) >= n
    return out[:n]


def test_a_lost_shards_cache_entries_miss_at_once_and_never_come_back(tmp_path: Path) -> None:
    c = make(tmp_path)
    c.apply_ownership(shard_map(1))
    lost, kept = 3, 5
    old, stay = keys_in(lost, 50), keys_in(kept, 50)
    cache_set_many(c, "c", old + stay, b"old")
    charged = c.tenant_memory(T)
    assert charged == sum(entry_size(len(k), 3) for k in old + stay)

    c.apply_ownership(shard_map(2, {lost: OTHER}, epochs={lost: 2}))
    # No scan ran: nothing reclaimed yet, but nothing of the lost shard is served.
    assert c.tenant_memory(T) == charged
    assert cache_get(c, old[0]) is None and cache_get(c, stay[0]) == b"old"
    assert c.tenant_memory(T) == charged - entry_size(len(old[0]), 3)  # found: gone at once
    # The shard comes back before the sweep reclaimed anything: nothing old returns.
    c.apply_ownership(shard_map(3, epochs={lost: 3}))
    assert all(cache_get(c, k) is None for k in old[1:10])
    cache_set_many(c, "c", old[10:20], b"new")  # written again: new entries
    while c._reclaiming:
        c.sweep(1.0)
    assert [cache_get(c, k) for k in old[10:20]] == [b"new"] * 10
    assert all(cache_get(c, k) is None for k in old[20:])
    assert all(cache_get(c, k) == b"old" for k in stay)
    assert c.moved_cache_entries == 50  # every old entry of the lost shard
    status = c.cache_status((T, NS, "c"))
    assert status is not None and status["entries"] == 60
    held = sum(entry_size(len(k), 3) for k in old[10:20] + stay)
    assert c.tenant_memory(T) == status["used_bytes"] == held


def test_reclaiming_a_lost_shard_is_bounded_per_sweep_and_gives_all_memory_back(
    tmp_path: Path,
) -> None:
    c = make(tmp_path)
    c.apply_ownership(shard_map(1))
    per_cache = RECLAIM_PER_SWEEP * 3 // 4
    for cache in ("c1", "c2"):
        cache_set_many(c, cache, [f"k{i}" for i in range(per_cache)])
    assert c.memory_used > 0
    partitions = [c._caches[(T, NS, name)] for name in ("c1", "c2")]

    def pending() -> int:
        return sum(p.reclaim_pending for p in partitions)

    everything = shard_map(2, dict.fromkeys(range(L), OTHER), epochs=dict.fromkeys(range(L), 2))
    c.apply_ownership(everything)
    assert pending() == 2 * per_cache  # the map's application looked at no entry
    before = c.memory_used
    c.sweep(1.0)
    assert pending() == 2 * per_cache - RECLAIM_PER_SWEEP  # one sweep: a bounded step
    assert sum(len(p) for p in partitions) == 2 * per_cache - RECLAIM_PER_SWEEP
    assert c.memory_used == sum(p.used_bytes for p in partitions) < before  # charged back
    c.sweep(1.0)
    assert pending() == 0 and not c._reclaiming
    assert c.memory_used == 0 and c.tenant_memory(T) == 0
    assert c.moved_cache_entries == 2 * per_cache


def test_a_held_ack_of_a_deleted_stream_is_answered_not_found(tmp_path: Path) -> None:
    """Review finding: an ack held for the pin pointed at the deleted stream's log and was
    never answered (it waited for an fsync of a log nobody syncs any more)."""
    clock = Clock()
    c, a, b = pinned_core(tmp_path, clock)
    send_publish(c, a, [b"x"], 1)
    send_publish(c, b, [b"y"], 2)
    assert replies(c) == []
    assert c.delete_stream(ipc.stream_key(T, NS, a))
    [gone] = replies(c)
    assert isinstance(gone, wire.ErrorReply) and gone.request_id == 1
    assert gone.code == NotFound.code and "deleted before" in gone.message
    # The other stream's ack still waits, and goes with the pin; nothing more for a.
    c.apply_ownership(shard_map(2, serve_until=200.0))
    [ack] = replies(c)
    assert isinstance(ack, wire.PublishOffsets) and ack.request_id == 2
    assert not c.pins
