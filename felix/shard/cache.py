"""One cache's key/value store inside a shard: TTLs, a byte budget, LRU eviction.

How it works
------------
A :class:`CachePartition` is sans-IO: every call takes ``now``, a monotonic time in
seconds supplied by the caller, and nothing reads a clock. One shard holds many
partitions (one per tenant/namespace/cache it owns) and uses them from one thread.

* **Entries** live in an ``OrderedDict`` kept in least-recently-used order: a hit
  or a store moves the key to the end, eviction pops from the front. Each value is a
  ``(value, expires_at, size)`` tuple; ``expires_at`` is ``math.inf`` for no expiry.
* **Expiry is checked on every access**: a key is readable while ``now <
  expires_at`` and never after, whether or not the sweeper has run. Inside a
  partition time never runs backwards: a ``now`` lower than one already seen (or
  NaN) is replaced by the highest ``now`` seen, so a caller whose clock steps back
  cannot make an expired key readable again. Expiry is relative to the monotonic
  ``now``, so wall-clock jumps do not affect it at all.
* **Reclamation** of expired keys nobody touches is done by :meth:`CachePartition.sweep`
  from a timer, in bounded steps. Keys with a TTL are indexed by the whole second
  their expiry falls in (``floor(expires_at)``) in a dict of small sets; the sweeper
  walks those second-buckets in order, up to the current second, and drops their
  keys. Overwrites and deletes remove a key from its bucket exactly, so unlike a
  lazily-cleaned heap the index never holds stale items and its size is bounded by
  the number of entries. An expired key is reclaimed by the first sweep after the
  second it expires in has passed (or sooner, if it is accessed or evicted).
* **Memory** is a byte budget on exactly accounted bytes: an entry costs
  ``len(key in UTF-8) + len(value) + ENTRY_OVERHEAD``. A store evicts least recently
  used entries until the new entry fits; the budget is never exceeded.
* **Fences** (a cluster node whose logical shards move away, felix/shard/core.py):
  :meth:`CachePartition.fence` gives up, at once and in O(1), every entry held now
  whose key a predicate names. The entries held move, as one dict, into an *old
  layer* that remembers the predicate; new stores go to a fresh dict. A lookup that
  misses the live dict looks in the old layers: an entry there that the predicate of
  its layer names is dropped and reported missing (so nothing of a lost shard is ever
  served again, and a later store of the key is a new entry that no fence names);
  any other is used where it is (a get, being a use, moves it into the live dict). A
  get that hits the live dict (the hot path) costs nothing more, a miss one check.
  :meth:`CachePartition.reclaim` frees the old layers in bounded steps (from the
  core's sweep): each step pops one entry off the newest layer's MRU end and drops it
  or puts it at the LRU end of the live dict, so the LRU order of what survives is
  kept. Layers are older than the live dict: eviction
  takes from the oldest layer first. A fence while layers remain adds its predicate
  to each of them (their entries are older than it too). At most
  :data:`MAX_FENCE_LAYERS` layers: a fence beyond that first reclaims the newest one
  whole.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from felix.errors import BadRequest, TooLarge
from felix.names import validate_key

__all__ = ["ENTRY_OVERHEAD", "CachePartition", "CacheSettings", "CacheStats", "entry_size"]

#: Accounted bytes per entry on top of its key and value: the str and bytes object
#: headers, the entry tuple, the expiry float, the dict slot and OrderedDict link and
#: the expiry index slot (about 220 bytes measured with tracemalloc on CPython 3.11).
ENTRY_OVERHEAD: Final = 224
#: Old layers a partition keeps at most (a miss looks in each). A fence beyond it
#: first reclaims the newest layer whole: O(its entries), once per fence, only while
#: maps keep taking shards away faster than the sweep reclaims them.
MAX_FENCE_LAYERS: Final = 8

_MIB = 1024 * 1024
_INF: Final = math.inf

# (value, expires_at, accounted size); a plain tuple is the cheapest record CPython has.
_Entry: TypeAlias = tuple[bytes, float, int]


def entry_size(key_bytes: int, value_bytes: int) -> int:
    """Accounted bytes of one entry, given its key's UTF-8 length and its value's length."""
    return key_bytes + value_bytes + ENTRY_OVERHEAD


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a size is always a mistake.
    return type(value) is int


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Limits and defaults of one cache.

    Attributes:
        budget_bytes: most accounted bytes the partition holds (see :func:`entry_size`).
        max_key_bytes: longest key, in UTF-8 bytes.
        max_value_bytes: longest value, in bytes (0 allows only empty values).
        default_ttl: seconds a key lives when a store gives no TTL; ``None`` means
            keys stored without a TTL never expire.
        max_ttl: longest TTL a store may ask for, in seconds.

    Raises:
        BadRequest: from ``__post_init__`` when a field is out of range (TTLs must be
            finite and positive, and ``default_ttl <= max_ttl``).
    """

    budget_bytes: int = 64 * _MIB
    max_key_bytes: int = 1024
    max_value_bytes: int = 1 * _MIB
    default_ttl: float | None = None
    max_ttl: float = 30 * 86_400.0

    def __post_init__(self) -> None:
        if not _is_int(self.budget_bytes) or self.budget_bytes < 1:
            raise BadRequest(f"budget_bytes must be an integer >= 1, got {self.budget_bytes!r}")
        if not _is_int(self.max_key_bytes) or self.max_key_bytes < 1:
            raise BadRequest(f"max_key_bytes must be an integer >= 1, got {self.max_key_bytes!r}")
        if not _is_int(self.max_value_bytes) or self.max_value_bytes < 0:
            raise BadRequest(
                f"max_value_bytes must be an integer >= 0, got {self.max_value_bytes!r}"
            )
        if not _is_seconds(self.max_ttl):
            raise BadRequest(f"max_ttl must be a finite number > 0, got {self.max_ttl!r}")
        if self.default_ttl is not None and (
            not _is_seconds(self.default_ttl) or self.default_ttl > self.max_ttl
        ):
            raise BadRequest(
                f"default_ttl must be None or a number in (0, max_ttl={self.max_ttl}], "
                f"got {self.default_ttl!r}"
            )


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a partition's counters and size.

    ``hits``/``misses`` count :meth:`CachePartition.get` calls; ``sets`` counts stores
    that happened, ``deletes`` deletes of a live key; ``evictions`` counts live
    entries dropped to make room; ``expirations`` counts expired entries removed
    (on access, by the sweeper, or found at the LRU end when making room).
    ``entries`` and ``used_bytes`` include expired entries not yet reclaimed.
    """

    hits: int
    misses: int
    sets: int
    deletes: int
    evictions: int
    expirations: int
    entries: int
    used_bytes: int
    budget_bytes: int


@dataclass(slots=True)
class _Layer:
    """Entries held when a fence came (in LRU order), and the fences that name some."""

    entries: OrderedDict[str, _Entry]
    gone: list[Callable[[str], bool]] = field(default_factory=list)

    def stale(self, key: str) -> bool:
        return any(gone(key) for gone in self.gone)


class CachePartition:
    """One cache's key/value store with TTLs and an LRU byte budget (sans-IO).

    Keys are ``str`` (checked by :func:`felix.names.validate_key`), values are
    ``bytes``. Every method takes ``now``, monotonic seconds from the caller; see the
    module docstring for how time, expiry and eviction work.

    Counters (``hits``, ``misses``, ``sets``, ``deletes``, ``evictions``,
    ``expirations``) and ``used_bytes`` are plain attributes, read them directly or
    take a :meth:`stats` snapshot. Not thread-safe: one shard owns it.
    """

    __slots__ = (
        "_buckets",
        "_budget",
        "_default_ttl",
        "_entries",
        "_max_key_bytes",
        "_max_ttl",
        "_max_value_bytes",
        "_now",
        "_old",
        "_sweep_at",
        "deletes",
        "discarded",
        "evictions",
        "expirations",
        "hits",
        "misses",
        "sets",
        "settings",
        "used_bytes",
    )

    def __init__(self, settings: CacheSettings | None = None) -> None:
        if settings is None:
            settings = CacheSettings()
        self.settings = settings
        # Copies of the hot settings: a slot read is cheaper than settings.x.
        self._budget = settings.budget_bytes
        self._max_key_bytes = settings.max_key_bytes
        self._max_value_bytes = settings.max_value_bytes
        self._default_ttl = settings.default_ttl
        self._max_ttl = settings.max_ttl
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Entries held when fences came, oldest layer first (see the module docstring);
        # a key is in at most one of _entries and the layers.
        self._old: list[_Layer] = []
        # Expiry index: floor(expires_at) -> keys expiring in that second. Exactly
        # the entries with a finite expiry, each in one bucket.
        self._buckets: dict[int, set[str]] = {}
        # The sweeper's position: no bucket below it exists.
        self._sweep_at = 0
        self._now = -_INF  # highest `now` seen; time never runs backwards in here
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.sets = 0
        self.deletes = 0
        self.evictions = 0
        self.expirations = 0
        #: Entries dropped because a fence named them (not deletes, evictions or
        #: expirations); the core takes it (:meth:`take_discarded`).
        self.discarded = 0

    def __len__(self) -> int:
        """Entries held, including expired and fenced ones not yet reclaimed."""
        return len(self._entries) + sum(len(layer.entries) for layer in self._old)

    def __repr__(self) -> str:
        return (
            f"CachePartition(entries={len(self._entries)}, used_bytes={self.used_bytes}, "
            f"budget_bytes={self._budget})"
        )

    def stats(self) -> CacheStats:
        """A snapshot of the counters and the current size."""
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            sets=self.sets,
            deletes=self.deletes,
            evictions=self.evictions,
            expirations=self.expirations,
            entries=len(self),
            used_bytes=self.used_bytes,
            budget_bytes=self._budget,
        )

    def _clock(self, now: float) -> float:
        """Return the time to use for this call: ``now``, but never earlier than before."""
        if now >= self._now:
            if now == _INF:
                raise ValueError("now must be finite")
            self._now = now
            return now
        return self._now  # `now` went backwards or is NaN

    # -- operations --------------------------------------------------------------

    def get(self, key: str, now: float) -> bytes | None:
        """Return the value of ``key``, or ``None`` if it is missing or expired.

        A hit makes the key the most recently used. An expired key found here is
        removed (counted in ``expirations``) and reported missing.

        Raises:
            BadRequest, TooLarge: ``key`` is invalid (see :func:`validate_key`).
        """
        # The clock and key checks are inlined on the two hottest calls (get, set):
        # a Python function call costs about as much as the rest of a hit.
        if now >= self._now:
            if now == _INF:
                raise ValueError("now must be finite")
            self._now = now
        else:
            now = self._now
        if not (type(key) is str and key.isascii() and 0 < len(key) <= self._max_key_bytes):
            validate_key(key, self._max_key_bytes)
        entry = self._entries.get(key)
        if entry is None and (not self._old or (entry := self._promote(key)) is None):
            self.misses += 1
            return None
        if entry[1] <= now:
            self._remove(key, entry)
            self.expirations += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def set(
        self,
        key: str,
        value: bytes,
        now: float,
        *,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> bool:
        """Store ``value`` under ``key``; return whether it was stored.

        ``ttl`` is the key's lifetime in seconds from ``now``; when ``None`` the
        cache's ``default_ttl`` applies, and if that is ``None`` too the key never
        expires. With ``nx`` the store happens only if the key is absent (or
        expired), with ``xx`` only if it is present and live; a refused conditional
        store returns ``False`` and changes nothing. A store replaces the value and
        the expiry, and makes the key the most recently used. Least recently used
        entries are evicted until the new entry fits in the byte budget.

        Raises:
            BadRequest: ``nx`` and ``xx`` are both set; ``ttl`` is not in
                ``(0, max_ttl]``; ``key`` is empty or not UTF-8 encodable.
            TooLarge: the key exceeds ``max_key_bytes``, the value exceeds
                ``max_value_bytes``, or the entry alone exceeds the byte budget.
            TypeError: ``value`` is not ``bytes`` (a buffer such as a memoryview would
                alias memory the caller is about to reuse).
        """
        if nx and xx:
            raise BadRequest("nx (only if absent) and xx (only if present) exclude each other")
        if now >= self._now:
            if now == _INF:
                raise ValueError("now must be finite")
            self._now = now
        else:
            now = self._now
        if type(key) is str and key.isascii() and 0 < len(key) <= self._max_key_bytes:
            key_bytes = len(key)
        else:
            key_bytes = validate_key(key, self._max_key_bytes)
        if not isinstance(value, bytes):
            raise TypeError(f"cache value must be bytes, not {type(value).__name__}")
        value_bytes = len(value)
        if value_bytes > self._max_value_bytes:
            raise TooLarge(
                f"cache value of {value_bytes} bytes exceeds the limit of "
                f"{self._max_value_bytes} bytes"
            )
        size = key_bytes + value_bytes + ENTRY_OVERHEAD
        if size > self._budget:
            raise TooLarge(
                f"cache entry of {size} bytes exceeds the cache's budget of {self._budget} bytes"
            )
        if ttl is None:
            ttl = self._default_ttl
        if ttl is None:
            expires_at = _INF
        else:
            # Written so that NaN fails too.
            if not 0 < ttl <= self._max_ttl:
                raise BadRequest(f"ttl must be in (0, {self._max_ttl}] seconds, got {ttl!r}")
            expires_at = now + ttl

        entries = self._entries
        old = entries.get(key)
        if old is None and self._old:
            old = self._find_old(key)
        if old is not None and old[1] <= now:
            self._remove(key, old)
            self.expirations += 1
            old = None
        if old is None:
            if xx:
                return False
        else:
            if nx:
                return False
            self._remove(key, old)

        if self.used_bytes + size > self._budget:
            self._evict(size, now)
        entries[key] = (value, expires_at, size)
        self.used_bytes += size
        if expires_at != _INF:
            bucket_id = math.floor(expires_at)
            bucket = self._buckets.get(bucket_id)
            if bucket is None:
                self._buckets[bucket_id] = {key}
                if bucket_id < self._sweep_at:
                    self._sweep_at = bucket_id
            else:
                bucket.add(key)
        self.sets += 1
        return True

    def delete(self, key: str, now: float) -> bool:
        """Remove ``key``; return whether a live (unexpired) entry was removed.

        Raises:
            BadRequest, TooLarge: ``key`` is invalid (see :func:`validate_key`).
        """
        now = self._clock(now)
        validate_key(key, self._max_key_bytes)
        entry = self._entries.get(key)
        if entry is None and self._old:
            entry = self._find_old(key)
        if entry is None:
            return False
        self._remove(key, entry)
        if entry[1] <= now:
            self.expirations += 1
            return False
        self.deletes += 1
        return True

    def ttl(self, key: str, now: float) -> float | None:
        """Return the seconds ``key`` has left, ``math.inf`` if it never expires,
        or ``None`` if it is missing or expired.

        Does not count as a use: LRU order and hit/miss counters are unchanged.

        Raises:
            BadRequest, TooLarge: ``key`` is invalid (see :func:`validate_key`).
        """
        now = self._clock(now)
        validate_key(key, self._max_key_bytes)
        entry = self._entries.get(key)
        if entry is None and self._old:
            entry = self._find_old(key)
        if entry is None:
            return None
        expires_at = entry[1]
        if expires_at <= now:
            self._remove(key, entry)
            self.expirations += 1
            return None
        return expires_at - now if expires_at != _INF else _INF

    def sweep(self, now: float, max_work: int) -> int:
        """Reclaim expired entries with at most ``max_work`` units of work.

        Meant to run from a timer: each call does bounded work, so it never stalls
        the shard, and calls resume where the previous one stopped. One unit is one
        entry removed, one empty second of the expiry index stepped over, or (when
        many empty seconds lie ahead, after an idle period or a clock jump) one
        indexed second looked at to find the next non-empty one. Entries
        whose expiry lies in a second that has fully passed (``floor(expires_at) <
        floor(now)``) are reclaimed; younger expired entries wait for a later sweep
        (or are removed when accessed). Returns the number of entries removed, each
        counted in ``expirations``.

        Raises:
            ValueError: ``max_work`` is below 1.
        """
        if max_work < 1:
            raise ValueError(f"max_work must be >= 1, got {max_work}")
        now = self._clock(now)
        limit = math.floor(now)  # every key in a bucket below this has expired
        buckets = self._buckets
        entries = self._entries
        bucket_id = self._sweep_at
        work = 0
        removed = 0
        freed = 0
        while bucket_id < limit and work < max_work:
            bucket = buckets.get(bucket_id)
            if bucket is None:
                if not buckets:
                    bucket_id = limit
                elif limit - bucket_id > len(buckets) and len(buckets) <= max_work - work:
                    # After a long idle period, finding the next bucket directly is
                    # cheaper than stepping over every empty second in between.
                    work += len(buckets)
                    bucket_id = min(min(buckets), limit)
                else:
                    work += 1
                    bucket_id += 1
                continue
            while bucket and work < max_work:
                key = bucket.pop()
                entry = entries.pop(key, None)
                freed += (self._pop_old(key) if entry is None else entry)[2]
                removed += 1
                work += 1
            if bucket:
                break  # out of work; resume in this bucket next time
            del buckets[bucket_id]
            bucket_id += 1
        self._sweep_at = bucket_id
        self.used_bytes -= freed
        self.expirations += removed
        return removed

    def fence(self, gone: Callable[[str], bool]) -> None:
        """Give up every entry held now whose key ``gone`` names, at once: no get, ttl,
        set or delete finds one again (a store after the fence is a new entry, which
        this fence does not name). O(old layers): the memory is freed by
        :meth:`reclaim` (and by lookups and eviction meanwhile); until then the
        entries count in ``used_bytes`` and ``len``. Dropped entries are counted in
        ``discarded``, not as deletes, evictions or expirations."""
        if self._entries:
            while len(self._old) >= MAX_FENCE_LAYERS:
                # Bounded: the newest layer's survivors join the live entries (at their
                # LRU end), which this fence then turns into one layer with them.
                self.reclaim(len(self._old[-1].entries))
        for layer in self._old:
            layer.gone.append(gone)
        if self._entries:
            self._old.append(_Layer(self._entries, [gone]))
            self._entries = OrderedDict()

    @property
    def reclaim_pending(self) -> int:
        """Entries in old layers, still to be looked at by :meth:`reclaim`."""
        return sum(len(layer.entries) for layer in self._old)

    def reclaim(self, max_work: int) -> int:
        """Look at up to ``max_work`` entries of the old layers (newest layer first,
        from its MRU end): drop those a fence names, put the others at the LRU end of
        the live entries (their order kept). Returns the entries looked at."""
        entries = self._entries
        work = dropped = freed = 0
        while self._old and work < max_work:
            layer = self._old[-1]
            held = layer.entries
            # One fence per layer is the usual case: call it without the any() around.
            stale = layer.gone[0] if len(layer.gone) == 1 else layer.stale
            while held and work < max_work:
                key, entry = held.popitem()
                work += 1
                if stale(key):
                    dropped += 1
                    freed += entry[2]
                    if entry[1] != _INF:
                        self._unindex(key, entry[1])
                else:
                    entries[key] = entry
                    entries.move_to_end(key, last=False)
            if not held:
                self._old.pop()
        self.used_bytes -= freed
        self.discarded += dropped
        return work

    def take_discarded(self) -> int:
        """Entries a fence dropped since the last call."""
        dropped, self.discarded = self.discarded, 0
        return dropped

    # -- internals -----------------------------------------------------------------

    def _find_old(self, key: str) -> _Entry | None:
        """``key``'s entry in an old layer, left where it is; None if it is in none, or
        a fence of its layer names it (then it is dropped)."""
        for i, layer in enumerate(self._old):
            entry = layer.entries.get(key)
            if entry is None:
                continue
            if layer.stale(key):
                del layer.entries[key]
                if not layer.entries:
                    del self._old[i]
                self.used_bytes -= entry[2]
                if entry[1] != _INF:
                    self._unindex(key, entry[1])
                self.discarded += 1
                return None
            return entry
        return None

    def _promote(self, key: str) -> _Entry | None:
        """:meth:`_find_old`, and the entry found moved into the live entries (a hit:
        the caller makes it the most recently used)."""
        entry = self._find_old(key)
        if entry is not None:
            self._pop_old(key)
            self._entries[key] = entry
        return entry

    def _pop_old(self, key: str) -> _Entry:
        """Take ``key``'s entry out of the old layer holding it (the sweeper found it
        expired: it goes, whatever a fence says)."""
        for i, layer in enumerate(self._old):
            entry = layer.entries.pop(key, None)
            if entry is not None:
                if not layer.entries:
                    del self._old[i]
                return entry
        raise KeyError(key)

    def _remove(self, key: str, entry: _Entry) -> None:
        """Drop ``key`` (whose current entry is ``entry``) from the dict and the index."""
        try:
            del self._entries[key]
        except KeyError:
            self._pop_old(key)  # found in an old layer
        self.used_bytes -= entry[2]
        if entry[1] != _INF:
            self._unindex(key, entry[1])

    def _unindex(self, key: str, expires_at: float) -> None:
        bucket_id = math.floor(expires_at)
        bucket = self._buckets[bucket_id]
        bucket.remove(key)
        if not bucket:
            del self._buckets[bucket_id]

    def _evict(self, size: int, now: float) -> None:
        """Pop least recently used entries until ``size`` more bytes fit the budget."""
        if self._old:
            self._evict_old(size, now)
        popitem = self._entries.popitem
        budget = self._budget
        used = self.used_bytes
        while used + size > budget:
            key, entry = popitem(last=False)
            used -= entry[2]
            expires_at = entry[1]
            if expires_at != _INF:
                self._unindex(key, expires_at)
            if expires_at <= now:
                self.expirations += 1
            else:
                self.evictions += 1
        self.used_bytes = used

    def _evict_old(self, size: int, now: float) -> None:
        """:meth:`_evict` from the old layers first (older than every live entry):
        entries a fence names are dropped (counted in ``discarded``), not evicted."""
        while self._old and self.used_bytes + size > self._budget:
            layer = self._old[0]
            key, entry = layer.entries.popitem(last=False)
            if not layer.entries:
                del self._old[0]
            self.used_bytes -= entry[2]
            expires_at = entry[1]
            if expires_at != _INF:
                self._unindex(key, expires_at)
            if layer.stale(key):
                self.discarded += 1
            elif expires_at <= now:
                self.expirations += 1
            else:
                self.evictions += 1

    @property
    def held_bytes(self) -> int:
        """Accounted bytes held (what the shard charges the cache's tenant)."""
        return self.used_bytes

    def trim_bytes(self, nbytes: int) -> int:
        """Evict least recently used entries until ``nbytes`` are freed (or none is left).

        For the memory quotas of the shard (felix/shard/tenants.py): the cache's own
        budget is a cap, and this makes it give memory back below it. Returns the
        bytes freed.
        """
        if nbytes <= 0 or not len(self):
            return 0
        before = self.used_bytes
        # _evict(size) frees until `size` more bytes fit: ask for room for exactly
        # `nbytes` below what is held now.
        self._evict(self._budget - before + min(nbytes, before), self._now)
        return before - self.used_bytes

    def _check_invariants(self) -> None:
        """Assert the internal bookkeeping is consistent (for tests; O(entries))."""
        total = 0
        expected: dict[int, set[str]] = {}
        held = [self._entries, *(layer.entries for layer in self._old)]
        assert all(held[1:]), "an empty old layer is kept"
        assert sum(len(h) for h in held) == len({k for h in held for k in h})
        for key, (value, expires_at, size) in ((k, e) for h in held for k, e in h.items()):
            assert size == entry_size(len(key.encode("utf-8")), len(value))
            total += size
            if expires_at != _INF:
                expected.setdefault(math.floor(expires_at), set()).add(key)
        assert total == self.used_bytes <= self._budget
        assert expected == self._buckets
        assert all(bucket_id >= self._sweep_at for bucket_id in self._buckets)
