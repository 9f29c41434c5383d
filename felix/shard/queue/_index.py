"""In-memory indexes of a queue group's window (felix/shard/queue/group.py).

Both are heaps with lazy deletion: an item is checked against the live state when it
reaches the top and dropped if it no longer holds, so a state change costs O(log n)
and nothing ever walks the whole window on a hot path. Each heap is rebuilt from the
live state when stale items outnumber live ones (amortised O(1) per change).
"""

from __future__ import annotations

import heapq

from felix.shard.queue.journal import Entry, EntryState

__all__ = ["AvailableIndex", "LeaseClock"]

_AVAILABLE = EntryState.AVAILABLE
_SLACK = 64


class AvailableIndex:
    """The AVAILABLE offsets of a window: ``ready`` ones (not-before passed), lowest
    offset first, and ``delayed`` ones, earliest not-before first.

    An item is live while its entry is AVAILABLE (and, for a delayed item, still has
    the same not-before time). ``add`` must be called whenever an entry becomes
    AVAILABLE or its not-before changes; nothing needs calling when it stops being.
    """

    __slots__ = ("_delayed", "_entries", "_queued", "_ready")

    def __init__(self, entries: dict[int, Entry]) -> None:
        self._entries = entries
        self._ready: list[int] = []
        self._queued: set[int] = set()  # offsets in _ready (live or not): no duplicates
        self._delayed: list[tuple[int, int]] = []  # (not_before_us, offset)

    def add(self, offset: int, not_before_us: int, wall_us: int) -> None:
        if not_before_us <= wall_us:
            if offset not in self._queued:
                self._queued.add(offset)
                heapq.heappush(self._ready, offset)
                if len(self._ready) > 2 * len(self._entries) + _SLACK:
                    self._rebuild_ready()
        else:
            heapq.heappush(self._delayed, (not_before_us, offset))
            if len(self._delayed) > 2 * len(self._entries) + _SLACK:
                self._rebuild_delayed()

    def promote(self, wall_us: int) -> None:
        """Move the delayed offsets whose time has come to ``ready``."""
        delayed = self._delayed
        entries = self._entries
        while delayed and delayed[0][0] <= wall_us:
            not_before, offset = heapq.heappop(delayed)
            entry = entries.get(offset)
            if (
                entry is not None
                and entry.state is _AVAILABLE
                and entry.not_before_us == not_before
            ):
                self.add(offset, not_before, wall_us)

    def first_ready(self, wall_us: int) -> int | None:
        """The lowest live ready offset (left on the heap: ``take`` removes it)."""
        ready = self._ready
        entries = self._entries
        while ready:
            offset = ready[0]
            entry = entries.get(offset)
            if entry is None or entry.state is not _AVAILABLE:
                self.take()
            elif entry.not_before_us > wall_us:  # the wall clock went back
                self.take()
                heapq.heappush(self._delayed, (entry.not_before_us, offset))
            else:
                return offset
        return None

    def take(self) -> None:
        self._queued.discard(heapq.heappop(self._ready))

    def next_retry_us(self) -> int | None:
        delayed = self._delayed
        entries = self._entries
        while delayed:
            not_before, offset = delayed[0]
            entry = entries.get(offset)
            if (
                entry is not None
                and entry.state is _AVAILABLE
                and entry.not_before_us == not_before
            ):
                return not_before
            heapq.heappop(delayed)
        return None

    def _rebuild_ready(self) -> None:
        entries = self._entries
        live = [o for o in self._queued if (e := entries.get(o)) and e.state is _AVAILABLE]
        heapq.heapify(live)
        self._ready = live
        self._queued = set(live)

    def _rebuild_delayed(self) -> None:
        entries = self._entries
        live = {
            (nb, o)
            for nb, o in self._delayed
            if (e := entries.get(o)) and e.state is _AVAILABLE and e.not_before_us == nb
        }
        self._delayed = list(live)
        heapq.heapify(self._delayed)


class LeaseClock:
    """Lease deadlines (monotonic seconds) of the leased offsets, earliest first."""

    __slots__ = ("_heap", "deadlines")

    def __init__(self) -> None:
        self.deadlines: dict[int, float] = {}  # the live deadline of each leased offset
        self._heap: list[tuple[float, int]] = []

    def set(self, offset: int, deadline: float) -> None:
        self.deadlines[offset] = deadline
        heapq.heappush(self._heap, (deadline, offset))
        if len(self._heap) > 2 * len(self.deadlines) + _SLACK:
            self._heap = [(d, o) for o, d in self.deadlines.items()]
            heapq.heapify(self._heap)

    def clear(self, offset: int) -> None:
        self.deadlines.pop(offset, None)

    def earliest(self) -> float | None:
        heap = self._heap
        deadlines = self.deadlines
        while heap:
            deadline, offset = heap[0]
            if deadlines.get(offset) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[int]:
        """The offsets whose lease ran out at ``now`` (deadline <= now), forgotten here."""
        heap = self._heap
        deadlines = self.deadlines
        due: list[int] = []
        while heap and heap[0][0] <= now:
            deadline, offset = heapq.heappop(heap)
            if deadlines.get(offset) == deadline:
                del deadlines[offset]
                due.append(offset)
        return due
