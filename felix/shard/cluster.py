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
  queue groups' states; their consumers are ended;
- the logical shards *pinned* to this node (the map's ``durable_node``): the ack of a
  durable publish to a shard not pinned here yet waits for the pin (:class:`PinWaits`).

A standalone core has none (``ShardCore.cluster is None``): one ``is None`` per write;
in cluster mode a write costs a crc32 of its routing key, and a durable publish one
clock read more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from felix.cluster.ownership import OwnershipMap, cluster_clock, logical_shard
from felix.errors import Unavailable

if TYPE_CHECKING:
    from felix.shard.durable import DurableStream

__all__ = ["HeldAck", "PinWaits", "ShardOwnership"]

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
        "_pinned",
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
        #: Per logical shard: 1 where the map pins it to this node (its durable_node).
        self._pinned = b""
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
        self._pinned = bytes(1 if state.durable_node == me else 0 for state in new.shards)
        self._held = held
        return lost

    def holds(self, shard: int) -> bool:
        """Whether this node owns logical ``shard`` (a handoff under way included)."""
        return shard in self._held

    def pinned(self, shard: int) -> bool:
        """Whether the newest map pins logical ``shard`` to this node: the placer keeps it
        here, so the acks of its durable records may be sent (see ``_PinWaits`` in
        felix/shard/core.py)."""
        return bool(self._pinned) and bool(self._pinned[shard])

    def lease_valid(self) -> bool:
        """Whether this node's lease is valid now (``serve_until`` has not passed)."""
        return self._clock() < self.serve_until

    def shard_of(self, key: str) -> int:
        """``key``'s logical shard, as gateways and clients compute it (a ``.dlq``
        stream with its source: :func:`felix.cluster.ownership.logical_shard`)."""
        return logical_shard(key, self.logical_shards)

    def serves(self, key: str) -> bool:
        """Whether this node serves ``key``'s logical shard by the newest map."""
        return bool(self.version) and bool(self._served[self.shard_of(key)])

    def check(self, key: str, durable: bool = False) -> int:
        """Raise Unavailable unless a write for routing key ``key`` may be stored here now:
        this node serves its logical shard by the newest map and, for a write that may
        go to disk (``durable``), its lease is still valid (``now < serve_until``).
        Returns the logical shard."""
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
        return shard

    def may_write(self, key: str) -> bool:
        """Whether state of routing key ``key`` may be written to disk now (a queue group's
        state file, by a timer or a delivery round rather than a request): ``check(key,
        durable=True)`` would pass. Counts nothing."""
        if not self.version or not self._served[logical_shard(key, self.logical_shards)]:
            return False
        return self._clock() < self.serve_until


#: Why a held ack fails when its logical shard left this node before it was pinned here.
PIN_LOST = (
    "not acknowledged: logical shard {shard} left this node before it was pinned to this "
    "node's durable data (the records may or may not be kept); retry"
)
#: Why a held ack fails when this node's lease lapsed before the pin.
PIN_FENCED = (
    "not acknowledged: this node's cluster lease lapsed before logical shard {shard} was "
    "pinned to this node's durable data (the records may or may not be kept); retry"
)


class HeldAck(NamedTuple):
    """An ack of durable records below offset ``end`` of ``disk``, for the request
    ``request_id`` of ``gateway`` (``token``): ``reply``."""

    disk: DurableStream
    end: int
    gateway: int
    token: int
    request_id: int
    reply: bytes


class PinWaits:
    """Acks of durable records held until their logical shard is pinned to this node.

    The placer keeps a logical shard on the node holding its durable records only once
    that node has pinned it (``durable_node`` in the cluster's tables). Before the pin,
    a node killed right after acking the shard's first durable records would lose the
    shard to another node, which would serve it empty and issue its offsets again. So
    the core holds such acks here and reports the shard as *wanted* (``wanted``; the
    process sends them to the supervisor, whose agent claims the pin at once); a newer
    map showing the pin releases them. They fail, retryable, when the shard leaves this
    node or this node's lease lapses first: a client never holds an ack for records the
    cluster may not serve. This costs the first durable publish of a logical shard on a
    node one claim (a few database round trips); once pinned, a shard stays pinned.

    Bounded by what the gateways keep in flight (each held ack is a request a gateway
    is still waiting for), as the acks waiting for an fsync are.
    """

    __slots__ = ("_waits", "failed", "held", "wanted")

    def __init__(self) -> None:
        #: logical shard -> held acks (whatever the owner of the ack needs to send it).
        self._waits: dict[int, list[HeldAck]] = {}
        #: Logical shards whose pin this node should claim now (taken by the process).
        self.wanted: set[int] = set()
        #: Acks held for a pin so far, and those failed instead.
        self.held = 0
        self.failed = 0

    def __bool__(self) -> bool:
        return bool(self._waits)

    def want(self, shard: int) -> None:
        self.wanted.add(shard)

    def take_wanted(self) -> list[int]:
        out = sorted(self.wanted)
        self.wanted.clear()
        return out

    def hold(self, shard: int, ack: HeldAck) -> None:
        self.want(shard)
        self._waits.setdefault(shard, []).append(ack)
        self.held += 1

    def drop(self, disk: DurableStream) -> list[HeldAck]:
        """Take out the held acks of ``disk`` (its stream is being deleted: they are
        answered NotFound, as the ones waiting for an fsync are)."""
        out: list[HeldAck] = []
        for shard in list(self._waits):
            acks = self._waits[shard]
            keep = [ack for ack in acks if ack.disk is not disk]
            if len(keep) != len(acks):
                out.extend(ack for ack in acks if ack.disk is disk)
                if keep:
                    self._waits[shard] = keep
                else:
                    del self._waits[shard]
        return out

    def settle(self, ownership: ShardOwnership) -> tuple[list[HeldAck], list[tuple[str, HeldAck]]]:
        """The held acks ``ownership`` (the newest map) decides: those to send (their
        shard is pinned here now) and those to fail, each with why. The others wait."""
        release: list[HeldAck] = []
        fail: list[tuple[str, HeldAck]] = []
        if not self._waits:
            return release, fail
        valid = ownership.lease_valid()
        for shard in list(self._waits):
            if ownership.pinned(shard):
                release.extend(self._waits.pop(shard))
            elif not ownership.holds(shard) or not valid:
                why = (PIN_FENCED if ownership.holds(shard) else PIN_LOST).format(shard=shard)
                acks = self._waits.pop(shard)
                self.failed += len(acks)
                fail.extend((why, ack) for ack in acks)
        return release, fail
