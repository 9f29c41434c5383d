"""Tests for felix.shard.cache: TTLs, conditional stores, LRU byte budget, sweeping."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from felix.errors import BadRequest, TooLarge
from felix.shard.cache import ENTRY_OVERHEAD, CachePartition, CacheSettings, CacheStats, entry_size


def cost(key: str, value: bytes) -> int:
    """Accounted bytes of an entry, spelled out independently of entry_size()."""
    return len(key.encode("utf-8")) + len(value) + ENTRY_OVERHEAD


def make(budget: int = 1 << 20, **kwargs: Any) -> CachePartition:
    return CachePartition(CacheSettings(budget_bytes=budget, **kwargs))


# -- settings ---------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = CacheSettings()
    assert s.max_key_bytes == 1024
    assert s.max_value_bytes == 1024 * 1024
    assert s.default_ttl is None
    assert s.max_ttl == 30 * 86_400
    assert s.budget_bytes == 64 * 1024 * 1024
    assert CachePartition().settings == s


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_bytes": 0}, "budget_bytes"),
        ({"budget_bytes": 1.5}, "budget_bytes"),
        ({"budget_bytes": True}, "budget_bytes"),
        ({"max_key_bytes": 0}, "max_key_bytes"),
        ({"max_value_bytes": -1}, "max_value_bytes"),
        ({"max_ttl": 0}, "max_ttl"),
        ({"max_ttl": math.inf}, "max_ttl"),
        ({"max_ttl": math.nan}, "max_ttl"),
        ({"default_ttl": 0}, "default_ttl"),
        ({"default_ttl": -1.0}, "default_ttl"),
        ({"default_ttl": math.nan}, "default_ttl"),
        ({"default_ttl": 11.0, "max_ttl": 10.0}, "default_ttl"),
    ],
)
def test_settings_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        CacheSettings(**kwargs)


def test_settings_accept_limits_at_their_bounds() -> None:
    s = CacheSettings(default_ttl=10, max_ttl=10, max_value_bytes=0, budget_bytes=1)
    assert s.default_ttl == s.max_ttl == 10


# -- basic operations -----------------------------------------------------------------


def test_get_set_delete_roundtrip() -> None:
    c = make()
    assert c.get("k", 0.0) is None
    assert c.set("k", b"v1", 0.0) is True
    assert c.get("k", 0.0) == b"v1"
    assert c.set("k", b"v2", 0.0) is True
    assert c.get("k", 0.0) == b"v2"
    assert c.delete("k", 0.0) is True
    assert c.delete("k", 0.0) is False
    assert c.get("k", 0.0) is None
    assert c.set("empty", b"", 0.0) and c.get("empty", 0.0) == b""
    assert len(c) == 1


def test_byte_accounting_is_exact() -> None:
    c = make()
    c.set("a", b"x" * 10, 0.0)
    c.set("\u00e9t\u00e9", b"y" * 3, 0.0)  # 5 UTF-8 bytes
    assert c.used_bytes == cost("a", b"x" * 10) + cost("\u00e9t\u00e9", b"yyy")
    assert c.used_bytes == entry_size(1, 10) + entry_size(5, 3)
    c.set("a", b"", 0.0)  # overwrite with a smaller value
    assert c.used_bytes == cost("a", b"") + cost("\u00e9t\u00e9", b"yyy")
    c.delete("a", 0.0)
    assert c.used_bytes == cost("\u00e9t\u00e9", b"yyy")
    c._check_invariants()


def test_stats_snapshot_and_counters() -> None:
    c = make(budget=2 * cost("a", b"1"))
    c.set("a", b"1", 0.0)
    c.get("a", 0.0)  # hit
    c.get("b", 0.0)  # miss
    c.set("b", b"2", 0.0, ttl=1)
    c.set("c", b"3", 0.0)  # evicts "a" (least recently used)
    c.get("b", 5.0)  # expired: miss + expiration
    c.delete("c", 5.0)
    stats = c.stats()
    assert stats == CacheStats(
        hits=1,
        misses=2,
        sets=3,
        deletes=1,
        evictions=1,
        expirations=1,
        entries=0,
        used_bytes=0,
        budget_bytes=2 * cost("a", b"1"),
    )
    assert "entries=0" in repr(c)


# -- validation ------------------------------------------------------------------------


def test_key_and_value_limits() -> None:
    c = make(max_key_bytes=4, max_value_bytes=8)
    assert c.set("abcd", b"x" * 8, 0.0)
    with pytest.raises(TooLarge, match="key"):
        c.set("abcde", b"x", 0.0)
    with pytest.raises(TooLarge, match="key"):
        c.set("\u20ac\u20ac", b"x", 0.0)  # 2 characters, 6 bytes
    with pytest.raises(TooLarge, match="value of 9 bytes"):
        c.set("k", b"x" * 9, 0.0)
    with pytest.raises(BadRequest, match="empty"):
        c.set("", b"x", 0.0)
    with pytest.raises(BadRequest, match="UTF-8"):
        c.set("\ud800", b"x", 0.0)
    for op in (c.get, c.delete, c.ttl):
        with pytest.raises(TooLarge):
            op("abcde", 0.0)
        with pytest.raises(BadRequest):
            op("", 0.0)
    assert c.get("abcd", 0.0) == b"x" * 8
    c._check_invariants()


@pytest.mark.parametrize("value", [bytearray(b"x"), memoryview(b"x"), "x"])
def test_value_must_be_bytes(value: Any) -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        make().set("k", value, 0.0)


def test_entry_larger_than_budget_is_too_large() -> None:
    c = make(budget=cost("k", b"x" * 10))
    assert c.set("k", b"x" * 10, 0.0)  # exactly the budget
    with pytest.raises(TooLarge, match="budget"):
        c.set("k", b"x" * 11, 0.0)
    assert c.get("k", 0.0) == b"x" * 10  # the failed store changed nothing


@pytest.mark.parametrize("ttl", [0, 0.0, -1, -0.5, math.nan, math.inf, 10.001])
def test_ttl_out_of_range_is_bad_request(ttl: float) -> None:
    c = make(max_ttl=10.0)
    with pytest.raises(BadRequest, match="ttl"):
        c.set("k", b"v", 0.0, ttl=ttl)
    assert c.get("k", 0.0) is None


def test_nx_and_xx_together_is_bad_request() -> None:
    c = make()
    c.set("k", b"v", 0.0)
    with pytest.raises(BadRequest, match="nx"):
        c.set("k", b"w", 0.0, nx=True, xx=True)
    assert c.get("k", 0.0) == b"v"


def test_now_must_be_finite() -> None:
    c = make()
    with pytest.raises(ValueError, match="finite"):
        c.get("k", math.inf)
    with pytest.raises(ValueError, match="finite"):
        c.set("k", b"v", math.inf)


# -- TTL --------------------------------------------------------------------------------


def test_ttl_expiry_boundary() -> None:
    c = make()
    c.set("k", b"v", 100.0, ttl=10)
    assert c.ttl("k", 100.0) == 10.0
    assert c.ttl("k", 104.5) == 5.5
    assert c.get("k", 109.999) == b"v"
    assert c.get("k", 110.0) is None  # readable while now < expires_at, never at it
    assert c.expirations == 1
    c.set("t", b"v", 110.0, ttl=10)
    assert c.ttl("t", 119.999) is not None
    assert c.ttl("t", 120.0) is None  # the same boundary for ttl()
    c.set("d", b"v", 120.0, ttl=10)
    assert c.delete("d", 130.0) is False  # and for delete()
    assert c.expirations == 3
    c._check_invariants()


def test_expired_key_is_never_returned_without_a_sweep() -> None:
    c = make()
    for t, op in ((0.0, "get"), (10.0, "ttl"), (20.0, "delete")):
        c.set("k", b"v", t, ttl=1)
        if op == "get":
            assert c.get("k", t + 1) is None
        elif op == "ttl":
            assert c.ttl("k", t + 1) is None
        else:
            assert c.delete("k", t + 1) is False
        assert len(c) == 0 and c.used_bytes == 0
    assert c.expirations == 3 and c.deletes == 0


def test_ttl_inf_for_no_expiry_and_none_when_missing() -> None:
    c = make()
    c.set("k", b"v", 0.0)
    assert c.ttl("k", 1e9) == math.inf
    assert c.ttl("missing", 0.0) is None


def test_default_ttl_applies_when_none_given() -> None:
    c = make(default_ttl=5.0, max_ttl=60.0)
    c.set("d", b"v", 0.0)
    c.set("e", b"v", 0.0, ttl=60)
    assert c.ttl("d", 0.0) == 5.0
    assert c.ttl("e", 0.0) == 60.0
    assert c.get("d", 5.0) is None
    assert c.get("e", 5.0) == b"v"


def test_max_ttl_is_inclusive() -> None:
    c = make(max_ttl=10.0)
    assert c.set("k", b"v", 0.0, ttl=10.0)
    assert c.ttl("k", 0.0) == 10.0


def test_overwrite_replaces_expiry() -> None:
    c = make()
    c.set("k", b"v", 0.0, ttl=1)
    c.set("k", b"w", 0.5)  # no TTL now
    assert c.get("k", 100.0) == b"w"
    c.set("k", b"x", 100.0, ttl=2)
    assert c.get("k", 101.9) == b"x" and c.get("k", 102.0) is None
    c._check_invariants()


def test_clock_going_backwards_never_revives_an_expired_key() -> None:
    c = make()
    c.set("k", b"v", 100.0, ttl=10)
    c.set("other", b"o", 200.0)  # the partition has now seen t=200
    # A caller whose clock stepped back to t=105 still gets t=200 semantics.
    assert c.get("k", 105.0) is None
    assert c.ttl("other", 50.0) == math.inf
    # Stores during the backward step are timed from t=200 too.
    c.set("late", b"v", 150.0, ttl=10)
    assert c.ttl("late", 0.0) == 10.0
    assert c.get("late", 209.0) == b"v"
    assert c.get("late", 210.0) is None
    # NaN is treated like a step back.
    c.set("n", b"v", 300.0, ttl=1)
    assert c.get("n", math.nan) == b"v"
    assert c.ttl("n", math.nan) == 1.0


def test_clock_jump_forward_expires_keys() -> None:
    c = make()
    for i in range(100):
        c.set(f"k{i}", b"v", 0.0, ttl=1 + i)
    assert all(c.get(f"k{i}", 1e6) is None for i in range(100))
    assert c.used_bytes == 0 and c.expirations == 100


# -- nx / xx -------------------------------------------------------------------------------


def test_nx_stores_only_when_absent() -> None:
    c = make()
    assert c.set("k", b"1", 0.0, nx=True) is True
    assert c.set("k", b"2", 0.0, nx=True) is False
    assert c.get("k", 0.0) == b"1"
    assert c.sets == 1


def test_nx_treats_expired_key_as_absent() -> None:
    c = make()
    c.set("k", b"1", 0.0, ttl=1)
    assert c.set("k", b"2", 1.0, nx=True) is True
    assert c.get("k", 1.0) == b"2"
    assert c.expirations == 1


def test_xx_stores_only_when_present() -> None:
    c = make()
    assert c.set("k", b"1", 0.0, xx=True) is False
    assert c.get("k", 0.0) is None and len(c) == 0
    c.set("k", b"1", 0.0)
    assert c.set("k", b"2", 0.0, xx=True) is True
    assert c.get("k", 0.0) == b"2"


def test_xx_treats_expired_key_as_absent() -> None:
    c = make()
    c.set("k", b"1", 0.0, ttl=1)
    assert c.set("k", b"2", 1.0, xx=True) is False
    assert c.get("k", 1.0) is None and len(c) == 0 and c.used_bytes == 0


def test_refused_conditional_store_does_not_touch_lru_order() -> None:
    one = cost("a", b"1")
    c = make(budget=2 * one)
    c.set("a", b"1", 0.0)
    c.set("b", b"1", 0.0)
    assert c.set("a", b"2", 0.0, nx=True) is False  # must not make "a" recent
    c.set("c", b"1", 0.0)
    assert c.get("a", 0.0) is None and c.get("b", 0.0) == b"1"


# -- byte budget and LRU -----------------------------------------------------------------


def test_evict_exactly_at_the_budget() -> None:
    one = cost("a", b"x" * 10)
    c = make(budget=3 * one)
    for key in "abc":
        c.set(key, b"x" * 10, 0.0)
    assert c.used_bytes == c.settings.budget_bytes  # full to the byte, nothing evicted
    assert c.evictions == 0 and len(c) == 3
    c.set("d", b"x" * 10, 0.0)  # one more entry: exactly one eviction
    assert c.evictions == 1 and len(c) == 3 and c.used_bytes == 3 * one
    assert c.get("a", 0.0) is None


def test_one_byte_over_budget_evicts() -> None:
    one = cost("a", b"x")
    c = make(budget=2 * one)
    c.set("a", b"x", 0.0)
    c.set("b", b"x", 0.0)
    c.set("b", b"xx", 0.0)  # b grows by one byte: a must go
    assert c.get("a", 0.0) is None and c.get("b", 0.0) == b"xx"
    assert c.used_bytes == cost("b", b"xx") and c.evictions == 1


def test_lru_order_follows_gets_and_sets() -> None:
    one = cost("a", b"1")
    c = make(budget=3 * one)
    for key in "abc":
        c.set(key, b"1", 0.0)
    assert c.get("a", 0.0) == b"1"  # order now b, c, a
    c.set("d", b"1", 0.0)  # evicts b
    assert c.get("b", 0.0) is None
    c.set("c", b"2", 0.0)  # overwrite makes c recent: order a, d, c
    c.set("e", b"1", 0.0)  # evicts a
    assert [k for k in "acde" if c.get(k, 0.0) is not None] == ["c", "d", "e"]


def test_ttl_query_does_not_refresh_lru() -> None:
    one = cost("a", b"1")
    c = make(budget=2 * one)
    c.set("a", b"1", 0.0)
    c.set("b", b"1", 0.0)
    assert c.ttl("a", 0.0) == math.inf
    c.set("c", b"1", 0.0)
    assert c.get("a", 0.0) is None


def test_large_value_evicts_several_but_not_itself() -> None:
    small = cost("a", b"1")
    c = make(budget=5 * small)
    for key in "abcde":
        c.set(key, b"1", 0.0)
    big = b"x" * (3 * small - ENTRY_OVERHEAD - 1)  # with key "c": exactly three smalls
    c.set("c", big, 0.0)
    assert c.get("c", 0.0) == big
    # The old "c" is released first (4 left), then a and b make room for three.
    assert [k for k in "abde" if c.get(k, 0.0) is not None] == ["d", "e"]
    assert c.used_bytes == cost("c", big) + 2 * small == 5 * small
    assert c.evictions == 2
    c._check_invariants()


def test_evicting_an_expired_entry_counts_as_expiration() -> None:
    one = cost("a", b"1")
    c = make(budget=2 * one)
    c.set("a", b"1", 0.0, ttl=1)
    c.set("b", b"1", 0.0)
    c.set("c", b"1", 1.0)  # "a" is at the LRU end and expired (exactly now)
    assert (c.evictions, c.expirations) == (0, 1)
    c.set("d", b"1", 1.0)
    assert (c.evictions, c.expirations) == (1, 1)
    c._check_invariants()


# -- sweep -------------------------------------------------------------------------------


def test_sweep_reclaims_keys_in_passed_seconds_only() -> None:
    c = make()
    c.set("a", b"v", 0.0, ttl=0.5)  # expires at 0.5, second 0
    c.set("b", b"v", 0.0, ttl=1.5)  # expires at 1.5, second 1
    c.set("c", b"v", 0.0)  # never
    assert c.sweep(0.9, 100) == 0  # second 0 has not fully passed
    assert c.sweep(1.0, 100) == 1  # second 0 has
    assert len(c) == 2 and c.expirations == 1
    assert c.sweep(1.9, 100) == 0  # "b" is expired but its second is not over...
    assert c.get("b", 1.9) is None  # ...yet it is never readable
    assert c.sweep(10.0, 100) == 0
    assert len(c) == 1 and c.used_bytes == cost("c", b"v")
    c._check_invariants()


def test_sweep_does_bounded_work_and_resumes() -> None:
    c = make()
    for i in range(10):
        c.set(f"k{i}", b"v", 0.0, ttl=0.5)
    c.set("live", b"v", 0.0, ttl=100)
    assert c.sweep(5.0, 3) == 3
    assert len(c) == 8
    c._check_invariants()
    assert c.sweep(5.0, 3) == 3
    assert c.sweep(5.0, 100) == 4
    assert c.sweep(5.0, 100) == 0
    assert len(c) == 1 and c.expirations == 10
    assert c.get("live", 5.0) == b"v"
    c._check_invariants()


def test_sweep_counts_empty_seconds_as_work() -> None:
    c = make()
    for i in range(20):  # a big index: stepping over a second beats searching it
        c.set(f"live{i}", b"v", 0.0, ttl=1000 + i)
    for second in (0, 5, 9):
        c.set(f"k{second}", b"v", float(second), ttl=0.5)
    assert c.sweep(10.0, 3) == 1  # second 0 (1 key), then seconds 1 and 2 (empty)
    assert c.sweep(10.0, 3) == 1  # seconds 3 and 4 (empty), then 5 (1 key)
    assert c.sweep(10.0, 3) == 0  # seconds 6, 7, 8 (empty)
    assert c.sweep(10.0, 3) == 1  # second 9
    assert c.sweep(10.0, 3) == 0
    assert len(c) == 20
    c._check_invariants()


def test_sweep_work_includes_searching_for_the_next_second() -> None:
    c = make()
    c.set("live", b"v", 0.0, ttl=1000)
    c.set("k", b"v", 50.0, ttl=0.5)
    # 2 buckets, 100 seconds to cover: finding the next bucket costs 2 units.
    assert c.sweep(100.0, 2) == 0
    assert c.sweep(100.0, 1) == 1
    c._check_invariants()


def test_sweep_jumps_over_a_long_idle_gap() -> None:
    c = make()
    c.set("a", b"v", 0.0, ttl=0.5)
    c.set("b", b"v", 0.0, ttl=86_400.5)
    c.set("live", b"v", 0.0, ttl=1e6)
    assert c.sweep(2 * 86_400.0, 10) == 2  # no walking 86 400 empty seconds
    assert len(c) == 1
    assert c.sweep(2 * 86_400.0, 1) == 0
    c._check_invariants()


def test_sweep_with_empty_index_catches_up_instantly() -> None:
    c = make()
    c.set("a", b"v", 0.0)
    assert c.sweep(1e9, 1) == 0
    c.set("b", b"v", 1e9, ttl=1)
    assert c.sweep(1e9 + 2, 2) == 1  # one unit to find second 1e9 + 1, one to reclaim "b"
    c._check_invariants()


def test_sweep_skips_overwritten_and_deleted_keys() -> None:
    c = make()
    c.set("a", b"v", 0.0, ttl=0.5)
    c.set("a", b"w", 0.0, ttl=100)  # moved to a later second
    c.set("b", b"v", 0.0, ttl=0.5)
    c.delete("b", 0.0)
    c._check_invariants()
    assert c.sweep(50.0, 100) == 0
    assert c.get("a", 50.0) == b"w"


def test_sweep_rejects_non_positive_work() -> None:
    with pytest.raises(ValueError, match="max_work"):
        make().sweep(0.0, 0)


def test_sweep_handles_negative_times() -> None:
    c = make()
    c.set("a", b"v", -10.0, ttl=1)
    assert c.sweep(-5.0, 100) == 1
    c._check_invariants()


# -- model-based -------------------------------------------------------------------------

KEYS = ["a", "b", "c", "d", "\u00e9", "long-key-" + "x" * 20]
TTLS = [None, None, 0.25, 0.5, 1.0, 2.5, 7.0]


class Model:
    """The cache spelled out plainly: LRU dict, expiry on access, sweep of passed seconds."""

    def __init__(self, budget: int, default_ttl: float | None) -> None:
        self.budget = budget
        self.default_ttl = default_ttl
        self.entries: OrderedDict[str, tuple[bytes, float, int]] = OrderedDict()
        self.now = -math.inf
        self.counts = dict.fromkeys(
            ("hits", "misses", "sets", "deletes", "evictions", "expirations"), 0
        )

    def clock(self, now: float) -> float:
        self.now = max(self.now, now)
        return self.now

    def live(self, key: str, now: float) -> tuple[bytes, float, int] | None:
        entry = self.entries.get(key)
        if entry is not None and entry[1] <= now:
            del self.entries[key]
            self.counts["expirations"] += 1
            return None
        return entry

    def get(self, key: str, now: float) -> bytes | None:
        now = self.clock(now)
        entry = self.live(key, now)
        if entry is None:
            self.counts["misses"] += 1
            return None
        self.entries.move_to_end(key)
        self.counts["hits"] += 1
        return entry[0]

    def set(self, key: str, value: bytes, now: float, ttl: float | None, mode: str) -> bool:
        now = self.clock(now)
        ttl = self.default_ttl if ttl is None else ttl
        expires = math.inf if ttl is None else now + ttl
        present = self.live(key, now) is not None
        if (mode == "nx" and present) or (mode == "xx" and not present):
            return False
        self.entries.pop(key, None)
        size = cost(key, value)
        while sum(e[2] for e in self.entries.values()) + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.counts["expirations" if old[1] <= now else "evictions"] += 1
        self.entries[key] = (value, expires, size)
        self.counts["sets"] += 1
        return True

    def delete(self, key: str, now: float) -> bool:
        now = self.clock(now)
        if self.live(key, now) is None:
            return False
        del self.entries[key]
        self.counts["deletes"] += 1
        return True

    def ttl(self, key: str, now: float) -> float | None:
        now = self.clock(now)
        entry = self.live(key, now)
        if entry is None:
            return None
        return math.inf if entry[1] == math.inf else entry[1] - now

    def sweep_all(self, now: float) -> int:
        now = self.clock(now)
        gone = [
            k
            for k, e in self.entries.items()
            if e[1] != math.inf and math.floor(e[1]) < math.floor(now)
        ]
        for key in gone:
            del self.entries[key]
        self.counts["expirations"] += len(gone)
        return len(gone)


class CacheMachine(RuleBasedStateMachine):
    """CachePartition against Model, exactly: every result, counter and byte."""

    cache: CachePartition
    model: Model

    @initialize(entries=st.integers(1, 6), default_ttl=st.sampled_from([None, 1.5]))
    def setup(self, entries: int, default_ttl: float | None) -> None:
        # Room for a few entries of the sizes drawn below, so evictions are common.
        budget = entries * (ENTRY_OVERHEAD + 40) + 60
        self.cache = make(budget=budget, default_ttl=default_ttl, max_value_bytes=24)
        self.model = Model(budget, default_ttl)
        self.t = 0.0

    @rule(dt=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 3.0, -2.0]))
    def advance(self, dt: float) -> None:
        self.t += dt  # may step back: the cache must keep its own time from running back

    @rule(
        key=st.sampled_from(KEYS),
        value=st.binary(max_size=24),
        ttl=st.sampled_from(TTLS),
        mode=st.sampled_from(["", "", "nx", "xx"]),
    )
    def set(self, key: str, value: bytes, ttl: float | None, mode: str) -> None:
        stored = self.cache.set(key, value, self.t, ttl=ttl, nx=mode == "nx", xx=mode == "xx")
        assert stored == self.model.set(key, value, self.t, ttl, mode)

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: str) -> None:
        assert self.cache.get(key, self.t) == self.model.get(key, self.t)

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: str) -> None:
        assert self.cache.delete(key, self.t) == self.model.delete(key, self.t)

    @rule(key=st.sampled_from(KEYS))
    def ttl(self, key: str) -> None:
        assert self.cache.ttl(key, self.t) == self.model.ttl(key, self.t)

    @rule()
    def sweep(self) -> None:
        assert self.cache.sweep(self.t, 10**9) == self.model.sweep_all(self.t)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "cache"):
            return
        c, m = self.cache, self.model
        assert list(c._entries) == list(m.entries)  # same keys in the same LRU order
        assert c.used_bytes == sum(e[2] for e in m.entries.values()) <= m.budget
        stats = c.stats()
        assert {k: getattr(stats, k) for k in m.counts} == m.counts
        c._check_invariants()


CacheMachine.TestCase.settings = hypothesis_settings(
    max_examples=200, stateful_step_count=50, deadline=None
)
test_cache_matches_model = CacheMachine.TestCase


class CacheSafetyMachine(RuleBasedStateMachine):
    """Bounded sweeps, big key space, fences: never an expired or stale value (nor one a
    fence named), never over budget."""

    cache: CachePartition

    @initialize(budget=st.integers(ENTRY_OVERHEAD + 30, 8 * (ENTRY_OVERHEAD + 30)))
    def setup(self, budget: int) -> None:
        self.cache = make(budget=budget, max_value_bytes=24)
        self.t = 0.0
        # key -> (value, expires_at, evictions counter when stored); absent when deleted.
        self.latest: dict[str, tuple[bytes, float, int]] = {}

    @rule(dt=st.floats(0, 2, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.t += dt

    @rule(
        key=st.integers(0, 40).map(str),
        value=st.binary(max_size=24),
        ttl=st.none() | st.floats(0.01, 3),
    )
    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        assert self.cache.set(key, value, self.t, ttl=ttl)
        expires = math.inf if ttl is None else self.t + ttl
        self.latest[key] = (value, expires, self.cache.evictions)
        assert self.cache.get(key, self.t) == value  # a store is readable at once

    @rule(key=st.integers(0, 40).map(str))
    def get(self, key: str) -> None:
        got = self.cache.get(key, self.t)
        if key not in self.latest:
            assert got is None
            return
        value, expires, evictions_then = self.latest[key]
        if self.t >= expires:
            assert got is None  # never after its TTL
        elif got is None:
            assert self.cache.evictions > evictions_then  # only eviction explains a loss
        else:
            assert got == value  # never a stale value

    @rule(key=st.integers(0, 40).map(str))
    def delete(self, key: str) -> None:
        self.cache.delete(key, self.t)
        self.latest.pop(key, None)

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(max_work=st.integers(1, 5))
    def sweep(self, max_work: int) -> None:
        before = len(self.cache)
        removed = self.cache.sweep(self.t, max_work)
        assert 0 <= removed <= max_work and len(self.cache) == before - removed

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(mod=st.integers(2, 4), rem=st.integers(0, 3))
    def fence(self, mod: int, rem: int) -> None:
        """A logical shard moves away: what it names must never be read again (a store
        after the fence is new, and must be read)."""

        def gone(key: str) -> bool:
            return int(key) % mod == rem % mod

        self.cache.fence(gone)
        for key in [k for k in self.latest if gone(k)]:
            del self.latest[key]

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(max_work=st.integers(1, 5))
    def reclaim(self, max_work: int) -> None:
        c = self.cache
        before, pending, discarded = len(c), c.reclaim_pending, c.discarded
        work = c.reclaim(max_work)
        assert work == min(max_work, pending) and c.reclaim_pending == pending - work
        assert len(c) == before - (c.discarded - discarded)

    @invariant()
    def bounded(self) -> None:
        if hasattr(self, "cache"):
            assert self.cache.used_bytes <= self.cache.settings.budget_bytes
            self.cache._check_invariants()


CacheSafetyMachine.TestCase.settings = hypothesis_settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
test_cache_safety = CacheSafetyMachine.TestCase


# -- fences (cluster: logical shards that moved away) -----------------------------


def odd(key: str) -> bool:
    return int(key[1:]) % 2 == 1


def test_a_fence_hides_what_it_names_at_once_and_reclaim_frees_it() -> None:
    c = make()
    for i in range(10):
        c.set(f"k{i}", b"v", 0.0, ttl=50.0 if i % 3 else None)
    used = c.used_bytes
    c.fence(odd)
    # Nothing freed yet, nothing named served any more: get, ttl, delete, xx, nx.
    assert c.used_bytes == used and len(c) == 10 and c.reclaim_pending == 10
    assert c.get("k1", 1.0) is None and c.ttl("k3", 1.0) is None
    assert c.delete("k5", 1.0) is False and c.set("k7", b"x", 1.0, xx=True) is False
    assert c.set("k9", b"new", 1.0, nx=True) is True  # absent: a new entry
    # The five named entries are gone (found by these calls), the rest waits.
    assert c.discarded == 5
    assert c.used_bytes == used - 5 * cost("k1", b"v") + cost("k9", b"new")
    assert c.get("k0", 1.0) == b"v" and c.ttl("k2", 1.0) == 49.0  # not named: kept
    c._check_invariants()
    assert c.reclaim_pending == 4  # k2 k4 k6 k8 (k0 was used: it is live again)
    assert c.reclaim(3) == 3 and c.reclaim_pending == 1  # bounded
    assert c.reclaim(100) == 1 and c.reclaim_pending == 0 and c.reclaim(100) == 0
    c._check_invariants()
    assert sorted(c._entries) == ["k0", "k2", "k4", "k6", "k8", "k9"]
    assert c.get("k9", 1.0) == b"new"  # stored after the fence: no fence names it
    assert c.deletes == c.evictions == c.expirations == 0
    assert c.take_discarded() == 5 and c.discarded == 0


def test_reclaim_frees_the_named_entries_bytes() -> None:
    c = make()
    for i in range(10):
        c.set(f"k{i}", b"v", 0.0, ttl=50.0 if i % 3 else None)
    c.fence(odd)
    assert c.reclaim(10) == 10 and len(c) == 5 and c.discarded == 5
    assert c.used_bytes == 5 * cost("k0", b"v")
    c._check_invariants()


def test_reclaim_keeps_the_lru_order_of_what_survives() -> None:
    c = make()
    for i in range(8):
        c.set(f"k{i}", b"v", 0.0)
    c.get("k0", 0.0)  # order: k1..k7, k0
    c.fence(odd)
    c.set("n", b"v", 0.0)
    c.get("k4", 0.0)  # a hit moves it to the live dict's MRU end
    while c.reclaim(2):
        pass
    assert list(c._entries) == ["k2", "k6", "k0", "n", "k4"]
    # The oldest go first: layers before the live dict.
    c.fence(lambda k: False)  # names nothing: one layer again
    c.set("m", b"v", 0.0)
    c.trim_bytes(2 * cost("k2", b"v"))
    assert c.get("k2", 0.0) is None and c.get("k6", 0.0) is None and c.get("m", 0.0) == b"v"
    assert c.evictions == 2
    c._check_invariants()


def test_a_second_fence_names_older_entries_but_spares_newer_ones() -> None:
    c = make()
    c.set("k1", b"old", 0.0)
    c.set("k2", b"old", 0.0)
    c.fence(odd)
    c.set("k1", b"new", 0.0)  # the shard came back: a new entry
    c.set("k3", b"new", 0.0)
    c.fence(lambda k: k == "k2")  # another shard goes
    assert c.get("k1", 0.0) == b"new" and c.get("k3", 0.0) == b"new"
    assert c.get("k2", 0.0) is None
    while c.reclaim(1):
        pass
    assert sorted(c._entries) == ["k1", "k3"] and c.get("k1", 0.0) == b"new"
    c._check_invariants()


def test_eviction_drops_fenced_entries_without_counting_them() -> None:
    one = cost("k0", b"v" * 10)
    c = make(budget=4 * one)
    for i in range(4):
        c.set(f"k{i}", b"v" * 10, 0.0)
    c.fence(lambda k: k in ("k0", "k1"))
    c.set("k4", b"v" * 10, 0.0)  # full: the oldest (fenced k0) makes room
    assert (c.evictions, c.discarded) == (0, 1) and len(c) == 4
    c.set("k5", b"v" * 10, 0.0)
    c.set("k6", b"v" * 10, 0.0)
    assert (c.evictions, c.discarded) == (1, 2)  # k1 dropped, k2 evicted
    c._check_invariants()


def test_the_expiry_sweep_reclaims_fenced_entries_too() -> None:
    c = make()
    c.set("k1", b"v", 0.0, ttl=1.0)
    c.set("k2", b"v", 0.0, ttl=1.0)
    c.fence(odd)
    assert c.sweep(5.0, 10) == 2 and len(c) == 0 and c.used_bytes == 0
    assert c.reclaim(10) == 0
    c._check_invariants()


def test_fence_layers_are_bounded_and_what_they_name_stays_gone() -> None:
    """Maps taking shards away faster than the sweep reclaims (a review finding: no cap,
    and every miss looks in each layer): at most MAX_FENCE_LAYERS layers; entries named
    by any fence never come back, the others stay."""
    from felix.shard.cache import MAX_FENCE_LAYERS

    c = make()
    rounds = 3 * MAX_FENCE_LAYERS
    for r in range(rounds):
        c.set(f"k{2 * r}", b"v", 0.0)  # named by no fence
        c.set(f"k{2 * r + 1}", b"v", 0.0)  # named by the fence right after
        c.fence(f"k{2 * r + 1}".__eq__)
        assert len(c._old) <= MAX_FENCE_LAYERS
        c._check_invariants()
    for r in range(rounds):
        assert c.get(f"k{2 * r + 1}", 0.0) is None
        assert c.get(f"k{2 * r}", 0.0) == b"v"
    while c.reclaim(100):
        pass
    assert len(c) == rounds and c.used_bytes == sum(cost(f"k{2 * r}", b"v") for r in range(rounds))
    c._check_invariants()
