"""The queue group engine against a model (hypothesis state machine): random joins,
leaves, window changes, publishes with gaps, plans, settles of every kind, time
passing, dead-letter confirmations and shard crashes (recovered=True), with the
engine's invariants checked after every step."""

from __future__ import annotations

import copy
import random
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from felix.shard.queue.group import Group, MemberId, Refusal, Role, SettleOp
from felix.shard.queue.journal import EntryState, GroupSnapshot, Start
from felix.shard.queue.settings import GroupSettings

WALL = 1_000_000_000
LEASE_S = 1.0
MEMBERS: list[MemberId] = [(0, 1), (0, 2), (1, 1), (1, 2)]
START = 3  # the group starts at offset 3 of its stream


class GroupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.g: Group
        self.initial: GroupSnapshot
        self.settings: GroupSettings
        self.now = 0.0
        self.wall = WALL
        self.log: dict[int, int | None] = {}  # offset -> payload size (None: a gap)
        self.end = START
        self.held: dict[int, MemberId] = {}  # the model's leases
        self.deadline: dict[int, float] = {}
        self.attempts: dict[int, int] = {}
        self.failures: dict[int, int] = {}
        self.acked: set[int] = set()
        self.dying: set[int] = set()  # chosen for the dead-letter stream, unconfirmed
        self.dead: set[int] = set()
        self.letters: list[int] = []  # dead letters the core still has to append
        self.seed = 0
        # Leases and span found when the limits were last lowered (reconfigure): those
        # stand until settled; plan() must not add to them.
        self.lease_cap = 0
        self.span_cap = 0

    @initialize(
        max_ack=st.integers(1, 6),
        extra_span=st.integers(0, 6),
        max_deliveries=st.integers(1, 4),
        exclusive=st.booleans(),
        seed=st.integers(0, 1 << 16),
    )
    def setup(
        self, max_ack: int, extra_span: int, max_deliveries: int, exclusive: bool, seed: int
    ) -> None:
        self.settings = GroupSettings(
            lease_ms=int(LEASE_S * 1000),
            max_deliveries=max_deliveries,
            backoff_ms=(100, 300),
            max_ack_pending=max_ack,
            max_span=max_ack + extra_span,
            exclusive=exclusive,
        )
        self.seed = seed
        state = GroupSnapshot()
        state.apply(Start(START))
        self._start(state, recovered=False)

    def _start(self, state: GroupSnapshot, recovered: bool) -> None:
        self.initial = copy.deepcopy(state)
        self.g = Group(
            "g",
            self.settings,
            state,
            self.now,
            self.wall,
            recovered=recovered,
            rng=random.Random(self.seed),
        )
        self._drain()

    def _drain(self) -> None:
        self.letters.extend(d.offset for d in self.g.dead_letters)
        for letter in self.g.dead_letters:
            assert letter.offset in self.dying
        self.g.dead_letters.clear()
        self.g.roles_changed()

    def _fail(self, offset: int) -> None:
        self.failures[offset] = self.failures.get(offset, 0) + 1
        if self.failures[offset] >= self.settings.max_deliveries:
            self.dying.add(offset)

    def _unhold(self, offset: int) -> None:
        del self.held[offset]
        del self.deadline[offset]

    # -- rules ------------------------------------------------------------------------

    @rule(sizes=st.lists(st.one_of(st.none(), st.integers(1, 60)), min_size=1, max_size=4))
    def publish(self, sizes: list[int | None]) -> None:
        for size in sizes:
            self.log[self.end] = size
            self.end += 1

    @rule(m=st.sampled_from(MEMBERS), records=st.integers(0, 4), nbytes=st.integers(0, 120))
    def join(self, m: MemberId, records: int, nbytes: int) -> None:
        self.g.join(m, MEMBERS.index(m), records, nbytes, self.now)

    @rule(m=st.sampled_from(MEMBERS), graceful=st.booleans())
    def leave(self, m: MemberId, graceful: bool) -> None:
        self.g.leave(m, graceful, self.now, self.wall)
        for offset in [o for o, h in self.held.items() if h == m]:
            self._unhold(offset)
            if not graceful:
                self._fail(offset)
        self._drain()

    @rule(m=st.sampled_from(MEMBERS), records=st.integers(0, 4), nbytes=st.integers(0, 120))
    def set_window(self, m: MemberId, records: int, nbytes: int) -> None:
        self.g.set_window(m, records, nbytes)

    @rule(
        max_ack=st.integers(1, 6),
        extra_span=st.integers(0, 6),
        max_deliveries=st.integers(1, 4),
        exclusive=st.booleans(),
    )
    def reconfigure(
        self, max_ack: int, extra_span: int, max_deliveries: int, exclusive: bool
    ) -> None:
        state = self.g.state
        self.lease_cap = len(self.held)
        self.span_cap = state.next - state.floor
        self.settings = GroupSettings(
            lease_ms=int(LEASE_S * 1000),
            max_deliveries=max_deliveries,
            backoff_ms=(100, 300),
            max_ack_pending=max_ack,
            max_span=max_ack + extra_span,
            exclusive=exclusive,
        )
        overdue = {
            offset
            for offset, entry in state.entries.items()
            if entry.state is EntryState.AVAILABLE and entry.failures >= max_deliveries
        }
        self.g.reconfigure(self.settings)
        self.dying |= overdue
        self._drain()

    @rule()
    def plan(self) -> None:
        g = self.g
        before = g.state.next
        out = g.plan(self.end, self.log.get, self.now, self.wall)
        if out:
            assert len(g._holder) <= self.settings.max_ack_pending
        if g.state.next > before and g.state.entries:
            assert g.state.next - g.state.floor <= self.settings.max_span
        seen: set[int] = set()
        for member, consumer_id, records in out:
            assert records
            assert consumer_id == MEMBERS.index(member)
            info = g._members[member]
            if self.settings.exclusive:
                assert info.role is Role.ACTIVE
            for offset, attempts, failures in records:
                assert offset not in seen and offset not in self.held  # never two holders
                assert offset < self.end and self.log[offset] is not None
                assert offset not in self.acked | self.dying | self.dead
                assert attempts == self.attempts.get(offset, 0) + 1
                assert failures == self.failures.get(offset, 0)
                seen.add(offset)
                self.attempts[offset] = attempts
                self.held[offset] = member
                self.deadline[offset] = self.now + LEASE_S
            # Credit: a member is handed a record only while it has room for it.
            count = len(info.leased)
            assert count <= info.records
            assert count == 1 or info.used <= info.nbytes

    @rule(
        data=st.data(),
        m=st.sampled_from(MEMBERS),
        op=st.sampled_from(SettleOp),
        delay=st.one_of(st.none(), st.integers(0, 500)),
    )
    def settle(self, data: Any, m: MemberId, op: SettleOp, delay: int | None) -> None:
        g = self.g
        low = max(START, g.state.floor - 2)
        offsets = data.draw(
            st.lists(
                st.integers(low, g.state.next + 1),
                min_size=1,
                max_size=min(4, self.settings.max_span),
                unique=True,
            )
        )
        expected: list[tuple[int, Refusal]] = []
        applied: list[int] = []
        for offset in offsets:
            refusal = self._expected(m, op, offset)
            if refusal is None:
                applied.append(offset)
            else:
                expected.append((offset, refusal))
        refused = g.settle(m, op, [(o, 1) for o in offsets], self.now, self.wall, delay_ms=delay)
        assert refused == expected
        for offset in applied:
            owned = self.held.get(offset) == m
            entry_gone = offset not in self.attempts or offset in self.acked
            if op is SettleOp.ACK:
                if owned:
                    self._unhold(offset)
                if not entry_gone and offset not in self.dead:
                    self.acked.add(offset)
            elif op is SettleOp.IN_PROGRESS:
                self.deadline[offset] = self.now + LEASE_S
            elif op is SettleOp.TERM:
                if owned:
                    self._unhold(offset)
                self.dying.add(offset)
            elif owned:
                self._unhold(offset)
                if op is SettleOp.NAK:
                    self._fail(offset)
        self._drain()

    def _expected(self, m: MemberId, op: SettleOp, offset: int) -> Refusal | None:
        state = self.g.state
        if offset >= state.next:
            return Refusal.UNKNOWN
        entry = state.entries.get(offset)
        if entry is None:
            return None if op is SettleOp.ACK else Refusal.UNKNOWN
        if entry.state is EntryState.DYING:
            return Refusal.DEAD
        if entry.state is EntryState.LEASED:
            return None if self.held[offset] == m else Refusal.STALE
        return Refusal.STALE if op is SettleOp.IN_PROGRESS else None

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0, 1.5]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.wall += int(seconds * 1_000_000)
        self.g.expire(self.now, self.wall)
        for offset in [o for o, d in self.deadline.items() if d <= self.now]:
            self._unhold(offset)
            self._fail(offset)
        self._drain()
        deadline = self.g.next_deadline()
        assert deadline == (min(self.deadline.values()) if self.deadline else None)

    @rule(data=st.data())
    def confirm_dead_letter(self, data: Any) -> None:
        if not self.letters:
            return
        offset = self.letters.pop(data.draw(st.integers(0, len(self.letters) - 1)))
        self.g.dead(offset)
        if offset in self.dying:
            self.dying.discard(offset)
            self.dead.add(offset)

    @rule()
    def crash(self) -> None:
        state = copy.deepcopy(self.g.state)
        for offset in list(self.held):
            self._unhold(offset)
            self._fail(offset)
        self.letters.clear()  # unconfirmed dead letters are found again
        self._start(state, recovered=True)
        assert sorted(self.letters) == sorted(self.dying)

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def journal_replays_to_the_state(self) -> None:
        if not hasattr(self, "g"):
            return
        replay = copy.deepcopy(self.initial)
        for entry in self.g.journal:
            replay.apply(entry)
        assert replay == self.g.state

    @invariant()
    def state_matches_the_model(self) -> None:
        if not hasattr(self, "g"):
            return
        g = self.g
        state = g.state
        entries = state.entries
        leased = {o for o, e in entries.items() if e.state is EntryState.LEASED}
        assert leased == set(self.held)
        assert {o: h.id for o, h in g._holder.items()} == self.held
        owned = [o for member in g._members.values() for o in member.leased]
        assert len(owned) == len(set(owned)) and set(owned) == leased
        assert {o for o, e in entries.items() if e.state is EntryState.DYING} == self.dying
        for offset in range(START, state.next):
            # Every offset is unfinished (available, leased, dying) or accounted for.
            finished = offset in self.acked or offset in self.dead or self.log[offset] is None
            assert (offset in entries) != finished, offset
            if offset in entries:
                assert entries[offset].failures == self.failures.get(offset, 0)
                assert entries[offset].attempts == self.attempts[offset]
        assert all(state.floor <= o < state.next for o in entries)
        assert len(leased) <= max(self.settings.max_ack_pending, self.lease_cap)
        assert state.next - state.floor <= max(self.settings.max_span, self.span_cap)
        status = g.status()
        assert status["leased"] == len(leased)
        assert status["dying"] == len(self.dying)
        if self.settings.exclusive:
            assert sum(1 for info in g._members.values() if info.role is Role.ACTIVE) <= 1


GroupMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGroupModel = GroupMachine.TestCase
