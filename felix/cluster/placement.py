"""Where each logical shard should live, and the moves that get it there (pure).

The placer (whichever node holds the cluster's advisory lock, felix/cluster/agent.py)
reads every shard's row and the live nodes, calls :func:`plan` and applies the moves
it returns, each a compare-and-swap on the shard's epoch (felix/cluster/store.py).
Nothing here does I/O or reads a clock, so every rule is tested on plain values
(docs/architecture.md, "Placement").
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from felix.cluster.ownership import ShardState, logical_shard

__all__ = [
    "FirstPlacement",
    "Move",
    "MoveKind",
    "balance",
    "logical_shard",
    "never_placed",
    "plan",
    "rendezvous_owner",
]

MoveKind = Literal["assign", "handoff", "clear_handoff"]


# Cached: the placer re-plans every poll with the same (node, shard) pairs, and L x N
# hashes (4096 x a dozen) each second would be most of its work.
@lru_cache(maxsize=1 << 16)
def _weight(node_id: str, shard: int) -> int:
    """The node's rendezvous weight for the shard: the same in every process and release
    (blake2b, not ``hash()``, which is salted per process)."""
    digest = hashlib.blake2b(f"{node_id}\x00{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous_owner(shard: int, node_ids: Iterable[str]) -> str | None:
    """The node of ``node_ids`` with the highest weight for ``shard`` (None if empty).

    Adding or removing one node of N changes the winner of about 1/N of the shards and
    of no others: a shard's winner changes only if the node added or removed is (or
    was) its winner. Ties (one in 2**64) go to the greater node id, so the result never
    depends on the order of ``node_ids``.
    """
    best: tuple[int, str] | None = None
    for node_id in node_ids:
        key = (_weight(node_id, shard), node_id)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


@dataclass(frozen=True, slots=True)
class Move:
    """One change the placer makes to one shard's row, if its epoch is still
    ``expected_epoch``.

    - ``assign``: ``owner = to``, ``epoch + 1``, no handoff (the owner is dead or none).
    - ``handoff``: ``handoff_to = to``; the live owner drains the shard and completes it.
    - ``clear_handoff``: ``handoff_to = NULL``; ``to`` is the target being given up.
    """

    shard: int
    expected_epoch: int
    kind: MoveKind
    to: str | None


def plan(
    shards: Sequence[ShardState],
    live: Collection[str],
    *,
    max_handoffs: int = 1,
    stale: Mapping[int, Collection[str]] | None = None,
) -> list[Move]:
    """The moves that bring ``shards`` (indexed by logical shard) closer to their desired
    owners, given the ids of the ``live`` nodes.

    A shard's desired owner is its ``durable_node`` when that node is live (a durable
    shard whose node is down is left alone: it waits for its data), else the rendezvous
    winner among the live nodes. A shard with no live owner is assigned at once; a live
    owner that is not the desired one hands the shard off, with at most
    ``max_handoffs`` handoffs in flight in the whole cluster (each makes the shard
    unavailable while it drains). A handoff whose target is gone or no longer desired is
    cleared. With no live node nothing can be placed: no moves.

    ``stale``: per logical shard, the nodes holding a stale copy of its durable records
    (it was moved or unpinned away from them): never desired for it, since they would
    serve that copy. A shard every live node is stale for is left alone.
    """
    live_set = frozenset(live)
    if not live_set:
        return []
    moves: list[Move] = []
    wanted: list[tuple[int, ShardState, str]] = []
    # Counted before this plan's clears and assigns: those are CASes that may lose, so the
    # slot they free is used by the next round, which reads the result (never one too many).
    in_flight = sum(1 for s in shards if s.handoff_to is not None)
    for shard, state in enumerate(shards):
        if state.durable_node is not None:
            if state.durable_node not in live_set:
                continue
            desired = state.durable_node
        else:
            avoid = stale.get(shard) if stale else None
            eligible = live_set.difference(avoid) if avoid else live_set
            if not eligible:
                continue
            desired = _desired(shard, eligible)
        if state.owner is None or state.owner not in live_set:
            # Dead or no owner (a handoff in flight included: its source cannot complete it).
            moves.append(Move(shard, state.epoch, "assign", desired))
        elif state.handoff_to is not None:
            if state.handoff_to != desired or state.handoff_to not in live_set:
                moves.append(Move(shard, state.epoch, "clear_handoff", state.handoff_to))
        elif state.owner != desired:
            wanted.append((shard, state, desired))
    for shard, state, desired in wanted:
        if in_flight >= max_handoffs:
            break
        moves.append(Move(shard, state.epoch, "handoff", desired))
        in_flight += 1
    return moves


def never_placed(shards: Sequence[ShardState]) -> bool:
    """Whether no shard was ever assigned: a cluster being created (every assignment
    bumps a shard's epoch, and epochs never go back)."""
    return all(s.epoch == 0 and s.owner is None for s in shards)


class FirstPlacement:
    """When the placer may make a fresh cluster's first placement (sans-IO: the caller
    passes its clock's reading).

    Nodes started together (a StatefulSet with parallel pod management, a compose file)
    register a moment apart. Placing the shards on the first one alone would give each
    later node its share one handoff at a time, each draining a shard. So the first
    placement waits until the set of live nodes has not changed for ``settle`` seconds,
    and at most ``limit`` seconds (default five times ``settle``) after this node first
    saw the cluster fresh; then every live node gets its share directly. ``settle`` 0:
    no wait. Only a fresh cluster waits (:func:`never_placed`): failover and every later move
    are never delayed.
    """

    def __init__(self, settle: float, limit: float | None = None) -> None:
        if not (settle >= 0 and (limit is None or limit >= settle)):
            raise ValueError(f"bad first placement settle {settle!r} / limit {limit!r}")
        self.settle = settle
        self.limit = 5 * settle if limit is None else limit
        #: When this node first saw the fresh cluster, and when its live set last changed.
        self._since: float | None = None
        self._changed = 0.0
        self._live: frozenset[str] | None = None

    def ready(self, live: Collection[str], now: float) -> bool:
        """Whether the first placement may be made now, with these ``live`` nodes (call it
        on every read of a fresh cluster, placer or not, so a new placer has the history)."""
        live_set = frozenset(live)
        if self._since is None:
            self._since = self._changed = now
            self._live = live_set
        elif live_set != self._live:
            self._live, self._changed = live_set, now
        return now - self._changed >= self.settle or now - self._since >= self.limit

    def seconds_left(self, now: float) -> float:
        """How long the first placement may still wait at most (0: not waiting)."""
        if self._since is None:
            return 0.0
        return max(0.0, min(self._changed + self.settle, self._since + self.limit) - now)


def _desired(shard: int, live: frozenset[str]) -> str:
    owner = rendezvous_owner(shard, live)
    assert owner is not None  # live is not empty
    return owner


def balance(shards: Sequence[ShardState], live: Collection[str]) -> dict[str, Any]:
    """How evenly the shards are spread, for ``felix cluster status`` and ``/cluster``.

    ``owned``: shards per node (every live node, with 0 if it owns none, and any dead
    node still named as an owner); ``min``/``max``/``spread`` over the live nodes;
    ``unowned``: shards with no live owner; ``handoffs``: handoffs in flight.
    """
    live_set = frozenset(live)
    counts = Counter(s.owner for s in shards if s.owner is not None)
    owned = {node: counts.get(node, 0) for node in sorted(live_set | set(counts))}
    live_counts = [owned[node] for node in live_set]
    low = min(live_counts, default=0)
    high = max(live_counts, default=0)
    return {
        "owned": owned,
        "min": low,
        "max": high,
        "spread": high - low,
        "unowned": sum(1 for s in shards if s.owner is None or s.owner not in live_set),
        "handoffs": sum(1 for s in shards if s.handoff_to is not None),
    }
