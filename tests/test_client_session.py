"""felix.client._session: request ids, control-stream and event-stream state, no I/O."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felix import wire
from felix.client._session import (
    CLIENT_FLAGS,
    Authenticated,
    ControlState,
    ControlStream,
    EventHello,
    EventStream,
    Notice,
    Reply,
    RequestTable,
    StreamClosed,
)
from felix.errors import (
    HandshakeFailed,
    ProtocolError,
    RemoteProtocolError,
    Unauthenticated,
)

AUTH_OK = wire.encode_message({"type": "auth_ok", "server_flags": CLIENT_FLAGS})


# -- RequestTable ------------------------------------------------------------------------


def test_ids_start_at_one_and_never_repeat() -> None:
    table: RequestTable[str] = RequestTable()
    ids = [table.start(f"w{i}") for i in range(1000)]
    assert ids == list(range(1, 1001))
    for rid in ids[::2]:
        table.discard(rid)
    # Even after ids were freed, new ones are fresh: a late reply cannot match them.
    assert table.start("new") == 1001
    assert table.new_id() == 1002


def test_replies_in_any_order_reach_their_own_waiter() -> None:
    table: RequestTable[str] = RequestTable()
    ids = {table.start(f"call-{i}"): f"call-{i}" for i in range(200)}
    order = list(ids)
    random.Random(7).shuffle(order)
    for rid in order:
        assert table.pop(rid) == ids[rid]
    assert len(table) == 0
    assert table.late_replies == 0


def test_cancelled_call_drops_its_late_reply() -> None:
    table: RequestTable[str] = RequestTable()
    a = table.start("a")
    table.discard(a)  # cancelled before its reply
    b = table.start("b")
    assert table.pop(a) is None  # the late reply for a finds nothing...
    assert table.late_replies == 1
    assert table.pop(b) == "b"  # ...and b still gets its own reply
    table.discard(a)  # idempotent


def test_reply_to_an_id_never_sent_is_a_protocol_error() -> None:
    table: RequestTable[str] = RequestTable()
    table.start("a")
    with pytest.raises(RemoteProtocolError, match="never sent"):
        table.pop(2)
    with pytest.raises(RemoteProtocolError):
        table.pop(2**64 - 1)


def test_drain_returns_everything_outstanding() -> None:
    table: RequestTable[str] = RequestTable()
    for name in "abc":
        table.start(name)
    table.discard(2)
    assert sorted(table.drain()) == ["a", "c"]
    assert len(table) == 0
    assert table.pop(1) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["start", "cancel", "reply"]), st.integers(0, 50))))
def test_random_interleavings_never_misdeliver(ops: list[tuple[str, int]]) -> None:
    """Whatever the order of starts, cancels and replies, a reply only reaches its caller."""
    table: RequestTable[int] = RequestTable()
    issued: list[int] = []
    live: set[int] = set()
    for op, n in ops:
        if op == "start":
            rid = table.start(len(issued) + 1)  # the waiter is the id it expects
            issued.append(rid)
            live.add(rid)
        elif op == "cancel" and issued:
            rid = issued[n % len(issued)]
            table.discard(rid)
            live.discard(rid)
        elif op == "reply" and issued:
            rid = issued[n % len(issued)]
            waiter = table.pop(rid)
            if rid in live:
                assert waiter == rid
                live.discard(rid)
            else:
                assert waiter is None
    assert len(table) == len(live)


# -- ControlStream -------------------------------------------------------------------------


def test_auth_frame_offers_v1_and_the_extension() -> None:
    stream = ControlStream("acme", "tok")
    message = wire.decode_message(stream.auth_frame())
    assert message == {
        "type": "auth",
        "tenant_id": "acme",
        "token": "tok",
        "client_flags": wire.FLAGS_V1 | wire.FLAG_FELIX_EXT,
    }
    assert CLIENT_FLAGS == 0x007F


def test_auth_ok_then_replies() -> None:
    stream = ControlStream("acme", "")
    reply = wire.encode_cache_value(5, b"v")
    events = stream.receive(AUTH_OK + reply)
    assert events[0] == Authenticated(CLIENT_FLAGS)
    assert isinstance(events[1], Reply)
    assert events[1].message.request_id == 5
    assert stream.state is ControlState.READY


def test_byte_by_byte_gives_the_same_events() -> None:
    data = AUTH_OK + wire.encode_ok(1) + wire.encode_cache_stored(2, True)
    stream = ControlStream("acme", "")
    events = []
    for i in range(len(data)):
        events += stream.receive(data[i : i + 1])
    assert [type(e) for e in events] == [Authenticated, Reply, Reply]
    assert [e.message.request_id for e in events if isinstance(e, Reply)] == [1, 2]


def test_auth_ok_without_the_extension_fails_clearly() -> None:
    stream = ControlStream("acme", "")
    events = stream.receive(wire.encode_message({"type": "auth_ok", "server_flags": 0x3F}))
    assert len(events) == 1 and isinstance(events[0], StreamClosed)
    assert isinstance(events[0].error, HandshakeFailed)
    assert "extension" in str(events[0].error)
    assert stream.state is ControlState.CLOSED
    assert stream.receive(wire.encode_ok(1)) == []  # closed stays closed


def test_plain_ok_means_a_v1_only_broker() -> None:
    stream = ControlStream("acme", "")
    [event] = stream.receive(wire.encode_message({"type": "ok"}))
    assert isinstance(event, StreamClosed) and isinstance(event.error, HandshakeFailed)


def test_auth_error_is_unauthenticated() -> None:
    stream = ControlStream("acme", "bad")
    [event] = stream.receive(wire.encode_message({"type": "error", "message": "token expired"}))
    assert isinstance(event, StreamClosed) and isinstance(event.error, Unauthenticated)
    assert "token expired" in str(event.error)


def test_error_after_auth_closes_the_stream() -> None:
    stream = ControlStream("acme", "")
    events = stream.receive(
        AUTH_OK + wire.encode_message({"type": "error", "message": "bad frame"})
    )
    assert isinstance(events[-1], StreamClosed)
    assert type(events[-1].error) is ProtocolError


@pytest.mark.parametrize(
    "data",
    [
        wire.encode_ok(1),  # an extension frame before auth_ok
        AUTH_OK + AUTH_OK,  # auth_ok twice
        b"GET / HTTP/1.1\r\n\r\n",  # garbage
        AUTH_OK + wire.encode_message({"type": "subscribed", "subscription_id": 1}),
        AUTH_OK + wire.encode_frame(0x0001, b"\x00" * 4),  # v1 binary: not served here
        AUTH_OK + wire.encode_frame(0x0040, b"\x80"),  # truncated extension frame
    ],
)
def test_protocol_violations_close_with_remote_protocol_error(data: bytes) -> None:
    stream = ControlStream("acme", "")
    events = stream.receive(data)
    assert isinstance(events[-1], StreamClosed)
    assert isinstance(events[-1].error, RemoteProtocolError)
    assert stream.state is ControlState.CLOSED


def test_fin_closes_the_stream() -> None:
    stream = ControlStream("acme", "")
    events = stream.receive(AUTH_OK + wire.encode_ok(1), end_stream=True)
    assert [type(e) for e in events] == [Authenticated, Reply, StreamClosed]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_after_auth_never_raises(data: bytes) -> None:
    stream = ControlStream("acme", "")
    events = stream.receive(AUTH_OK)
    events += stream.receive(data)
    assert isinstance(events[0], Authenticated)
    for event in events[1:]:
        assert isinstance(event, Reply | StreamClosed)


# -- EventStream ---------------------------------------------------------------------------


def _hello(sub_id: int) -> bytes:
    return wire.encode_message({"type": "event_stream_hello", "subscription_id": sub_id})


def test_event_stream_hello_then_notices() -> None:
    stream = EventStream()
    data = (
        _hello(7)
        + wire.encode_events(10, [b"a", b"b"])
        + wire.encode_slow_consumer(7, 12, 3)
        + wire.encode_subscription_end(7, 0, "unsubscribed")
    )
    events = stream.receive(data, end_stream=True)
    assert events[0] == EventHello(7)
    assert stream.subscription_id == 7
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert [m.opcode for m in notices] == [
        wire.OP_EVENTS,
        wire.OP_SLOW_CONSUMER,
        wire.OP_SUBSCRIPTION_END,
    ]
    assert isinstance(notices[0], wire.Events) and notices[0].payloads == [b"a", b"b"]
    assert events[-1] == StreamClosed(None)
    assert stream.closed


def test_event_stream_must_start_with_hello() -> None:
    stream = EventStream()
    [event] = stream.receive(wire.encode_events(0, [b"x"]))
    assert isinstance(event, StreamClosed) and isinstance(event.error, RemoteProtocolError)


def test_event_stream_split_anywhere() -> None:
    data = _hello(3) + wire.encode_events(0, [b"x" * 100, b"y"])
    for cut in range(len(data) + 1):
        stream = EventStream()
        events = stream.receive(data[:cut]) + stream.receive(data[cut:])
        assert [type(e) for e in events] == [EventHello, Notice]
