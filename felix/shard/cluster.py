"""A shard core's side of the cluster (issue #16; docs/architecture.md, "Cluster").

In cluster mode every shard core gets its node's shard map too: a shard process from
the supervisor (felix/node/messages.py ``Ownership``, acknowledged like a gateway's),
embedded cores from the gateway hosting them. :class:`ShardOwnership` keeps what a
core needs of it:

- the logical shards this node *serves* (it owns them and no handoff is under way):
  a write (publish, cache set) is stored only for those, any other is refused with
  Unavailable (retryable). So no in-memory state of a logical shard is created here
  while another node owns it, whatever the order in which a gateway and a shard
  process learn a map (a request admitted under the previous map may reach the core
  after the new one);
- a queue group's state (felix/shard/queue/manager.py): the requests that change it
  or hand out its records are checked like writes (consume, ack/nak/term/release/
  in_progress, window), and nothing else writes its state file unless :meth:`may_write`
  (served, and the lease valid): deliveries, lease expiries and dead-letter
  confirmations of a group wait meanwhile (docs/queues.md, "In a cluster");
- ``serve_until``: before a publish to a durable stream the core checks that this
  node's lease is still valid (the fence of "Membership and leases"), on the clock
  the supervisor's deadline is on, so a frozen or partitioned supervisor fences its
  shard processes too, whatever their gateways do (embedded cores check it anyway:
  one clock read per durable publish);
- the logical shards a new map takes away (their owner changed, or their epoch did:
  the shard left and came back between two maps seen here): the core drops their
  in-memory state (:meth:`felix.shard.core.ShardCore.apply_ownership`), so a shard
  that comes back starts empty as on any other node. Durable streams stay (their
  records are on disk and the shard is only ever placed with them), and so do their
  queue groups' states; their consumers are ended.

A standalone core has none (``ShardCore.cluster is None``): one ``is None`` per write;
in cluster mode a write costs a crc32 of its routing key, and a durable publish one
clock read more.
"""

from __future__ import annotations

from collections.abc import Callable

from felix.cluster.ownership import OwnershipMap, cluster_clock, logical_shard
from felix.errors import Unavailable

__all__ = ["ShardOwnership"]

#: Why a core refuses writes before its first map.
NO_MAP = "this shard has no cluster shard map yet (the node is joining); retry"


class ShardOwnership:
    """The newest shard map a shard core has, as the core checks writes against it.

    ``clock``: the clock ``serve_until`` is on, the supervisor's (``cluster_clock``:
    CLOCK_BOOTTIME is one clock for every process of a host, and counts a suspended
    host's sleep; felix/cluster/ownership.py).
    """

    __slots__ = (
        "_clock",
        "_held",
        "_served",
        "fenced",
        "logical_shards",
        "refused",
        "serve_until",
        "version",
    )

    def __init__(self, clock: Callable[[], float] = cluster_clock) -> None:
        self._clock = clock
        #: The newest map's version (0: none yet; the agent's versions start at 1).
        self.version = 0
        self.logical_shards = 0
        self.serve_until = 0.0
        #: Per logical shard: 1 where this node serves it (owner, no handoff).
        self._served = b""
        #: Logical shards this node owns (a handoff under way included) -> epoch.
        self._held: dict[int, int] = {}
        #: Writes refused: their logical shard is not served here.
        self.refused = 0
        #: Durable publishes refused: this node's lease was not valid (``serve_until``).
        self.fenced = 0

    def apply(self, new: OwnershipMap) -> set[int] | None:
        """Take ``new``; the logical shards whose in-memory state must go (owned under the
        previous map, and now owned by another node or under another epoch). None:
        ``new`` is not newer than the map held (ignored). The first map takes nothing:
        a core holds no in-memory state before it (writes are refused)."""
        if new.version <= self.version:
            return None
        me = new.node_id
        held = {s: state.epoch for s, state in enumerate(new.shards) if state.owner == me}
        if not self.version:
            lost: set[int] = set()
        elif new.logical_shards != self.logical_shards:
            lost = set(self._held)
        else:
            lost = {s for s, epoch in self._held.items() if held.get(s) != epoch}
        self.version = new.version
        self.logical_shards = new.logical_shards
        self.serve_until = new.serve_until
        self._served = bytes(
            1 if state.owner == me and state.handoff_to is None else 0 for state in new.shards
        )
        self._held = held
        return lost

    def shard_of(self, key: str) -> int:
        """``key``'s logical shard, as gateways and clients compute it (a ``.dlq``
        stream with its source: :func:`felix.cluster.ownership.logical_shard`)."""
        return logical_shard(key, self.logical_shards)

    def serves(self, key: str) -> bool:
        """Whether this node serves ``key``'s logical shard by the newest map."""
        return bool(self.version) and bool(self._served[self.shard_of(key)])

    def check(self, key: str, durable: bool = False) -> None:
        """Raise Unavailable unless a write for routing key ``key`` may be stored here now:
        this node serves its logical shard by the newest map and, for a write that may
        go to disk (``durable``), its lease is still valid (``now < serve_until``)."""
        if not self.version:
            self.refused += 1
            raise Unavailable(NO_MAP)
        shard = logical_shard(key, self.logical_shards)
        if not self._served[shard]:
            self.refused += 1
            raise Unavailable(
                f"logical shard {shard} is not served by this node now (moved or moving); retry"
            )
        if durable and self._clock() >= self.serve_until:
            self.fenced += 1
            raise Unavailable(
                "this node's cluster lease is not valid right now: nothing written; retry"
            )

    def may_write(self, key: str) -> bool:
        """Whether state of routing key ``key`` may be written to disk now (a queue group's
        state file, by a timer or a delivery round rather than a request): ``check(key,
        durable=True)`` would pass. Counts nothing."""
        if not self.version or not self._served[logical_shard(key, self.logical_shards)]:
            return False
        return self._clock() < self.serve_until
