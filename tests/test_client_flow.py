"""felix.client._flow.SubscriptionFlow: credit, offsets, gaps and the bounded queue."""

from __future__ import annotations

import pytest

from felix.client._flow import SubscriptionFlow
from felix.errors import RemoteProtocolError


def payloads(n: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def drain(flow: SubscriptionFlow) -> list[int]:
    offsets = []
    while (message := flow.take()) is not None:
        offsets.append(message.offset)
    return offsets


def test_initial_credit_is_the_window() -> None:
    flow = SubscriptionFlow("s", 1024)
    assert flow.subscribe_credit() == 1024
    assert flow.available == 1024


def test_credit_returns_when_half_the_window_is_consumed() -> None:
    flow = SubscriptionFlow("s", 10)
    flow.subscribe_credit()
    flow.on_subscribed(0)
    flow.on_events(0, payloads(10), None)
    assert flow.available == 0
    granted = []
    for _ in range(10):
        assert flow.take() is not None
        granted.append(flow.credit_due())
    # Top-ups of exactly what was consumed, each time half the window (5) is reached.
    assert granted == [0, 0, 0, 0, 5, 0, 0, 0, 0, 5]
    assert flow.available == 10


def test_the_queue_never_exceeds_what_was_granted() -> None:
    """A consumer that never reads gets nothing beyond its window: the broker must stop."""
    flow = SubscriptionFlow("s", 8)
    flow.subscribe_credit()
    flow.on_events(0, payloads(8), None)
    assert len(flow.queue) == 8
    assert flow.credit_due() == 0  # nothing consumed: nothing returned
    with pytest.raises(RemoteProtocolError, match="without credit"):
        flow.on_events(8, payloads(1), None)


def test_one_frame_may_overshoot() -> None:
    # The broker may send a whole shared batch while it has any credit left.
    flow = SubscriptionFlow("s", 4)
    flow.subscribe_credit()
    flow.on_events(0, payloads(3), None)
    flow.on_events(3, payloads(10), None)  # 1 credit left: allowed, overshoots by 9
    assert flow.available == -9
    with pytest.raises(RemoteProtocolError):
        flow.on_events(13, payloads(1), None)
    # Consuming returns credit; it must first cover the overshoot.
    for _ in range(13):
        flow.take()
    assert flow.credit_due() == 13
    assert flow.available == 4


def test_offsets_and_headers_come_through() -> None:
    flow = SubscriptionFlow("orders", 16)
    flow.subscribe_credit()
    flow.on_events(5, [b"a", b"b"], [{"k": "v"}, None])
    first, second = flow.take(), flow.take()
    assert first is not None and second is not None
    assert (first.stream, first.offset, first.data, dict(first.headers)) == (
        "orders",
        5,
        b"a",
        {"k": "v"},
    )
    assert (second.offset, dict(second.headers)) == (6, {})
    assert flow.next_offset == 7


def test_slow_consumer_notice_counts_dropped() -> None:
    flow = SubscriptionFlow("s", 16)
    flow.subscribe_credit()
    flow.on_subscribed(0)
    flow.on_events(0, payloads(2), None)
    assert flow.on_slow_consumer(2, 5) == 5
    assert flow.dropped == 5
    assert flow.next_offset == 7
    # The following records, from the oldest retained, are not counted again.
    assert flow.on_events(7, payloads(2), None) == 0
    assert flow.dropped == 5
    assert drain(flow) == [0, 1, 7, 8]


def test_unannounced_gap_is_counted_once() -> None:
    flow = SubscriptionFlow("s", 16)
    flow.subscribe_credit()
    flow.on_events(0, payloads(2), None)
    assert flow.on_events(5, payloads(1), None) == 3
    # A notice for the same range afterwards adds nothing.
    assert flow.on_slow_consumer(2, 3) == 0
    assert flow.dropped == 3


def test_resume_later_than_expected_is_a_gap() -> None:
    flow = SubscriptionFlow("s", 16)
    flow.subscribe_credit()
    flow.on_subscribed(0)
    flow.on_events(0, payloads(4), None)
    # Reconnect: re-subscribe from next_offset (4); the broker starts at 10.
    assert flow.next_offset == 4
    flow.subscribe_credit()
    assert flow.on_subscribed(10) == 6
    assert flow.dropped == 6


def test_resume_overlap_is_deduplicated_and_its_credit_returned() -> None:
    flow = SubscriptionFlow("s", 4)
    flow.subscribe_credit()
    flow.on_events(0, payloads(3), None)
    # After a re-subscribe the broker replays offsets 1..4; 1 and 2 were already queued.
    flow.subscribe_credit()
    flow.on_events(1, payloads(4, "r"), None)
    assert drain(flow) == [0, 1, 2, 3, 4]
    assert flow.dropped == 0
    # 5 taken + 2 discarded duplicates = 7 to return (window 4: due at 2).
    assert flow.credit_due() == 7


def test_resubscribe_credit_accounts_for_the_queue() -> None:
    flow = SubscriptionFlow("s", 10)
    flow.subscribe_credit()
    flow.on_events(0, payloads(7), None)
    assert flow.subscribe_credit() == 3  # 7 still queued locally
    flow.on_events(7, payloads(3), None)
    assert flow.subscribe_credit() == 1  # never 0: that means "broker default" on the wire


def test_events_before_subscribed_set_the_position() -> None:
    flow = SubscriptionFlow("s", 8)
    flow.subscribe_credit()
    flow.on_events(42, payloads(2), None)
    assert flow.on_subscribed(42) == 0
    assert flow.dropped == 0
    assert drain(flow) == [42, 43]


def test_window_must_allow_a_top_up() -> None:
    with pytest.raises(ValueError):
        SubscriptionFlow("s", 1)
