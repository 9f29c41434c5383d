"""The sans-IO shard core: ring records in, ring records out, time passed in."""

from __future__ import annotations

from pathlib import Path

from felix import ipc, wire
from felix.errors import NotFound, Overloaded
from felix.ipc import RecordType
from felix.shard.cache import CacheSettings, entry_size
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.offsets import OffsetReservations
from felix.shard.stream_log import StreamSettings
from felix.shard.tenants import TenantQuota

T, NS = "acme", "prod"


def core(**kw: object) -> ShardCore:
    return ShardCore(ShardSettings(index=0, shards=1, **kw))  # type: ignore[arg-type]


def request(c: ShardCore, frame: bytes, *, gateway: int = 0, token: int = 1, now: float = 0.0):
    c.handle(gateway, ipc.encode(RecordType.REQUEST, token, 0, frame), now)
    out = c.flush()
    replies = [r for r in out.get(gateway, []) if r[0] == RecordType.REPLY]
    assert len(replies) == 1, out
    _, tok, _ = ipc.decode_header(replies[0])
    assert tok == token
    return wire.decode_ext(wire.decode_frame(replies[0][ipc.HEADER_SIZE :], extensions=True))


def test_cache_set_get_ttl_delete_with_time_passed_in() -> None:
    c = core()
    stored = request(c, wire.encode_cache_set(1, T, NS, "c", "k", b"v", ttl_ms=1500))
    assert isinstance(stored, wire.CacheResult) and stored.result
    got = request(c, wire.encode_cache_get(2, T, NS, "c", "k"), now=1.0)
    assert isinstance(got, wire.CacheValue) and got.value == b"v" and got.request_id == 2
    ttl = request(c, wire.encode_cache_ttl(3, T, NS, "c", "k"), now=1.0)
    assert isinstance(ttl, wire.CacheTtlReply)
    assert (ttl.state, ttl.ttl_ms) == (wire.TTL_EXPIRING, 500)
    assert request(c, wire.encode_cache_get(4, T, NS, "c", "k"), now=1.5).value is None
    nx = request(c, wire.encode_cache_set(5, T, NS, "c", "k", b"2", mode=wire.SET_IF_ABSENT))
    xx = request(c, wire.encode_cache_set(6, T, NS, "c", "k", b"3", mode=wire.SET_IF_ABSENT))
    assert nx.result is True and xx.result is False
    assert request(c, wire.encode_cache_delete(7, T, NS, "c", "k")).result is True
    assert request(c, wire.encode_cache_delete(8, T, NS, "c", "k")).result is False
    ttl = request(c, wire.encode_cache_ttl(9, T, NS, "c", "k"))
    assert ttl.state == wire.TTL_MISSING


def test_errors_carry_the_request_id_and_code() -> None:
    c = core()
    bad_name = request(c, wire.encode_cache_get(11, T, NS, "bad name!", "k"))
    assert isinstance(bad_name, wire.ErrorReply) and bad_name.request_id == 11
    assert bad_name.code == 1
    too_big = request(c, wire.encode_cache_set(12, T, NS, "c", "k", b"x" * (2 << 20)))
    assert isinstance(too_big, wire.ErrorReply) and too_big.code == 7


def test_auto_create_off_gives_not_found() -> None:
    c = core(auto_create=False)
    reply = request(c, wire.encode_publish(1, T, NS, "s", [b"x"]))
    assert isinstance(reply, wire.ErrorReply) and reply.code == NotFound.code


def test_publish_acks_offsets_and_pushes_once_per_batch_to_watchers() -> None:
    c = core()
    sub = request(c, wire.encode_subscribe(1, T, NS, "s", 77), gateway=1)
    assert isinstance(sub, wire.Subscribed) and sub.start_offset == 0
    key = ipc.stream_key(T, NS, "s")
    # Two publishes from gateway 0 in one batch: one PUSH per watching gateway at flush.
    c.handle(
        0, ipc.encode(RecordType.REQUEST, 5, 0, wire.encode_publish(1, T, NS, "s", [b"a", b"b"])), 0
    )
    c.handle(
        0,
        ipc.encode(
            RecordType.REQUEST,
            6,
            0,
            wire.encode_publish(2, T, NS, "s", [b"c"], headers=[{"h": "v"}]),
        ),
        0,
    )
    out = c.flush()
    acks = [
        wire.decode_ext(wire.decode_frame(r[ipc.HEADER_SIZE :], extensions=True)) for r in out[0]
    ]
    assert [(a.base_offset, a.count) for a in acks] == [(0, 2), (2, 1)]  # type: ignore[attr-defined]
    assert [r[0] for r in out[1]] == [RecordType.PUSH]
    pushed_key, pos = ipc.decode_key(out[1][0][ipc.HEADER_SIZE :])
    assert pushed_key == key
    events = wire.decode_ext(wire.decode_frame(out[1][0][ipc.HEADER_SIZE + pos :], extensions=True))
    assert isinstance(events, wire.Events)
    assert (events.base_offset, events.payloads) == (0, [b"a", b"b", b"c"])
    assert events.headers == [None, None, {"h": "v"}]
    assert c.flush() == {}


def test_read_serves_laggards_and_reports_too_old() -> None:
    c = core(stream_defaults=StreamSettings(replay_max_records=4))
    for i in range(10):
        request(c, wire.encode_publish(i, T, NS, "s", [bytes([i])]), token=i)
    key = ipc.stream_key(T, NS, "s")
    c.handle(0, ipc.encode_read(99, key, 7, 2, 1 << 20), 0)
    (rec,) = c.flush()[0]
    kind, token, tail = ipc.decode_header(rec)
    events = wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
    assert (kind, token, tail) == (RecordType.READ_REPLY, 99, 10)
    assert isinstance(events, wire.Events) and events.payloads == [b"\x07", b"\x08"]
    c.handle(0, ipc.encode_read(99, key, 1, 2, 1 << 20), 0)
    (rec,) = c.flush()[0]
    err = wire.decode_ext(wire.decode_frame(rec[ipc.HEADER_SIZE :], extensions=True))
    assert isinstance(err, wire.CursorErrorReply)
    assert (err.reason, err.requested, err.available) == ("too_old", 1, 6)


def test_subscribe_cursor_errors() -> None:
    c = core()
    request(c, wire.encode_publish(1, T, NS, "s", [b"x"]))
    err = request(c, wire.encode_subscribe(2, T, NS, "s", 1, start=5))
    assert isinstance(err, wire.CursorErrorReply) and err.reason == "in_future"
    assert err.available == 1 and err.request_id == 2


def test_hostile_records_are_dropped_not_raised() -> None:
    c = core()
    for junk in [
        b"",
        b"\x01",
        ipc.encode(RecordType.REQUEST, 1, 0, b"garbage"),
        ipc.encode(RecordType.READ, 1, 0, b"\x00"),
        ipc.encode(99, 1, 0, b""),  # type: ignore[arg-type]
        ipc.encode(RecordType.REQUEST, 1, 0, wire.encode_message({"type": "ok"})),
    ]:
        c.handle(0, junk, 0.0)
    assert c.malformed == 6
    # A well-framed extension frame with a broken body still gets an error reply with its id.
    broken = wire.encode_cache_get(42, T, NS, "c", "k")
    broken = broken[:8] + (len(broken) - 13).to_bytes(4, "big") + broken[12:-1]
    reply = request(c, broken)
    assert isinstance(reply, wire.ErrorReply) and reply.request_id == 42


def test_offsets_continue_above_the_reservation_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "shard-0.offsets"
    first = ShardCore(ShardSettings(0, 1), OffsetReservations(path, block=100))
    ack = request(first, wire.encode_publish(1, T, NS, "s", [b"a", b"b"]))
    assert ack.base_offset == 0
    # "kill -9": a new core on the same file continues above what was reserved.
    second = ShardCore(ShardSettings(0, 1), OffsetReservations(path, block=100))
    ack = request(second, wire.encode_publish(1, T, NS, "s", [b"c"]))
    assert ack.base_offset >= 2
    sub = request(second, wire.encode_subscribe(2, T, NS, "s", 1, start="earliest"))
    assert sub.start_offset == ack.base_offset


def test_memory_budget_trims_the_largest_stream_and_caches_are_charged_as_used() -> None:
    c = core(
        memory_budget=200_000,
        cache_defaults=CacheSettings(budget_bytes=60_000, max_value_bytes=1000),
    )
    payload = b"x" * 1000
    for i in range(100):
        request(c, wire.encode_publish(i, T, NS, "big", [payload] * 5))
        request(c, wire.encode_publish(i, T, NS, "small", [payload]))
        assert c.memory_used <= 200_000
    assert c.budget_trims > 0
    big = c.stream_log(ipc.stream_key(T, NS, "big"))
    small = c.stream_log(ipc.stream_key(T, NS, "small"))
    assert big is not None and small is not None
    assert big.earliest > 0 and big.next_offset == 500  # offsets keep counting
    # A cache's budget is a cap, not a reservation: ten caches of 60 kB budget each
    # (three times the shard's budget together) cost what they hold.
    fresh = core(
        memory_budget=200_000,
        cache_defaults=CacheSettings(budget_bytes=60_000, max_value_bytes=1000),
    )
    for i in range(10):
        stored = request(fresh, wire.encode_cache_set(i, T, NS, f"c{i}", "k", b"v"))
        assert isinstance(stored, wire.CacheResult) and stored.result
    assert (fresh.caches, fresh.memory_used) == (10, 10 * entry_size(1, 1))
    for i in range(50):
        request(c, wire.encode_publish(i, T, NS, "big", [payload] * 5))
        assert c.memory_used <= 200_000


def test_a_read_never_creates_anything() -> None:
    """Issue 11 item 1: cache reads and subscriptions of unknown names create nothing."""
    c = core()
    for i in range(2000):
        got = request(c, wire.encode_cache_get(i, T, NS, f"c{i}", "k"))
        assert isinstance(got, wire.CacheValue) and got.value is None
    ttl = request(c, wire.encode_cache_ttl(1, T, NS, "c0", "k"))
    assert isinstance(ttl, wire.CacheTtlReply) and ttl.state == wire.TTL_MISSING
    deleted = request(c, wire.encode_cache_delete(2, T, NS, "c0", "k"))
    assert isinstance(deleted, wire.CacheResult) and deleted.result is False
    assert (c.caches, c.streams, c.memory_used) == (0, 0, 0)
    # A subscription to a stream nobody published to yet: a watch, not a stream.
    sub = request(c, wire.encode_subscribe(3, T, NS, "s", 7), gateway=1)
    assert isinstance(sub, wire.Subscribed) and sub.start_offset == 0
    assert c.streams == 0
    # The first publish (a write) creates it, and the watcher gets the records.
    request(c, wire.encode_publish(4, T, NS, "s", [b"a"]), token=5)
    assert c.streams == 1
    c.handle(0, ipc.encode(RecordType.REQUEST, 6, 0, wire.encode_publish(5, T, NS, "s", [b"b"])), 0)
    assert [r[0] for r in c.flush()[1]] == [RecordType.PUSH]
    # A watch whose subscriber left is forgotten (the table stays bounded).
    request(c, wire.encode_subscribe(7, T, NS, "never", 8), gateway=1)
    assert c.resources_held() == 2
    c.handle(
        1, ipc.encode(RecordType.WATCH, 0, 0, ipc.encode_key(ipc.stream_key(T, NS, "never"))), 0
    )
    assert c.resources_held() == 1


def test_reads_of_unknown_names_are_not_found_without_auto_create() -> None:
    c = core(auto_create=False)
    for frame in (
        wire.encode_cache_get(1, T, NS, "c", "k"),
        wire.encode_subscribe(1, T, NS, "s", 7),
    ):
        reply = request(c, frame)
        assert isinstance(reply, wire.ErrorReply) and reply.code == NotFound.code


def test_a_tenant_over_its_quota_trims_only_its_own_data() -> None:
    c = core(tenant_quota=TenantQuota(memory_bytes=50_000, max_resources=100))
    payload = b"x" * 1000
    request(c, wire.encode_publish(1, "b", NS, "s", [payload] * 10))
    for i in range(100):
        request(c, wire.encode_publish(i, "a", NS, "s", [payload] * 5))
        request(c, wire.encode_cache_set(i, "a", NS, "c", f"k{i}", payload))
        assert c.tenant_memory("a") <= 50_000
    b_log = c.stream_log(ipc.stream_key("b", NS, "s"))
    assert b_log is not None and b_log.earliest == 0 and len(b_log) == 10
    assert c.quota_trims > 0 and c.budget_trims == 0


def test_a_shard_over_budget_trims_the_biggest_tenant_first() -> None:
    """Trimming never makes a tenant pay for a bigger one: b's single stream is the
    largest on the shard, but a holds more in total, so only a is trimmed."""
    c = core(memory_budget=100_000)
    payload = b"x" * 1000
    for i in range(70):
        request(c, wire.encode_publish(i, "a", NS, f"s{i % 10}", [payload]))
    for i in range(25):
        request(c, wire.encode_publish(i, "b", NS, "s", [payload]))
        assert c.memory_used <= 100_000
    assert c.budget_trims > 0
    b_log = c.stream_log(ipc.stream_key("b", NS, "s"))
    assert b_log is not None and (b_log.earliest, len(b_log)) == (0, 25)
    assert c.tenant_memory("a") < 70 * (1000 + 96)


def test_a_tenant_holds_at_most_its_quota_of_resources() -> None:
    c = core(tenant_quota=TenantQuota(memory_bytes=1 << 30, max_resources=3))
    for i in range(3):
        request(c, wire.encode_cache_set(i, "a", NS, f"c{i}", "k", b"v"))
    refused = request(c, wire.encode_publish(9, "a", NS, "s", [b"x"]))
    assert isinstance(refused, wire.ErrorReply) and refused.code == Overloaded.code
    assert "quota of 3" in refused.message
    ok = request(c, wire.encode_publish(9, "b", NS, "s", [b"x"]))
    assert isinstance(ok, wire.PublishOffsets)


def test_the_stream_limit_is_a_clear_error() -> None:
    c = core(max_streams=2)
    for name in ("s1", "s2"):
        request(c, wire.encode_publish(1, T, NS, name, [b"x"]))
    refused = request(c, wire.encode_publish(1, T, NS, "s3", [b"x"]))
    assert isinstance(refused, wire.ErrorReply) and refused.code == Overloaded.code
    assert "--max-streams-per-shard" in refused.message


def test_a_batch_trimmed_away_still_tells_watchers_the_new_tail() -> None:
    """Never silence: when memory trimming removes a whole batch, watchers still hear of it."""
    c = core(memory_budget=20_000)
    request(c, wire.encode_subscribe(1, T, NS, "s", 7), gateway=1)
    c.flush()
    publish = wire.encode_publish(2, T, NS, "s", [b"x" * 25_000])
    c.handle(0, ipc.encode(RecordType.REQUEST, 2, 0, publish), 0)
    pushes = c.flush()[1]
    assert [r[0] for r in pushes] == [RecordType.PUSH]
    _, pos = ipc.decode_key(pushes[0][ipc.HEADER_SIZE :])
    events = wire.decode_ext(wire.decode_frame(pushes[0][ipc.HEADER_SIZE + pos :], extensions=True))
    # No records, but the new tail: the gateway READs offset 0, gets too_old and tells
    # its subscribers which range they lost.
    assert isinstance(events, wire.Events)
    assert (events.base_offset, events.payloads) == (1, [])


def test_a_deleted_stream_stays_deleted_until_defined_again() -> None:
    """Issue 11 item 16: publishing to a deleted stream does not create it again."""
    c = core(max_tombstones=2)
    key = ipc.stream_key(T, NS, "s")
    c.define_stream(key, StreamSettings())
    request(c, wire.encode_publish(1, T, NS, "s", [b"x"]))
    assert c.delete_stream(key) is True
    refused = request(c, wire.encode_publish(2, T, NS, "s", [b"y"]))
    assert isinstance(refused, wire.ErrorReply) and refused.code == NotFound.code
    assert "deleted" in refused.message and c.streams == 0
    sub = request(c, wire.encode_subscribe(3, T, NS, "s", 1))
    assert isinstance(sub, wire.ErrorReply) and sub.code == NotFound.code
    c.define_stream(key, StreamSettings())  # re-created through the control plane
    ok = request(c, wire.encode_publish(4, T, NS, "s", [b"z"]))
    assert isinstance(ok, wire.PublishOffsets)
    # Caches too; and the tombstones are bounded (the oldest is forgotten).
    c.delete_cache((T, NS, "c"))
    refused = request(c, wire.encode_cache_set(5, T, NS, "c", "k", b"v"))
    assert isinstance(refused, wire.ErrorReply) and refused.code == NotFound.code
    get = request(c, wire.encode_cache_get(6, T, NS, "c", "k"))
    assert isinstance(get, wire.ErrorReply) and get.code == NotFound.code
    c.delete_stream(ipc.stream_key(T, NS, "x"))
    c.delete_stream(ipc.stream_key(T, NS, "y"))
    stored = request(c, wire.encode_cache_set(7, T, NS, "c", "k", b"v"))
    assert isinstance(stored, wire.CacheResult) and stored.result


def test_budgets_above_the_node_are_enforced_on_the_data_plane() -> None:
    """Issue 11 item 2: whatever the control plane accepted, the shard holds its budget."""
    c = core(memory_budget=100_000)
    c.define_cache((T, NS, "huge"), CacheSettings(budget_bytes=1 << 40, max_value_bytes=1000))
    c.define_stream(ipc.stream_key(T, NS, "huge"), StreamSettings(replay_max_bytes=1 << 40))
    assert c.memory_used == 0  # defining reserves nothing
    for i in range(500):
        request(c, wire.encode_cache_set(i, T, NS, "huge", f"k{i}", b"v" * 1000))
        request(c, wire.encode_publish(i, T, NS, "huge", [b"r" * 1000]))
        assert c.memory_used <= 100_000
