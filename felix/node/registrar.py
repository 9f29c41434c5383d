"""Registering what the shards create on first use in the control plane the node follows.

How it works: a shard that creates a stream or cache on its first write (or finds
a durable stream on disk at start) notes it with the settings it got; its process
reports those notes to the supervisor every quarter second (msg.AutoCreated),
never from the publish path itself. The supervisor's :class:`Registrar` keeps them
in a bounded pending set and registers them in batches through the control plane
the node follows (the embedded control process over its control socket, or a
remote one with ``POST /v1/registrations`` and the node's control token); the
control plane creates each one if absent, marked ``auto_created`` (its tenant and
namespace too), and its change feed brings it back to the node like any defined
resource (the shard finds it defined with what it has: nothing changes).

Bounds and policy: at most :data:`MAX_PENDING` resources wait (and
:data:`MAX_PENDING_PER_TENANT` of one tenant, so one careless tenant cannot crowd
out the others); a report beyond that is dropped and counted (``dropped``: the
resource keeps working on the data plane, unregistered until the shard reports it
again, at its next start). Reports of one resource coalesce. One batch of
:data:`BATCH` is in flight at a time. When the control plane is away the batch
stays pending and is retried with jittered backoff. A refusal (quotas, limits,
settings) is counted and logged, never retried.

Ordering against deletes: each report carries the follower's feed position when
it arrived (``since``); the control plane refuses (``deleted``) to register a
resource it, or its namespace or tenant, was deleted after that position, since
the shard created it before it learnt of the delete; the registrar then ends it
on the data plane, as the delete would have. A report of a resource the follower
already saw deleted is dropped at once (its shard has been told). Idempotent: a
resource that exists is left alone, so a restart re-reports without duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from felix.cancel import raise_if_cancelled
from felix.control.model import SPEC_TYPES, ResourceKind

log = logging.getLogger("felix.control.registrar")

#: Resources waiting to be registered at most, and of one tenant.
MAX_PENDING = 10_000
MAX_PENDING_PER_TENANT = 2_000
#: Resources per registration request (the control plane takes at most 500).
BATCH = 250
#: Seconds to gather reports before a batch, and between batches.
GATHER = 0.1
#: Retry delays when the control plane is away (jittered, doubling).
RETRY_MIN, RETRY_MAX = 0.5, 10.0
#: Seconds between log lines about refused or dropped registrations.
LOG_EVERY = 10.0

Key = tuple[ResourceKind, tuple[str, ...]]


class RegisterSink(Protocol):
    """Where registrations go: the control plane the node follows."""

    async def register(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


class FollowerView(Protocol):
    """What the registrar reads of the node's ControlFollower (felix/node/control.py)."""

    @property
    def position(self) -> int: ...
    @property
    def seeded(self) -> asyncio.Event: ...
    @property
    def resources(self) -> dict[Key, dict[str, Any]]: ...
    @property
    def deleted(self) -> OrderedDict[Key, None]: ...

    def end(self, kind: ResourceKind, path: tuple[str, ...]) -> None: ...


@dataclass
class _Entry:
    spec: dict[str, Any]
    #: The follower's position when it was reported (None: before the node was seeded;
    #: stamped with the seed's position).
    since: int | None


class _Throttled:
    """A warning at most every LOG_EVERY seconds, with how many were held back."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last = -LOG_EVERY
        self._held = 0

    def warn(self, text: str, *args: object) -> None:
        now = self._clock()
        if now - self._last < LOG_EVERY:
            self._held += 1
            return
        if self._held:
            text += f" (and {self._held} more like it since the last such line)"
        self._held = 0
        self._last = now
        log.warning(text, *args)


class Registrar:
    """Registers auto-created resources in the control plane (see the module docstring)."""

    def __init__(
        self,
        *,
        region: str | None = None,
        max_pending: int = MAX_PENDING,
        max_pending_per_tenant: int = MAX_PENDING_PER_TENANT,
        batch: int = BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.region = region
        self.max_pending = max_pending
        self.max_pending_per_tenant = max_pending_per_tenant
        self.batch = batch
        self.sink: RegisterSink | None = None
        self.follower: FollowerView | None = None
        self.pending: OrderedDict[Key, _Entry] = OrderedDict()
        self._per_tenant: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._refusals = _Throttled(clock)
        self._drops = _Throttled(clock)
        self._failures = _Throttled(clock)
        # Counters (the supervisor exports them, felix_autocreate_*_total).
        self.reported = 0
        self.registered = 0
        self.existed = 0
        self.refused = 0
        self.dropped = 0
        self.deleted = 0
        self.failures = 0
        #: Registration requests that were answered.
        self.batches = 0

    def attach(self, sink: RegisterSink, follower: FollowerView) -> None:
        """Start registering through ``sink``, against ``follower``'s view of the feed."""
        self.sink = sink
        self.follower = follower
        if self.pending:
            self._wake.set()

    # -- reports (from the shards, on the supervisor's loop) -----------------------------

    def report(self, kind: str, path: list[str], spec: dict[str, Any]) -> None:
        """A shard created ``kind`` ``path`` on first use with ``spec``. Never blocks."""
        self.reported += 1
        try:
            key: Key = (ResourceKind(kind), tuple(path))
        except ValueError:
            return
        if key[0] not in (ResourceKind.STREAM, ResourceKind.CACHE) or len(key[1]) != 3:
            return
        if key in self.pending:
            return  # coalesced
        follower = self.follower
        since = None
        if follower is not None and follower.seeded.is_set():
            if key in follower.resources:
                return  # defined already (a durable stream found on disk at start)
            if key in follower.deleted:
                # The shard created it before it applied the delete it has been sent.
                self.deleted += 1
                return
            since = follower.position
        tenant = key[1][0]
        if len(self.pending) >= self.max_pending:
            self._drop(key, f"{len(self.pending)} registrations are pending (the most)")
            return
        if self._per_tenant[tenant] >= self.max_pending_per_tenant:
            self._drop(key, f"tenant {tenant} has {self._per_tenant[tenant]} pending (its most)")
            return
        if "region" in SPEC_TYPES[key[0]].model_fields and self.region is not None:
            spec = {**spec, "region": self.region}
        self.pending[key] = _Entry(spec, since)
        self._per_tenant[tenant] += 1
        self._wake.set()

    def _drop(self, key: Key, why: str) -> None:
        self.dropped += 1
        self._drops.warn(
            "not registering auto-created %s %s in the control plane: %s; it serves "
            "unregistered until its shard restarts (felix_autocreate_dropped_total)",
            key[0].value,
            "/".join(key[1]),
            why,
        )

    # -- registering -----------------------------------------------------------------------

    async def run(self) -> None:
        """Register what is pending, batch by batch, forever (cancel to stop)."""
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            follower, sink = self.follower, self.sink
            if follower is None or sink is None:
                self._wake.clear()
                continue
            await follower.seeded.wait()
            await asyncio.sleep(GATHER)  # let a burst of reports gather into one batch
            try:
                await self.register_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled()
                self.failures += 1
                self._failures.warn(
                    "registering %d auto-created resources failed (%s); retrying in %.1fs",
                    len(self.pending),
                    exc,
                    delay,
                )
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            if not self.pending:
                self._wake.clear()

    async def register_once(self) -> None:
        """Send one batch of what is pending and settle its answers (raises when the
        control plane cannot be reached: the batch stays pending)."""
        follower, sink = self.follower, self.sink
        assert follower is not None and sink is not None
        batch: list[tuple[Key, _Entry]] = []
        for key, entry in list(self.pending.items()):
            if key in follower.resources:
                self._settle(key)  # defined meanwhile (registered by another node, ...)
                continue
            if entry.since is None:
                entry.since = follower.position
            batch.append((key, entry))
            if len(batch) >= self.batch:
                break
        if not batch:
            return
        items = [
            {"kind": key[0].value, "path": list(key[1]), "spec": entry.spec, "since": entry.since}
            for key, entry in batch
        ]
        results = await sink.register(items)
        self.batches += 1
        for (key, entry), result in zip(batch, results, strict=True):
            outcome = result.get("result")
            if outcome == "stale":
                # Too old for the control plane's delete check: what the follower saw
                # since is checked here instead, then it is asked again.
                if key in follower.deleted:
                    self.deleted += 1
                    self._settle(key)
                else:
                    entry.since = follower.position
                continue
            self._settle(key)
            if outcome == "created":
                self.registered += 1
            elif outcome == "exists":
                self.existed += 1
            elif outcome == "deleted":
                self.deleted += 1
                log.info(
                    "auto-created %s %s is not registered: %s; ending it on this node",
                    key[0].value,
                    "/".join(key[1]),
                    result.get("detail"),
                )
                follower.end(*key)
            else:
                self.refused += 1
                self._refusals.warn(
                    "the control plane refused to register auto-created %s %s: %s "
                    "(felix_autocreate_refused_total)",
                    key[0].value,
                    "/".join(key[1]),
                    result.get("detail"),
                )

    def _settle(self, key: Key) -> None:
        if self.pending.pop(key, None) is not None:
            tenant = key[1][0]
            self._per_tenant[tenant] -= 1
            if self._per_tenant[tenant] <= 0:
                del self._per_tenant[tenant]

    def counters(self) -> list[tuple[str, str, int]]:
        """(metric name, help, value) for the supervisor's /metrics."""
        return [
            (
                "felix_autocreate_registered",
                "Streams and caches created on first use and registered in the control plane",
                self.registered,
            ),
            (
                "felix_autocreate_refused",
                "Registrations of auto-created streams and caches the control plane refused "
                "(quotas, limits, settings)",
                self.refused,
            ),
            (
                "felix_autocreate_dropped",
                "Reports of auto-created streams and caches dropped: too many registrations "
                "pending",
                self.dropped,
            ),
            (
                "felix_autocreate_deleted",
                "Auto-created streams and caches not registered because the control plane "
                "deleted them (or a parent of theirs) meanwhile",
                self.deleted,
            ),
            (
                "felix_autocreate_failures",
                "Registration batches that failed (the control plane away); retried",
                self.failures,
            ),
        ]

    def status(self) -> dict[str, int]:
        """The /status view: pending and the counters."""
        return {
            "pending": len(self.pending),
            "max_pending": self.max_pending,
            "registered": self.registered,
            "existed": self.existed,
            "refused": self.refused,
            "dropped": self.dropped,
            "deleted": self.deleted,
            "failures": self.failures,
            "batches": self.batches,
        }
