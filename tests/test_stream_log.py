"""Tests for felix.shard.stream_log: offsets, the replay ring, reads and cursors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from felix.errors import BadRequest, CursorError, TooLarge
from felix.shard.stream_log import (
    HEADER_OVERHEAD,
    MAX_OFFSET,
    RECORD_OVERHEAD,
    RecordBatch,
    StreamLog,
    StreamSettings,
    record_size,
)


def make_log(
    max_records: int = 100, max_bytes: int = 1 << 20, first_offset: int = 0, max_record: int = 4096
) -> StreamLog:
    settings = StreamSettings(
        replay_max_records=max_records, replay_max_bytes=max_bytes, max_record_bytes=max_record
    )
    return StreamLog(settings, first_offset=first_offset)


def payloads(log: StreamLog) -> list[bytes]:
    """Every retained payload, oldest first, read in one go."""
    batch = log.read(log.earliest, 1 << 30, 1 << 62)
    assert batch.first_offset == log.earliest
    return batch.payloads


def size(payload: bytes, headers: Mapping[str, str] | None = None) -> int:
    """The accounted size spelled out independently of record_size()."""
    extra = 0
    for name, value in (headers or {}).items():
        extra += HEADER_OVERHEAD + len(name.encode()) + len(value.encode())
    return RECORD_OVERHEAD + len(payload) + extra


# -- settings -------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = StreamSettings()
    assert s.replay_max_records == 100_000
    assert s.replay_max_bytes == 64 * 1024 * 1024
    assert s.max_record_bytes == 1024 * 1024
    assert s.slow_subscriber_policy == "drop_old"


@pytest.mark.parametrize("policy", ["drop_old", "disconnect", "block"])
def test_settings_accept_each_policy(policy: Any) -> None:
    assert StreamSettings(slow_subscriber_policy=policy).slow_subscriber_policy == policy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replay_max_records": 0}, "replay_max_records"),
        ({"replay_max_records": True}, "replay_max_records"),
        ({"replay_max_records": 1.5}, "replay_max_records"),
        ({"replay_max_bytes": RECORD_OVERHEAD}, "replay_max_bytes"),
        ({"max_record_bytes": 0}, "max_record_bytes"),
        ({"replay_max_bytes": 1000}, "must fit in replay_max_bytes"),
        ({"slow_subscriber_policy": "drop_new"}, "slow_subscriber_policy"),
    ],
)
def test_settings_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        StreamSettings(**kwargs)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        StreamSettings().replay_max_records = 5  # type: ignore[misc]


def test_record_size_formula() -> None:
    assert record_size(b"") == RECORD_OVERHEAD
    assert record_size(b"abc") == RECORD_OVERHEAD + 3
    assert record_size(b"abc", {}) == RECORD_OVERHEAD + 3
    headers = {"k": "v", "\u00e9": "\u20ac"}  # 1+1 and 2+3 UTF-8 bytes
    assert record_size(b"abc", headers) == RECORD_OVERHEAD + 3 + 2 * HEADER_OVERHEAD + 2 + 5
    assert record_size(b"abc", headers) == size(b"abc", headers)


# -- appending ------------------------------------------------------------------


def test_new_log_is_empty_at_first_offset() -> None:
    log = make_log(first_offset=1000)
    assert (log.earliest, log.next_offset, len(log)) == (1000, 1000, 0)
    assert log.retained_bytes == log.appended_bytes == log.evicted_bytes == 0
    assert log.appended_records == log.evicted_records == 0
    assert len(log.read(1000, 10, 100)) == 0


def test_append_assigns_contiguous_offsets_from_first_offset() -> None:
    log = make_log(first_offset=7)
    assert log.append([b"a", b"b", b"c"]) == (7, 3)
    assert log.append([b"d"]) == (10, 1)
    assert log.append((b"e", b"f")) == (11, 2)
    assert (log.earliest, log.next_offset, len(log)) == (7, 13, 6)
    assert payloads(log) == [b"a", b"b", b"c", b"d", b"e", b"f"]
    assert log.appended_records == 6
    assert log.retained_bytes == log.appended_bytes == sum(size(p) for p in payloads(log))
    log._check_invariants()


def test_append_with_headers_accounts_and_returns_them() -> None:
    log = make_log()
    headers: list[Mapping[str, str] | None] = [{"trace": "1"}, None, {}, {"\u00e9": "x"}]
    log.append([b"a", b"b", b"c", b"d"], headers)
    batch = log.read(0, 10, 1 << 20)
    assert batch.headers == [{"trace": "1"}, None, None, {"\u00e9": "x"}]
    expected = size(b"a", {"trace": "1"}) + 2 * size(b"b") + size(b"d", {"\u00e9": "x"})
    assert log.retained_bytes == batch.nbytes == expected
    log._check_invariants()


def test_append_rejects_empty_batch() -> None:
    with pytest.raises(BadRequest, match="empty batch"):
        make_log().append([])


@pytest.mark.parametrize("bad", [bytearray(b"x"), memoryview(b"x"), "x"])
def test_append_rejects_non_bytes_payloads(bad: Any) -> None:
    log = make_log()
    with pytest.raises(TypeError, match="must be bytes"):
        log.append([b"ok", bad])
    with pytest.raises(TypeError, match="must be bytes"):
        log.append([b"ok", bad], [None, None])
    assert log.next_offset == 0


def test_append_rejects_bad_headers() -> None:
    log = make_log()
    with pytest.raises(BadRequest, match="2 header entries for 1 payloads"):
        log.append([b"a"], [None, None])
    with pytest.raises(BadRequest, match="strings"):
        log.append([b"a"], [{"k": 1}])  # type: ignore[dict-item]
    with pytest.raises(BadRequest, match="UTF-8"):
        log.append([b"a"], [{"k": "\ud800"}])
    assert log.next_offset == 0


def test_record_size_limit_counts_payload_and_headers() -> None:
    log = make_log(max_record=10)
    log.append([b"x" * 10])
    with pytest.raises(TooLarge, match="record of 11 bytes exceeds the limit of 10"):
        log.append([b"x" * 11])
    # Headers count too: 2 + HEADER_OVERHEAD + 2 > 10.
    with pytest.raises(TooLarge):
        log.append([b"xy"], [{"a": "b"}])
    assert log.next_offset == 1


def test_batch_larger_than_ring_is_refused() -> None:
    log = make_log(max_records=3, max_bytes=2 * size(b"x" * 10), max_record=10)
    with pytest.raises(TooLarge, match="4 records exceeds the replay ring of 3"):
        log.append([b"a"] * 4)
    with pytest.raises(TooLarge, match="bytes exceeds the replay ring of"):
        log.append([b"x" * 10] * 3)
    assert log.next_offset == 0
    log.append([b"x" * 10] * 2)  # a batch exactly at the byte bound
    assert (log.earliest, log.next_offset) == (0, 2)


def test_batch_is_all_or_nothing() -> None:
    log = make_log(max_records=4, max_record=10)
    log.append([b"keep"])
    with pytest.raises(TooLarge):
        log.append([b"a", b"b", b"x" * 11])
    assert (log.earliest, log.next_offset, payloads(log)) == (0, 1, [b"keep"])
    log._check_invariants()


def test_first_offset_validation_and_offset_space_end() -> None:
    with pytest.raises(BadRequest):
        make_log(first_offset=-1)
    with pytest.raises(BadRequest):
        make_log(first_offset=MAX_OFFSET + 1)
    log = make_log(first_offset=MAX_OFFSET - 1)
    assert log.append([b"a", b"b"]) == (MAX_OFFSET - 1, 2)
    with pytest.raises(BadRequest, match="exhausted"):
        log.append([b"c"])


# -- the replay ring -------------------------------------------------------------


def test_eviction_by_record_count() -> None:
    log = make_log(max_records=3)
    for i in range(5):
        log.append([bytes([65 + i])])
    assert (log.earliest, log.next_offset, len(log)) == (2, 5, 3)
    assert payloads(log) == [b"C", b"D", b"E"]
    assert log.evicted_records == 2
    assert log.evicted_bytes == 2 * size(b"A")
    assert log.retained_bytes == 3 * size(b"A")
    log._check_invariants()


def test_eviction_by_bytes() -> None:
    rec = size(b"x" * 36)  # 100 bytes
    log = make_log(max_records=100, max_bytes=2 * rec + 50, max_record=36)
    log.append([b"x" * 36, b"y" * 36])
    assert log.evicted_records == 0
    log.append([b"z" * 36])
    assert payloads(log) == [b"y" * 36, b"z" * 36]
    assert (log.earliest, log.evicted_records, log.evicted_bytes) == (1, 1, rec)
    log._check_invariants()


def test_eviction_exactly_at_byte_bound_keeps_everything() -> None:
    rec = size(b"x")
    log = make_log(max_records=100, max_bytes=3 * rec, max_record=1)
    log.append([b"a", b"b"])
    log.append([b"c"])  # retained bytes == bound: nothing evicted
    assert (log.earliest, log.retained_bytes) == (0, 3 * rec)
    log.append([b"d"])  # one byte over: exactly one eviction
    assert (log.earliest, log.retained_bytes, log.evicted_records) == (1, 3 * rec, 1)


def test_eviction_exactly_at_record_bound() -> None:
    log = make_log(max_records=4)
    log.append([b"a", b"b", b"c", b"d"])
    assert log.evicted_records == 0
    log.append([b"e", b"f", b"g", b"h"])  # a whole ring's worth replaces everything
    assert payloads(log) == [b"e", b"f", b"g", b"h"]
    assert log.evicted_records == 4


def test_one_large_record_evicts_many_small_ones() -> None:
    small = size(b"s")
    log = make_log(max_records=1000, max_bytes=50 * small, max_record=12 * small)
    for i in range(50):
        log.append([bytes([i])])  # the ring is now exactly full
    assert log.evicted_records == 0
    big = b"L" * (10 * small - RECORD_OVERHEAD)  # accounted as exactly 10 small records
    log.append([big])
    assert log.evicted_records == 10  # more than _SMALL_DROP: evicted with slice fills
    assert log.retained_bytes == 40 * small + size(big) == 50 * small
    assert payloads(log) == [bytes([i]) for i in range(10, 50)] + [big]
    log.append([b"t"])  # the ring is full to the byte: the next small record evicts one
    assert log.evicted_records == 11
    log._check_invariants()


def test_ring_wraps_and_grows_preserving_order() -> None:
    log = make_log(max_records=50)
    expected: list[bytes] = []
    for i in range(400):
        batch = [f"{i}.{j}".encode() for j in range(i % 7 + 1)]
        log.append(batch)
        expected.extend(batch)
        log._check_invariants()
        assert payloads(log) == expected[-50:]
    assert log.next_offset == len(expected)
    assert log.earliest == len(expected) - 50


def test_byte_eviction_across_the_ring_wrap() -> None:
    small = size(b"s")
    log = make_log(max_records=8, max_bytes=8 * small, max_record=5 * small)
    log.append([b"s"] * 8)
    log.append([b"t"] * 5)  # head at slot 5: retained records wrap around the ring end
    assert log.earliest == 5
    big = b"L" * (5 * small - RECORD_OVERHEAD - 1)  # one byte less than 5 small records
    log.append([big])  # frees 5 records: 3 before the wrap and 2 after
    assert (log.earliest, log.evicted_records) == (10, 10)
    assert payloads(log) == [b"t"] * 3 + [big]
    assert log.retained_bytes == 3 * small + size(big) == 8 * small - 1
    log._check_invariants()


def test_big_batches_evict_with_slice_fills() -> None:
    log = make_log(max_records=64)
    for i in range(20):
        log.append([bytes([i])] * 40)
        log._check_invariants()
    assert payloads(log) == [bytes([18])] * 24 + [bytes([19])] * 40


# -- reading --------------------------------------------------------------------


def test_read_bounds_by_records_and_by_bytes() -> None:
    log = make_log()
    log.append([b"a" * 10, b"b" * 20, b"c" * 30, b"d"])
    sizes = [size(b"a" * 10), size(b"b" * 20), size(b"c" * 30), size(b"d")]
    batch = log.read(0, 2, 1 << 20)
    assert (batch.first_offset, batch.payloads, batch.next_offset) == (0, [b"a" * 10, b"b" * 20], 2)
    assert batch.nbytes == sizes[0] + sizes[1]
    # exactly the first two records' bytes: two records; one byte less: one record
    assert len(log.read(0, 10, sizes[0] + sizes[1])) == 2
    assert len(log.read(0, 10, sizes[0] + sizes[1] - 1)) == 1
    batch = log.read(1, 10, sizes[1] + sizes[2] + sizes[3])
    assert batch.payloads == [b"b" * 20, b"c" * 30, b"d"]
    assert batch.nbytes == sum(sizes[1:])


def test_read_returns_at_least_one_record() -> None:
    log = make_log()
    log.append([b"x" * 1000, b"y"])
    batch = log.read(0, 10, 1)
    assert batch.payloads == [b"x" * 1000]
    assert batch.nbytes == size(b"x" * 1000)


def test_read_at_tail_is_empty_and_cursor_errors_outside() -> None:
    log = make_log(max_records=2, first_offset=10)
    log.append([b"a", b"b"])
    log.append([b"c"])  # 10 evicted
    assert (log.earliest, log.next_offset) == (11, 13)
    empty = log.read(13, 5, 100)
    assert (len(empty), empty.first_offset, empty.nbytes, empty.payloads) == (0, 13, 0, [])
    with pytest.raises(CursorError) as old:
        log.read(10, 5, 100)
    assert (old.value.reason, old.value.requested, old.value.available) == ("too_old", 10, 11)
    with pytest.raises(CursorError) as future:
        log.read(14, 5, 100)
    assert (future.value.reason, future.value.requested, future.value.available) == (
        "in_future",
        14,
        13,
    )


@pytest.mark.parametrize(("max_records", "max_bytes"), [(0, 10), (10, 0), (-1, 10)])
def test_read_rejects_bad_limits(max_records: int, max_bytes: int) -> None:
    log = make_log()
    log.append([b"a"])
    with pytest.raises(BadRequest):
        log.read(0, max_records, max_bytes)


def test_read_across_the_ring_wrap() -> None:
    log = make_log(max_records=8)
    log.append([b"%d" % i for i in range(8)])
    log.append([b"%d" % i for i in range(8, 13)])  # head moved to slot 5: ring wraps
    assert (log.earliest, log.next_offset) == (5, 13)
    one = size(b"5")
    batch = log.read(6, 100, 1 << 20)
    assert batch.payloads == [b"6", b"7", b"8", b"9", b"10", b"11", b"12"]
    assert batch.nbytes == sum(size(p) for p in batch.payloads)
    assert log.read(6, 100, 3 * one).payloads == [b"6", b"7", b"8"]
    assert log.read(7, 3, 1 << 20).payloads == [b"7", b"8", b"9"]
    assert log.read(9, 100, 1 << 20).payloads == [b"9", b"10", b"11", b"12"]


def test_read_result_does_not_change_with_later_appends() -> None:
    log = make_log(max_records=2)
    log.append([b"a", b"b"])
    batch = log.read(0, 10, 1 << 20)
    log.append([b"c", b"d"])
    assert batch.payloads == [b"a", b"b"]


def test_record_batch_iteration_and_repr() -> None:
    log = make_log(first_offset=5)
    log.append([b"a", b"b"], [{"h": "1"}, None])
    batch = log.read(5, 10, 1 << 20)
    assert list(batch) == [(5, b"a", {"h": "1"}), (6, b"b", None)]
    assert "first_offset=5" in repr(batch) and "records=2" in repr(batch)
    assert isinstance(batch, RecordBatch)
    assert "next_offset=7" in repr(log)


# -- resolve_start ----------------------------------------------------------------


def test_resolve_start() -> None:
    log = make_log(max_records=3, first_offset=100)
    assert log.resolve_start("latest") == log.resolve_start("earliest") == 100
    log.append([b"a", b"b", b"c"])
    log.append([b"d", b"e"])
    assert (log.earliest, log.next_offset) == (102, 105)
    assert log.resolve_start("latest") == 105
    assert log.resolve_start("earliest") == 102
    assert log.resolve_start(102) == 102
    assert log.resolve_start(105) == 105  # the tail itself is a valid start
    with pytest.raises(CursorError) as old:
        log.resolve_start(101)
    assert (old.value.reason, old.value.requested, old.value.available) == ("too_old", 101, 102)
    with pytest.raises(CursorError) as future:
        log.resolve_start(106)
    assert (future.value.reason, future.value.requested, future.value.available) == (
        "in_future",
        106,
        105,
    )


@pytest.mark.parametrize("start", [-1, "oldest", "", True, 1.0, None])
def test_resolve_start_rejects_bad_values(start: Any) -> None:
    log = make_log()
    log.append([b"a"])
    with pytest.raises(BadRequest):
        log.resolve_start(start)


# -- model-based -----------------------------------------------------------------

MAX_RECORD = 40

records = st.tuples(
    st.binary(max_size=MAX_RECORD),
    st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2) | st.just({}),
)


class StreamLogMachine(RuleBasedStateMachine):
    """StreamLog against a list of every record ever appended plus an earliest index."""

    log: StreamLog

    @initialize(
        max_records=st.integers(1, 20),
        extra_bytes=st.integers(0, 1500),
        first_offset=st.integers(0, 10**6),
    )
    def setup(self, max_records: int, extra_bytes: int, first_offset: int) -> None:
        self.max_records = max_records
        self.max_bytes = RECORD_OVERHEAD + MAX_RECORD + extra_bytes
        self.log = make_log(max_records, self.max_bytes, first_offset, MAX_RECORD)
        self.first = first_offset
        self.all: list[tuple[bytes, Mapping[str, str] | None, int]] = []
        self.start = 0  # index into self.all of the oldest retained record

    def retained(self) -> list[tuple[bytes, Mapping[str, str] | None, int]]:
        return self.all[self.start :]

    @rule(batch=st.lists(records, min_size=1, max_size=24), with_headers=st.booleans())
    def append(
        self, batch: list[tuple[bytes, Mapping[str, str] | None]], with_headers: bool
    ) -> None:
        if not with_headers:
            batch = [(p, None) for p, _ in batch]
        sizes = [size(p, h) for p, h in batch]
        too_large = (
            len(batch) > self.max_records
            or any(s - RECORD_OVERHEAD > MAX_RECORD for s in sizes)
            or sum(sizes) > self.max_bytes
        )
        if too_large:
            with pytest.raises(TooLarge):
                self.log.append([p for p, _ in batch], [h for _, h in batch])
            return
        headers = [h for _, h in batch] if with_headers else None
        base, count = self.log.append([p for p, _ in batch], headers)
        assert (base, count) == (self.first + len(self.all), len(batch))
        self.all.extend((p, h or None, s) for (p, h), s in zip(batch, sizes, strict=True))
        # Oldest first, until both bounds hold.
        while (
            len(self.all) - self.start > self.max_records
            or sum(s for _, _, s in self.retained()) > self.max_bytes
        ):
            self.start += 1

    @rule(
        data=st.data(),
        max_records=st.integers(1, 30),
        max_bytes=st.integers(1, 2000),
    )
    def read(self, data: st.DataObject, max_records: int, max_bytes: int) -> None:
        earliest = self.first + self.start
        tail = self.first + len(self.all)
        offset = data.draw(st.integers(max(0, earliest - 3), tail + 3))
        if offset < earliest or offset > tail:
            with pytest.raises(CursorError) as info:
                self.log.read(offset, max_records, max_bytes)
            reason, available = ("too_old", earliest) if offset < earliest else ("in_future", tail)
            assert (info.value.reason, info.value.available) == (reason, available)
            return
        expected: list[tuple[bytes, Mapping[str, str] | None, int]] = []
        nbytes = 0
        for record in self.all[offset - self.first :]:
            if len(expected) == max_records or (expected and nbytes + record[2] > max_bytes):
                break
            expected.append(record)
            nbytes += record[2]
        batch = self.log.read(offset, max_records, max_bytes)
        assert batch.first_offset == offset
        assert batch.payloads == [p for p, _, _ in expected]
        assert batch.headers == [h for _, h, _ in expected]
        assert batch.nbytes == nbytes

    @rule(data=st.data())
    def resolve(self, data: st.DataObject) -> None:
        earliest = self.first + self.start
        tail = self.first + len(self.all)
        assert self.log.resolve_start("latest") == tail
        assert self.log.resolve_start("earliest") == earliest
        start = data.draw(st.integers(max(0, earliest - 3), tail + 3))
        if earliest <= start <= tail:
            assert self.log.resolve_start(start) == start
        else:
            with pytest.raises(CursorError):
                self.log.resolve_start(start)

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "log"):
            return
        retained = self.retained()
        assert self.log.earliest == self.first + self.start
        assert self.log.next_offset == self.first + len(self.all)
        assert len(self.log) == len(retained)
        assert self.log.retained_bytes == sum(s for _, _, s in retained) <= self.max_bytes
        assert len(retained) <= self.max_records
        assert self.log.evicted_records == self.start
        assert self.log.evicted_bytes == sum(s for _, _, s in self.all[: self.start])
        self.log._check_invariants()


StreamLogMachine.TestCase.settings = hypothesis_settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_stream_log_model = StreamLogMachine.TestCase
