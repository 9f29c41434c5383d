"""felix.cluster.placement and felix.cluster.lease: the placer's rules and the lease's
deadlines on plain values (no database, a clock the test moves)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from felix.cluster.lease import LeaseKeeper, LeaseSettings
from felix.cluster.ownership import ShardState
from felix.cluster.placement import (
    FirstPlacement,
    Move,
    balance,
    logical_shard,
    never_placed,
    plan,
    rendezvous_owner,
)
from felix.errors import ConfigError

L = 256


def converge(
    shards: list[ShardState], live: set[str], *, max_handoffs: int = 1
) -> tuple[list[ShardState], list[list[Move]]]:
    """Apply plans until none is left, completing each handoff right away (as an owner
    would); the final shards and each round's moves."""
    rounds: list[list[Move]] = []
    for _ in range(2 * L + 10):
        moves = plan(shards, live, max_handoffs=max_handoffs)
        if not moves:
            return shards, rounds
        rounds.append(moves)
        for m in moves:
            s = shards[m.shard]
            assert s.epoch == m.expected_epoch
            if m.kind == "assign":
                shards[m.shard] = ShardState(m.to, s.epoch + 1, None, s.durable_node)
            elif m.kind == "handoff":
                # The owner completes the handoff at once.
                shards[m.shard] = ShardState(m.to, s.epoch + 1, None, s.durable_node)
            else:
                shards[m.shard] = ShardState(s.owner, s.epoch, None, s.durable_node)
    raise AssertionError("placement did not converge")


def fresh() -> list[ShardState]:
    return [ShardState(None, 0) for _ in range(L)]


def test_logical_shard_is_reexported_and_stable() -> None:
    assert logical_shard("acme/prod/orders", L) == logical_shard("acme/prod/orders", L)
    assert 0 <= logical_shard("acme/prod/orders", L) < L


def test_rendezvous_is_deterministic_across_processes_and_orders() -> None:
    nodes = ["n1", "n2", "n3"]
    here = [rendezvous_owner(s, nodes) for s in range(32)]
    assert here == [rendezvous_owner(s, reversed(nodes)) for s in range(32)]
    code = (
        "from felix.cluster.placement import rendezvous_owner as r;"
        "print(','.join(str(r(s, ['n3', 'n1', 'n2'])) for s in range(32)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == here
    assert rendezvous_owner(0, []) is None


def test_an_empty_cluster_is_spread_evenly_at_once() -> None:
    live = {"n1", "n2", "n3"}
    shards, rounds = converge(fresh(), live)
    assert len(rounds) == 1 and all(m.kind == "assign" for m in rounds[0])
    b = balance(shards, live)
    assert sum(b["owned"].values()) == L and b["unowned"] == 0
    # Rendezvous over 256 shards: each node near 85; a spread of 30 is far outside luck.
    assert b["min"] >= 65 and b["spread"] <= 30, b


def test_a_fourth_node_takes_about_a_quarter_by_handoffs_one_at_a_time() -> None:
    shards, _ = converge(fresh(), {"n1", "n2", "n3"})
    before = list(shards)
    after, rounds = converge(list(shards), {"n1", "n2", "n3", "n4"})
    assert all(len(r) == 1 and r[0].kind == "handoff" for r in rounds)
    moved = [i for i in range(L) if after[i].owner != before[i].owner]
    assert all(after[i].owner == "n4" for i in moved)
    assert all(after[i].epoch == before[i].epoch + 1 for i in moved)
    assert 40 <= len(moved) <= 90, len(moved)  # ~64
    # Removing it again moves those shards back (it is dead: assigned at once).
    back, rounds = converge(list(after), {"n1", "n2", "n3"})
    assert [s.owner for s in back] == [s.owner for s in before]
    assert len(rounds) == 1 and all(m.kind == "assign" for m in rounds[0])


def test_at_most_max_handoffs_in_flight_counting_existing_ones() -> None:
    shards, _ = converge(fresh(), {"n1", "n2", "n3"})
    live = {"n1", "n2", "n3", "n4"}
    moves = plan(shards, live)
    assert len(moves) == 1 and moves[0].kind == "handoff" and moves[0].to == "n4"
    first = moves[0]
    s = shards[first.shard]
    shards[first.shard] = ShardState(s.owner, s.epoch, "n4")
    assert plan(shards, live) == []  # one in flight already
    assert len(plan(shards, live, max_handoffs=3)) == 2


def test_a_handoff_to_a_node_gone_or_no_longer_desired_is_cleared() -> None:
    shards, _ = converge(fresh(), {"n1", "n2", "n3"})
    live = {"n1", "n2", "n3", "n4"}
    (move,) = plan(shards, live)
    s = shards[move.shard]
    shards[move.shard] = ShardState(s.owner, s.epoch, "n4")
    moves = plan(shards, {"n1", "n2", "n3"})  # n4 died before it completed
    assert moves == [Move(move.shard, s.epoch, "clear_handoff", "n4")]
    # A handoff to a live node the shard does not belong to is cleared too.
    wrong = next(n for n in ("n1", "n2", "n3") if n != s.owner)
    shards[move.shard] = ShardState(s.owner, s.epoch, wrong)
    assert Move(move.shard, s.epoch, "clear_handoff", wrong) in plan(shards, live)


def test_a_dead_owner_is_replaced_at_once_even_mid_handoff() -> None:
    shards, _ = converge(fresh(), {"n1", "n2", "n3"})
    owned_by_n1 = [i for i, s in enumerate(shards) if s.owner == "n1"]
    s = shards[owned_by_n1[0]]
    shards[owned_by_n1[0]] = ShardState("n1", s.epoch, "n2")
    moves = plan(shards, {"n2", "n3"})
    assert {m.shard for m in moves} == set(owned_by_n1)
    assert all(m.kind == "assign" and m.to in ("n2", "n3") for m in moves)
    assert all(m.to == rendezvous_owner(m.shard, ["n2", "n3"]) for m in moves)


def test_durable_shards_stay_with_their_node() -> None:
    shards, _ = converge(fresh(), {"n1", "n2", "n3"})
    pinned = [i for i, s in enumerate(shards) if s.owner == "n1"][:5]
    for i in pinned:
        shards[i] = ShardState("n1", shards[i].epoch, None, "n1")
    # n1 down: its durable shards wait for it, the rest move.
    moves = plan(shards, {"n2", "n3"})
    assert not {m.shard for m in moves} & set(pinned)
    shards, _ = converge(shards, {"n2", "n3"})
    assert all(shards[i].owner == "n1" for i in pinned)
    # n1 back: its durable shards are its own again at once (assigned: it was dead).
    shards, _ = converge(shards, {"n1", "n2", "n3", "n4"})
    assert all(shards[i].owner == "n1" for i in pinned)
    # A durable shard a live node holds elsewhere is handed to its durable node.
    i = pinned[0]
    shards[i] = ShardState("n2", shards[i].epoch, None, "n1")
    assert plan(shards, {"n1", "n2", "n3", "n4"}) == [Move(i, shards[i].epoch, "handoff", "n1")]


def test_a_node_with_a_stale_copy_is_never_given_the_shard() -> None:
    """A node a shard was moved or unpinned away from keeps its old records: placed there
    again it would serve them (a review finding: only `felix cluster move` checked)."""
    live = {"n1", "n2", "n3"}
    shards = fresh()
    wins: dict[int, str] = {}
    for i in range(len(shards)):
        winner = rendezvous_owner(i, sorted(live))
        assert winner is not None
        wins[i] = winner
    stale = {i: {w} for i, w in wins.items()}  # every shard's winner holds a stale copy
    moves = plan(shards, live, stale=stale)
    assert len(moves) == len(shards)
    assert all(m.kind == "assign" and m.to != wins[m.shard] for m in moves)
    # Owned by the stale node: handed to another.
    shards[0] = ShardState(wins[0], 1, None, None)
    moves = plan(shards, live, stale={0: {wins[0]}})
    assert next(m for m in moves if m.shard == 0).kind == "handoff"
    # Every live node stale for it: left alone rather than served stale.
    assert not [m for m in plan(fresh(), live, stale={5: live}) if m.shard == 5]


def test_no_live_node_no_moves() -> None:
    assert plan(fresh(), set()) == []


def test_a_fresh_cluster_is_one_no_shard_was_ever_assigned_in() -> None:
    assert never_placed([ShardState(None, 0)] * 4)
    # Every assignment bumps the epoch: a cluster whose nodes all died is not fresh.
    assert not never_placed([ShardState(None, 0)] * 3 + [ShardState(None, 1)])
    assert not never_placed([ShardState(None, 0)] * 3 + [ShardState("a", 1)])


def test_the_first_placement_waits_for_the_live_nodes_to_stop_changing() -> None:
    first = FirstPlacement(2.0)
    assert first.limit == 10.0
    assert not first.ready({"a"}, 100.0)
    assert first.seconds_left(100.0) == 2.0
    assert not first.ready({"a"}, 101.0)
    assert not first.ready({"a", "b"}, 101.5)  # b joined: the window starts again
    assert not first.ready({"a", "b"}, 103.4)
    assert first.ready({"a", "b"}, 103.5)  # unchanged for 2 s
    # A lone node waits the window once.
    lone = FirstPlacement(2.0)
    assert not lone.ready({"a"}, 0.0) and not lone.ready({"a"}, 1.9) and lone.ready({"a"}, 2.0)


def test_the_first_placement_waits_at_most_its_limit_and_settle_0_not_at_all() -> None:
    first = FirstPlacement(1.0, limit=3.0)
    now = 50.0
    for i in range(4):  # a node joins every 0.75 s: never quiet for 1 s
        assert not first.ready({f"n{j}" for j in range(i + 1)}, now)
        now += 0.75
    assert now - 50.0 >= 3.0
    assert first.ready({f"n{j}" for j in range(5)}, now)  # the limit has passed
    assert FirstPlacement(0.0).ready({"a"}, 0.0)
    assert FirstPlacement(0.0).seconds_left(0.0) == 0.0
    with pytest.raises(ValueError):
        FirstPlacement(2.0, limit=1.0)


def test_balance_summary() -> None:
    shards = [ShardState("a", 1), ShardState("a", 1), ShardState("b", 1, "c"), ShardState(None, 0)]
    b = balance(shards, {"a", "c"})
    assert b == {
        "owned": {"a": 2, "b": 1, "c": 0},
        "min": 0,
        "max": 2,
        "spread": 2,
        "unowned": 2,
        "handoffs": 1,
    }


# --- lease ---------------------------------------------------------------------------


def test_lease_settings_are_checked() -> None:
    s = LeaseSettings()
    assert s.renew_interval == pytest.approx(10 / 3)
    for bad in (
        {"ttl": 0},
        {"ttl": 2.0, "fence_margin": 2.0},
        {"ttl": 3.0, "fence_margin": 2.0},  # renew every 1s >= 3 - 2
        {"renew_every": 9.0},
        {"placer_grace": -1},
        {"ttl": float("nan")},
    ):
        with pytest.raises(ConfigError):
            LeaseSettings(**bad)
    assert LeaseSettings(ttl=1.5, fence_margin=0.5, placer_grace=0.5).renew_interval == 0.5


def test_lease_keeper_serves_from_the_send_time_of_the_renewal() -> None:
    k = LeaseKeeper(LeaseSettings(ttl=9.0, fence_margin=2.0))
    assert not k.serving(0.0) and k.renew_due(0.0)
    k.renewing(100.0)
    assert not k.renew_due(100.0) and not k.renew_due(1000.0)  # one in flight
    k.renewed()  # the answer came late: the deadline still counts from the send
    assert k.serve_until == 107.0
    assert k.serving(106.9) and not k.serving(107.0)
    assert not k.renew_due(102.9) and k.renew_due(103.0)
    assert k.seconds_left(105.0) == 2.0


def test_lease_keeper_retries_failures_with_backoff_and_keeps_the_deadline() -> None:
    k = LeaseKeeper(LeaseSettings(ttl=9.0, fence_margin=2.0))
    k.renewing(0.0)
    k.renewed()
    delays = []
    t = 3.0
    for _ in range(6):
        assert k.renew_due(t)
        k.renewing(t)
        k.failed()
        delays.append(k.next_due() - t)
        t = k.next_due()
    assert delays == pytest.approx([0.3, 0.6, 1.2, 1.5, 1.5, 1.5])
    assert k.serve_until == 7.0 and not k.serving(t)
    k.renewing(t)
    k.renewed()
    assert k.serve_until == t + 7.0


def test_lease_keeper_lost_stops_serving_at_once() -> None:
    k = LeaseKeeper(LeaseSettings())
    k.renewing(0.0)
    k.renewed()
    assert k.serving(1.0)
    k.renewing(3.4)
    k.lost()
    assert k.serve_until == 0 and not k.serving(3.5) and k.renew_due(3.5)
    with pytest.raises(RuntimeError):
        k.renewed()
    # Re-registered: serving from the new send time.
    k.renewing(4.0)
    k.renewed()
    assert k.serve_until == 12.0
