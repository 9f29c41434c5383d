"""The shard map as one node sees it, and the verdict on each request (sans-IO).

The supervisor's cluster agent builds an :class:`OwnershipMap` from PostgreSQL and
its lease, and sends it to every gateway process (a :class:`~felix.node.messages`
line, :meth:`OwnershipMap.to_dict`) whenever the map or ``serve_until`` changes. A
gateway asks :meth:`OwnershipMap.verdict` before it admits a request: serve it here,
redirect the client to the owner, or refuse it for now (retry).

``serve_until`` is a deadline on :func:`cluster_clock`, CLOCK_BOOTTIME: one clock for
every process of a Linux host (so the supervisor's deadline means the same in its
gateways and shard processes) that, unlike CLOCK_MONOTONIC (``time.monotonic()``),
keeps counting while the host is suspended, so a host that slept past its lease
wakes fenced. Every comparison with ``serve_until`` reads this clock. A map is never
trusted past it (docs/architecture.md, "Membership and leases").
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "MAX_LOGICAL_SHARDS",
    "ClusterNode",
    "OwnershipMap",
    "Redirect",
    "Refuse",
    "Serve",
    "ShardState",
    "cluster_clock",
    "logical_shard",
]

#: The most logical shards a cluster may have (the SHARD_MAP reply stays under 64 KiB).
MAX_LOGICAL_SHARDS = 4096

_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def cluster_clock() -> float:
    """Seconds on the clock ``serve_until`` is on: CLOCK_BOOTTIME (Linux; it counts time
    the host spent suspended, which CLOCK_MONOTONIC does not), ``time.monotonic()``
    where there is none (development on other systems)."""
    if _BOOTTIME is None:
        return time.monotonic()
    return time.clock_gettime(_BOOTTIME)


#: A stream whose name ends with it lives on the logical shard of the stream without it:
#: a dead-letter stream (``<stream>.dlq``, the default) with its source.
DEAD_LETTER_SUFFIX = ".dlq"


def logical_shard(key: str, logical_shards: int) -> int:
    """The logical shard of a routing key: crc32 of the key, as clients compute it
    (felix/client/_cluster.py has the same function), modulo ``logical_shards``.

    A stream key (``tenant/ns/name``: exactly two slashes; cache keys have three)
    whose name ends with ``.dlq`` hashes without it, repeatedly: ``orders.dlq`` (and
    ``orders.dlq.dlq``) live on the logical shard of ``orders``, so a queue group's
    default dead-letter stream is served by the node that serves its source."""
    if key.endswith(DEAD_LETTER_SUFFIX) and key.count("/") == 2:
        while key.endswith(DEAD_LETTER_SUFFIX):
            key = key[: -len(DEAD_LETTER_SUFFIX)]
    return zlib.crc32(key.encode()) % logical_shards


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """A member as the node last read it from PostgreSQL."""

    node_id: str
    #: QUIC ``host:port`` it advertises: where clients are redirected.
    address: str
    #: Its health/metrics base URL (``http://host:port``), for ``felix cluster status``.
    health_url: str
    #: Its lease (plus the placer's grace) had not run out when the map was read.
    live: bool
    incarnation: int
    #: Unix seconds on the database's clock (shown, never compared with local clocks).
    lease_until: float


@dataclass(frozen=True, slots=True)
class ShardState:
    """One logical shard's row."""

    owner: str | None
    epoch: int
    #: The node a handoff is moving it to (the owner stops admitting requests for it).
    handoff_to: str | None = None
    #: The node holding its durable records: it is only ever placed there.
    durable_node: str | None = None


@dataclass(frozen=True, slots=True)
class Serve:
    """Admit the request: this node owns the shard."""

    shard: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer REDIRECT: ``owner`` (host:port) holds ``shard`` at ``epoch``."""

    shard: int
    epoch: int
    owner: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer Unavailable with ``reason`` (retryable): no live owner, a handoff in
    progress, or this node's lease is not valid now."""

    shard: int
    reason: str


Verdict = Serve | Redirect | Refuse


@dataclass(frozen=True, slots=True)
class OwnershipMap:
    """Who owns which logical shard, and until when this node may serve its own."""

    #: Rises with every map the agent sends (gateways ignore an older one).
    version: int
    #: This node's id.
    node_id: str
    logical_shards: int
    #: :func:`cluster_clock` deadline: after it, this node serves no shard.
    serve_until: float
    nodes: tuple[ClusterNode, ...]
    #: Indexed by logical shard; ``len(shards) == logical_shards``.
    shards: tuple[ShardState, ...]
    #: ``nodes`` by id (derived): a redirect looks its owner up per request.
    _by_id: dict[str, ClusterNode] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {n.node_id: n for n in self.nodes})

    def shard_of(self, key: str) -> int:
        return logical_shard(key, self.logical_shards)

    def node(self, node_id: str | None) -> ClusterNode | None:
        return None if node_id is None else self._by_id.get(node_id)

    def verdict(self, key: str, now: float) -> Verdict:
        """What to do with a request for routing key ``key`` at time ``now``
        (:func:`cluster_clock`)."""
        shard = self.shard_of(key)
        state = self.shards[shard]
        if state.owner == self.node_id:
            if now >= self.serve_until:
                return Refuse(shard, f"node {self.node_id} has no valid cluster lease right now")
            if state.handoff_to is not None:
                return Refuse(shard, f"shard {shard} is moving to node {state.handoff_to}")
            return Serve(shard, state.epoch)
        owner = self.node(state.owner)
        if owner is None:
            return Refuse(shard, f"shard {shard} has no owner right now")
        if not owner.live:
            return Refuse(shard, f"shard {shard}'s node {owner.node_id} is down")
        return Redirect(shard, state.epoch, owner.address)

    def owned(self) -> list[int]:
        """The logical shards this node owns (handoffs included)."""
        return [i for i, s in enumerate(self.shards) if s.owner == self.node_id]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (the supervisor -> gateway message, ``/cluster``)."""
        return {
            "version": self.version,
            "node_id": self.node_id,
            "logical_shards": self.logical_shards,
            "serve_until": self.serve_until,
            "nodes": [
                [n.node_id, n.address, n.health_url, n.live, n.incarnation, n.lease_until]
                for n in self.nodes
            ],
            "shards": [[s.owner, s.epoch, s.handoff_to, s.durable_node] for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OwnershipMap:
        """The inverse of :meth:`to_dict` (raises KeyError/TypeError/ValueError on a bad one)."""
        shards = tuple(ShardState(*row) for row in data["shards"])
        if len(shards) != data["logical_shards"]:
            raise ValueError("shard map length differs from logical_shards")
        return cls(
            version=int(data["version"]),
            node_id=str(data["node_id"]),
            logical_shards=int(data["logical_shards"]),
            serve_until=float(data["serve_until"]),
            nodes=tuple(ClusterNode(*row) for row in data["nodes"]),
            shards=shards,
        )
