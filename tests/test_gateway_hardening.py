"""Issue 11's gateway attacks against the session core, with the clock moved by hand.

Each test is the attack: it fails on the gateway before the fix. The same
attacks against a real node over QUIC are in tests/test_gateway_attacks.py.
"""

from __future__ import annotations

import logging

import pytest

from felix import wire
from felix.client._session import Authenticated, Notice, Reply, StreamClosed
from felix.errors import Unauthenticated
from felix.gateway.auth import FailureLimiter
from felix.gateway.gateway import (
    CLOSE_AUTH_FAILED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_FRAME_TIMEOUT,
    CLOSE_INPUT_LIMIT,
    CLOSE_OVERLOADED,
    CLOSE_TOKEN_EXPIRED,
    GatewayLimits,
)
from felix.gateway.session import EXPIRED
from tests.gateway_pair import Pair
from tests.test_gateway_session import NS, T, auth_frame, mint, replies, token_pair

SUB_PERMS = ["stream.publish:stream:acme/prod/*", "stream.subscribe:stream:acme/prod/*"]


def partial_publish(request_id: int, size: int, sent: int) -> bytes:
    """The first ``sent`` bytes of a publish frame whose payload is ``size`` bytes."""
    return wire.encode_publish(request_id, T, NS, "s", [b"x" * size])[:sent]


# --- item 7: every stream expires on its own token ---------------------------------------


def test_each_stream_is_authorised_until_its_own_token_expires() -> None:
    pair = token_pair()
    old = pair.open_control("", mint(pair, ttl=10, perms=SUB_PERMS))
    fresh = pair.open_control("", mint(pair, ttl=100, perms=SUB_PERMS))
    pair.send(old, wire.encode_subscribe(1, T, NS, "s", 7, credit=10))
    pair.pump()
    pair.advance(10)
    # The stream with the expired token is closed, its subscription ended; the other serves.
    assert pair.transport.stopped[old] == CLOSE_TOKEN_EXPIRED
    assert pair.transport.closed is None
    ends = [
        e.message for sid in pair.event_streams for e in pair.events[sid] if isinstance(e, Notice)
    ]
    codes = [(m.opcode, getattr(m, "code", None)) for m in ends]
    assert (wire.OP_SUBSCRIPTION_END, Unauthenticated.code) in codes
    assert not pair.shell.subscriptions
    pair.send(old, wire.encode_publish(2, T, NS, "s", [b"late"]))  # ignored: closed
    pair.send(fresh, wire.encode_publish(3, T, NS, "s", [b"ok"]))
    pair.pump()
    assert 2 not in replies(pair, old)
    assert isinstance(replies(pair, fresh)[3], wire.PublishOffsets)
    pair.advance(90)
    assert pair.transport.closed is not None and pair.transport.closed[0] == CLOSE_TOKEN_EXPIRED


def test_reauth_extends_only_its_own_stream() -> None:
    pair = token_pair()
    a = pair.open_control("", mint(pair, ttl=10))
    b = pair.open_control("", mint(pair, ttl=10))
    pair.send(b, wire.encode_reauth(1, mint(pair, ttl=100)))
    assert replies(pair, b)[1].opcode == wire.OP_OK
    pair.advance(10)
    assert pair.transport.stopped[a] == CLOSE_TOKEN_EXPIRED
    assert b not in pair.transport.stopped and pair.transport.closed is None
    pair.send(b, wire.encode_ping(2))
    assert replies(pair, b)[2].opcode == wire.OP_OK


# --- item 4: idle connections cannot lock clients out ----------------------------------


def test_idle_connections_are_evicted_for_a_new_one_and_a_valid_client_gets_in() -> None:
    limits = GatewayLimits(max_connections=3, max_unauthenticated_per_source=10)
    first = Pair(limits, peer="198.51.100.9")
    idle = [first, first.connect("198.51.100.9"), first.connect("198.51.100.9")]
    client = first.connect("192.0.2.50")
    sid = client.open_control()
    client.pump()
    assert client.events[sid] == [Authenticated(wire.FLAGS_V1 | wire.FLAG_FELIX_EXT)]
    assert idle[0].transport.closed is not None and idle[0].transport.closed[0] == CLOSE_OVERLOADED
    assert first.gateway.evicted_connections == 1 and len(first.gateway.connections) == 3
    # Authenticated connections are never evicted: a table full of them refuses.
    for pair in idle[1:]:
        pair.open_control()
    late = first.connect("203.0.113.7")
    assert late.transport.closed == (CLOSE_OVERLOADED, "gateway at its connection limit")
    assert first.gateway.refused_connections == 1


def test_unauthenticated_connections_per_source_are_bounded() -> None:
    first = Pair(GatewayLimits(max_unauthenticated_per_source=2), peer="198.51.100.9")
    second = first.connect("198.51.100.9")
    third = first.connect("198.51.100.9")
    assert third.transport.closed is not None and third.transport.closed[0] == CLOSE_OVERLOADED
    second.open_control()  # authenticated: no longer counts against its source
    fourth = first.connect("198.51.100.9")
    assert fourth.transport.closed is None and first.transport.closed is None


# --- item 3: incomplete frames are bounded in bytes and time ---------------------------


def test_an_incomplete_frame_must_be_completed_within_the_deadline() -> None:
    pair = Pair(GatewayLimits(frame_timeout=30.0))
    sid = pair.open_control()
    pair.send(sid, partial_publish(1, 1_000_000, 50_000))
    pair.advance(20)
    pair.send(sid, b"x" * 10_000)  # trickling does not extend it
    pair.advance(9.9)
    assert pair.transport.closed is None
    pair.advance(0.2)
    assert pair.transport.closed == (CLOSE_FRAME_TIMEOUT, "a frame was not completed within 30 s")
    assert pair.gateway.buffered_input == 0 and pair.gateway.input_limit_closes == 1


def test_each_completed_frame_restarts_the_deadline() -> None:
    pair = Pair(GatewayLimits(frame_timeout=30.0))
    sid = pair.open_control()
    frames = [wire.encode_publish(i, T, NS, "s", [b"x" * 1000]) for i in range(5)]
    pair.send(sid, frames[0][:10])
    for i in range(4):  # each frame completes within the deadline as the next one starts
        pair.advance(25)
        pair.send(sid, frames[i][10:] + frames[i + 1][:10])
    pair.pump()
    assert pair.transport.closed is None and sorted(replies(pair, sid)) == [0, 1, 2, 3]


def test_incomplete_frames_are_bounded_per_connection() -> None:
    pair = Pair(GatewayLimits(max_buffered_input_per_connection=1_000_000))
    streams = [pair.open_control() for _ in range(3)]
    for sid in streams[:2]:
        pair.send(sid, partial_publish(1, 2_000_000, 400_000))
    assert pair.transport.closed is None
    assert pair.shell.session.buffered == pair.gateway.buffered_input == 800_000
    pair.send(streams[2], partial_publish(1, 2_000_000, 400_000))
    assert pair.transport.closed is not None and pair.transport.closed[0] == CLOSE_INPUT_LIMIT
    pair.pump()
    assert pair.gateway.buffered_input == 0


def test_over_the_gateway_budget_the_connection_holding_most_is_closed() -> None:
    hog = Pair(GatewayLimits(max_buffered_input=1_000_000))
    other = hog.connect("192.0.2.77")
    hs, os_ = hog.open_control(), other.open_control()
    hog.send(hs, partial_publish(1, 2_000_000, 800_000))
    other.send(os_, partial_publish(1, 2_000_000, 300_000))
    assert hog.transport.closed is not None and hog.transport.closed[0] == CLOSE_INPUT_LIMIT
    assert other.transport.closed is None
    hog.pump()
    assert hog.gateway.buffered_input == 300_000


# --- item 10: failed attempts back off; valid credentials are never denied --------------


def test_a_burst_of_bad_tokens_delays_but_never_locks_out_a_valid_one() -> None:
    attacker = token_pair()
    attacker.gateway.auth_limiter = FailureLimiter(free_failures=3, base_delay=0.5, max_delay=2)
    for _ in range(5):  # several connections, each under the per-connection bound
        conn = attacker.connect("198.51.100.9")
        for _ in range(4):
            conn.open_control("", "garbage")
    client = attacker.connect("198.51.100.9")  # same address, valid token
    sid = client.open_control("", mint(client))
    client.pump()
    assert sid not in client.events and client.transport.closed is None  # delayed
    assert attacker.gateway.auth_throttled >= 1
    assert client.timer_at is not None and client.timer_at <= client.clock.now + 2
    client.advance(2)
    assert client.events[sid] == [Authenticated(wire.FLAGS_V1 | wire.FLAG_FELIX_EXT)]


def test_requests_pipelined_behind_a_delayed_auth_are_served_after_it() -> None:
    pair = token_pair()
    pair.gateway.auth_limiter = FailureLimiter(free_failures=0, base_delay=1, max_delay=1)
    pair.open_control("", "garbage")
    sid = pair.open_control("", mint(pair))
    pair.send(sid, wire.encode_publish(5, T, NS, "s", [b"a"]))
    pair.pump()
    assert 5 not in replies(pair, sid)
    pair.advance(1)
    assert isinstance(replies(pair, sid)[5], wire.PublishOffsets)


def test_a_connection_is_closed_after_too_many_failed_attempts() -> None:
    pair = token_pair()
    pair.gateway.auth_limiter = FailureLimiter(free_failures=100)
    for _ in range(8):
        sid = pair.open_control("", "garbage")
        pair.pump()
        assert isinstance(pair.events[sid][0], StreamClosed)
    assert pair.transport.closed == (
        CLOSE_AUTH_FAILED,
        "too many failed authentications on this connection",
    )
    assert pair.gateway.auth_failures == 8


# --- item 9: between the ring record limit and the frame limit ------------------------


def test_a_request_over_the_ring_record_limit_gets_too_large_and_the_connection_lives() -> None:
    pair = Pair()
    sid = pair.open_control()
    pair.send(sid, wire.encode_publish(1, T, NS, "s", [b"x" * 3_000_000]))
    pair.send(sid, wire.encode_ping(2))
    pair.pump()
    got = replies(pair, sid)
    assert got[1].code == 7 and "limit" in got[1].message  # type: ignore[attr-defined]
    assert got[2].opcode == wire.OP_OK and pair.transport.closed is None


# --- low: pipelined auth + extension frame --------------------------------------------


def test_a_frame_pipelined_after_auth_is_judged_by_post_auth_rules() -> None:
    big = wire.encode_publish(1, T, NS, "s", [b"x" * 100_000])  # over the pre-auth cap
    pair = Pair()
    pair.send(0, auth_frame() + big + wire.encode_ping(2))
    pair.pump()
    got = replies(pair, 0)
    assert isinstance(got[1], wire.PublishOffsets) and got[2].opcode == wire.OP_OK
    assert pair.gateway.protocol_errors == 0


def test_input_fed_whole_or_byte_by_byte_gives_the_same_answers() -> None:
    data = auth_frame() + b"".join(
        wire.encode_cache_set(i, T, NS, "c", f"k{i}", b"v") for i in range(1, 4)
    )
    whole, bytewise = Pair(), Pair()
    whole.send(0, data)
    for i in range(len(data)):
        bytewise.send(0, data[i : i + 1])
    whole.pump()
    bytewise.pump()
    assert bytes(whole.transport.out[0]) == bytes(bytewise.transport.out[0])
    assert sorted(replies(whole, 0)) == [1, 2, 3]


# --- item 8: one subscriber's failure never costs another ------------------------------


def test_a_broken_subscriber_is_dropped_alone_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = Pair()
    bad = good.connect("192.0.2.66")
    streams = {}
    for pair in (good, bad):
        sid = streams[id(pair)] = pair.open_control()
        pair.send(sid, wire.encode_subscribe(1, T, NS, "s", 1, credit=1000))
        pair.pump()
    broken = next(iter(bad.event_streams))

    def refuse(stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if stream_id == broken:
            raise RuntimeError("stream reset by peer")

    bad.transport.send_stream_data = refuse  # type: ignore[method-assign]
    pub = good.connect("192.0.2.99")
    psid = pub.open_control()
    with caplog.at_level(logging.ERROR, logger="felix.gateway"):
        for i in range(5):
            pub.send(psid, wire.encode_publish(10 + i, T, NS, "s", [b"%d" % i]))
            pub.pump()
    good.pump()
    notices = [
        e.message for sid in good.event_streams for e in good.events[sid] if isinstance(e, Notice)
    ]
    got = [p for n in notices if isinstance(n, wire.Events) for p in n.payloads]
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert not bad.shell.subscriptions and good.shell.subscriptions
    assert good.gateway.internal_errors == 1
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_events_reach_a_client_session_as_notices() -> None:
    pair = Pair()
    sid = pair.open_control()
    pair.send(sid, wire.encode_subscribe(1, T, NS, "s", 1, credit=10))
    pair.send(sid, wire.encode_publish(2, T, NS, "s", [b"a"]))
    pair.pump()
    assert any(isinstance(e, Reply) for e in pair.events[sid])
    (stream,) = pair.event_streams
    assert any(isinstance(e, Notice) for e in pair.events[stream])


def test_a_subscription_without_an_event_stream_is_refused_not_left_hanging() -> None:
    """Item 8: past the streams the client lets the broker open, SUBSCRIBE gets an answer."""
    pair = Pair()
    sid = pair.open_control()
    pair.send(sid, wire.encode_subscribe(1, T, NS, "s", 1, credit=10))
    pair.pump()
    opened = pair.transport.next_stream_id

    def refuse(unidirectional: bool = False) -> int:
        raise RuntimeError("stream limit reached")

    pair.transport.next_stream_id = refuse  # type: ignore[method-assign]
    pair.send(sid, wire.encode_subscribe(2, T, NS, "s", 2, credit=10))
    pair.pump()
    refused = replies(pair, sid)[2]
    assert refused.code == 5 and "event stream" in refused.message  # type: ignore[attr-defined]
    assert list(pair.shell.subscriptions) == [1]
    pair.transport.next_stream_id = opened  # type: ignore[method-assign]
    pair.send(sid, wire.encode_publish(3, T, NS, "s", [b"a"]))
    pair.pump()
    (stream,) = pair.event_streams
    assert any(isinstance(e, Notice) for e in pair.events[stream])


# --- review finding 2: one authentication does not hold a slot for good ----------------


def test_a_connection_whose_authenticated_streams_are_gone_is_idle_again() -> None:
    """Authenticate a stream, FIN it, keep the connection: it is evictable and must
    authenticate again within the deadline, like a new one."""
    held = token_pair()
    held.gateway.admission.max_connections = 2
    sid = held.open_control("", mint(held, ttl=300))
    held.send(sid, b"", end_stream=True)
    held.pump()
    assert held.gateway.admission.unauthenticated == 1
    quiet = held.connect("192.0.2.77")
    quiet.open_control("", mint(quiet, ttl=300))  # authenticated and kept: never evicted
    newcomer = held.connect("203.0.113.5")
    assert held.transport.closed is not None and held.transport.closed[0] == CLOSE_OVERLOADED
    assert newcomer.transport.closed is None and quiet.transport.closed is None
    # Not evicted, it ages out at the auth deadline unless a stream authenticates again.
    again = token_pair()
    first = again.open_control("", mint(again, ttl=300))
    again.reset(first)
    again.advance(4.9)
    second = again.open_control("", mint(again, ttl=300))
    again.advance(0.2)
    assert again.transport.closed is None and again.gateway.admission.unauthenticated == 0
    again.send(second, b"", end_stream=True)
    again.advance(5)
    assert again.transport.closed is not None and again.transport.closed[0] == CLOSE_AUTH_TIMEOUT


def test_a_connection_is_closed_once_no_token_that_authenticated_it_is_live() -> None:
    """The stream is gone but its subscription holds the connection: until the token expires."""
    pair = token_pair()
    sid = pair.open_control("", mint(pair, ttl=10, perms=SUB_PERMS))
    pair.send(sid, wire.encode_subscribe(1, T, NS, "s", 7, credit=10))
    pair.send(sid, b"", end_stream=True)
    pair.pump()
    assert not pair.shell.session.streams and pair.shell.subscriptions
    assert pair.gateway.admission.unauthenticated == 0  # a live subscription: not idle
    pair.advance(9.9)
    assert pair.transport.closed is None
    pair.advance(0.1)
    assert pair.transport.closed == (CLOSE_TOKEN_EXPIRED, EXPIRED)
    assert not pair.shell.subscriptions


# --- review finding 7: a WATCH-off that met a full ring is retried ---------------------


def test_a_watch_off_refused_by_a_full_ring_is_sent_later() -> None:
    pair = Pair(shards=1)
    core = pair.links.cores[0]
    sid = pair.open_control()
    pair.send(sid, wire.encode_subscribe(1, T, NS, "s", 7, credit=10))
    pair.pump()
    assert "acme/prod/s" in core._waiting  # watched by this gateway, counted as a resource
    pair.links.accept = False  # the ring is full
    pair.send(sid, wire.encode_unsubscribe(2, 7))
    pair.links.accept = True
    assert "acme/prod/s" in core._waiting
    pair.send(sid, wire.encode_cache_get(3, T, NS, "c", "k"))  # any later shard traffic
    pair.pump()
    assert "acme/prod/s" not in core._waiting
    assert pair.gateway.deferred_unwatches == 1


def test_same_host_peers_of_one_user_share_the_failure_back_off() -> None:
    """A same-host (shm) peer is ``unix:pid=P,uid=U``: a new process per attempt must not
    escape the back-off, so failures count by the user, as admission does."""
    attacker = token_pair()
    attacker.gateway.auth_limiter = FailureLimiter(free_failures=3, base_delay=0.5, max_delay=2)
    for pid in range(100, 105):  # five processes of uid 1000, each failing 4 times
        conn = attacker.connect(f"unix:pid={pid},uid=1000")
        for _ in range(4):
            conn.open_control("", "garbage")
    same_user = attacker.connect("unix:pid=999,uid=1000")
    sid = same_user.open_control("", mint(same_user))
    same_user.pump()
    assert sid not in same_user.events  # delayed, like the processes before it
    assert attacker.gateway.auth_throttled >= 1
    other_user = attacker.connect("unix:pid=998,uid=1001")  # another user is not held back
    other = other_user.open_control("", mint(other_user))
    other_user.pump()
    assert other_user.events[other] == [Authenticated(wire.FLAGS_V1 | wire.FLAG_FELIX_EXT)]
