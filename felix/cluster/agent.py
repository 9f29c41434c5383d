"""The supervisor's cluster loop: lease, shard map, placer and handoffs (asyncio).

Two tasks share one :class:`~felix.cluster.store.ClusterStore`:

- **renew**: renews the lease when :class:`~felix.cluster.lease.LeaseKeeper` says so;
  a renewal that finds the lease gone re-registers under a new incarnation. It never
  waits on the other task, so reading the map or placing shards cannot delay it.
- **sync**: re-reads the tables on every NOTIFY and at least every ``poll_interval``,
  publishes a new :class:`~felix.cluster.ownership.OwnershipMap` whenever the shards,
  the nodes or ``serve_until`` changed, acts as the placer while it holds the lock (a
  fresh cluster's first placement after a settling window, placement.FirstPlacement;
  removing the rows of nodes long gone that hold nothing), completes the handoffs of
  shards this node owns, and pins its durable shards.

The node serves only while ``serve_until`` (published in every map) lies ahead. After
a lost lease it publishes ``serve_until = 0`` until it has re-registered *and* read the
map after that, so its first request sees every epoch that changed meanwhile. While the
database is unreachable it keeps serving until the fence, retries with a backoff, and
logs each change of state once (docs/architecture.md, "Cluster").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from felix.cancel import raise_if_cancelled
from felix.cluster.lease import LeaseKeeper, LeaseSettings
from felix.cluster.ownership import OwnershipMap, cluster_clock
from felix.cluster.placement import FirstPlacement, balance, never_placed, plan
from felix.cluster.store import ClusterStore, ClusterView
from felix.errors import ClusterError, ClusterMismatch, ClusterUnavailable, NodeIdInUse

__all__ = ["ClusterAgent", "ClusterSettings"]

log = logging.getLogger(__name__)

#: Counters the agent keeps (``/cluster`` and the metrics).
COUNTERS = (
    "registrations",
    "renewals_ok",
    "renewals_failed",
    "renewals_lost",
    "ownership_changes",
    "handoffs_completed",
    "moves_applied",
    "durable_claims",
    "nodes_expired",
)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """How a node joins its cluster (``felix up --cluster ...``)."""

    #: PostgreSQL DSN of the cluster's database (its password: never in a repr or log).
    dsn: str = field(repr=False)
    node_id: str
    #: QUIC ``host:port`` clients are redirected to.
    address: str
    #: Health/metrics base URL (``http://host:port``).
    health_url: str
    region: str
    logical_shards: int = 256
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    #: Longest time between two reads of the tables (a NOTIFY wakes it sooner).
    poll_interval: float = 1.0
    #: Handoffs in flight in the whole cluster (each shard is unavailable while it moves).
    max_handoffs: int = 1
    #: Bound of every database call.
    db_timeout: float = 2.0
    #: Longest wait for the gateways to drain a shard being handed off (then retried).
    handoff_timeout: float = 30.0
    #: Names the node's data dir (its durable records): ClusterStore.register.
    data_id: str = ""
    #: A fresh cluster's first placement waits until the live nodes have not changed for
    #: this long (at most five times as long), so nodes started together each get their
    #: share at once rather than by handoffs (placement.FirstPlacement; 0: no wait).
    settle: float = 2.0
    #: The placer removes the rows of nodes whose lease ended more than this long ago and
    #: that hold nothing (no pinned shard, none owned); 0: never.
    node_expiry: float = 24 * 3600.0


class ClusterAgent:
    """Keeps this node's lease and shard map; see the module docstring.

    ``publish`` gets every new map (versions 1, 2, ...); ``durable_shards`` says which
    logical shards this node holds durable records for; ``handoff_drained(version)``,
    if given, returns once every gateway applied map ``version`` and finished its
    requests in flight (the map refuses the shard being handed off); ``clock`` is the
    monotonic clock ``serve_until`` is on.
    """

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        publish: Callable[[OwnershipMap], None],
        durable_shards: Callable[[], Collection[int]],
        handoff_drained: Callable[[int], Awaitable[None]] | None = None,
        clock: Callable[[], float] = cluster_clock,
        imports: Callable[[], Mapping[int, tuple[str, str]]] | None = None,
    ) -> None:
        self.settings = settings
        self._publish_cb = publish
        self._durable_cb = durable_shards
        self._durable_last: set[int] = set()
        #: Where this node's imported shards came from (felix cluster move checks it).
        self._imports_cb = imports
        self._drained_cb = handoff_drained
        self._clock = clock
        self.keeper = LeaseKeeper(settings.lease)
        self.store: ClusterStore | None = None
        #: This process's incarnation (None: not registered, or its lease was lost).
        self.incarnation: int | None = None
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # Registrations completed, and the one the current view was read after: the
        # node serves only with a map read after its latest registration.
        self._registered = 0
        self._view_after = -1
        self._view: ClusterView | None = None
        self._map: OwnershipMap | None = None
        self._published_key: tuple[Any, ...] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handoffs: dict[int, asyncio.Task[None]] = {}
        #: (shard, epoch) of handoffs this node completed.
        self._handed_off: set[tuple[int, int]] = set()
        self._stopping = False
        self._leaving = False
        # Last logged states (each change is logged once).
        self._db_ok = True
        self._placer = False
        self._warned_pins: set[tuple[int, bool]] = set()  # (shard, its node live)
        #: node id -> (its last lease row (incarnation, lease_until), when this node saw
        #: that row first, on its own clock): the placer's second opinion on who is dead.
        self._renewals: dict[str, tuple[tuple[int, float], float]] = {}
        self._first = FirstPlacement(settings.settle)
        #: Set once a view shows the cluster's first placement made (by any placer).
        self._placed = asyncio.Event()
        self._warned_settle = False
        #: Nodes whose row is past its expiry but kept for their pins (logged once each).
        self._kept: set[str] = set()

    # --- life cycle ---------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Open the store, register (waiting out another incarnation's lease), renew and
        publish the first map, within ``timeout`` seconds (else the last ClusterError)."""
        deadline = self._clock() + timeout
        s = self.settings
        while self.store is None:
            try:
                self.store = await ClusterStore.open(
                    s.dsn,
                    logical_shards=s.logical_shards,
                    region=s.region,
                    placer_grace=s.lease.placer_grace,
                    timeout=s.db_timeout,
                    application_name=f"felix-cluster {s.node_id}"[:63],
                    # Never reached by a working placer, which uses it every poll.
                    placer_idle=max(s.lease.ttl, 3 * s.poll_interval),
                    lease=s.lease.ttl,
                )
            except ClusterMismatch:
                raise
            except ClusterUnavailable as exc:
                self._db_state(False, exc)
                await self._sleep_before(deadline, s.poll_interval, exc)
        await self._register(deadline)
        await self._renew()
        while self._map is None:
            try:
                await self._sync_once()
            except ClusterUnavailable as exc:
                self._db_state(False, exc)
                await self._sleep_before(deadline, s.poll_interval, exc)

    @property
    def is_placed(self) -> bool:
        """Whether :meth:`placed` would return at once."""
        return self._placed.is_set()

    async def placed(self) -> None:
        """Return once this node has read a map with the cluster's first placement made
        (at once in a cluster placed before; in a fresh one, after the placer's settling
        window: ``settle``)."""
        await self._placed.wait()

    async def run(self) -> None:
        """Renew and follow until :meth:`stop` (never raises for a database outage)."""
        if self.store is None:
            raise RuntimeError("ClusterAgent.run() before start()")
        if self._stopping:  # stopped before this task got to run
            return
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name=f"cluster renew {self.settings.node_id}"),
            asyncio.create_task(self._sync_loop(), name=f"cluster sync {self.settings.node_id}"),
        ]
        try:
            await asyncio.gather(*self._tasks)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            await self._cancel_tasks()

    def wake(self) -> None:
        """Re-read the tables, place and pin now rather than at the next poll (a shard core
        wrote the first durable records of a logical shard and holds their acks until the
        pin: felix/shard/cluster.py ``PinWaits``)."""
        if self.store is not None:
            self.store.wake()

    async def stop(self, leave: bool = True) -> None:
        """Stop the loops; with ``leave``, stop serving, let the gateways drain and end the
        lease at once so the placer moves this node's shards now; close the store."""
        if self._stopping:
            return
        self._stopping = True
        await self._cancel_tasks()
        store, incarnation = self.store, self.incarnation
        if leave and store is not None and incarnation is not None:
            self._leaving = True
            self._publish()  # serve_until = 0: the gateways stop admitting requests
            if self._drained_cb is not None and self._map is not None:
                try:
                    await asyncio.wait_for(
                        self._drained_cb(self._map.version), self.settings.handoff_timeout
                    )
                except TimeoutError:
                    log.warning("gateways did not drain before leaving the cluster")
            try:
                await store.leave(self.settings.node_id, incarnation)
                log.info("left the cluster (node %s)", self.settings.node_id)
            except ClusterError as exc:
                log.warning("could not leave the cluster (its lease will run out): %s", exc)
        if store is not None:
            await store.close()

    async def abort(self) -> None:
        """Drop everything at once, as a crash would: no leave, connections cut."""
        self._stopping = True
        await self._cancel_tasks()
        if self.store is not None:
            await self.store.terminate()

    async def _cancel_tasks(self) -> None:
        tasks = [*self._tasks, *self._handoffs.values()]
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        for task in tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._handoffs.clear()

    # --- what the node parts read -----------------------------------------------------

    @property
    def map(self) -> OwnershipMap | None:
        """The newest map published."""
        return self._map

    def serving(self) -> bool:
        return self._map is not None and self._clock() < self._map.serve_until

    def snapshot(self) -> dict[str, Any]:
        """The ``/cluster`` document: the map, the placer, counters, balance, handoffs in
        flight and how long the lease lets this node serve without another renewal."""
        now = self._clock()
        doc: dict[str, Any] = self._map.to_dict() if self._map is not None else {}
        view = self._view
        doc.update(
            incarnation=self.incarnation,
            serving=self.serving(),
            lease_seconds_left=(
                max(0.0, self._map.serve_until - now) if self._map is not None else 0.0
            ),
            placer=self.store is not None and self.store.held(),
            placer_losses=self.store.placer_losses if self.store is not None else 0,
            counters=dict(self.counters),
            balance=balance(view.shards, view.live) if view is not None else None,
            handoffs=[
                {"shard": i, "from": s.owner, "to": s.handoff_to, "epoch": s.epoch}
                for i, s in enumerate(view.shards if view is not None else ())
                if s.handoff_to is not None
            ],
            node_expiry=self.settings.node_expiry,
            rows=self._rows(view) if view is not None else {},
            # Nodes holding a stale copy of a shard's durable records (moved or unpinned
            # away from them): never given the shard until their copy is gone.
            stale={str(i): sorted(nodes) for i, nodes in view.stale.items()} if view else {},
        )
        return doc

    def _rows(self, view: ClusterView) -> dict[str, dict[str, Any]]:
        """Per node that is down: what becomes of its row. ``pinned``: shards pinned to
        its durable data (the row is kept while there are any); ``expires_in``: seconds
        until the placer may remove it, as of the view's read (None: never, expiry off or
        pinned)."""
        after = self.settings.node_expiry
        pinned: dict[str, int] = {}
        for state in view.shards:
            if state.durable_node is not None:
                pinned[state.durable_node] = pinned.get(state.durable_node, 0) + 1
        rows = {}
        for node in view.nodes:
            if node.live:
                continue
            count = pinned.get(node.node_id, 0)
            expires = None
            if after > 0 and count == 0:
                expires = max(0.0, node.lease_until + after - view.db_now)
            rows[node.node_id] = {"pinned": count, "expires_in": expires}
        return rows

    # --- the lease --------------------------------------------------------------------

    async def _register(self, deadline: float | None) -> None:
        """Register under a new incarnation, waiting while another holds the node id."""
        assert self.store is not None
        s = self.settings
        waited_since: float | None = None
        while True:
            sent = self._clock()
            try:
                incarnation = await self.store.register(
                    s.node_id, s.address, s.health_url, s.lease.ttl, s.data_id
                )
            except NodeIdInUse as exc:
                if waited_since is None:
                    waited_since = sent
                log.warning("%s; waiting for it (%.1fs so far)", exc, self._clock() - waited_since)
                # The other lease ends on the database's clock: a little past it.
                await self._sleep_before(deadline, min(exc.seconds_left + 0.1, s.lease.ttl), exc)
                continue
            except ClusterUnavailable as exc:
                self._db_state(False, exc)
                await self._sleep_before(deadline, self.keeper.settings.renew_interval / 2, exc)
                continue
            except ClusterMismatch as exc:
                if deadline is not None:
                    raise  # at start: felix up refuses to run
                # Rejoining (after a lost lease), and refused: serve nothing, say why, retry.
                log.error("cannot rejoin the cluster: %s", exc)
                await self._sleep_before(deadline, s.lease.ttl, exc)
                continue
            break
        self._db_state(True)
        self.incarnation = incarnation
        self._registered += 1
        self.counters["registrations"] += 1
        self.keeper.renewing(sent)
        self.keeper.renewed()
        log.info("registered in the cluster as node %s (incarnation %d)", s.node_id, incarnation)
        if self.store is not None:
            self.store.wake()  # read the map now: nothing is served before that

    async def _renew(self) -> None:
        """One renewal; a lost lease drops the incarnation (the renew loop re-registers)."""
        assert self.store is not None and self.incarnation is not None
        s = self.settings
        sent = self._clock()
        self.keeper.renewing(sent)
        try:
            durable = sorted(self._durable_shards())  # scans (and reads the imports) first
            imports = None if self._imports_cb is None else self._imports_cb()
            ok = await self.store.renew(s.node_id, self.incarnation, s.lease.ttl, durable, imports)
        except ClusterUnavailable as exc:
            self.keeper.failed()
            self.counters["renewals_failed"] += 1
            self._db_state(False, exc)
            return
        self._db_state(True)
        if ok:
            self.keeper.renewed()
            self.counters["renewals_ok"] += 1
        else:
            self.keeper.lost()
            self.counters["renewals_lost"] += 1
            self.incarnation = None
            log.warning(
                "cluster lease of node %s was lost (presumed dead): serving nothing until it "
                "has re-registered and read the shard map",
                s.node_id,
            )
        self._publish()

    async def _renew_loop(self) -> None:
        while True:
            try:
                if self.incarnation is None:
                    await self._register(None)
                    continue
                now = self._clock()
                if self.keeper.renew_due(now):
                    await self._renew()
                    continue
                wait = self.keeper.next_due() - now
                await asyncio.sleep(min(max(wait, 0.001), self.keeper.settings.renew_interval))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the lease's loop
                raise_if_cancelled()
                log.exception("cluster renew loop failed; retrying")
                await asyncio.sleep(self.keeper.settings.renew_interval / 2)

    # --- the map, the placer, handoffs --------------------------------------------------

    async def _sync_loop(self) -> None:
        assert self.store is not None
        poll = self.settings.poll_interval
        delay = poll
        while True:
            try:
                await self._sync_once()
                self._db_state(True)
                delay = poll
            except asyncio.CancelledError:
                raise
            except ClusterError as exc:
                raise_if_cancelled()
                self._db_state(False, exc)
                delay = min(delay * 2, max(5.0, poll))
            except Exception:
                raise_if_cancelled()
                log.exception("cluster sync loop failed; retrying")
                delay = min(delay * 2, max(5.0, poll))
            await self.store.wait_change(delay)

    async def _sync_once(self) -> None:
        """Read the tables, publish, place (if the placer), hand off and pin."""
        store = self.store
        assert store is not None
        registered = self._registered
        view = await store.view()
        # Tracked on every read, placer or not, so a new placer has the history at once.
        lately = self._renewing_lately(view)
        self._seen(view)
        self._view, self._view_after = view, registered
        self._publish()
        # Only a node that may serve places: one whose lease ran out (paused, cut off)
        # gives the lock up rather than move shards on what it last saw.
        if self.serving():
            placer = await store.placer_lock()
        else:
            if store.held():
                await store.release_placer()
            placer = False
        if placer != self._placer:
            self._placer = placer
            log.info(
                "node %s %s the cluster's placer",
                self.settings.node_id,
                "is now" if placer else "is no longer",
            )
        live = view.live | lately
        first = never_placed(view.shards)
        if not first:
            self._placed.set()
        # Tracked on every read of a fresh cluster, placer or not (a new placer goes on).
        settled = not first or self._first.ready(live, self._clock())
        if placer and not settled:
            if not self._warned_settle:
                self._warned_settle = True
                log.info(
                    "a fresh cluster: waiting up to %.1fs for nodes starting together before "
                    "placing its %d logical shards",
                    self._first.seconds_left(self._clock()),
                    view.logical_shards,
                )
        elif placer:
            if first:
                log.info(
                    "first placement of %d logical shards on %d node(s): %s",
                    view.logical_shards,
                    len(live),
                    ", ".join(sorted(live)),
                )
            moves = plan(
                view.shards, live, max_handoffs=self.settings.max_handoffs, stale=view.stale
            )
            for move in moves:
                if await store.place(move):
                    self.counters["moves_applied"] += 1
            await self._expire_nodes(view, lately)
        self._hand_off(view)
        await self._pin_durable(view)

    async def _expire_nodes(self, view: ClusterView, lately: frozenset[str]) -> None:
        """As the placer, remove the rows of nodes whose lease ended more than
        ``node_expiry`` ago (database clock; and not renewed lately on this node's clock
        either) and that hold nothing. Rows of nodes with pinned shards are kept: their
        durable data may come back (said once per node)."""
        after = self.settings.node_expiry
        store = self.store
        if after <= 0 or store is None:
            return
        pinned: dict[str, list[int]] = {}
        held: set[str] = set()
        for shard, state in enumerate(view.shards):
            if state.durable_node is not None:
                pinned.setdefault(state.durable_node, []).append(shard)
            held.update(n for n in (state.owner, state.handoff_to) if n is not None)
        due = []
        for node in view.nodes:
            if node.live or node.node_id in lately or view.db_now - node.lease_until <= after:
                continue
            shards = pinned.get(node.node_id)
            if shards:
                if node.node_id not in self._kept:
                    self._kept.add(node.node_id)
                    log.warning(
                        "node %s has been down for over %gs but is kept in the cluster: "
                        "logical shards %s are pinned to its durable data, which may come "
                        "back (felix cluster forget %s gives them up)",
                        node.node_id,
                        after,
                        ", ".join(map(str, shards[:20])) + (" ..." if len(shards) > 20 else ""),
                        node.node_id,
                    )
            elif node.node_id not in held:
                due.append(node.node_id)
        if not due:
            return
        for node_id in await store.expire_nodes(due, after):
            self._kept.discard(node_id)
            self.counters["nodes_expired"] += 1
            log.info(
                "removed node %s from the cluster: its lease ended over %gs ago and it "
                "holds no shards",
                node_id,
                after,
            )

    def _renewing_lately(self, view: ClusterView) -> frozenset[str]:
        """Nodes whose lease row changed within a lease plus the grace, on this node's own
        clock. The database's rule (``lease_until + grace < now()``) alone would trust the
        database's wall clock: one stepped forward (an NTP step, a failover to a replica
        whose clock runs ahead) would make every lease look expired while the nodes still
        serve within their own fence. A node is treated as dead only when both agree; this
        costs at most a poll interval of extra failover time. Nodes that left on purpose
        are not waited for."""
        now = self._clock()
        window = self.settings.lease.ttl + self.settings.lease.placer_grace
        seen: dict[str, tuple[tuple[int, float], float]] = {}
        lately = set()
        for node in view.nodes:
            row = (node.incarnation, node.lease_until)
            before = self._renewals.get(node.node_id)
            first = before[1] if before is not None and before[0] == row else now
            seen[node.node_id] = (row, first)
            if now - first < window and node.node_id not in view.leaving:
                lately.add(node.node_id)
        self._renewals = seen
        return frozenset(lately)

    def _seen(self, view: ClusterView) -> None:
        """Count the shards this node gained or lost since the previous view."""
        if self._view is None:
            return
        me = self.settings.node_id
        before = {i for i, s in enumerate(self._view.shards) if s.owner == me}
        after = {i for i, s in enumerate(view.shards) if s.owner == me}
        self.counters["ownership_changes"] += len(before ^ after)

    def _publish(self) -> None:
        """Publish a new map if anything a gateway acts on changed (the lease ends shown in
        it do not count: they change with every renewal of every node)."""
        view = self._view
        if view is None:
            return
        serving = (
            self.incarnation is not None
            and self._view_after == self._registered
            and not self._leaving
        )
        serve_until = self.keeper.serve_until if serving else 0.0
        key = (
            view.shards,
            tuple((n.node_id, n.address, n.health_url, n.live, n.incarnation) for n in view.nodes),
            serve_until,
        )
        if key == self._published_key:
            return
        self._published_key = key
        version = 1 if self._map is None else self._map.version + 1
        self._map = view.ownership(self.settings.node_id, version, serve_until)
        try:
            self._publish_cb(self._map)
        except Exception:
            log.exception("publishing cluster map %d failed", version)

    def _hand_off(self, view: ClusterView) -> None:
        """Start completing each handoff of a shard this node owns (one task per shard)."""
        me = self.settings.node_id
        assert self._map is not None
        # Forget completed handoffs once the view shows their result (a newer epoch).
        self._handed_off = {(i, e) for i, e in self._handed_off if view.shards[i].epoch == e}
        for shard, state in enumerate(view.shards):
            if (
                state.owner == me
                and state.handoff_to is not None
                and shard not in self._handoffs
                # A view read while the handoff was completing still shows it.
                and (shard, state.epoch) not in self._handed_off
            ):
                self._handoffs[shard] = asyncio.create_task(
                    self._complete_handoff(shard, state.epoch, state.handoff_to, self._map.version),
                    name=f"cluster handoff {shard}",
                )

    async def _complete_handoff(self, shard: int, epoch: int, to: str, version: int) -> None:
        """Wait until the gateways drained ``shard`` (map ``version`` refuses it: its
        handoff_to is set there), then move it to ``to``."""
        store, me = self.store, self.settings.node_id
        assert store is not None
        try:
            if self._drained_cb is not None:
                try:
                    await asyncio.wait_for(self._drained_cb(version), self.settings.handoff_timeout)
                except TimeoutError:
                    # The node's gateways did not all acknowledge the map with nothing in
                    # flight for the shard (or this bound passed): it stays, refused.
                    log.warning("shard %d has not drained yet; the handoff is retried", shard)
                    return
            if shard in self._durable_shards():
                # It holds durable records now: it stays (the placer clears the handoff).
                if await store.claim_durable(shard, me):
                    self.counters["durable_claims"] += 1
                return
            if await store.complete_handoff(shard, epoch, me, to):
                self._handed_off.add((shard, epoch))
                self.counters["handoffs_completed"] += 1
                log.info("handed shard %d to node %s (epoch %d)", shard, to, epoch + 1)
                store.wake()
        except ClusterError as exc:
            log.debug("handoff of shard %d not completed (retried): %s", shard, exc)
        finally:
            self._handoffs.pop(shard, None)

    async def _pin_durable(self, view: ClusterView) -> None:
        """Pin each owned shard this node holds durable records for to this node."""
        store, me = self.store, self.settings.node_id
        assert store is not None
        durable = self._durable_shards()
        for shard in sorted(durable):
            if not 0 <= shard < len(view.shards):
                continue
            state = view.shards[shard]
            if state.owner == me and state.durable_node is None:
                if await store.claim_durable(shard, me):
                    self.counters["durable_claims"] += 1
            elif (
                state.durable_node not in (None, me)
                and (warning := (shard, state.durable_node in view.live)) not in self._warned_pins
            ):
                self._warned_pins.add(warning)
                if not warning[1]:
                    # Its node is down: most likely an operator's import, waiting for
                    # `felix cluster move` (or a stale copy; move refuses those).
                    log.warning(
                        "node %s holds durable records of logical shard %d, pinned to node "
                        "%s, which is down: not served here unless moved here (felix "
                        "cluster move %d --to %s, after an import of that node's data)",
                        me,
                        shard,
                        state.durable_node,
                        shard,
                        me,
                    )
                    continue
                # Moved away (felix cluster move) or given up (forget/unpin) while this
                # node was down: what it holds is a stale copy, never served here.
                log.warning(
                    "node %s holds durable records of logical shard %d, which is pinned to "
                    "node %s: this copy is stale and is not served here (remove those "
                    "streams' directories once the shard is safe there)",
                    me,
                    shard,
                    state.durable_node,
                )

    # --- plumbing -------------------------------------------------------------------------

    def _durable_shards(self) -> set[int]:
        try:
            self._durable_last = set(self._durable_cb())
        except Exception:
            # The last good answer: an empty one would tell the cluster this node holds
            # no durable copy any more (clearing its stale-copy marks, among others).
            log.exception("reading the durable shards failed")
        return set(self._durable_last)

    def _db_state(self, ok: bool, exc: BaseException | None = None) -> None:
        """Log the database becoming unreachable or reachable again, once each."""
        if ok == self._db_ok:
            return
        self._db_ok = ok
        if ok:
            log.warning("cluster database reachable again")
        else:
            log.warning(
                "cluster database unreachable (%s): serving for %.1fs more unless a renewal "
                "gets through; retrying",
                exc,
                self.keeper.seconds_left(self._clock()),
            )

    async def _sleep_before(self, deadline: float | None, delay: float, exc: Exception) -> None:
        """Sleep ``delay`` seconds (at most until ``deadline``), or raise ``exc`` if the
        deadline has passed already."""
        if deadline is not None:
            left = deadline - self._clock()
            if left <= 0:
                raise exc
            delay = min(delay, left)
        await asyncio.sleep(delay)
