"""One stream's in-memory append-only log: offsets, a bounded replay ring, cursors.

How it works
------------
A :class:`StreamLog` is owned by exactly one shard worker and used from one thread.
Every appended record gets the next offset; offsets are contiguous and never reused.
Only the newest records are retained, in a replay ring bounded both by a record
count and by a byte size (:class:`StreamSettings`); when an append would exceed
either bound the oldest records are evicted first (subscribers that were reading
them see a gap, reported as ``CursorError("too_old", ...)`` by :meth:`StreamLog.read`).

The ring is three parallel Python lists used as one circular buffer whose capacity
is a power of two (so a slot index is ``(head + i) & mask``): payloads, headers and
the *cumulative* accounted byte count at each record. Storing cumulative counts
instead of sizes makes the byte size of any run of records one subtraction, so
:meth:`StreamLog.read` finds where ``max_bytes`` cuts a batch with a C-speed
``bisect`` and copies the batch out with list slices: O(log n) plus a memcpy of
pointers, with no per-record Python work. The lists start small and double up to
the record bound; they never shrink (at most 8 bytes per slot and list, freed with
the log).

Byte accounting is exact and deterministic, so a node-wide memory budget can sum it:
a record costs ``RECORD_OVERHEAD + len(payload)`` plus, for each header,
``HEADER_OVERHEAD + len(name) + len(value)`` with names and values counted in UTF-8
bytes. The overheads approximate what CPython spends beyond the raw bytes (measured
on 3.11: a bytes object header is 33 bytes, the three list slots 24, the cumulative
int 32; each header adds two str objects of 49 bytes plus its dict slot), so that
many tiny records still count for the memory they take.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Final, Literal, TypeAlias, TypeVar

from felix.errors import BadRequest, CursorError, TooLarge
from felix.wire import StartAtTime

__all__ = [
    "HEADER_OVERHEAD",
    "MAX_DEDUP_ENTRIES",
    "MAX_DEDUP_WINDOW_S",
    "MAX_OFFSET",
    "RECORD_OVERHEAD",
    "RecordBatch",
    "SlowSubscriberPolicy",
    "Start",
    "StreamLog",
    "StreamSettings",
    "record_size",
]

#: Accounted bytes per record on top of its payload and headers.
RECORD_OVERHEAD: Final = 96
#: Accounted bytes per header entry on top of its name and value.
HEADER_OVERHEAD: Final = 128
#: Largest offset a log issues (offsets travel as signed 64-bit integers).
MAX_OFFSET: Final = 2**63 - 1

_MIB = 1024 * 1024
#: Bounds of the dedup settings (felix/shard/dedup.py).
MAX_DEDUP_WINDOW_S: Final = 7 * 86_400.0
MAX_DEDUP_ENTRIES: Final = 10_000_000

SlowSubscriberPolicy: TypeAlias = Literal["drop_old", "disconnect", "block"]
#: Where a subscription starts: ``"latest"`` (only new records), ``"earliest"``
#: (the oldest retained record) or an absolute offset.
Start: TypeAlias = int | Literal["latest", "earliest"] | StartAtTime

_POLICIES: Final = ("drop_old", "disconnect", "block")
_INITIAL_CAPACITY: Final = 16
_T = TypeVar("_T")
# Evictions up to this many records clear slots one by one; more use slice fills,
# which cost more to set up but less per record.
_SMALL_DROP: Final = 8


def _check_count(field: str, value: object, minimum: int = 1) -> None:
    # bool is an int subclass; True as a size is always a mistake.
    if type(value) is not int or value < minimum:
        raise BadRequest(f"{field} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Per-stream limits of the in-memory log and the subscriber policy.

    Attributes:
        replay_max_records: most records the replay ring retains (>= 1).
        replay_max_bytes: most accounted bytes the replay ring retains (see
            :func:`record_size`).
        max_record_bytes: largest payload plus header bytes (UTF-8) of one record,
            not counting the fixed overheads. Must leave room for one record in the
            ring: ``max_record_bytes + RECORD_OVERHEAD <= replay_max_bytes``.
        slow_subscriber_policy: what a gateway does when a subscriber falls behind
            its bound: ``"drop_old"`` skips it forward with a visible gap in
            offsets, ``"disconnect"`` ends the subscription with an error,
            ``"block"`` holds the publisher back (opt-in; slows every subscriber).
        dedup_window_s: how long the stream remembers the message ids
            (``felix-msg-id``) it stored, to drop a publish of one again
            (felix/shard/dedup.py); 0 turns duplicate suppression off.
        dedup_max_entries: most message ids remembered; the oldest are forgotten first.

    Raises:
        BadRequest: from ``__post_init__`` when a field is out of range.
    """

    replay_max_records: int = 100_000
    replay_max_bytes: int = 64 * _MIB
    max_record_bytes: int = 1 * _MIB
    slow_subscriber_policy: SlowSubscriberPolicy = "drop_old"
    dedup_window_s: float = 120.0
    dedup_max_entries: int = 100_000

    def __post_init__(self) -> None:
        _check_count("replay_max_records", self.replay_max_records)
        _check_count("replay_max_bytes", self.replay_max_bytes, RECORD_OVERHEAD + 1)
        _check_count("max_record_bytes", self.max_record_bytes)
        if self.max_record_bytes + RECORD_OVERHEAD > self.replay_max_bytes:
            raise BadRequest(
                f"max_record_bytes ({self.max_record_bytes}) plus the record overhead "
                f"({RECORD_OVERHEAD}) must fit in replay_max_bytes ({self.replay_max_bytes})"
            )
        if self.slow_subscriber_policy not in _POLICIES:
            raise BadRequest(
                f"slow_subscriber_policy must be one of {', '.join(_POLICIES)}, "
                f"got {self.slow_subscriber_policy!r}"
            )
        window = self.dedup_window_s
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise BadRequest(f"dedup_window_s must be a number of seconds, got {window!r}")
        if not 0 <= window <= MAX_DEDUP_WINDOW_S:
            raise BadRequest(
                f"dedup_window_s must be within 0..{MAX_DEDUP_WINDOW_S:g} seconds "
                f"(0: off), got {window!r}"
            )
        _check_count("dedup_max_entries", self.dedup_max_entries)
        if self.dedup_max_entries > MAX_DEDUP_ENTRIES:
            raise BadRequest(
                f"dedup_max_entries must be <= {MAX_DEDUP_ENTRIES}, got {self.dedup_max_entries}"
            )


def _utf8_len(text: str) -> int:
    # isascii() is O(1) in CPython; only non-ASCII text pays for an encode.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _headers_bytes(headers: Mapping[str, str]) -> int:
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise BadRequest("record header names and values must be strings")
        try:
            size += HEADER_OVERHEAD + _utf8_len(name) + _utf8_len(value)
        except UnicodeEncodeError:
            raise BadRequest("record header is not encodable as UTF-8") from None
    return size


def record_size(payload: bytes, headers: Mapping[str, str] | None = None) -> int:
    """Accounted bytes of one record: the unit of every byte bound in this module.

    ``RECORD_OVERHEAD + len(payload)`` plus ``HEADER_OVERHEAD + len(name) +
    len(value)`` per header, names and values in UTF-8 bytes.
    """
    return RECORD_OVERHEAD + len(payload) + (_headers_bytes(headers) if headers else 0)


class RecordBatch:
    """Consecutive records read from a :class:`StreamLog`.

    Record ``i`` has offset ``first_offset + i``, payload ``payloads[i]`` and headers
    ``headers[i]`` (``None`` when it has none). ``nbytes`` is the accounted size of
    the batch (:func:`record_size` summed). The lists are fresh copies owned by the
    caller; the payloads and header mappings are shared with the log and must not be
    mutated.
    """

    __slots__ = ("first_offset", "headers", "nbytes", "payloads")

    def __init__(
        self,
        first_offset: int,
        payloads: list[bytes],
        headers: list[Mapping[str, str] | None],
        nbytes: int,
    ) -> None:
        self.first_offset = first_offset
        self.payloads = payloads
        self.headers = headers
        self.nbytes = nbytes

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def next_offset(self) -> int:
        """The offset right after the last record (``first_offset`` when empty)."""
        return self.first_offset + len(self.payloads)

    def __iter__(self) -> Iterator[tuple[int, bytes, Mapping[str, str] | None]]:
        """Yield ``(offset, payload, headers)`` per record (allocates; not for hot paths)."""
        return zip(
            range(self.first_offset, self.first_offset + len(self.payloads)),
            self.payloads,
            self.headers,
            strict=True,
        )

    def __repr__(self) -> str:
        return (
            f"RecordBatch(first_offset={self.first_offset}, records={len(self.payloads)}, "
            f"nbytes={self.nbytes})"
        )


class StreamLog:
    """One stream's append-only log with a bounded in-memory replay ring.

    Offsets start at ``first_offset`` (after a shard restart, the stream's reserved
    mark from :class:`felix.shard.offsets.OffsetReservations`, so they never go
    backward) and grow by one per record. Not thread-safe: one shard owns it.

    Attributes (read-only):
        settings: the :class:`StreamSettings` in force.
        first_offset: offset of the first record this log ever issued (or will).
    """

    __slots__ = (
        "_cap",
        "_count",
        "_cums",
        "_earliest",
        "_evicted_cum",
        "_head",
        "_headers",
        "_mask",
        "_max_bytes",
        "_max_record_bytes",
        "_max_records",
        "_payloads",
        "_tail_cum",
        "first_offset",
        "settings",
    )

    def __init__(self, settings: StreamSettings | None = None, *, first_offset: int = 0) -> None:
        """Create an empty log whose first record will get ``first_offset``.

        Raises:
            BadRequest: ``first_offset`` is not an integer in ``[0, MAX_OFFSET]``.
        """
        if settings is None:
            settings = StreamSettings()
        _check_count("first_offset", first_offset, 0)
        if first_offset > MAX_OFFSET:
            raise BadRequest(f"first_offset must be <= {MAX_OFFSET}, got {first_offset}")
        self.settings = settings
        self.first_offset = first_offset
        self._max_records = settings.replay_max_records
        self._max_bytes = settings.replay_max_bytes
        self._max_record_bytes = settings.max_record_bytes
        cap = min(_INITIAL_CAPACITY, _pow2_at_least(self._max_records))
        self._cap = cap
        self._mask = cap - 1
        self._payloads: list[bytes] = [b""] * cap
        self._headers: list[Mapping[str, str] | None] = [None] * cap
        # _cums[slot] = accounted bytes appended to this log up to and including the
        # record in that slot. Strictly increasing along the ring (every record costs
        # at least RECORD_OVERHEAD), which is what makes bisect valid.
        self._cums: list[int] = [0] * cap
        self._head = 0  # slot of the oldest retained record
        self._count = 0  # retained records
        self._earliest = first_offset  # offset of the record in slot _head
        self._tail_cum = 0  # cumulative bytes through the newest record
        self._evicted_cum = 0  # cumulative bytes through the newest evicted record

    # -- state -----------------------------------------------------------------

    @property
    def earliest(self) -> int:
        """Offset of the oldest retained record; equals ``next_offset`` when none is."""
        return self._earliest

    @property
    def next_offset(self) -> int:
        """The offset the next appended record gets (the tail)."""
        return self._earliest + self._count

    @property
    def retained_records(self) -> int:
        """Records currently in the replay ring."""
        return self._count

    @property
    def retained_bytes(self) -> int:
        """Accounted bytes currently in the replay ring (exact; see :func:`record_size`)."""
        return self._tail_cum - self._evicted_cum

    @property
    def appended_records(self) -> int:
        """Records appended over the life of this log."""
        return self._earliest + self._count - self.first_offset

    @property
    def appended_bytes(self) -> int:
        """Accounted bytes appended over the life of this log."""
        return self._tail_cum

    @property
    def evicted_records(self) -> int:
        """Records evicted from the ring by either bound (the eviction counter)."""
        return self._earliest - self.first_offset

    @property
    def evicted_bytes(self) -> int:
        """Accounted bytes evicted from the ring."""
        return self._evicted_cum

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"StreamLog(earliest={self._earliest}, next_offset={self.next_offset}, "
            f"retained_bytes={self.retained_bytes})"
        )

    # -- writing ---------------------------------------------------------------

    def append(
        self,
        payloads: Sequence[bytes],
        headers: Sequence[Mapping[str, str] | None] | None = None,
    ) -> tuple[int, int]:
        """Append a batch of records; return ``(base_offset, count)``.

        The records get offsets ``base_offset .. base_offset + count - 1`` in order
        (``count == len(payloads)``). ``headers``, when given, has one entry per
        payload (``None`` or an empty mapping for a record without headers; empty
        mappings are stored as ``None``). The log keeps references to the payloads
        and header mappings: callers must not mutate them afterwards.

        The batch is all-or-nothing: it is validated in full before anything is
        stored. To make room, the oldest records are evicted until the ring holds at
        most ``replay_max_records`` records and ``replay_max_bytes`` bytes including
        the batch; a valid batch never evicts its own records.

        Raises:
            BadRequest: empty batch, ``headers`` of the wrong length, a header that is
                not ``str`` to ``str``, or the offset space is exhausted.
            TypeError: a payload is not ``bytes`` (a buffer such as a memoryview of a
                ring slot would alias memory that is about to be reused).
            TooLarge: a record's payload plus header bytes exceeds
                ``max_record_bytes``, or the whole batch exceeds either ring bound.
        """
        n = len(payloads)
        if n == 0:
            raise BadRequest("cannot append an empty batch")
        if n > self._max_records:
            raise TooLarge(
                f"batch of {n} records exceeds the replay ring of {self._max_records} records"
            )
        limit = self._max_record_bytes
        # First pass: validate everything and compute the cumulative byte counts, so
        # a bad record leaves the log untouched.
        cum = start_cum = self._tail_cum
        cums: list[int] = []
        push = cums.append
        stored_headers: list[Mapping[str, str] | None] | None = None
        if headers is None:
            for payload in payloads:
                if type(payload) is not bytes and not isinstance(payload, bytes):
                    raise TypeError(f"record payload must be bytes, not {type(payload).__name__}")
                size = len(payload)
                if size > limit:
                    raise TooLarge(f"record of {size} bytes exceeds the limit of {limit} bytes")
                cum += size + RECORD_OVERHEAD
                push(cum)
        else:
            if len(headers) != n:
                raise BadRequest(f"got {len(headers)} header entries for {n} payloads")
            stored_headers = []
            for payload, hdrs in zip(payloads, headers, strict=True):
                if not isinstance(payload, bytes):
                    raise TypeError(f"record payload must be bytes, not {type(payload).__name__}")
                size = len(payload) + (_headers_bytes(hdrs) if hdrs else 0)
                if size > limit:
                    raise TooLarge(f"record of {size} bytes exceeds the limit of {limit} bytes")
                cum += size + RECORD_OVERHEAD
                push(cum)
                stored_headers.append(hdrs or None)
        total = cum - start_cum
        if total > self._max_bytes:
            raise TooLarge(
                f"batch of {total} bytes exceeds the replay ring of {self._max_bytes} bytes"
            )
        base = self._earliest + self._count
        if base + n - 1 > MAX_OFFSET:
            raise BadRequest("stream offset space exhausted")

        # Evict once for the whole batch (same result as record by record, since
        # eviction is oldest-first and the batch itself fits).
        if (
            self._count + n > self._max_records
            or start_cum - self._evicted_cum + total > self._max_bytes
        ):
            self._evict_for(n, total)
        count = self._count
        if count + n > self._cap:
            self._grow(count + n)

        # Store with slice assignments (C loops). Free slots already hold b"" and
        # None, so a batch without headers does not touch the headers ring.
        slot = (self._head + count) & self._mask
        _ring_put(self._payloads, slot, payloads)
        _ring_put(self._cums, slot, cums)
        if stored_headers is not None:
            _ring_put(self._headers, slot, stored_headers)
        self._tail_cum = cum
        self._count = count + n
        return base, n

    def validate(
        self,
        payloads: Sequence[bytes],
        headers: Sequence[Mapping[str, str] | None] | None = None,
    ) -> int:
        """Check a batch as :meth:`append` would, without storing it; return its bytes.

        For durable streams, which write a batch to disk before appending it here: a
        batch :meth:`append` would refuse must never reach the disk. Raises what
        :meth:`append` raises for the batch itself.
        """
        n = len(payloads)
        if n == 0:
            raise BadRequest("cannot append an empty batch")
        if n > self._max_records:
            raise TooLarge(
                f"batch of {n} records exceeds the replay ring of {self._max_records} records"
            )
        if headers is not None and len(headers) != n:
            raise BadRequest(f"got {len(headers)} header entries for {n} payloads")
        limit = self._max_record_bytes
        for payload in payloads:
            if not isinstance(payload, bytes):
                raise TypeError(f"record payload must be bytes, not {type(payload).__name__}")
        if headers is None or not any(headers):
            # The common case in C loops: sizes are the payloads' lengths.
            largest = max(map(len, payloads))
            if largest > limit:
                raise TooLarge(f"record of {largest} bytes exceeds the limit of {limit} bytes")
            total = sum(map(len, payloads)) + n * RECORD_OVERHEAD
        else:
            total = 0
            for payload, hdrs in zip(payloads, headers, strict=True):
                size = len(payload) + (_headers_bytes(hdrs) if hdrs else 0)
                if size > limit:
                    raise TooLarge(f"record of {size} bytes exceeds the limit of {limit} bytes")
                total += size + RECORD_OVERHEAD
        if total > self._max_bytes:
            raise TooLarge(
                f"batch of {total} bytes exceeds the replay ring of {self._max_bytes} bytes"
            )
        if self._earliest + self._count + n - 1 > MAX_OFFSET:
            raise BadRequest("stream offset space exhausted")
        return total

    def reconfigure(self, settings: StreamSettings) -> None:
        """Apply new limits now (a smaller replay ring evicts the oldest records at once)."""
        self.settings = settings
        self._max_records = settings.replay_max_records
        self._max_bytes = settings.replay_max_bytes
        self._max_record_bytes = settings.max_record_bytes
        if self._count:
            self._evict_for(0, 0)

    def trim(self, nbytes: int) -> int:
        """Evict the oldest records until ``nbytes`` accounted bytes are freed (or none are left).

        For a memory budget shared by many streams; returns the records evicted.
        Subscribers see the evicted range as they see any eviction (``too_old``).
        """
        if nbytes <= 0 or not self._count:
            return 0
        before = self._count
        target = max(self.retained_bytes - nbytes, 0)
        # _evict_for(0, x) evicts until retained + x <= max_bytes.
        self._evict_for(0, self._max_bytes - target)
        return before - self._count

    def earliest_after(
        self, payloads: Sequence[bytes], headers: Sequence[Mapping[str, str] | None] | None = None
    ) -> int:
        """The oldest offset the ring would still hold after appending this batch.

        For push-back (the ``block`` policy): an append that would evict a record a
        subscriber still needs can be refused before it happens.
        """
        hs = headers or [None] * len(payloads)
        nbytes = sum(record_size(p, h) for p, h in zip(payloads, hs, strict=True))
        return self._earliest + min(self._count, max(0, self._drop_count(len(payloads), nbytes)))

    def _drop_count(self, n: int, nbytes: int) -> int:
        """How many oldest records must go so ``n`` more records of ``nbytes`` fit."""
        count = self._count
        head = self._head
        mask = self._mask
        cums = self._cums
        # Records to drop for the count bound...
        drop = count + n - self._max_records
        # ... and for the byte bound: up to and including the first record whose
        # cumulative count reaches `threshold`.
        threshold = self._tail_cum + nbytes - self._max_bytes
        if threshold > self._evicted_cum and (
            drop <= 0 or cums[(head + drop - 1) & mask] < threshold
        ):
            # The count bound alone is not enough: bisect over up to two runs.
            first_run = min(count, self._cap - head)
            k = bisect_left(cums, threshold, head, head + first_run) - head
            if k == first_run:
                k += bisect_left(cums, threshold, 0, count - first_run)
            drop = k + 1
        return drop

    def _evict_for(self, n: int, nbytes: int) -> None:
        """Evict oldest records until ``n`` more records of ``nbytes`` fit in both bounds."""
        count = self._count
        head = self._head
        mask = self._mask
        cums = self._cums
        drop = self._drop_count(n, nbytes)
        if drop <= 0:
            return
        self._evicted_cum = cums[(head + drop - 1) & mask]
        # Drop the references now: an evicted record must not pin its memory.
        if drop <= _SMALL_DROP:
            pls = self._payloads
            hls = self._headers
            for i in range(head, head + drop):
                pls[i & mask] = b""
                hls[i & mask] = None
        else:
            _ring_fill(self._payloads, head, drop, b"")
            _ring_fill(self._headers, head, drop, None)
        self._head = (head + drop) & mask
        self._count = count - drop
        self._earliest += drop

    def _grow(self, needed: int) -> None:
        """Re-layout the ring into a power-of-two capacity of at least ``needed`` slots."""
        cap = _pow2_at_least(needed)
        head, count, old_cap = self._head, self._count, self._cap
        pad = cap - count

        def relayout(ring: list[_T], fill: _T) -> list[_T]:
            end = head + count
            if end <= old_cap:
                return ring[head:end] + [fill] * pad
            return ring[head:] + ring[: end - old_cap] + [fill] * pad

        self._payloads = relayout(self._payloads, b"")
        self._headers = relayout(self._headers, None)
        self._cums = relayout(self._cums, 0)
        self._cap = cap
        self._mask = cap - 1
        self._head = 0

    # -- reading ---------------------------------------------------------------

    def read(self, from_offset: int, max_records: int, max_bytes: int) -> RecordBatch:
        """Return up to ``max_records`` consecutive records starting at ``from_offset``.

        The batch holds as many records as fit in both ``max_records`` and
        ``max_bytes`` (accounted bytes, :func:`record_size`), but always at least one
        when ``from_offset < next_offset``, even if that record alone is larger than
        ``max_bytes``, so a reader always makes progress. ``from_offset ==
        next_offset`` gives an empty batch (the reader is caught up).

        Cost: O(log retained) to find the byte cut plus list slices of the result.

        Raises:
            BadRequest: ``max_records`` or ``max_bytes`` is below 1.
            CursorError: ``"too_old"`` when ``from_offset < earliest`` (the records
                were evicted; ``available`` is ``earliest``), ``"in_future"`` when
                ``from_offset > next_offset`` (``available`` is ``next_offset``).
        """
        if max_records < 1 or max_bytes < 1:
            raise BadRequest(
                f"max_records and max_bytes must be >= 1, got {max_records} and {max_bytes}"
            )
        earliest = self._earliest
        tail = earliest + self._count
        if from_offset < earliest:
            raise CursorError("too_old", from_offset, earliest)
        if from_offset > tail:
            raise CursorError("in_future", from_offset, tail)
        n = tail - from_offset
        if n > max_records:
            n = max_records
        if n == 0:
            return RecordBatch(from_offset, [], [], 0)
        cums = self._cums
        cap = self._cap
        logical = from_offset - earliest
        start = (self._head + logical) & self._mask
        before = cums[(start - 1) & self._mask] if logical else self._evicted_cum
        # Number of records among the next n whose cumulative count stays within
        # the byte limit; the ring may wrap, so search up to two runs.
        limit = before + max_bytes
        first_run = cap - start
        if n <= first_run:
            k = bisect_right(cums, limit, start, start + n) - start
        else:
            k = bisect_right(cums, limit, start, cap) - start
            if k == first_run:
                k += bisect_right(cums, limit, 0, n - first_run)
        if k == 0:
            k = 1
        end = start + k
        if end <= cap:
            payloads = self._payloads[start:end]
            headers = self._headers[start:end]
            last = end - 1
        else:
            payloads = self._payloads[start:]
            payloads += self._payloads[: end - cap]
            headers = self._headers[start:]
            headers += self._headers[: end - cap]
            last = end - cap - 1
        return RecordBatch(from_offset, payloads, headers, cums[last] - before)

    def resolve_start(self, start: Start) -> int:
        """Return the offset a subscription starting at ``start`` delivers from.

        ``"latest"`` gives ``next_offset`` (only records appended from now on),
        ``"earliest"`` gives ``earliest`` (the whole replay ring), and an integer
        offset is returned as is when ``earliest <= start <= next_offset``.

        Raises:
            BadRequest: ``start`` is a negative integer or neither an integer nor
                ``"latest"``/``"earliest"``.
            CursorError: ``"too_old"`` when ``start < earliest`` (``available`` is
                ``earliest``), ``"in_future"`` when ``start > next_offset``
                (``available`` is ``next_offset``).
        """
        if start == "latest":
            return self._earliest + self._count
        if start == "earliest":
            return self._earliest
        if type(start) is not int:
            raise BadRequest(f"start must be 'latest', 'earliest' or an offset, got {start!r}")
        if start < 0:
            raise BadRequest(f"start offset must be >= 0, got {start}")
        if start < self._earliest:
            raise CursorError("too_old", start, self._earliest)
        tail = self._earliest + self._count
        if start > tail:
            raise CursorError("in_future", start, tail)
        return start

    # -- testing -----------------------------------------------------------------

    def _check_invariants(self) -> None:
        """Assert the internal bookkeeping is consistent (for tests; O(retained))."""
        cap, head, count = self._cap, self._head, self._count
        assert cap & (cap - 1) == 0 and self._mask == cap - 1
        assert len(self._payloads) == len(self._headers) == len(self._cums) == cap
        assert 0 <= count <= min(cap, self._max_records)
        assert self.retained_bytes <= self._max_bytes
        prev = self._evicted_cum
        for i in range(count):
            slot = (head + i) & self._mask
            size = self._cums[slot] - prev
            assert size == record_size(self._payloads[slot], self._headers[slot])
            prev = self._cums[slot]
        assert prev == self._tail_cum
        for i in range(count, cap):
            slot = (head + i) & self._mask
            assert self._payloads[slot] == b"" and self._headers[slot] is None


def _ring_put(ring: list[_T], slot: int, values: Sequence[_T]) -> None:
    """Store ``values`` in consecutive ring slots from ``slot``, wrapping at the end."""
    end = slot + len(values)
    cap = len(ring)
    if end <= cap:
        ring[slot:end] = values
    else:
        split = cap - slot
        ring[slot:] = values[:split]
        ring[: end - cap] = values[split:]


def _ring_fill(ring: list[_T], slot: int, count: int, value: _T) -> None:
    """Set ``count`` consecutive ring slots from ``slot`` to ``value``, wrapping at the end."""
    end = slot + count
    cap = len(ring)
    if end <= cap:
        ring[slot:end] = repeat(value, count)
    else:
        ring[slot:] = repeat(value, cap - slot)
        ring[: end - cap] = repeat(value, end - cap)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
