"""Queue consumers in the gateway's session core, through the in-memory client <->
gateway pair (tests/gateway_pair.py) whose one shard is a real durable ShardCore in a
temp dir: consumer ids, the per-connection bound, settles of unknown consumers, settles
while the node drains, and the LEAVE when a consumer's stream closes (docs/queues.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from felix import ipc, wire
from felix.errors import BadRequest, Overloaded, Unavailable
from felix.gateway.gateway import GatewayLimits
from felix.ipc import RecordType
from tests.gateway_pair import Pair
from tests.test_queues_shard import make

T, NS = "acme", "prod"


def pair_with_disk(tmp: Path, limits: GatewayLimits | None = None) -> Pair:
    pair = Pair(limits, shards=1)
    pair.links.cores[0] = make(tmp, fsync="interval")  # written records are readable
    return pair


def ext(pair: Pair, sid: int) -> list[Any]:
    return [m for m in pair.messages(sid) if isinstance(m, wire.ExtMessage)]


def by_id(pair: Pair, sid: int) -> dict[int, Any]:
    return {m.request_id: m for m in ext(pair, sid) if hasattr(m, "request_id")}


def consume(rid: int, consumer_id: int, records: int = 4) -> bytes:
    return wire.encode_consume(rid, T, NS, "jobs", "g", consumer_id, credit_records=records)


def deliveries(pair: Pair, sid: int) -> list[int]:
    return [d.offset for m in ext(pair, sid) if isinstance(m, wire.Deliveries) for d in m.records]


def test_a_consumer_id_claimed_twice_is_a_bad_request(tmp_path: Path) -> None:
    pair = pair_with_disk(tmp_path)
    sid = pair.open_control(T)
    pair.send(sid, consume(1, 5))
    pair.send(sid, consume(2, 5))  # before the first is answered
    pair.pump()
    pair.send(sid, consume(3, 5))  # and after
    pair.pump()
    got = by_id(pair, sid)
    assert isinstance(got[1], wire.Consuming)
    for rid in (2, 3):
        assert got[rid].code == BadRequest.code and "already exists" in got[rid].message
    assert len(pair.gateway.queues.by_token) == 1


def test_consumers_per_connection_are_bounded(tmp_path: Path) -> None:
    pair = pair_with_disk(tmp_path, GatewayLimits(max_consumers_per_connection=2))
    sid = pair.open_control(T)
    for rid in (1, 2, 3):
        pair.send(sid, consume(rid, rid))
    pair.pump()
    got = by_id(pair, sid)
    assert isinstance(got[1], wire.Consuming) and isinstance(got[2], wire.Consuming)
    assert got[3].code == Overloaded.code
    # Another connection has its own bound.
    other = pair.connect()
    osid = other.open_control(T)
    other.send(osid, consume(1, 1))
    other.pump()
    assert isinstance(by_id(other, osid)[1], wire.Consuming)


def test_a_settle_for_an_unknown_consumer_is_a_bad_request(tmp_path: Path) -> None:
    pair = pair_with_disk(tmp_path)
    sid = pair.open_control(T)
    pair.send(sid, wire.encode_ack(1, 42, [(0, 1)]))
    pair.send(sid, wire.encode_stop_consume(2, 42))
    pair.send(sid, wire.encode_consumer_window(3, 42, 1, 1))
    pair.pump()
    got = by_id(pair, sid)
    for rid in (1, 2, 3):
        assert got[rid].code == BadRequest.code and "no consumer 42" in got[rid].message
    # Another connection's consumer is not this one's.
    other = pair.connect()
    osid = other.open_control(T)
    other.send(osid, consume(1, 42))
    other.pump()
    pair.send(sid, wire.encode_ack(4, 42, [(0, 1)]))
    pair.pump()
    assert by_id(pair, sid)[4].code == BadRequest.code


def test_settles_are_allowed_while_the_node_drains(tmp_path: Path) -> None:
    pair = pair_with_disk(tmp_path)
    sid = pair.open_control(T)
    pair.send(sid, wire.encode_publish(1, T, NS, "jobs", [b"a", b"b", b"c"]))
    pair.send(sid, consume(2, 9, records=3))
    pair.pump()
    assert deliveries(pair, sid) == [0, 1, 2]
    pair.gateway.draining = True
    pair.send(sid, wire.encode_ack(3, 9, [(0, 1)]))
    pair.send(sid, wire.encode_nak(4, 9, [(1, 1)], delay_ms=60_000))
    pair.send(sid, wire.encode_release(5, 9, [(2, 1)]))
    pair.send(sid, wire.encode_publish(6, T, NS, "jobs", [b"d"]))  # not a settle: refused
    pair.send(sid, consume(7, 10))  # nor a new consumer
    pair.pump()
    got = by_id(pair, sid)
    for rid in (3, 4, 5):
        assert isinstance(got[rid], wire.Settled) and got[rid].refused == [], got[rid]
    for rid in (6, 7):
        assert got[rid].code == Unavailable.code and "draining" in got[rid].message
    pair.send(sid, wire.encode_stop_consume(8, 9))  # the graceful leave, too
    pair.pump()
    assert isinstance(by_id(pair, sid)[8], wire.ExtMessage)
    assert by_id(pair, sid)[8].opcode == wire.OP_OK
    status = pair.links.cores[0].stream_status(ipc.stream_key(T, NS, "jobs"))
    assert status is not None
    group = status["groups"]["g"]  # type: ignore[index]
    assert (group["acked"], group["leased"], group["members"]) == (1, 0, 0), group


def test_a_consumer_whose_stream_closes_leaves_its_group(tmp_path: Path) -> None:
    pair = pair_with_disk(tmp_path)
    keep = pair.open_control(T)
    sid = pair.open_control(T)
    pair.send(sid, wire.encode_publish(1, T, NS, "jobs", [b"a", b"b"]))
    pair.send(sid, consume(2, 9, records=2))
    pair.pump()
    pair.send(keep, consume(3, 10, records=2))
    pair.pump()
    assert deliveries(pair, sid) == [0, 1]  # the first consumer took both
    assert deliveries(pair, keep) == []
    sent = len(pair.links.sent)
    pair.reset(sid)  # the client resets the stream the consumer came on
    pair.pump()
    leaves = [r for r in pair.links.sent[sent:] if ipc.decode_header(r)[0] == RecordType.LEAVE]
    assert len(leaves) == 1  # the gateway told the shard at once (abrupt)
    assert [c.consumer_id for c in pair.gateway.queues.by_token.values()] == [10]
    # Its records went to the other consumer with one failure each.
    got = [
        (d.offset, d.attempts, d.failures)
        for m in ext(pair, keep)
        if isinstance(m, wire.Deliveries)
        for d in m.records
    ]
    assert got == [(0, 2, 1), (1, 2, 1)]
    # The other stream's consumer is untouched; acking works there.
    pair.send(keep, wire.encode_ack(4, 10, [(0, 2)]))
    pair.pump()
    assert isinstance(by_id(pair, keep)[4], wire.Settled)
