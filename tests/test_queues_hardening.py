"""Queue groups against a careless tenant and an attacker (from an adversarial review):
a dead letter the dead-letter stream refuses is retried with backoff, not in a loop; an
abandoned group cannot hold age retention forever; a huge settle range costs no
per-offset work; the gateway does not buffer without bound for a consumer that never
reads; one tenant cannot take every group slot of a shard; the client splits a tick's
acks over frames; an ack whose write failed is not confirmed by a retry; dead letters
of a durable stream go to a durable stream."""

from __future__ import annotations

import time
from pathlib import Path

from felix import ipc, wire
from felix.ipc import RecordType
from felix.shard.core import ShardCore
from felix.shard.durable import DurableSettings
from felix.shard.stream_log import StreamSettings
from tests.test_queues_shard import CONSUMER, MEMBER, Out, consume, make, publish, request
from tests.test_shard_durable import NS, T


def _gateway_round(c: ShardCore, now: float) -> int:
    """Play gateway 0 for one flush: relay every RELAY to the (only) shard, hand the
    answer back as RELAY_REPLY. Returns how many RELAY records the shard sent."""
    relays = 0
    for rec in c.flush().get(0, []):
        kind, token, _aux = ipc.decode_header(rec)
        if kind != RecordType.RELAY:
            continue
        relays += 1
        body = rec[ipc.HEADER_SIZE :]
        _key, pos = ipc.decode_key(body)
        ring_token = 1_000_000 + relays
        c.handle(
            0,
            ipc.encode(RecordType.REQUEST, ring_token, ipc.AUX_DEAD_LETTER, bytes(body[pos:])),
            now,
        )
        for reply in c.flush().get(0, []):
            k, t, _ = ipc.decode_header(reply)
            if k == RecordType.REPLY and t == ring_token:
                c.handle(
                    0, ipc.encode(RecordType.RELAY_REPLY, token, 0, reply[ipc.HEADER_SIZE :]), now
                )
    return relays


def test_a_dead_letter_the_dlq_refuses_is_not_retried_in_a_hot_loop(tmp_path: Path) -> None:
    """A record of exactly max_record_bytes is valid on its stream, but its dead-letter
    copy (same payload + felix-dlq-* headers) is TooLarge on the dead-letter stream:
    a permanent refusal. manager.relay_reply requeues at once and the next flush sends it
    again: RELAY_RETRY (1 s) is never applied to a refused append, so the shard and a
    gateway ping-pong at ring speed (and log a warning each time)."""
    c = make(tmp_path, fsync="none")
    limit = StreamSettings().max_record_bytes
    publish(c, [b"x" * limit])
    Out(c)
    consume(c, records=1)
    request(c, wire.encode_term(5, CONSUMER, [(0, 1)], detail="poison"), 5, aux=MEMBER)
    now = 1.0  # time does not move: every retry below is immediate
    sent = sum(_gateway_round(c, now) for _ in range(50))
    assert sent <= 2, f"{sent} dead-letter appends of one record within one instant"


def test_an_abandoned_group_cannot_let_an_age_retained_stream_grow_without_bound(
    tmp_path: Path,
) -> None:
    """A stream retained by age with a group nobody consumes any more keeps what the
    group needs (pending records are never deleted), but not forever at the cost of the
    disk every tenant shares: once the oldest pending record is over twice the age,
    publishes are refused (Overloaded naming the group's offset), until it catches up."""
    clock_us = [1_000_000_000]
    c = make(tmp_path, fsync="none", segment_bytes=4096)
    c._wall_us = lambda: clock_us[0]
    key = ipc.stream_key(T, NS, "s")
    c.define_stream(
        key, StreamSettings(replay_max_records=4), DurableSettings(fsync="none", retention_age_s=1)
    )
    publish(c, [b"a"])
    Out(c)
    consume(c, records=1)
    request(c, wire.encode_stop_consume(6, CONSUMER), 6, aux=MEMBER)  # gone for good
    Out(c)
    for i in range(100):
        publish(c, [b"y" * 300], token=10 + i)
        assert isinstance(Out(c).replies[10 + i], wire.PublishOffsets)
    clock_us[0] += 3600 * 1_000_000  # an hour later: everything is past its age
    assert c.disk_sweep() == 0  # the group still needs offset 0: nothing deleted
    publish(c, [b"late"], token=500)
    reply = Out(c).replies[500]
    assert isinstance(reply, wire.ErrorReply) and "from offset 0" in reply.message
    assert c.queues.refused == 1
    # The group is removed (felix group rm): retention frees it all, publishes go on.
    c.queues.remove(key, "g")
    assert c.disk_sweep() > 0
    publish(c, [b"later"], token=501)
    assert isinstance(Out(c).replies[501], wire.PublishOffsets)


def test_settling_an_undelivered_range_costs_no_per_offset_work(tmp_path: Path) -> None:
    """ACK of offsets never handed out: each is looked at one by one (group._ack loops
    over range(first, first + count)). One frame of one range (first=next,
    count=max_span) costs max_span Python iterations on the shard loop: ~65 ms at the
    default max_span, ~0.6 s at 1_000_000, and a connection may pipeline 4096 of them
    (every tenant on the shard waits)."""
    c = make(tmp_path, fsync="none")
    publish(c, [b"a"])
    Out(c)
    consume(c, records=1)
    start = time.perf_counter()
    request(c, wire.encode_ack(7, CONSUMER, [(1, 100_000)]), 7, aux=MEMBER)
    replies = [r for r in c.flush().get(0, []) if ipc.decode_header(r)[:2] == (RecordType.REPLY, 7)]
    spent = time.perf_counter() - start
    size = len(replies[0])
    print(f"ack of 100000 undelivered offsets: {spent * 1000:.0f} ms, reply {size} bytes")
    assert spent < 0.01, f"{spent * 1000:.0f} ms of shard loop for one 14-byte range"


def test_the_gateway_does_not_buffer_deliveries_without_bound_for_a_client_that_never_reads(
    tmp_path: Path,
) -> None:
    """QueueRouter.on_deliver -> ConnectionShell.deliver writes every DELIVER with
    send_stream_data, never looking at the stream's backlog (subscriptions stop at
    subscription.MAX_QUEUED_BYTES). The credit bounds what is leased, not what the
    gateway holds: each lease expiry frees the credit and the shard redelivers the same
    records to the same silent member, so the bytes queued in the gateway for one
    consumer grow by a full credit every lease_ms, forever."""
    from felix.shard.queue.manager import MAX_DELIVERY_BYTES
    from felix.shard.queue.settings import GroupSettings
    from tests.test_gateway_session_queues import pair_with_disk

    pair = pair_with_disk(tmp_path)
    core = pair.links.cores[0]
    key = ipc.stream_key(T, NS, "jobs")
    transport = pair.transport
    # The client reads nothing: everything written stays queued in the gateway.

    def unsent(stream_id: int | None = None) -> int:
        out = transport.out
        return sum(map(len, out.values())) if stream_id is None else len(out.get(stream_id, b""))

    transport.send_buffer_size = unsent  # type: ignore[method-assign]
    sid = pair.open_control(T)
    pair.pump()
    core.define_group(key, "g", GroupSettings(lease_ms=1000, max_deliveries=1000))
    for i in range(16):
        pair.send(sid, wire.encode_publish(100 + i, T, NS, "jobs", [b"p" * 60_000] * 16))
    credit = 1 << 20
    pair.send(
        sid, wire.encode_consume(2, T, NS, "jobs", "g", 9, credit_records=1000, credit_bytes=credit)
    )
    pair.pump()
    now = pair.clock.now
    for _ in range(40):  # 40 lease periods of a client that reads nothing
        now += 1.5
        pair.clock.now = now
        core.sweep(now)
        pair.pump()
    queued = transport.send_buffer_size(sid)
    print(f"queued for a silent consumer: {queued} bytes (credit {credit})")
    # Bounded: its window, the slack, and at most one frame over before it is ended.
    bound = credit + ipc.QUEUE_GATEWAY_SLACK + MAX_DELIVERY_BYTES
    assert queued <= bound, f"{queued} bytes queued for one silent consumer"
    assert b"consumer too slow" in transport.out[sid]  # CONSUMER_END told it why


def test_one_tenant_cannot_take_every_queue_group_slot_of_a_shard(tmp_path: Path) -> None:
    """Groups are opened by any CONSUME (stream.consume permission) and outlive their
    members: a tenant that consumes with throwaway group names gets its share of the
    shard's groups (MAX_GROUPS_PER_TENANT), then Overloaded; the others still consume."""
    from felix.errors import Overloaded
    from felix.shard.queue.settings import MAX_GROUPS_PER_STREAM, MAX_GROUPS_PER_TENANT

    c = make(tmp_path, fsync="none")
    token = 10_000
    refused = None
    for s in range(MAX_GROUPS_PER_TENANT // MAX_GROUPS_PER_STREAM + 1):
        for g in range(MAX_GROUPS_PER_STREAM):
            token += 1
            request(c, wire.encode_consume(1, "mallory", NS, f"s{s}", f"w{g}", 1), token)
            reply = Out(c).replies[token]
            if isinstance(reply, wire.ErrorReply):
                refused = reply
                break
            request(c, wire.encode_stop_consume(2, 1), token + 500_000, aux=token)
        if refused is not None:
            break
    assert refused is not None and refused.code == Overloaded.code
    assert f"maximum of {MAX_GROUPS_PER_TENANT} queue groups" in refused.message
    assert len(c.queues.groups) == MAX_GROUPS_PER_TENANT and c.queues.members == 0
    request(c, wire.encode_consume(3, "alice", NS, "orders", "billing", 1), 1)
    reply = Out(c).replies[1]
    assert isinstance(reply, wire.Consuming), f"alice refused: {reply.message}"


def test_acks_of_one_tick_fit_one_ack_frame() -> None:
    """Consumer._flush_acks sends every ack of a loop tick as ONE frame of
    _ranges(offsets), with no split at the wire's 1024 ranges. Members of a group get
    interleaved offsets (round-robin), so ``await asyncio.gather(*(m.ack() for m in
    await c.fetch(2048)))`` makes 2048 ranges: encode_ack raises LocalProtocolError and
    every ack of the batch fails (the records are never acked, their leases expire and
    they count failures toward the dead-letter stream)."""
    import asyncio

    from felix.client._consumer import Consumer

    sent: list[bytes] = []

    class Conn:
        alive = True

        async def call(self, make, stream_id=None):
            frame = make(len(sent) + 1)
            sent.append(frame)
            return wire.decode_ext(
                wire.decode_frame(wire.encode_settled(len(sent)), extensions=True)
            )

    class Client:
        async def _with_timeout(self, awaitable):
            return await awaitable

    async def main() -> list[object]:
        c = Consumer(Client(), "s", "g", NS, "s", 4096, 1 << 20)  # type: ignore[arg-type]
        c._state = c._state.__class__.ACTIVE
        c._conn, c._consumer_id, c._stream_id = Conn(), 1, 0  # type: ignore[assignment]
        batch = [(o, 0, 1, 0, None, b"x") for o in range(0, 4096, 2)]
        frame = wire.encode_deliveries(1, batch)
        c._on_deliveries(wire.decode_ext(wire.decode_frame(frame, extensions=True)))  # type: ignore[arg-type]
        msgs = await c.fetch(2048)
        return await asyncio.gather(*(m.ack() for m in msgs), return_exceptions=True)

    results = asyncio.run(main())
    failed = [r for r in results if r is not None]
    assert not failed, f"{len(failed)} of 2048 acks failed: {failed[0]!r}"


def test_an_ack_whose_write_failed_is_not_confirmed_by_a_retry(tmp_path: Path) -> None:
    """manager._write empties group.journal before GroupLog.append: when the write
    fails (DiskFull: the file is truncated back, still usable) the entries are lost
    for the file but stay applied in memory. The client's ack got an error, so it
    retries; the retry finds the offset finished in memory, journals nothing and is
    answered SETTLED at once, although no state file holds the ack: after a restart
    the acked record is delivered again. (The same drop loses Lease entries, and a
    Dying entry whose dead letter then goes out anyway.)"""
    import pytest

    from felix.errors import DiskFull
    from felix.shard.queue.group_log import GroupLog
    from tests.test_queues_shard import ack

    mp = pytest.MonkeyPatch()
    c = make(tmp_path, fsync="interval")
    publish(c, [b"a", b"b"])
    Out(c)
    assert consume(c, records=2).offsets() == [0, 1]
    real = GroupLog.append
    fail = [True]

    def flaky(self: GroupLog, entries):
        if fail[0]:
            fail[0] = False
            raise DiskFull("disk full writing group file (probe)")
        return real(self, entries)

    mp.setattr(GroupLog, "append", flaky)
    ack(c, [0], token=901)
    first = Out(c).replies[901]
    assert isinstance(first, wire.ErrorReply)  # not confirmed: the client retries
    ack(c, [0], token=902)
    second = Out(c).replies[902]
    mp.undo()
    c.queues.shutdown(0.0)  # graceful: releases offset 1, closes the file
    # Restart on the same files.
    c2 = make(tmp_path, fsync="interval")
    again = consume(c2, records=2).offsets()
    assert not (isinstance(second, wire.Settled) and not second.refused and 0 in again), (
        f"ack of offset 0 confirmed ({second!r}) but redelivered after a restart: {again}"
    )


def test_dead_letters_of_a_durable_stream_go_to_a_durable_stream(tmp_path: Path) -> None:
    """Without --durable-streams (DiskSettings.auto None) the dead-letter stream of a
    stream defined durable is auto-created by the first relayed PUBLISH in memory only:
    the entry becomes ``dead`` (finished, the floor moves on, retention may delete the
    source record) while the dead letter itself lives in a replay ring that a shard
    restart, the tenant's memory quota or simply 100k newer records drop. "Never
    silently dropped" does not hold."""
    from felix.shard.core import ShardSettings
    from felix.shard.durable import DiskSettings, DurableStore
    from felix.shard.offsets import OffsetReservations
    from tests.test_shard_durable import Clock

    store = DurableStore(DiskSettings(root=tmp_path / "streams"))  # auto None
    offsets = OffsetReservations(tmp_path / "shard-0.offsets", block=64)
    c = ShardCore(
        ShardSettings(index=0, shards=1, stream_defaults=StreamSettings()),
        offsets,
        store,
        wall_us=Clock(),
    )
    c.open_durable()
    c.handle(0, ipc.encode(RecordType.HELLO, 0, 0, b""), 0.0)
    c.flush()
    key = ipc.stream_key(T, NS, "s")
    c.define_stream(key, StreamSettings(), DurableSettings(fsync="none"))
    publish(c, [b"poison"])
    Out(c)
    consume(c, records=1)
    request(c, wire.encode_term(5, CONSUMER, [(0, 1)], detail="bad"), 5, aux=MEMBER)
    _gateway_round(c, 1.0)
    c.flush()
    group = c.stream_status(key)["groups"]["g"]  # type: ignore[index]
    dlq = c.stream_status(ipc.stream_key(T, NS, "s.dlq"))
    assert dlq is not None
    assert not (group["dead"] == 1 and dlq.get("durable") is False), (
        f"dead-lettered into an in-memory stream: {dlq}"
    )
