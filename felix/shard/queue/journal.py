"""A queue group's persisted state and the journal entries that change it.

The group engine (felix/shard/queue/group.py) emits one entry per change it must not
forget (a hand-out before the record is sent, an ack before it is confirmed, ...);
the group's state file (felix/shard/queue/group_log.py) writes them after a snapshot
and, on recovery, replays them with :meth:`GroupSnapshot.apply`. Applying is pure and
total: the same entries always give the same state, so recovery is idempotent.

What is persisted is only what must survive a restart (docs/queues.md): the window's
entries with their counters and retry times. Members, credit and lease deadlines are
not: after a restart every lease is void.

Window rule: an offset in ``[floor, next)`` with no entry is finished (acked,
dead-lettered or skipped); ``floor`` advances over finished offsets, so the entries
never hold more than the window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

__all__ = [
    "Ack",
    "Dead",
    "Dying",
    "Entry",
    "EntryState",
    "Fail",
    "GroupSnapshot",
    "JournalEntry",
    "Lease",
    "Release",
    "Skip",
    "Start",
]


class EntryState(enum.IntEnum):
    """What an unfinished offset of the window is waiting for."""

    AVAILABLE = 0  # for a member (maybe not before ``not_before_us``)
    LEASED = 1  # to a member (void after a restart: the engine counts a failure)
    DYING = 2  # chosen for the dead-letter stream, the append not yet confirmed


@dataclass(slots=True)
class Entry:
    """One unfinished offset of the window."""

    state: EntryState = EntryState.AVAILABLE
    attempts: int = 0  # times handed out
    failures: int = 0  # nak, lease expiry, member lost, shard crash while leased
    not_before_us: int = 0  # wall clock (microseconds): a delayed retry waits until then
    reason: str = ""  # DYING: why (``max_deliveries``, ``term``)
    detail: str = ""  # the last nak/term text (bounded by the engine)


# -- journal entries ------------------------------------------------------------------


class Start(NamedTuple):
    """The group starts at ``offset`` (created, or moved by an operator)."""

    offset: int


class Lease(NamedTuple):
    """``offset`` was handed out (for the ``attempts``-th time); written before sending."""

    offset: int
    attempts: int


class Ack(NamedTuple):
    """Offsets ``first`` .. ``first + count - 1`` are done (those not finished already)."""

    first: int
    count: int  # type: ignore[assignment]  # (shadows tuple.count: wire name kept)


class Fail(NamedTuple):
    """``offset`` failed (now ``failures`` in all); available again from ``not_before_us``."""

    offset: int
    failures: int
    not_before_us: int
    detail: str


class Release(NamedTuple):
    """``offset`` is available again at once, no failure counted."""

    offset: int


class Dying(NamedTuple):
    """``offset`` goes to the dead-letter stream (``reason``); never handed out again."""

    offset: int
    reason: str
    detail: str


class Dead(NamedTuple):
    """The dead-letter append of ``offset`` was acknowledged: it is finished."""

    offset: int


class Skip(NamedTuple):
    """Offsets ``first`` .. ``first + count - 1`` hold no record (a gap in the log, or
    gone to retention): finished without a delivery."""

    first: int
    count: int  # type: ignore[assignment]  # (shadows tuple.count: wire name kept)


JournalEntry: TypeAlias = Start | Lease | Ack | Fail | Release | Dying | Dead | Skip


@dataclass(slots=True)
class GroupSnapshot:
    """A group's persisted state; :meth:`apply` folds one journal entry into it."""

    floor: int = 0
    next: int = 0
    entries: dict[int, Entry] = field(default_factory=dict)
    # Monotonic totals (statistics, persisted with the state).
    acked: int = 0
    dead: int = 0
    skipped: int = 0

    def apply(self, entry: JournalEntry) -> None:
        """Fold ``entry`` in; entries about finished or unknown offsets change nothing."""
        entries = self.entries
        if isinstance(entry, Lease):
            offset = entry.offset
            if offset < self.floor:
                return
            if offset >= self.next:
                # Offsets jumped over were never handed out: nothing to deliver there.
                self.skipped += offset - self.next
                self.next = offset + 1
            elif offset not in entries:
                return  # finished already
            slot = entries.get(offset)
            if slot is None:
                slot = entries[offset] = Entry()
            slot.state = EntryState.LEASED
            slot.attempts = entry.attempts
        elif isinstance(entry, Ack):
            end = entry.first + entry.count
            if entry.count <= len(entries):
                for offset in range(max(entry.first, self.floor), min(end, self.next)):
                    if entries.pop(offset, None) is not None:
                        self.acked += 1
            else:
                for offset in [o for o in entries if entry.first <= o < end]:
                    del entries[offset]
                    self.acked += 1
        elif isinstance(entry, Fail):
            slot = entries.get(entry.offset)
            if slot is not None and slot.state is not EntryState.DYING:
                slot.state = EntryState.AVAILABLE
                slot.failures = entry.failures
                slot.not_before_us = entry.not_before_us
                slot.detail = entry.detail
        elif isinstance(entry, Release):
            slot = entries.get(entry.offset)
            if slot is not None and slot.state is EntryState.LEASED:
                slot.state = EntryState.AVAILABLE
        elif isinstance(entry, Dying):
            slot = entries.get(entry.offset)
            if slot is not None:
                slot.state = EntryState.DYING
                slot.reason = entry.reason
                slot.detail = entry.detail
        elif isinstance(entry, Dead):
            if entries.pop(entry.offset, None) is not None:
                self.dead += 1
        elif isinstance(entry, Skip):
            end = entry.first + entry.count
            below = min(end, self.next)  # entries live below next only
            if end > self.next:
                self.skipped += end - max(self.next, entry.first)
                self.next = end
            # Entries in the range: gone to retention while waiting (never happens to
            # pending records while retention respects the groups; kept total for
            # safety). The usual skip, at next, has none: not a walk over the window.
            if entry.first < below:
                if below - entry.first <= len(entries):
                    gone = [o for o in range(entry.first, below) if o in entries]
                else:
                    gone = [o for o in entries if entry.first <= o < below]
                for offset in gone:
                    del entries[offset]
                    self.skipped += 1
        elif isinstance(entry, Start):
            self.floor = self.next = entry.offset
            entries.clear()
            return
        self._advance()

    def _advance(self) -> None:
        entries = self.entries
        if not entries:
            self.floor = self.next
            return
        floor = self.floor
        while floor < self.next and floor not in entries:
            floor += 1
        self.floor = floor
