"""A gateway's side of the cluster (issue #16): the newest shard map and what it says.

In cluster mode (``felix up --cluster``) the supervisor's agent sends every gateway
its node's :class:`~felix.cluster.ownership.OwnershipMap` (felix/node/messages.py
``Ownership``) at start and whenever it or ``serve_until`` changes. The gateway
(felix/gateway/gateway.py ``Gateway.forward``, the one place every request with a
routing key passes) asks :meth:`ClusterGate.verdict` before it sends a request to a
shard: serve it, answer REDIRECT naming the owner, or answer Unavailable. Until its
first map a gateway serves nothing ("joining the cluster").

When a map takes logical shards away from this node (their owner changed, or a
handoff started), :meth:`ClusterGate.apply` says which, so the gateway ends their
subscriptions and consumers ("moved": clients re-route) and, once its requests in
flight for them are answered, acknowledges the map's version to the supervisor: a
handoff completes only after every gateway did (``handoff_drained``).

Standalone gateways have no gate (``Gateway.cluster is None``): one ``is None``
check per request.
"""

from __future__ import annotations

from collections.abc import Callable

from felix import wire
from felix.cluster.ownership import (
    OwnershipMap,
    Redirect,
    Refuse,
    Serve,
    Verdict,
    cluster_clock,
)

__all__ = ["JOINING", "NO_OWNER", "ClusterGate"]

#: SHARD_MAP's owner index of a shard with no owner to send requests to.
NO_OWNER = wire.SHARD_NO_OWNER
#: Why a gateway without a map refuses every request.
JOINING = "node is joining the cluster (no shard map yet); retry"


class ClusterGate:
    """The newest shard map a gateway has, and the verdict it gives each request."""

    def __init__(self, clock: Callable[[], float] = cluster_clock) -> None:
        self.map: OwnershipMap | None = None
        self._clock = clock
        #: Requests answered with REDIRECT, and refused (Unavailable) for the cluster.
        self.redirects = 0
        self.refused = 0
        # The last SHARD_MAP body's parts: (map version, fenced) -> encode arguments.
        self._shard_map: tuple[tuple[int, bool], tuple[list[str], list[int], list[int]]] | None = (
            None
        )

    def verdict(self, key: str) -> Verdict:
        """Serve, Redirect or Refuse a request for routing key ``key`` now."""
        current = self.map
        if current is None:
            return Refuse(-1, JOINING)
        return current.verdict(key, self._clock())

    def apply(self, new: OwnershipMap) -> set[int] | None:
        """Take ``new`` as the current map; the logical shards it takes away from this
        node (served under the previous map, not under this one). None: ``new`` is not
        newer than the current map (ignored)."""
        old = self.map
        if old is not None and new.version <= old.version:
            return None
        self.map = new
        if old is None:
            return set()
        if old.logical_shards != new.logical_shards:
            return set(_served(old))
        return {s for s in _served(old) if not _serves(new, s)}

    def serves(self, shard: int) -> bool:
        """Whether the newest map has this node serve logical shard ``shard`` (its
        owner, no handoff under way; the lease is not looked at)."""
        current = self.map
        return (
            current is not None and 0 <= shard < current.logical_shards and _serves(current, shard)
        )

    def serving(self) -> bool:
        """Whether this node's lease is valid now (by the newest map)."""
        current = self.map
        return current is not None and self._clock() < current.serve_until

    def shard_map(self, request_id: int) -> bytes:
        """The SHARD_MAP answer: the whole map as this gateway would route it now."""
        current = self.map
        if current is None:
            return wire.encode_shard_map(request_id, 0, 0, [], [], [])
        fenced = self._clock() >= current.serve_until
        cached = self._shard_map
        if cached is None or cached[0] != (current.version, fenced):
            cached = self._shard_map = ((current.version, fenced), _map_parts(current, fenced))
        addresses, owners, epochs = cached[1]
        return wire.encode_shard_map(
            request_id, current.logical_shards, current.version, addresses, owners, epochs
        )


def _serves(m: OwnershipMap, shard: int) -> bool:
    state = m.shards[shard]
    return state.owner == m.node_id and state.handoff_to is None


def _served(m: OwnershipMap) -> list[int]:
    return [s for s in range(m.logical_shards) if _serves(m, s)]


def _map_parts(m: OwnershipMap, fenced: bool) -> tuple[list[str], list[int], list[int]]:
    """(addresses, owner index per shard, epoch per shard) of a SHARD_MAP answer: an
    owner only where :meth:`OwnershipMap.verdict` would serve the request here or
    redirect it to a live owner (as a client would be told request by request)."""
    # Only nodes that own a shard here are listed: rows of nodes long gone (the table
    # keeps them until `felix cluster forget`) must not push the answer past its
    # 1024-node bound.
    eligible = {n.node_id: n for n in m.nodes if n.live or n.node_id == m.node_id}
    addresses: list[str] = []
    index: dict[str, int] = {}
    owners = []
    epochs = []
    for state in m.shards:
        owner_id = state.owner
        if owner_id == m.node_id and (fenced or state.handoff_to is not None):
            owner_id = None
        node = eligible.get(owner_id) if owner_id is not None else None
        owner = NO_OWNER
        if node is not None:
            owner = index.get(node.node_id, NO_OWNER)
            if owner == NO_OWNER:
                owner = index[node.node_id] = len(addresses)
                addresses.append(node.address)
        owners.append(owner)
        epochs.append(state.epoch)
    return addresses, owners, epochs


def verdict_kind(verdict: Verdict) -> str:
    """ "serve", "redirect" or "refuse" (for logs and tests)."""
    if isinstance(verdict, Serve):
        return "serve"
    if isinstance(verdict, Redirect):
        return "redirect"
    assert isinstance(verdict, Refuse)
    return "refuse"
