"""Routing across the nodes of a cluster (sans-IO): the client's shard map and redirects.

How it works (docs/architecture.md, "Epochs, redirects and the client"): a client
starts knowing one address, the one it was given. A node of a cluster answers a
request for a logical shard it does not own with REDIRECT (shard, epoch, owner).
The first REDIRECT puts the client in cluster mode: the call follows it to the
owner, and the client fetches the whole map (SHARD_MAP) from the node that sent it.
From then on each request goes straight to the owner of its routing key's logical
shard (``crc32(key) % L``), over a connection per node. Every REDIRECT updates one
entry (a newer or equal epoch wins, unless it is more than :data:`MAX_EPOCH_JUMP`
above the known one: an epoch rises by one per change of owner, so such a jump is a
broken or hostile node's, and would make its entry outlast every true one); one call
follows at most
:data:`MAX_REDIRECTS` in a row, then fails with Unavailable naming the shard and
the last owner. A call that is sent back to a node it already left (A -> B -> A),
or redirected at an older epoch than the map's, makes the client fetch the map from
the node it was given and take that map whole, whatever its epochs: a wrong entry
that epochs protect is undone there. A client
that never sees a REDIRECT never has a map: routing costs
nothing on its calls.

A node's word is not enough to connect somewhere and present the client's token
there: every address a REDIRECT or a map names is checked by the client's host
policy (``cluster_hosts``, felix/client/_hosts.py) first. A REDIRECT to a host it
refuses fails its call with ConfigError (and is not learned); a map entry naming one
is ignored.

:class:`Router` holds that state and makes every decision, with no I/O and no clock
of its own (``now`` is passed in), so the client's I/O code only asks it where to
send and what to do with a reply.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from felix import wire
from felix.client._convert import Endpoint
from felix.errors import ConfigError, FelixError, RemoteProtocolError, Unavailable

__all__ = [
    "MAP_INTERVAL",
    "MAP_RETRY",
    "MAX_EARLY",
    "MAX_EPOCH_JUMP",
    "MAX_NODES",
    "MAX_REDIRECTS",
    "Redirected",
    "Router",
    "ShardMap",
    "logical_shard",
    "parse_address",
]

log = logging.getLogger("felix.client")

#: Says why the client must not connect to a node address (None: it may).
HostCheck = Callable[[str], "str | None"]

#: REDIRECTs one call follows in a row before it fails with Unavailable.
MAX_REDIRECTS = 4
#: Nodes a client keeps connections to besides the one it was given (beyond: Overloaded).
MAX_NODES = 64
#: How far above the known epoch of a shard a REDIRECT or map entry may be (further:
#: refused, and logged once).
MAX_EPOCH_JUMP = 1_000_000
#: REDIRECTs kept from before the map arrives, one per logical shard (the most a map has:
#: a REDIRECT naming a higher shard fits no map and is not kept); beyond, the oldest go.
MAX_EARLY = 4096
#: Seconds between two SHARD_MAP fetches from one node (and one in flight per node).
MAP_INTERVAL = 1.0
#: Seconds before a failed SHARD_MAP fetch (or one answered "not a cluster") is tried again.
MAP_RETRY = 5.0
#: How a node says a subscription ended because its shard moved.
_MOVED = re.compile(r"\bmoved\b")


def logical_shard(key: str, logical_shards: int) -> int:
    """The logical shard of routing key ``key``: ``crc32(key) % logical_shards``, as nodes
    compute it (felix.cluster.ownership.logical_shard): a stream key ``tenant/ns/name``
    whose name ends with ``.dlq`` hashes without it (repeatedly), as its source stream."""
    if key.endswith(".dlq") and key.count("/") == 2:
        while key.endswith(".dlq"):
            key = key[:-4]
    return zlib.crc32(key.encode()) % logical_shards


def parse_address(address: str) -> Endpoint:
    """A node's advertised ``host:port`` (``[v6]:port`` for an IPv6 literal) as an Endpoint.

    Raises RemoteProtocolError: the address came from a node."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 literal must be bracketed
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RemoteProtocolError(f"a node named {address!r} as an address, not host:port")
    return Endpoint(host, int(port_text))


class Redirected(Unavailable):
    """The node answered REDIRECT: ``redirect`` names the owner (raised by
    ``expect_reply``; the client follows it where it can, else it surfaces as the
    Unavailable it is)."""

    def __init__(self, redirect: wire.Redirect) -> None:
        super().__init__(
            f"redirected to {redirect.owner} (shard {redirect.shard}, epoch {redirect.epoch})"
        )
        self.redirect = redirect


@dataclass(slots=True)
class ShardMap:
    """Who owns each logical shard, as far as this client knows."""

    logical_shards: int
    #: Of the last SHARD_MAP_REPLY applied (versions of different nodes are not
    #: comparable: epochs decide, the version only breaks a tie).
    version: int = 0
    #: Per logical shard: the owner's ``host:port``, None when no node serves it.
    owners: list[str | None] = field(default_factory=list)
    #: Per logical shard: its epoch (rises at every change of owner).
    epochs: list[int] = field(default_factory=list)
    #: Entries refused for an epoch more than MAX_EPOCH_JUMP above the known one.
    refused_epochs: int = 0
    _warned: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_reply(
        cls, reply: wire.ShardMap, allowed: Callable[[str], bool] | None = None
    ) -> ShardMap:
        """The map a SHARD_MAP_REPLY states (with ``logical_shards`` > 0); an entry whose
        owner ``allowed`` refuses is left out (no owner, epoch 0)."""
        addresses = reply.addresses
        owners = [
            None if index == wire.SHARD_NO_OWNER else addresses[index] for index in reply.owners
        ]
        epochs = list(reply.epochs)
        if allowed is not None:
            for shard, owner in enumerate(owners):
                if owner is not None and not allowed(owner):
                    owners[shard], epochs[shard] = None, 0
        return cls(reply.logical_shards, reply.version, owners, epochs)

    @property
    def addresses(self) -> set[str]:
        """Every node address that owns a shard."""
        return {owner for owner in self.owners if owner is not None}

    def shard(self, key: str) -> int:
        return logical_shard(key, self.logical_shards)

    def route(self, key: str) -> str | None:
        """The owner of ``key``'s logical shard, or None when none is known."""
        return self.owners[zlib.crc32(key.encode()) % self.logical_shards]

    def _sane(self, shard: int, epoch: int, owner: str | None) -> bool:
        """False (counted, logged once) for an epoch too far above the known one."""
        if epoch <= self.epochs[shard] + MAX_EPOCH_JUMP:
            return True
        self.refused_epochs += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "felix client: a node of the cluster named %s owner of shard %d at epoch %d, "
                "more than %d above the known epoch %d; ignored (and further such entries)",
                owner,
                shard,
                epoch,
                MAX_EPOCH_JUMP,
                self.epochs[shard],
            )
        return False

    def learn(self, redirect: wire.Redirect) -> bool:
        """Apply one REDIRECT: its owner wins if its epoch is at least the known one (and
        at most MAX_EPOCH_JUMP above). True if the entry changed (False also for a shard
        outside this map)."""
        shard = redirect.shard
        if shard >= self.logical_shards or redirect.epoch < self.epochs[shard]:
            return False
        if not self._sane(shard, redirect.epoch, redirect.owner):
            return False
        changed = self.owners[shard] != redirect.owner or self.epochs[shard] != redirect.epoch
        self.owners[shard] = redirect.owner
        self.epochs[shard] = redirect.epoch
        return changed

    def replace(self, reply: wire.ShardMap, allowed: Callable[[str], bool] | None = None) -> bool:
        """Apply a SHARD_MAP_REPLY: per shard, a higher epoch wins, and at an equal epoch
        the entry of a map at least as new as this one (a shard's owner may stop serving
        without a new epoch); an entry whose owner ``allowed`` refuses is ignored. A map
        with another number of logical shards replaces this one whole. True if anything
        changed."""
        addresses = reply.addresses
        refused = {
            index
            for index, address in enumerate(addresses)
            if allowed is not None and not allowed(address)
        }
        other = ShardMap.from_reply(reply, allowed)
        if other.logical_shards != self.logical_shards:
            self.logical_shards, self.version = other.logical_shards, other.version
            self.owners, self.epochs = other.owners, other.epochs
            return True
        tie_wins = other.version >= self.version
        changed = False
        for shard, (owner, epoch) in enumerate(zip(other.owners, other.epochs, strict=True)):
            if reply.owners[shard] in refused or not self._sane(shard, epoch, owner):
                continue
            known = self.epochs[shard]
            if epoch > known or (epoch == known and tie_wins and owner != self.owners[shard]):
                changed = True
                self.owners[shard] = owner
                self.epochs[shard] = epoch
        self.version = max(self.version, other.version)
        return changed


class Router:
    """The client's routing state and decisions (see the module doc). No I/O, no clock."""

    def __init__(self, check: HostCheck | None = None) -> None:
        # The client's host policy (None: every address is allowed).
        self._check = check
        # Addresses refused and logged (at most MAX_NODES: each is logged once).
        self._refused: set[str] = set()
        #: None until a SHARD_MAP_REPLY of a cluster arrived: every request then goes
        #: to the address the client was given, as with a single node.
        self.map: ShardMap | None = None
        #: True once any node answered REDIRECT (or a subscription ended as "moved").
        self.clustered = False
        #: REDIRECTs followed (calls sent again to the owner they named).
        self.redirects = 0
        #: SHARD_MAP_REPLYs applied.
        self.maps = 0
        #: Maps taken whole from the node the client was given, after a redirect loop.
        self.resets = 0
        # A call went round in a circle: take the bootstrap node's next map whole.
        self._reset = False
        # REDIRECTs that arrived before the map: applied to it when it comes.
        self._early: dict[int, wire.Redirect] = {}
        # Per node (its address): fetches in flight, and when it may be asked again.
        self._fetching: set[str] = set()
        self._next_fetch: dict[str, float] = {}
        # The map does not fit a REDIRECT (another number of logical shards): fetch again.
        self._stale = False
        self._retry_at = 0.0

    # -- where a request goes --------------------------------------------------------------

    def route(self, key: str) -> str | None:
        """The address to send a request for routing key ``key`` to; None: the address
        the client was given (no map, or no owner known)."""
        shard_map = self.map
        return None if shard_map is None else shard_map.route(key)

    def redirected(self, redirect: wire.Redirect, followed: int) -> str:
        """A call that already followed ``followed`` REDIRECTs got ``redirect``: learn it,
        and return the address to send the call to next.

        Raises Unavailable once the call has followed MAX_REDIRECTS, ConfigError when the
        host policy refuses the owner (nothing is learned from that REDIRECT).
        """
        self.clustered = True
        refusal = self.refusal(redirect.owner)
        if refusal is not None:
            raise ConfigError(f"shard {redirect.shard}: {refusal}")
        shard_map = self.map
        if (
            shard_map is not None
            and redirect.shard < shard_map.logical_shards
            and redirect.epoch < shard_map.epochs[redirect.shard]
        ):
            # Sent away at an older epoch than the map's: a node is behind, or the
            # map's entry is wrong (a newer epoch always wins, so only a map taken
            # whole undoes it).
            self._reset = True
        self.learn(redirect)
        if followed >= MAX_REDIRECTS:
            raise Unavailable(
                f"shard {redirect.shard} was redirected {followed + 1} times in a row, "
                f"last to {redirect.owner} (epoch {redirect.epoch}); retry later"
            )
        self.redirects += 1
        return redirect.owner

    def refusal(self, address: str) -> str | None:
        """Why the host policy refuses ``address`` (None: it allows it)."""
        return None if self._check is None else self._check(address)

    def allowed(self, address: str) -> bool:
        """Whether the host policy allows ``address``; a refused one is logged once."""
        refusal = self.refusal(address)
        if refusal is None:
            return True
        if address not in self._refused and len(self._refused) < MAX_NODES:
            self._refused.add(address)
            log.warning("felix client: %s", refusal)
        return False

    def learn(self, redirect: wire.Redirect) -> bool:
        """Update the map from a REDIRECT (also one that is not followed: a publish with
        ack=False). False when the host policy refuses its owner: nothing is learned."""
        self.clustered = True
        if not self.allowed(redirect.owner):
            return False
        if self.map is None:
            if redirect.shard >= MAX_EARLY:
                return True  # fits no map (the call may still follow it)
            early = self._early.get(redirect.shard)
            if early is None or early.epoch <= redirect.epoch:
                self._early.pop(redirect.shard, None)  # newest last
                self._early[redirect.shard] = redirect
                if len(self._early) > MAX_EARLY:
                    del self._early[next(iter(self._early))]
            return True
        if redirect.shard >= self.map.logical_shards:
            self._stale = True
        self.map.learn(redirect)
        return True

    def reroutes(self, error: FelixError | None) -> bool:
        """Whether a subscription or consumer that the broker ended with ``error`` should
        subscribe again through the map rather than end: an Unavailable in cluster mode,
        or one saying its shard moved."""
        if not isinstance(error, Unavailable):
            return False
        if not self.clustered and _MOVED.search(str(error)) is None:
            return False
        self.clustered = True
        return True

    # -- fetching the map ------------------------------------------------------------------

    def looped(self) -> None:
        """A call was sent back to a node it had already left: the map's next fetch is
        from the node the client was given, and that map is taken whole."""
        self._reset = True

    @property
    def reset_wanted(self) -> bool:
        """True after :meth:`looped` until a map from the bootstrap node was taken whole."""
        return self._reset

    def should_fetch(self, now: float, *, bootstrap: bool = False, node: str = "") -> bool:
        """True when the client should send SHARD_MAP to ``node`` now (then call
        :meth:`fetched` or :meth:`fetch_failed` with it): :meth:`fetch_wait` is 0."""
        return self.fetch_wait(now, bootstrap=bootstrap, node=node) == 0.0

    def fetch_wait(self, now: float, *, bootstrap: bool = False, node: str = "") -> float | None:
        """0.0 when the client should send SHARD_MAP to ``node`` now (counted as in
        flight: then call :meth:`fetched` or :meth:`fetch_failed` with it); seconds to
        wait when a map is wanted but ``node`` was asked less than MAP_INTERVAL ago; None
        when none is wanted, a fetch failed recently or one is in flight to ``node``.

        A map is wanted in cluster mode with no map yet, one that does not fit a
        REDIRECT, or (``bootstrap``: ``node`` is the one the client was given) after a
        redirect loop."""
        if not self.clustered or now < self._retry_at or node in self._fetching:
            return None
        if self.map is not None and not self._stale and not (self._reset and bootstrap):
            return None
        wait = self._next_fetch.get(node, 0.0) - now
        if wait > 0.0:
            return wait
        if len(self._next_fetch) >= 2 * MAX_NODES:  # forget nodes that may be asked again
            self._next_fetch = {n: t for n, t in self._next_fetch.items() if t > now}
        self._fetching.add(node)
        self._next_fetch[node] = now + MAP_INTERVAL
        return 0.0

    def fetched(
        self, reply: wire.ShardMap, now: float, *, bootstrap: bool = False, node: str = ""
    ) -> bool:
        """Apply a SHARD_MAP_REPLY of ``node``; True if the map changed. A reply of a node
        that is not in a cluster (L = 0) changes nothing: redirects are still followed
        per call. ``bootstrap``: the reply is from the node the client was given; after a
        redirect loop it replaces the map whole, epochs or not."""
        self._fetching.discard(node)
        if reply.logical_shards == 0:
            self._retry_at = now + MAP_RETRY
            return False
        self._stale = False
        self.maps += 1
        if self._reset and bootstrap:
            self._reset = False
            self.resets += 1
            self.map = None  # taken whole below
        if self.map is None:
            self.map = ShardMap.from_reply(reply, self.allowed)
            changed = True
        else:
            changed = self.map.replace(reply, self.allowed)
        early, self._early = self._early, {}
        for redirect in early.values():
            changed = self.map.learn(redirect) or changed
        return changed

    def fetch_failed(self, now: float, node: str = "") -> None:
        self._fetching.discard(node)
        self._retry_at = now + MAP_RETRY
