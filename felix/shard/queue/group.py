"""The queue group engine: who holds which record of a durable stream (sans-IO).

docs/queues.md is the contract of behaviour ("Code" lists the pieces). A
:class:`Group` never reads a clock or does I/O: the shard core passes
``now`` (monotonic seconds, for lease deadlines) and ``wall_us`` (wall clock, for
retry times that survive restarts) into every call, drains :attr:`Group.journal`
(written to the group's state file), :attr:`Group.dead_letters` (appended to the
dead-letter stream, then confirmed with :meth:`Group.dead`) and
:meth:`Group.roles_changed` (notices to exclusive members).

How it works
------------
The persisted state is a :class:`GroupSnapshot`. The engine changes it only by
making a journal entry, applying it (``state.apply``) and appending it to
``journal``, so what is written is exactly what is live. Beside it the engine keeps
what is not persisted: members with their credit and leased offsets, the holder and
lease deadline of each leased offset, and two indexes (felix/shard/queue/_index.py):
the available offsets (ready lowest-first, delayed by not-before) and the lease
deadlines. :meth:`Group.plan` and :meth:`Group.expire` therefore cost
O((records handed out or expired) x log n), never O(window).

Delivery: members with room sit in a rotating order (an insertion-ordered dict);
each record goes to the first member in that order with room for it, who then
moves to the back: round-robin, fair across calls. The next record is always the
lowest eligible redelivery, else ``next``; when no member has room for it the call
stops there (nothing is handed out of order to fill a gap in someone's credit).

Decisions the contract leaves open
----------------------------------
* Operations other than ack on a record that is AVAILABLE and held by nobody (its
  lease was lost; nobody took it since): ``release`` and ``nak`` are accepted and
  change nothing (the loss already counted its failure and made it available; a
  nak's delay is not applied), ``term`` is applied (the client's verdict stands, as
  a late ack does), ``in_progress`` is refused as STALE (there is no lease to
  extend: the client learns that its work may be done twice).
* Operations other than ack on an offset below ``next`` that is finished are
  refused as UNKNOWN (finished by ack, skip or dead-letter cannot be told apart).
* A member that is not (or no longer) joined may settle: it holds nothing, so its
  acks are late acks, and operations on leased records are STALE.
* :meth:`Group.stalled`: ``next - floor >= max_span`` while the log holds records at
  or beyond ``next`` (as last told to :meth:`Group.plan`) and not every offset of the
  window is out on a lease. A window of leases in flight is ordinary backpressure,
  not a stall.
* Failures that are not naks record what happened as their detail (``lease
  expired``, ``member lost``, ``shard restarted``): it is the dead-letter detail
  when that failure is the last one.
* A record's failure that reaches ``max_deliveries`` journals ``Fail`` then
  ``Dying`` (so the failure count is persisted for the dead-letter headers); an
  AVAILABLE entry found with ``failures >= max_deliveries`` (a torn write between
  the two, or ``max_deliveries`` lowered by :meth:`Group.reconfigure`) is
  dead-lettered then.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from felix.errors import BadRequest, Overloaded
from felix.shard.queue._index import AvailableIndex, LeaseClock
from felix.shard.queue._terms import (
    JITTER,
    MAX_DELAY_MS,
    MAX_DETAIL_BYTES,
    MAX_MEMBERS,
    MAX_RANGES,
    DeadLetter,
    Delivery,
    Member,
    MemberId,
    Refusal,
    Role,
    SettleOp,
    check_window,
    truncate_detail,
)
from felix.shard.queue.journal import (
    Ack,
    Dead,
    Dying,
    Entry,
    EntryState,
    Fail,
    GroupSnapshot,
    JournalEntry,
    Lease,
    Release,
    Skip,
)
from felix.shard.queue.settings import GroupSettings

__all__ = [
    "MAX_DELAY_MS",
    "MAX_DETAIL_BYTES",
    "MAX_MEMBERS",
    "MAX_RANGES",
    "DeadLetter",
    "Group",
    "MemberId",
    "Refusal",
    "Role",
    "SettleOp",
    "truncate_detail",
]

_AVAILABLE = EntryState.AVAILABLE
_LEASED = EntryState.LEASED
_DYING = EntryState.DYING


class Group:
    """One queue group's leases over its stream (see the module docstring)."""

    def __init__(
        self,
        name: str,
        settings: GroupSettings,
        state: GroupSnapshot,
        now: float,
        wall_us: int,
        *,
        recovered: bool = False,
        rng: random.Random | None = None,
        max_members: int = MAX_MEMBERS,
    ) -> None:
        self.name = name
        self.settings = settings
        self.state = state
        self.journal: list[JournalEntry] = []
        self.dead_letters: list[DeadLetter] = []
        self._rng = rng if rng is not None else random.Random()
        self._max_members = max_members
        self._members: dict[MemberId, Member] = {}  # in joining order
        self._open: dict[MemberId, Member] = {}  # members with room, in turn order
        self._holder: dict[int, Member] = {}  # leased offset -> member
        self._dying: set[int] = set()
        self._roles: list[tuple[MemberId, Role]] = []
        self._readable_end = 0
        self._available = AvailableIndex(state.entries)
        self._leases = LeaseClock()
        entries = state.entries
        for offset in sorted(entries):
            entry = entries[offset]
            if entry.state is _LEASED:
                if recovered:  # the shard crashed with it leased: a failure
                    self._fail(offset, entry, 0, wall_us, "shard restarted", "")
                    continue
                self._emit(Release(offset))  # leases are never carried over
            if entry.state is _DYING:  # its dead-letter append is not confirmed
                self._dying.add(offset)
                self.dead_letters.append(self._letter(offset, entry, ""))
            elif entry.failures >= settings.max_deliveries:
                self._die(offset, entry, "max_deliveries", entry.detail, "")
            else:
                self._available.add(offset, entry.not_before_us, wall_us)

    # -- members ----------------------------------------------------------------------

    def join(
        self, member: MemberId, consumer_id: int, records: int, nbytes: int, now: float
    ) -> Role:
        """Add ``member`` with a window of ``records`` / ``nbytes`` (a member joined
        already keeps its leases and gets the new consumer id and window). Raises
        :class:`Overloaded` beyond the group's member bound."""
        check_window(records, nbytes)
        known = self._members.get(member)
        if known is not None:
            known.consumer_id = consumer_id
            self.set_window(member, records, nbytes)
            return known.role
        if len(self._members) >= self._max_members:
            raise Overloaded(
                f"group {self.name!r} has {len(self._members)} members (at most "
                f"{self._max_members})"
            )
        joined = Member(member, consumer_id, records, nbytes)
        if self.settings.exclusive:
            joined.role = Role.STANDBY if self._active() is not None else Role.ACTIVE
        self._members[member] = joined
        self._refresh(joined)
        return joined.role

    def leave(self, member: MemberId, graceful: bool, now: float, wall_us: int) -> None:
        """``member`` is gone: its leases are released (graceful) or each counts a
        failure and is available at once (abrupt). Unknown members are ignored."""
        gone = self._members.pop(member, None)
        if gone is None:
            return
        self._open.pop(member, None)
        entries = self.state.entries
        for offset in sorted(gone.leased):
            self._unlease(offset, gone)
            entry = entries[offset]
            if graceful:
                self._emit(Release(offset))
                self._available.add(offset, entry.not_before_us, wall_us)
            else:
                self._fail(offset, entry, 0, wall_us, "member lost", gone.name())
        if gone.role is Role.ACTIVE:
            self._promote()

    def set_window(self, member: MemberId, records: int, nbytes: int) -> None:
        """A new credit for ``member`` (a smaller one only stops new hand-outs)."""
        check_window(records, nbytes)
        known = self._members.get(member)
        if known is not None:
            known.records = records
            known.nbytes = nbytes
            self._refresh(known)

    def roles_changed(self) -> list[tuple[MemberId, Role]]:
        """Drain the role notices to send (exclusive groups)."""
        roles, self._roles = self._roles, []
        return roles

    def members(self) -> Iterable[MemberId]:
        return list(self._members)

    # -- settling ---------------------------------------------------------------------

    def settle(
        self,
        member: MemberId,
        op: SettleOp,
        ranges: Sequence[tuple[int, int]],
        now: float,
        wall_us: int,
        *,
        delay_ms: int | None = None,
        detail: str = "",
    ) -> list[tuple[int, Refusal]]:
        """Apply ``op`` to the offsets of ``ranges`` ([(first, count)]); returns the
        refused offsets, everything else is applied and journaled. Raises
        :class:`BadRequest` for malformed ranges (nothing applied)."""
        try:
            op = SettleOp(op)
        except ValueError:
            raise BadRequest(f"unknown settle operation {op!r}") from None
        self._check_ranges(ranges)
        if delay_ms is not None and not 0 <= delay_ms <= MAX_DELAY_MS:
            raise BadRequest(f"nak delay must be 0..{MAX_DELAY_MS} ms, got {delay_ms}")
        refused: list[tuple[int, Refusal]] = []
        if op is SettleOp.ACK:
            for first, count in ranges:
                self._ack(member, first, count, refused)
            return refused
        detail = truncate_detail(detail)
        entries = self.state.entries
        for first, count in ranges:
            end = first + count
            floor, nxt = self.state.floor, self.state.next
            if first < floor:  # finished: one refusal for the part below the window
                refused.append((first, Refusal.UNKNOWN))
            for offset in self._window_offsets(max(first, floor), min(end, nxt), absent=True):
                refusal = self._settle_one(
                    member, op, offset, entries.get(offset), now, wall_us, delay_ms, detail
                )
                if refusal is not None:
                    refused.append((offset, refusal))
            if end > nxt:  # never delivered: one refusal for the part beyond the window
                refused.append((max(first, nxt), Refusal.UNKNOWN))
        return refused

    def _window_offsets(self, lo: int, hi: int, *, absent: bool) -> list[int]:
        """Offsets of ``[lo, hi)`` (inside the window) worth looking at, in order: those
        with an entry, and with ``absent`` the first of each run of finished ones (an
        operation on a finished offset is refused once per run). Costs at most the
        smaller of the range and the window's entries: a huge range is not per-offset
        work."""
        if lo >= hi:
            return []
        entries = self.state.entries
        if hi - lo <= len(entries):
            if absent:
                # an entry, or the first finished offset of a run (at lo or after an entry)
                return [o for o in range(lo, hi) if o in entries or o == lo or o - 1 in entries]
            return [o for o in range(lo, hi) if o in entries]
        present = sorted(o for o in entries if lo <= o < hi)
        if not absent:
            return present
        out: list[int] = []
        expected = lo
        for offset in present:
            if offset > expected:
                out.append(expected)  # a run of finished offsets starts here
            out.append(offset)
            expected = offset + 1
        if expected < hi:
            out.append(expected)
        return out

    def _check_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        if len(ranges) > MAX_RANGES:
            raise BadRequest(f"at most {MAX_RANGES} ranges per operation, got {len(ranges)}")
        total = 0
        for first, count in ranges:
            if first < 0 or count < 1:
                raise BadRequest(f"bad offset range ({first}, {count})")
            total += count
        if total > self.settings.max_span:
            raise BadRequest(
                f"{total} offsets in one operation (at most max_span={self.settings.max_span})"
            )

    def _ack(
        self, member: MemberId, first: int, count: int, refused: list[tuple[int, Refusal]]
    ) -> None:
        state = self.state
        entries = state.entries
        holder = self._holder
        end = first + count
        nxt = state.next
        # Below the floor everything is finished (accepted again, no work); beyond
        # ``next`` nothing was delivered (one refusal for the part); inside the window
        # only the offsets with an entry matter (finished ones are accepted again).
        run = -1  # first offset of the current run of accepted offsets (an Ack covers
        last = -1  # finished offsets in between harmlessly: applying skips them)
        for offset in self._window_offsets(max(first, state.floor), min(end, nxt), absent=False):
            entry = entries[offset]
            if entry.state is _LEASED:
                owner = holder[offset]
                if owner.id == member:
                    self._unlease(offset, owner)
                    refusal = None
                else:
                    refusal = Refusal.STALE
            elif entry.state is _DYING:
                refusal = Refusal.DEAD
            else:  # available, nobody holds it: a late ack
                refusal = None
            if refusal is None:
                if run < 0:
                    run = offset
                last = offset
            else:
                refused.append((offset, refusal))
                if run >= 0:
                    self._emit(Ack(run, last + 1 - run))
                run = -1
        if run >= 0:
            self._emit(Ack(run, last + 1 - run))
        if end > nxt:
            refused.append((max(first, nxt), Refusal.UNKNOWN))

    def _settle_one(
        self,
        member: MemberId,
        op: SettleOp,
        offset: int,
        entry: Entry | None,
        now: float,
        wall_us: int,
        delay_ms: int | None,
        detail: str,
    ) -> Refusal | None:
        if entry is None:
            return Refusal.UNKNOWN  # never delivered, or finished
        if entry.state is _DYING:
            return Refusal.DEAD
        if entry.state is _AVAILABLE:  # nobody holds it (see the module docstring)
            if op is SettleOp.IN_PROGRESS:
                return Refusal.STALE
            if op is SettleOp.TERM:
                known = self._members.get(member)
                self._die(offset, entry, "term", detail, known.name() if known else "")
            return None
        owner = self._holder[offset]
        if owner.id != member:
            return Refusal.STALE
        if op is SettleOp.IN_PROGRESS:
            self._leases.set(offset, now + self.settings.lease_ms / 1000)
            return None
        self._unlease(offset, owner)
        if op is SettleOp.NAK:
            failures = entry.failures + 1
            delay = delay_ms if delay_ms is not None else self._backoff(failures)
            self._fail(offset, entry, wall_us + delay * 1000, wall_us, detail, owner.name())
        elif op is SettleOp.RELEASE:
            self._emit(Release(offset))
            self._available.add(offset, entry.not_before_us, wall_us)
        else:
            self._die(offset, entry, "term", detail, owner.name())
        return None

    def _backoff(self, failures: int) -> int:
        base = self.settings.backoff_for(failures)
        return round(base * self._rng.uniform(1 - JITTER, 1 + JITTER))

    # -- time -------------------------------------------------------------------------

    def expire(self, now: float, wall_us: int) -> None:
        """Leases whose deadline is ``<= now`` count a failure (available at once)."""
        entries = self.state.entries
        for offset in self._leases.pop_due(now):
            owner = self._holder[offset]
            self._unlease(offset, owner)
            self._fail(offset, entries[offset], 0, wall_us, "lease expired", owner.name())

    def next_deadline(self) -> float | None:
        """The earliest lease deadline (monotonic seconds), None without leases."""
        return self._leases.earliest()

    def next_retry_us(self) -> int | None:
        """The earliest not-before time of a delayed retry (wall microseconds)."""
        return self._available.next_retry_us()

    # -- delivery ---------------------------------------------------------------------

    def plan(
        self,
        readable_end: int,
        size_of: Callable[[int], int | None],
        now: float,
        wall_us: int,
    ) -> list[tuple[MemberId, int, list[Delivery]]]:
        """Hand out what members have room for (leases journaled, see the contract):
        ``[(member, consumer_id, [(offset, attempts, failures), ...]), ...]``.

        ``size_of(offset)`` is the payload size of the record at ``offset`` (None: no
        record there, journaled as a skip); it is called once per offset looked at,
        gaps included."""
        self._readable_end = readable_end
        out: dict[MemberId, list[Delivery]] = {}
        if not self._open:
            return []
        settings = self.settings
        max_leased = settings.max_ack_pending
        deadline = now + settings.lease_ms / 1000
        state = self.state
        entries = state.entries
        available = self._available
        holder = self._holder
        available.promote(wall_us)
        while self._open and len(holder) < max_leased:  # redeliveries first
            offset = available.first_ready(wall_us)
            if offset is None or offset >= readable_end:  # (the durable end went back)
                break
            size = size_of(offset)
            if size is None:  # gone from the log: nothing left to deliver
                available.take()
                self._emit(Skip(offset, 1))
                continue
            taker = self._pick(size)
            if taker is None:
                break
            available.take()
            self._lease(offset, entries[offset], taker, size, deadline, out)
        if not self._open or len(holder) >= max_leased:
            return self._deliveries(out)
        if available.first_ready(wall_us) is not None:
            return self._deliveries(out)  # an eligible redelivery waits: newer ones too
        max_span = settings.max_span
        skip_from = cursor = state.next
        base = state.floor if entries else None  # None: skips move the floor along
        while cursor < readable_end and self._open and len(holder) < max_leased:
            if base is not None and cursor - base >= max_span:
                break
            size = size_of(cursor)
            if size is None:
                cursor += 1
                continue
            taker = self._pick(size)
            if taker is None:
                break
            if cursor > skip_from:
                self._emit(Skip(skip_from, cursor - skip_from))
            self._lease(cursor, None, taker, size, deadline, out)
            cursor += 1
            skip_from = cursor
            base = state.floor
        if cursor > skip_from:
            self._emit(Skip(skip_from, cursor - skip_from))
        return self._deliveries(out)

    def _deliveries(
        self, out: dict[MemberId, list[Delivery]]
    ) -> list[tuple[MemberId, int, list[Delivery]]]:
        members = self._members
        return [(member, members[member].consumer_id, records) for member, records in out.items()]

    def _pick(self, size: int) -> Member | None:
        for member in self._open.values():
            if member.fits(size):
                return member
        return None

    def _lease(
        self,
        offset: int,
        entry: Entry | None,
        taker: Member,
        size: int,
        deadline: float,
        out: dict[MemberId, list[Delivery]],
    ) -> None:
        attempts = (entry.attempts if entry is not None else 0) + 1
        self._emit(Lease(offset, attempts))
        self._holder[offset] = taker
        taker.leased[offset] = size
        taker.used += size
        self._leases.set(offset, deadline)
        failures = entry.failures if entry is not None else 0
        delivery = (offset, attempts, failures)
        records = out.get(taker.id)
        if records is None:
            out[taker.id] = [delivery]
        else:
            records.append(delivery)
        # Round-robin: the taker goes to the back of the turn order (if room is left).
        turns = self._open
        if not taker.has_room():
            del turns[taker.id]
        elif len(turns) > 1:
            del turns[taker.id]
            turns[taker.id] = taker

    # -- dead letters, status, settings -----------------------------------------------

    def dead(self, offset: int) -> None:
        """The dead-letter append of ``offset`` was acknowledged (idempotent)."""
        if offset in self._dying:
            self._dying.discard(offset)
            self._emit(Dead(offset))

    def stalled(self) -> bool:
        """The oldest unfinished record holds the window full: ``next - floor >=
        max_span`` while the log holds records at or beyond ``next`` (as last told to
        :meth:`plan`), and not every offset of the window is out on a lease (a window
        of leases in flight is backpressure, not a stall)."""
        state = self.state
        span = state.next - state.floor
        return (
            span >= self.settings.max_span
            and self._readable_end > state.next
            and len(self._holder) < span
        )

    def status(self) -> dict[str, object]:
        state = self.state
        leased = len(self._holder)
        dying = len(self._dying)
        return {
            "floor": state.floor,
            "next": state.next,
            "leased": leased,
            "available": len(state.entries) - leased - dying,
            "dying": dying,
            "acked": state.acked,
            "dead": state.dead,
            "skipped": state.skipped,
            "members": len(self._members),
            "stalled": self.stalled(),
        }

    def reconfigure(self, settings: GroupSettings) -> None:
        """New settings: lease_ms applies to new leases and extensions, the limits at
        once; a lower max_deliveries dead-letters the available records beyond it; a
        change of ``exclusive`` reassigns roles (noticed through roles_changed())."""
        old = self.settings
        self.settings = settings
        if settings.max_deliveries < old.max_deliveries:
            entries = self.state.entries
            overdue = [
                o
                for o, e in entries.items()
                if e.state is _AVAILABLE and e.failures >= settings.max_deliveries
            ]
            for offset in sorted(overdue):
                entry = entries[offset]
                self._die(offset, entry, "max_deliveries", entry.detail, "")
        if settings.exclusive != old.exclusive:
            for index, member in enumerate(self._members.values()):
                if settings.exclusive:
                    member.role = Role.ACTIVE if index == 0 else Role.STANDBY
                else:
                    member.role = Role.MEMBER
                self._roles.append((member.id, member.role))
                self._refresh(member)

    # -- helpers ----------------------------------------------------------------------

    def _emit(self, entry: JournalEntry) -> None:
        self.state.apply(entry)
        self.journal.append(entry)

    def _unlease(self, offset: int, owner: Member) -> None:
        """Forget ``owner``'s lease of ``offset`` and give back its credit."""
        del self._holder[offset]
        self._leases.clear(offset)
        owner.used -= owner.leased.pop(offset)
        if owner.id not in self._open:
            self._refresh(owner)

    def _fail(
        self,
        offset: int,
        entry: Entry,
        not_before_us: int,
        wall_us: int,
        detail: str,
        consumer: str,
    ) -> None:
        failures = entry.failures + 1
        if failures >= self.settings.max_deliveries:
            self._emit(Fail(offset, failures, 0, detail))
            self._die(offset, entry, "max_deliveries", detail, consumer)
        else:
            self._emit(Fail(offset, failures, not_before_us, detail))
            self._available.add(offset, not_before_us, wall_us)

    def _die(self, offset: int, entry: Entry, reason: str, detail: str, consumer: str) -> None:
        self._emit(Dying(offset, reason, detail))
        self._dying.add(offset)
        self.dead_letters.append(self._letter(offset, entry, consumer))

    @staticmethod
    def _letter(offset: int, entry: Entry, consumer: str) -> DeadLetter:
        return DeadLetter(
            offset, entry.reason, entry.detail, entry.attempts, entry.failures, consumer
        )

    def _refresh(self, member: Member) -> None:
        """Put ``member`` in the turn order (at the back) or take it out."""
        eligible = member.role is not Role.STANDBY and member.id in self._members
        if eligible and member.has_room():
            if member.id not in self._open:
                self._open[member.id] = member
        else:
            self._open.pop(member.id, None)

    def _active(self) -> Member | None:
        for member in self._members.values():
            if member.role is Role.ACTIVE:
                return member
        return None

    def _promote(self) -> None:
        """Exclusive: the earliest-joined member becomes ACTIVE (none active now)."""
        for member in self._members.values():
            member.role = Role.ACTIVE
            self._roles.append((member.id, Role.ACTIVE))
            self._refresh(member)
            return
