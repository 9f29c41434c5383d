"""The sans-IO shard core: ring records in, ring records out, time passed in."""

from __future__ import annotations

from pathlib import Path

from felix import ipc, wire
from felix.errors import NotFound
from felix.ipc import RecordType
from felix.shard.cache import CacheSettings
from felix.shard.core import ShardCore, ShardSettings
from felix.shard.offsets import OffsetReservations
from felix.shard.stream_log import StreamSettings

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


def test_memory_budget_trims_the_largest_stream_and_bounds_caches() -> None:
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
    # Caches reserve their budget up front: three fit, a fourth is refused (Overloaded).
    replies = [request(c, wire.encode_cache_set(i, T, NS, f"c{i}", "k", b"v")) for i in range(4)]
    assert [type(r).__name__ for r in replies[:3]] == ["CacheResult"] * 3
    assert isinstance(replies[3], wire.ErrorReply) and replies[3].code == 5
    for i in range(50):
        request(c, wire.encode_publish(i, T, NS, "big", [payload] * 5))
        assert c.memory_used <= 200_000
