"""Tests for felix.shard.queue.group: the queue group engine (docs/queues.md)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest

from felix.errors import BadRequest, Overloaded
from felix.shard.queue.group import (
    MAX_DETAIL_BYTES,
    MAX_RANGES,
    DeadLetter,
    Group,
    MemberId,
    Refusal,
    Role,
    SettleOp,
    truncate_detail,
)
from felix.shard.queue.journal import (
    Ack,
    Dying,
    Entry,
    EntryState,
    Fail,
    GroupSnapshot,
    Lease,
    Release,
    Skip,
    Start,
)
from felix.shard.queue.settings import GroupSettings

A: MemberId = (0, 1)
B: MemberId = (0, 2)
C: MemberId = (1, 3)
WALL = 1_000_000_000  # wall clock, microseconds
BIG = 1 << 30


def settings(**kw: Any) -> GroupSettings:
    base: dict[str, Any] = {"lease_ms": 1000, "max_deliveries": 3, "backoff_ms": (100,)}
    base.update(kw)
    return GroupSettings(**base)


def fresh(start: int = 0) -> GroupSnapshot:
    state = GroupSnapshot()
    state.apply(Start(start))
    return state


def group(state: GroupSnapshot | None = None, **kw: Any) -> Group:
    recovered = kw.pop("recovered", False)
    return Group(
        "g",
        settings(**kw),
        state if state is not None else fresh(),
        0.0,
        WALL,
        recovered=recovered,
        rng=random.Random(7),
    )


def size10(offset: int) -> int | None:
    return 10


def plan(
    g: Group,
    end: int = 100,
    now: float = 0.0,
    wall: int = WALL,
    size_of: Callable[[int], int | None] = size10,
) -> dict[MemberId, list[int]]:
    """member -> offsets handed out."""
    return {m: [o for o, _, _ in recs] for m, _, recs in g.plan(end, size_of, now, wall)}


def replayed(initial: GroupSnapshot, g: Group) -> GroupSnapshot:
    state = copy.deepcopy(initial)
    for entry in g.journal:
        state.apply(entry)
    return state


def ack(g: Group, member: MemberId, *offsets: int, **kw: Any) -> list[tuple[int, Refusal]]:
    return g.settle(member, SettleOp.ACK, [(o, 1) for o in offsets], 0.0, WALL, **kw)


def op(g: Group, member: MemberId, what: SettleOp, *offsets: int, **kw: Any) -> Any:
    now = kw.pop("now", 0.0)
    wall = kw.pop("wall", WALL)
    return g.settle(member, what, [(o, 1) for o in offsets], now, wall, **kw)


# -- members and credit ----------------------------------------------------------------


def test_round_robin_one_record_per_turn() -> None:
    g = group()
    for m in (A, B, C):
        assert g.join(m, 7, 10, BIG, 0.0) is Role.MEMBER
    got = plan(g, end=6)
    assert got == {A: [0, 3], B: [1, 4], C: [2, 5]}
    assert list(g.members()) == [A, B, C]


def test_round_robin_fair_across_calls() -> None:
    g = group()
    for m in (A, B, C):
        g.join(m, 7, 10, BIG, 0.0)
    firsts: list[MemberId] = []
    for end in range(1, 7):  # one new record per call
        got = plan(g, end=end)
        assert sum(map(len, got.values())) == 1
        firsts.extend(got)
    assert firsts == [A, B, C, A, B, C]


def test_plan_reports_consumer_ids_attempts_failures() -> None:
    g = group()
    g.join(A, 42, 10, BIG, 0.0)
    assert g.plan(2, size10, 0.0, WALL) == [(A, 42, [(0, 1, 0), (1, 1, 0)])]
    assert g.journal == [Lease(0, 1), Lease(1, 1)]


def test_credit_in_records() -> None:
    g = group()
    g.join(A, 1, 2, BIG, 0.0)
    assert plan(g) == {A: [0, 1]}
    assert plan(g) == {}
    assert ack(g, A, 0) == []
    assert plan(g) == {A: [2]}


def test_credit_in_bytes_and_one_oversize_record() -> None:
    sizes = {0: 60, 1: 60, 2: 500, 3: 10}
    g = group()
    g.join(A, 1, 10, 100, 0.0)
    assert plan(g, end=4, size_of=sizes.get) == {A: [0]}  # 60 + 60 > 100
    ack(g, A, 0)
    assert plan(g, end=4, size_of=sizes.get) == {A: [1]}  # 500 would not fit beside it
    ack(g, A, 1)
    # Alone, a record is always allowed whatever its size; then nothing fits beside it.
    assert plan(g, end=4, size_of=sizes.get) == {A: [2]}
    assert plan(g, end=4, size_of=sizes.get) == {}
    ack(g, A, 2)
    assert plan(g, end=4, size_of=sizes.get) == {A: [3]}


def test_record_goes_to_a_member_with_room_for_its_bytes() -> None:
    g = group()
    g.join(A, 1, 10, 100, 0.0)
    g.join(B, 2, 10, 1000, 0.0)
    sizes = {0: 90, 1: 90, 2: 90}
    assert plan(g, end=3, size_of=sizes.get) == {A: [0], B: [1, 2]}


def test_in_progress_keeps_credit_settling_frees_it() -> None:
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    plan(g)
    assert op(g, A, SettleOp.IN_PROGRESS, 0) == []
    assert plan(g) == {}
    assert op(g, A, SettleOp.RELEASE, 0) == []
    assert plan(g) == {A: [0]}
    op(g, A, SettleOp.NAK, 0, delay_ms=0)
    assert plan(g) == {A: [0]}
    op(g, A, SettleOp.TERM, 0)
    assert plan(g) == {A: [1]}


def test_set_window() -> None:
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    assert plan(g) == {A: [0]}
    g.set_window(A, 3, BIG)
    assert plan(g) == {A: [1, 2]}
    g.set_window(A, 1, BIG)  # smaller: holds what it has, gets nothing new
    ack(g, A, 0)
    assert plan(g) == {}
    ack(g, A, 1, 2)
    assert plan(g) == {A: [3]}
    g.set_window((9, 9), 1, 1)  # unknown member: ignored
    with pytest.raises(BadRequest):
        g.set_window(A, -1, 0)


def test_zero_credit_member_gets_nothing() -> None:
    g = group()
    g.join(A, 1, 0, BIG, 0.0)
    assert plan(g) == {}


def test_members_bounded() -> None:
    g = Group("g", settings(), fresh(), 0.0, WALL, max_members=2)
    g.join(A, 1, 1, 1, 0.0)
    g.join(B, 1, 1, 1, 0.0)
    with pytest.raises(Overloaded):
        g.join(C, 1, 1, 1, 0.0)
    g.join(A, 5, 2, 1, 0.0)  # a member joined already: its window changes
    g.leave(B, True, 0.0, WALL)
    assert g.join(C, 1, 1, 1, 0.0) is Role.MEMBER


def test_default_member_bound_is_1024() -> None:
    g = group()
    for token in range(1024):
        g.join((0, token), token, 1, 1, 0.0)
    with pytest.raises(Overloaded):
        g.join((1, 0), 0, 1, 1, 0.0)


# -- window ----------------------------------------------------------------------------


def test_max_ack_pending_bounds_leases() -> None:
    g = group(max_ack_pending=3, max_span=10)
    g.join(A, 1, 100, BIG, 0.0)
    g.join(B, 1, 100, BIG, 0.0)
    assert sum(map(len, plan(g).values())) == 3
    assert g.status()["leased"] == 3
    assert not g.stalled()  # every lease out is backpressure, not a stall
    ack(g, A, 0)
    assert plan(g) == {B: [3]}  # B's turn


def test_max_span_stalls_behind_the_oldest_record() -> None:
    g = group(max_ack_pending=3, max_span=5)
    g.join(A, 1, 3, BIG, 0.0)
    assert plan(g) == {A: [0, 1, 2]}
    ack(g, A, 1, 2)
    assert plan(g) == {A: [3, 4]}  # next - floor = 5: full behind offset 0
    assert g.state.next - g.state.floor == 5
    assert g.stalled()
    assert g.status()["stalled"] is True
    ack(g, A, 3, 4)
    assert plan(g) == {}
    assert g.stalled()
    ack(g, A, 0)
    assert not g.stalled()
    assert plan(g) == {A: [5, 6, 7]}


def test_full_span_without_more_records_is_not_a_stall() -> None:
    g = group(max_ack_pending=2, max_span=2)
    g.join(A, 1, 3, BIG, 0.0)
    assert plan(g, end=2) == {A: [0, 1]}
    assert not g.stalled()
    assert plan(g, end=3) == {}
    assert not g.stalled()  # a window of leases in flight: backpressure
    ack(g, A, 1)
    assert plan(g, end=3) == {}
    assert g.stalled()  # offset 0 alone holds the span full


def test_only_readable_offsets_handed_out() -> None:
    g = group()
    g.join(A, 1, 100, BIG, 0.0)
    assert plan(g, end=0) == {}
    assert plan(g, end=2) == {A: [0, 1]}
    assert plan(g, end=2) == {}
    assert plan(g, end=3) == {A: [2]}


def test_gaps_are_skipped_and_coalesced() -> None:
    holes = {2, 3, 4, 7}
    g = group()
    initial = copy.deepcopy(g.state)
    g.join(A, 1, 100, BIG, 0.0)
    got = plan(g, end=10, size_of=lambda o: None if o in holes else 5)
    assert got == {A: [0, 1, 5, 6, 8, 9]}
    assert [e for e in g.journal if isinstance(e, Skip)] == [Skip(2, 3), Skip(7, 1)]
    assert g.status()["skipped"] == 4
    assert replayed(initial, g) == g.state


def test_trailing_gap_skipped_without_member_room() -> None:
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    assert plan(g, end=10, size_of=lambda o: 5 if o in (0, 5) else None) == {A: [0]}
    # A has no room, so nothing is looked at; once it has, the gap goes as one skip.
    ack(g, A, 0)
    g.journal.clear()
    assert plan(g, end=10, size_of=lambda o: 5 if o in (0, 5) else None) == {A: [5]}
    assert g.journal == [Skip(1, 4), Lease(5, 1)]
    ack(g, A, 5)
    g.journal.clear()
    assert plan(g, end=10, size_of=lambda o: None) == {}
    assert g.journal == [Skip(6, 4)]
    assert g.state.floor == g.state.next == 10


def test_long_gap_with_empty_window_is_not_bounded_by_span() -> None:
    g = group(max_ack_pending=2, max_span=2)
    g.join(A, 1, 10, BIG, 0.0)
    assert plan(g, end=50, size_of=lambda o: 5 if o == 40 else None) == {A: [40]}
    assert g.state.floor == 40


# -- redelivery ------------------------------------------------------------------------


def test_redelivery_goes_before_new_records_lowest_offset_first() -> None:
    g = group()
    g.join(A, 1, 5, BIG, 0.0)
    assert plan(g) == {A: [0, 1, 2, 3, 4]}
    op(g, A, SettleOp.RELEASE, 3, 1)
    ack(g, A, 0, 2, 4)
    got = g.plan(100, size10, 0.0, WALL)
    assert got == [(A, 1, [(1, 2, 0), (3, 2, 0), (5, 1, 0), (6, 1, 0), (7, 1, 0)])]


def test_blocked_redelivery_blocks_newer_records() -> None:
    sizes = {0: 50, 1: 500, 2: 50}
    g = group()
    g.join(A, 1, 10, 100, 0.0)
    assert plan(g, end=1, size_of=sizes.get) == {A: [0]}
    g.join(B, 2, 10, 100, 0.0)
    assert plan(g, end=2, size_of=sizes.get) == {B: [1]}
    g.leave(B, True, 0.0, WALL)
    # Offset 1 (500 bytes) does not fit beside A's 50: offset 2 (which would) waits.
    assert plan(g, end=3, size_of=sizes.get) == {}
    ack(g, A, 0)
    assert plan(g, end=3, size_of=sizes.get) == {A: [1]}  # alone: any size
    assert plan(g, end=3, size_of=sizes.get) == {}
    ack(g, A, 1)
    assert plan(g, end=3, size_of=sizes.get) == {A: [2]}


def test_nak_backoff_with_jitter_bounds() -> None:
    backoff = (1000, 2000, 4000)
    g = group(max_deliveries=10, backoff_ms=backoff)
    g.join(A, 1, 1, BIG, 0.0)
    wall = WALL
    for failures in range(1, 6):
        assert plan(g, end=1, wall=wall) == {A: [0]}
        g.journal.clear()
        op(g, A, SettleOp.NAK, 0, wall=wall)
        (fail,) = g.journal
        assert isinstance(fail, Fail) and fail.failures == failures
        base = backoff[min(failures, 3) - 1] * 1000
        delay = fail.not_before_us - wall
        assert 0.8 * base <= delay <= 1.2 * base
        assert g.next_retry_us() == fail.not_before_us
        assert plan(g, end=1, wall=fail.not_before_us - 1) == {}  # not yet
        wall = fail.not_before_us
    # Each delivery carries the attempts and failures so far.
    assert g.plan(1, size10, 0.0, wall) == [(A, 1, [(0, 6, 5)])]


def test_jitter_is_seeded_and_varies() -> None:
    def delays(seed: int) -> list[int]:
        g = Group(
            "g",
            settings(max_deliveries=50, backoff_ms=(1000,)),
            fresh(),
            0.0,
            WALL,
            rng=random.Random(seed),
        )
        g.join(A, 1, 1, BIG, 0.0)
        out = []
        wall = WALL
        for _ in range(20):
            plan(g, wall=wall)
            op(g, A, SettleOp.NAK, 0, wall=wall)
            fail = g.journal[-1]
            assert isinstance(fail, Fail)
            out.append(fail.not_before_us - wall)
            wall = fail.not_before_us
        return out

    assert delays(3) == delays(3)
    assert len(set(delays(3))) > 10
    assert all(800_000 <= d <= 1_200_000 for d in delays(4))


def test_delayed_record_does_not_block_newer_ones() -> None:
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    plan(g)
    op(g, A, SettleOp.NAK, 0, delay_ms=5000)
    assert plan(g) == {A: [1]}
    ack(g, A, 1)
    assert plan(g, wall=WALL + 5_000_000) == {A: [0]}


def test_nak_explicit_delay() -> None:
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    op(g, A, SettleOp.NAK, 0, delay_ms=2500, detail="later")
    assert g.state.entries[0] == Entry(EntryState.AVAILABLE, 1, 1, WALL + 2_500_000, "", "later")
    assert g.next_retry_us() == WALL + 2_500_000
    assert plan(g, end=1, wall=WALL + 2_499_999) == {}
    assert plan(g, end=1, wall=WALL + 2_500_000) == {A: [0]}
    assert g.next_retry_us() is None
    op(g, A, SettleOp.NAK, 0, delay_ms=0)
    assert plan(g, end=1) == {A: [0]}
    with pytest.raises(BadRequest):
        op(g, A, SettleOp.NAK, 0, delay_ms=-1)


def test_release_counts_no_failure() -> None:
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    op(g, A, SettleOp.RELEASE, 0)
    assert g.state.entries[0].failures == 0
    assert g.plan(1, size10, 0.0, WALL) == [(A, 1, [(0, 2, 0)])]


# -- leases in time --------------------------------------------------------------------


def test_lease_expiry_counts_a_failure_available_at_once() -> None:
    g = group(lease_ms=2000)
    g.join(A, 1, 1, BIG, 0.0)
    g.join(B, 2, 1, BIG, 0.0)
    assert plan(g, end=1, now=10.0) == {A: [0]}
    assert g.next_deadline() == 12.0
    g.expire(11.999, WALL)
    assert g.status()["leased"] == 1
    g.expire(12.0, WALL)
    assert g.state.entries[0].failures == 1
    assert g.state.entries[0].not_before_us == 0
    assert g.next_deadline() is None
    assert plan(g, end=1, now=12.0) == {B: [0]}  # A's credit came back too
    assert plan(g, end=2, now=12.0) == {A: [1]}


def test_in_progress_extends_the_lease() -> None:
    g = group(lease_ms=1000)
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1, now=0.0)
    op(g, A, SettleOp.IN_PROGRESS, 0, now=0.9)
    assert g.next_deadline() == pytest.approx(1.9)
    g.expire(1.5, WALL)
    assert g.status()["leased"] == 1
    assert g.journal == [Lease(0, 1)]  # in_progress is not journaled
    g.expire(1.9, WALL)
    assert g.status()["leased"] == 0


def test_reconfigure_lease_ms_applies_to_new_leases() -> None:
    g = group(lease_ms=1000)
    g.join(A, 1, 2, BIG, 0.0)
    plan(g, end=1, now=0.0)
    g.reconfigure(settings(lease_ms=5000))
    plan(g, end=2, now=0.0)
    g.expire(1.0, WALL)
    assert g.state.entries[0].state is EntryState.AVAILABLE
    assert g.state.entries[1].state is EntryState.LEASED
    assert g.next_deadline() == 5.0


# -- refusals --------------------------------------------------------------------------


def test_stale_when_leased_to_another_member() -> None:
    g = group(lease_ms=1000)
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    g.join(B, 2, 1, BIG, 0.0)
    g.expire(1.0, WALL)  # A is back in the turn order, behind B
    assert plan(g, end=1) == {B: [0]}
    for what in SettleOp:
        assert op(g, A, what, 0) == [(0, Refusal.STALE)]
    assert ack(g, B, 0) == []


def test_late_ack_of_a_record_nobody_holds_is_accepted() -> None:
    g = group(lease_ms=1000)
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    g.expire(1.0, WALL)
    assert ack(g, A, 0) == []
    assert 0 not in g.state.entries
    assert g.state.acked == 1
    g.join(B, 2, 1, BIG, 0.0)
    assert plan(g, end=1) == {}  # never handed out again


def test_ack_is_idempotent_and_coalesced() -> None:
    g = group()
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=5)
    g.journal.clear()
    assert g.settle(A, SettleOp.ACK, [(0, 5)], 0.0, WALL) == []
    assert g.journal == [Ack(0, 5)]
    assert g.settle(A, SettleOp.ACK, [(0, 5)], 0.0, WALL) == []
    assert g.journal == [Ack(0, 5)]  # nothing new to journal
    assert g.state.acked == 5


def test_ack_ranges_split_around_refusals() -> None:
    g = group(lease_ms=1000)
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=6)
    g.join(B, 2, 1, BIG, 0.0)
    op(g, A, SettleOp.TERM, 2)
    op(g, A, SettleOp.RELEASE, 4)
    g.set_window(A, 0, 0)
    assert plan(g, end=6) == {B: [4]}
    g.journal.clear()
    refused = g.settle(A, SettleOp.ACK, [(0, 8)], 0.0, WALL)
    # Beyond what was delivered, a range is refused once, at its first such offset.
    assert refused == [(2, Refusal.DEAD), (4, Refusal.STALE), (6, Refusal.UNKNOWN)]
    assert g.journal == [Ack(0, 2), Ack(3, 1), Ack(5, 1)]


def test_a_huge_settle_range_is_not_per_offset_work() -> None:
    g = group(max_ack_pending=4, max_span=1_000_000)
    g.join(A, 1, 10, BIG, 0.0)
    assert plan(g, end=4) == {A: [0, 1, 2, 3]}
    ack(g, A, 1)
    # 1M offsets, most of them below the floor or never delivered: a handful of steps.
    assert g.settle(A, SettleOp.ACK, [(0, 1_000_000)], 0.0, WALL) == [(4, Refusal.UNKNOWN)]
    assert g.state.floor == 4 and g.state.acked == 4
    assert g.settle(A, SettleOp.NAK, [(0, 1_000_000)], 0.0, WALL) == [
        (0, Refusal.UNKNOWN),
        (4, Refusal.UNKNOWN),
    ]


def test_unknown_offsets() -> None:
    g = group()
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=2)
    assert ack(g, A, 2, 50) == [(2, Refusal.UNKNOWN), (50, Refusal.UNKNOWN)]
    for what in (SettleOp.NAK, SettleOp.RELEASE, SettleOp.IN_PROGRESS, SettleOp.TERM):
        assert op(g, A, what, 2) == [(2, Refusal.UNKNOWN)]
    ack(g, A, 0)
    assert op(g, A, SettleOp.NAK, 0) == [(0, Refusal.UNKNOWN)]  # finished
    assert ack(g, A, 0) == []


def test_dead_refusals() -> None:
    g = group()
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=1)
    op(g, A, SettleOp.TERM, 0, detail="poison")
    assert g.dead_letters == [DeadLetter(0, "term", "poison", 1, 0, "1@gateway0")]
    for what in SettleOp:
        assert op(g, A, what, 0) == [(0, Refusal.DEAD)]
    g.dead(0)
    assert g.status()["dead"] == 1
    assert ack(g, A, 0) == []  # finished: cannot be told apart from acked
    g.dead(0)  # confirmed twice: nothing more
    assert g.status()["dead"] == 1


def test_ops_on_an_available_record_nobody_holds() -> None:
    g = group(lease_ms=1000)
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    g.expire(1.0, WALL)
    g.journal.clear()
    assert op(g, A, SettleOp.RELEASE, 0) == []
    assert op(g, A, SettleOp.NAK, 0, delay_ms=9000) == []
    assert g.journal == []  # the loss counted already; nothing changes
    assert op(g, A, SettleOp.IN_PROGRESS, 0) == [(0, Refusal.STALE)]
    assert op(g, A, SettleOp.TERM, 0, detail="bad") == []
    assert g.journal == [Dying(0, "term", "bad")]
    assert g.dead_letters == [DeadLetter(0, "term", "bad", 1, 1, "1@gateway0")]


def test_unknown_member_settles_as_a_stranger() -> None:
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    assert ack(g, (5, 5), 0) == [(0, Refusal.STALE)]


def test_settle_bounds() -> None:
    g = group(max_ack_pending=10, max_span=20)
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=1)
    with pytest.raises(BadRequest):
        g.settle(A, SettleOp.ACK, [(0, 1)] * (MAX_RANGES + 1), 0.0, WALL)
    with pytest.raises(BadRequest):
        g.settle(A, SettleOp.ACK, [(0, 15), (100, 6)], 0.0, WALL)  # 21 > max_span
    with pytest.raises(BadRequest):
        g.settle(A, SettleOp.ACK, [(0, 0)], 0.0, WALL)
    with pytest.raises(BadRequest):
        g.settle(A, SettleOp.ACK, [(-1, 1)], 0.0, WALL)
    with pytest.raises(BadRequest):
        g.settle(A, 0x99, [(0, 1)], 0.0, WALL)  # type: ignore[arg-type]
    assert g.status()["leased"] == 1  # nothing applied
    assert g.settle(A, SettleOp.ACK, [(0, 1)] * 20, 0.0, WALL) == []
    wide = group()
    assert (
        wide.settle(A, SettleOp.ACK, [(0, 1)] * MAX_RANGES, 0.0, WALL)
        == [(0, Refusal.UNKNOWN)] * MAX_RANGES
    )


def test_detail_truncated_on_a_character_boundary() -> None:
    assert truncate_detail("abc") == "abc"
    text = "é" * 600  # 2 bytes each
    cut = truncate_detail(text)
    assert cut == "é" * 512
    assert len(truncate_detail("€" * 400).encode()) == 1023  # 3 bytes each: 341 fit
    assert truncate_detail("\ud800x") == "?x"
    g = group()
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    op(g, A, SettleOp.TERM, 0, detail="x" * 5000)
    assert g.state.entries[0].detail == "x" * MAX_DETAIL_BYTES


# -- dead letters ----------------------------------------------------------------------


def test_max_deliveries_exact_then_never_handed_out_again() -> None:
    g = group(max_deliveries=3)
    g.join(A, 1, 1, BIG, 0.0)
    for failures in range(3):
        assert g.plan(1, size10, 0.0, WALL)[0][2] == [(0, failures + 1, failures)]
        assert g.dead_letters == []
        op(g, A, SettleOp.NAK, 0, delay_ms=0, detail=f"boom {failures}")
    assert g.dead_letters == [DeadLetter(0, "max_deliveries", "boom 2", 3, 3, "1@gateway0")]
    assert g.state.entries[0].state is EntryState.DYING
    assert g.status()["dying"] == 1
    assert plan(g, end=1) == {}
    assert plan(g, end=2) == {A: [1]}  # the others keep flowing
    g.dead(0)
    assert 0 not in g.state.entries


def test_max_deliveries_by_expiry_and_abrupt_leave() -> None:
    g = group(max_deliveries=2, lease_ms=1000)
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1, now=0.0)
    g.expire(1.0, WALL)
    plan(g, end=1, now=1.0)
    g.leave(A, False, 1.5, WALL)
    assert g.dead_letters == [DeadLetter(0, "max_deliveries", "member lost", 2, 2, "1@gateway0")]


def test_recovered_crash_counting_reaches_dlq_after_max_deliveries() -> None:
    initial = fresh()
    state = copy.deepcopy(initial)
    journal: list[Any] = []
    restarts = 0
    while True:
        g = Group("g", settings(max_deliveries=4), state, 0.0, WALL, recovered=True)
        journal.extend(g.journal)
        if g.dead_letters:
            break
        g.join(A, 1, 10, BIG, 0.0)
        got = plan(g, end=1)
        journal.extend(g.journal)
        assert got == {A: [0]}  # then the shard crashes delivering it
        restarts += 1
        state = copy.deepcopy(g.state)
    assert restarts == 4
    assert g.dead_letters == [DeadLetter(0, "max_deliveries", "shard restarted", 4, 4, "")]
    replay = copy.deepcopy(initial)
    for entry in journal:
        replay.apply(entry)
    assert replay == g.state
    # A further restart before the dead-letter append was confirmed appends it again.
    again = Group(
        "g", settings(max_deliveries=4), copy.deepcopy(g.state), 0.0, WALL, recovered=True
    )
    assert again.dead_letters == g.dead_letters
    assert again.journal == []
    again.join(A, 1, 10, BIG, 0.0)
    assert plan(again, end=1) == {}


def test_recovery_keeps_retry_times_and_voids_leases() -> None:
    state = fresh()
    for entry in (Lease(0, 1), Lease(1, 1), Lease(2, 1), Fail(1, 1, WALL + 500, "x")):
        state.apply(entry)
    g = group(copy.deepcopy(state), recovered=True)
    assert [type(e) for e in g.journal] == [Fail, Fail]  # offsets 0 and 2
    assert g.state.entries[0].failures == 1
    assert g.next_retry_us() == WALL + 500
    g.join(A, 1, 10, BIG, 0.0)
    assert plan(g, end=3) == {A: [0, 2]}
    assert plan(g, end=3, wall=WALL + 500) == {A: [1]}
    # Not recovered (a graceful stop left leases): released without a failure.
    g2 = group(copy.deepcopy(state))
    assert g2.journal == [Release(0), Release(2)]


def test_torn_write_between_fail_and_dying() -> None:
    state = fresh()
    state.apply(Lease(0, 3))
    state.apply(Fail(0, 3, 0, "x"))  # Dying cut off by a crash
    g = group(state, max_deliveries=3)
    assert g.journal == [Dying(0, "max_deliveries", "x")]
    assert [d.offset for d in g.dead_letters] == [0]


def test_lower_max_deliveries_dead_letters_overdue_records() -> None:
    g = group(max_deliveries=5)
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=2)
    op(g, A, SettleOp.NAK, 0, 1, delay_ms=0)
    assert plan(g, end=2) == {A: [0, 1]}
    op(g, A, SettleOp.NAK, 0, delay_ms=0)  # 0 failed twice, 1 once (and leased)
    g.reconfigure(settings(max_deliveries=2))
    assert [(d.offset, d.failures) for d in g.dead_letters] == [(0, 2)]


# -- leaving ---------------------------------------------------------------------------


def test_graceful_leave_releases_without_failure() -> None:
    g = group()
    g.join(A, 1, 2, BIG, 0.0)
    g.join(B, 2, 2, BIG, 0.0)
    assert plan(g, end=2) == {A: [0], B: [1]}
    g.journal.clear()
    g.leave(A, True, 0.0, WALL)
    assert g.journal == [Release(0)]
    assert g.state.entries[0].failures == 0
    assert plan(g, end=2) == {B: [0]}
    g.leave(A, True, 0.0, WALL)  # gone already: nothing
    assert list(g.members()) == [B]


def test_abrupt_leave_counts_a_failure_available_at_once() -> None:
    g = group()
    g.join(A, 1, 2, BIG, 0.0)
    g.join(B, 2, 2, BIG, 0.0)
    assert plan(g, end=3) == {A: [0, 2], B: [1]}
    g.journal.clear()
    g.leave(A, False, 0.0, WALL)
    assert g.journal == [Fail(0, 1, 0, "member lost"), Fail(2, 1, 0, "member lost")]
    assert plan(g, end=3) == {B: [0]}
    assert g.next_deadline() is not None


# -- exclusive -------------------------------------------------------------------------


def test_exclusive_failover_to_the_earliest_standby() -> None:
    g = group(exclusive=True)
    assert g.join(A, 1, 10, BIG, 0.0) is Role.ACTIVE
    assert g.join(B, 2, 10, BIG, 0.0) is Role.STANDBY
    assert g.join(C, 3, 10, BIG, 0.0) is Role.STANDBY
    assert plan(g, end=3) == {A: [0, 1, 2]}
    ack(g, A, 0)
    assert g.roles_changed() == []
    g.leave(A, True, 0.0, WALL)
    assert g.roles_changed() == [(B, Role.ACTIVE)]
    assert g.roles_changed() == []
    assert plan(g, end=4) == {B: [1, 2, 3]}  # in order
    g.leave(C, False, 0.0, WALL)  # a standby leaving changes nothing
    assert g.roles_changed() == []
    assert g.join(A, 1, 10, BIG, 0.0) is Role.STANDBY


def test_reconfigure_exclusive() -> None:
    g = group()
    g.join(A, 1, 10, BIG, 0.0)
    g.join(B, 2, 10, BIG, 0.0)
    g.reconfigure(settings(exclusive=True))
    assert g.roles_changed() == [(A, Role.ACTIVE), (B, Role.STANDBY)]
    assert plan(g, end=2) == {A: [0, 1]}
    g.reconfigure(settings(exclusive=False))
    assert g.roles_changed() == [(A, Role.MEMBER), (B, Role.MEMBER)]
    assert plan(g, end=4) == {A: [2], B: [3]}


# -- status and the journal ------------------------------------------------------------


def test_status() -> None:
    g = group(lease_ms=1000)
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=6, size_of=lambda o: None if o == 5 else 1)
    ack(g, A, 0)
    op(g, A, SettleOp.RELEASE, 1)
    op(g, A, SettleOp.TERM, 2)
    assert g.status() == {
        "floor": 1,
        "next": 6,
        "leased": 2,
        "available": 1,
        "dying": 1,
        "acked": 1,
        "dead": 0,
        "skipped": 1,
        "members": 1,
        "stalled": False,
    }


def test_journal_replays_to_the_live_state() -> None:
    g = group(lease_ms=1000, max_deliveries=2)
    initial = copy.deepcopy(g.state)
    g.join(A, 1, 3, BIG, 0.0)
    g.join(B, 2, 3, BIG, 0.0)
    plan(g, end=10, size_of=lambda o: None if o % 4 == 3 else 8)
    ack(g, A, 0)
    op(g, B, SettleOp.NAK, 1, detail="n")
    g.expire(5.0, WALL)
    plan(g, end=10, now=5.0, wall=WALL + 10**9)
    g.leave(A, False, 5.0, WALL)
    for dl in g.dead_letters:
        g.dead(dl.offset)
    assert replayed(initial, g) == g.state


# -- cost ------------------------------------------------------------------------------


def test_plan_looks_at_each_offset_once() -> None:
    calls: list[int] = []

    def size_of(offset: int) -> int | None:
        calls.append(offset)
        return None if offset % 3 == 2 else 1

    g = group(max_ack_pending=1000, max_span=5000)
    g.join(A, 1, 1000, BIG, 0.0)
    for end in range(0, 3000, 7):
        plan(g, end=end, size_of=size_of)
    assert calls == list(range(1499))  # the 1000th record is at 1498
    assert g.status()["leased"] == 1000  # window full: more calls look at nothing
    plan(g, end=5000, size_of=size_of)
    assert len(calls) == 1499
    g.settle(A, SettleOp.ACK, [(0, 1499)], 0.0, WALL)
    plan(g, end=1502, size_of=size_of)
    assert calls == list(range(1502))


def test_indexes_stay_bounded_by_the_window() -> None:
    g = group(max_deliveries=1000)
    g.join(A, 1, 1, BIG, 0.0)
    plan(g, end=1)
    for step in range(5000):
        op(g, A, SettleOp.IN_PROGRESS, 0, now=step * 0.001)
    assert len(g._leases._heap) < 100
    wall = WALL
    for _ in range(500):
        op(g, A, SettleOp.NAK, 0, delay_ms=10_000, wall=wall)
        wall += 10_000_000
        assert plan(g, end=1, wall=wall) == {A: [0]}
    assert len(g._available._delayed) < 100
    assert len(g._available._ready) < 100


def test_redelivery_beyond_the_readable_end_waits() -> None:
    g = group()
    g.join(A, 1, 10, BIG, 0.0)
    plan(g, end=3)
    op(g, A, SettleOp.RELEASE, 2)
    assert plan(g, end=2) == {}  # the durable end went back (not a state we expect)
    assert plan(g, end=3) == {A: [2]}
