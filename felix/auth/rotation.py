"""Scheduled rotation of the tenants' signing keys, run by the process that owns the rings.

How it works
------------
The process that owns the rings (``felix up --auth`` with its embedded control plane:
``DATA_DIR/auth``, or in a cluster the cluster's database; ``felix control --auth``:
``--keys-dir``) runs a :class:`KeyRotator` over every tenant that has a key ring there
(rings are made by ``felix token keygen``; the token exchange only reads them). For
each ring the pure :func:`plan` decides, from the ring's timeline and ``now``, what is
due::

    newest key activates at A                A + interval - lead     A + interval
      |--- ACTIVE -----------------------------------|--- (publish next: NEXT) ---|--- next ACTIVE
                                                     rotate(now, lead)

- **rotate**: the newest key has been active for ``interval - lead`` seconds: publish
  the next key now; it signs ``lead`` seconds later, so every key activates
  ``interval`` after the one before. A rotation already pending (``felix token
  rotate`` published a NEXT key) just moves the schedule: the next rotation is
  counted from that key's activation.
- **prune**: a retired key is past ``max_token_ttl + leeway`` after its successor
  activated (every token it signed has expired): forget it and publish the set
  without it.

:func:`apply` does both to a ring (prune first, then rotate) and :func:`next_check`
says when the ring next needs a look. ``lead`` is how long every verifier has to
fetch the new key before the first token signed with it arrives: keep it above the
longest a verifier's copy of the set can be stale, i.e. twice the followers' (or the
cluster's nodes') ``--jwks-refresh`` period plus a few seconds for the file rechecks
(see :meth:`RotationPolicy.covers`). A ring that already holds
:data:`~felix.auth.tokens.MAX_JWKS_KEYS` keys is not rotated until one is pruned (a
set with more would not verify).

:meth:`KeyRotator.tick` does one pass over the store
(:class:`~felix.auth.ringstore.RingStore`), each ring's read-modify-write under the
store's lock of it (the key directory's ``flock``; the ring's row lock in PostgreSQL),
with the decision taken on the ring as read under that lock: a concurrent ``felix
token rotate``, a second rotator, or another node of the cluster cannot race it, and
two rotators due at once rotate once. :meth:`KeyRotator.run` repeats it until
cancelled. All times are wall-clock Unix seconds (the keys' timelines and the tokens'
``iat``/``exp`` are); the clock is passed in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from felix.auth.files import MAX_TENANTS
from felix.auth.keys import KeyState, TenantKeyRing
from felix.auth.ringstore import FileRingStore, RingStore
from felix.auth.tokens import MAX_JWKS_KEYS
from felix.errors import ConfigError, FelixError, KeyUnavailable, NotFound, Unavailable

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_LEAD",
    "Applied",
    "KeyRotator",
    "Plan",
    "RotationPolicy",
    "apply",
    "next_check",
    "plan",
    "rotate_at",
]

log = logging.getLogger("felix.auth.rotation")

#: Default seconds between two keys' activations (``--key-rotation-interval``).
DEFAULT_INTERVAL = 24 * 3600.0
#: Default seconds a scheduled key is published before it signs (``--key-publish-lead``).
DEFAULT_LEAD = 300.0
#: Seconds the file rechecks add to a verifier's staleness (the control plane's and the
#: gateways' :class:`~felix.auth.files.JwksDirectory` re-stat every 2 s).
_RECHECKS = 5.0


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """When to rotate: a key activates every ``interval`` s, published ``lead`` s ahead.

    Raises:
        ConfigError: ``lead`` is not positive, or ``interval`` is shorter than ``lead``
            (or either is not a finite number).
    """

    interval: float = DEFAULT_INTERVAL
    lead: float = DEFAULT_LEAD

    def __post_init__(self) -> None:
        for name in ("interval", "lead"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"key rotation {name} must be a number of seconds")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"key rotation {name} must be a positive number of seconds")
        if self.interval < self.lead:
            raise ConfigError(
                f"the key rotation interval ({self.interval:g} s) must be at least the "
                f"publish lead time ({self.lead:g} s)"
            )

    def covers(self, refresh: float) -> bool:
        """Whether ``lead`` outlasts a verifier refreshing its JWK set every ``refresh`` s.

        A follower's copy can be up to ``refresh`` old (a failed fetch adds up to
        another ``refresh``), plus the file rechecks on both ends.
        """
        return self.lead >= 2 * refresh + _RECHECKS


@dataclass(frozen=True, slots=True)
class Plan:
    """What one ring needs at one moment."""

    #: Publish the next key now.
    rotate: bool
    #: Forget the keys that are DROPPED now (and republish the set without them).
    prune: bool
    #: A rotation is due but the ring already holds the most keys a set may have.
    full: bool = False

    @property
    def changes(self) -> bool:
        return self.rotate or self.prune


def rotate_at(ring: TenantKeyRing, policy: RotationPolicy) -> float:
    """When the next key should be published: ``interval - lead`` after the newest activates."""
    newest = ring.schedule()[-1]
    return newest.activate_at + policy.interval - policy.lead


def plan(ring: TenantKeyRing, now: float, policy: RotationPolicy) -> Plan:
    """What ``ring`` needs at ``now`` (pure: reads nothing, changes nothing)."""
    schedule = ring.schedule()
    dropped = sum(1 for t in schedule if t.state(now) is KeyState.DROPPED)
    due = now >= rotate_at(ring, policy)
    full = due and len(schedule) - dropped >= MAX_JWKS_KEYS
    return Plan(rotate=due and not full, prune=dropped > 0, full=full)


def next_check(ring: TenantKeyRing, now: float, policy: RotationPolicy) -> float:
    """The earliest time after ``now`` at which :func:`plan` may ask for something.

    The next rotation, or the next key drop, whichever comes first (a rotation held
    back by a full ring waits for a drop).
    """
    drops = [t.drop_at for t in ring.schedule() if t.drop_at is not None and t.drop_at > now]
    when = rotate_at(ring, policy)
    if when > now:
        drops.append(when)
    return min(drops, default=math.inf)


@dataclass(frozen=True, slots=True)
class Applied:
    """What :func:`apply` did."""

    rotated: str | None  # the new key's kid
    dropped: list[str]
    full: bool

    @property
    def changed(self) -> bool:
        return self.rotated is not None or bool(self.dropped)


def apply(ring: TenantKeyRing, now: float, policy: RotationPolicy) -> Applied:
    """Do what :func:`plan` asks of ``ring`` at ``now`` (store the ring after, if changed)."""
    todo = plan(ring, now, policy)
    dropped = ring.prune(now) if todo.prune else []
    rotated = ring.rotate(now, publish_ahead=policy.lead) if todo.rotate else None
    return Applied(rotated, dropped, todo.full)


class KeyRotator:
    """Rotates and prunes every ring of ``store`` on ``policy``'s schedule.

    ``store`` is a :class:`~felix.auth.ringstore.RingStore`, or a key directory (a
    :class:`~felix.auth.ringstore.FileRingStore` over it). Remembers, per tenant, the
    ring's version it last saw and when that ring next needs a look, so a pass reloads
    only rings that are due or changed (``felix token rotate``, ``keygen --force``,
    another node of a cluster). Passes are at least every ``max_sleep`` seconds
    (default: a quarter of the interval, 1 to 60 s), so new rings and clock jumps are
    noticed. At most :data:`~felix.auth.files.MAX_TENANTS` rings (by name) are handled.

    A ring this process cannot open (sealed with a region key it does not have) is
    skipped until it changes (another node, which has the key, rotates it), with one
    warning per tenant and reason; a ring that cannot be read for another reason is
    tried again every pass, also warned about once.
    """

    def __init__(
        self,
        store: RingStore | Path,
        policy: RotationPolicy,
        *,
        clock: Callable[[], float] = time.time,
        max_sleep: float | None = None,
    ) -> None:
        self.store: RingStore = (
            FileRingStore(store) if isinstance(store, str | os.PathLike) else store
        )
        self.policy = policy
        if max_sleep is None:
            max_sleep = min(max(policy.interval / 4, 1.0), 60.0)
        self.max_sleep = max_sleep
        self._clock = clock
        self._due: dict[str, tuple[Hashable, float]] = {}
        self._warned_full: set[str] = set()
        # Per tenant with a ring, the last problem warned about (bounded by the tenants).
        self._warned: dict[str, str] = {}
        self._warned_many = False
        self.rotations = 0

    async def tick(self) -> float:
        """One pass: rotate and prune the rings that are due.

        Returns the wall-clock time of the next pass (at most ``max_sleep`` ahead).
        """
        now = self._clock()
        try:
            versions = await self.store.versions()
        except FelixError as exc:
            log.warning("key rotation: %s", exc)
            return now + self.max_sleep
        tenants = sorted(versions)
        if len(tenants) > MAX_TENANTS:
            if not self._warned_many:
                log.warning(
                    "key rotation: %d key rings in %s, rotating the first %d only",
                    len(tenants),
                    self.store.where,
                    MAX_TENANTS,
                )
                self._warned_many = True
            tenants = tenants[:MAX_TENANTS]
        for gone in self._due.keys() - set(tenants):
            del self._due[gone]
        for gone in self._warned.keys() - set(tenants):
            del self._warned[gone]
        self._warned_full &= set(tenants)
        wake = now + self.max_sleep
        for tenant in tenants:
            seen = self._due.get(tenant)
            if seen is not None and seen[1] > now and seen[0] == versions[tenant]:
                wake = min(wake, seen[1])
                continue
            due, version = await self._one(tenant, versions[tenant])
            self._due[tenant] = (version, due)
            wake = min(wake, due)
        return wake

    async def _one(self, tenant: str, version: Hashable) -> tuple[float, Hashable]:
        """Rotate/prune one ring under the store's lock of it: when it next needs a
        look, and its version once done (None: unknown, so it is looked at again)."""
        done: Applied | None = None
        at = 0.0

        def change(ring: TenantKeyRing) -> float | None:
            nonlocal done, at
            at = self._clock()
            done = apply(ring, at, self.policy)
            return at if done.changed else None

        try:
            ring = await self.store.update(tenant, change)
        except NotFound:  # removed since the listing
            return self._clock() + self.max_sleep, None
        except FelixError as exc:  # a corrupt or unreadable ring: look again later
            if isinstance(exc, Unavailable) and not isinstance(exc, KeyUnavailable):
                # The store, not the ring: every pass says so.
                log.warning("key rotation of tenant %r: %s", tenant, exc)
                return self._clock() + self.max_sleep, version
            if self._warned.get(tenant) != str(exc):
                self._warned[tenant] = str(exc)
                log.warning("key rotation of tenant %r: %s", tenant, exc)
            if isinstance(exc, KeyUnavailable):
                # Sealed with a region key this process lacks: not its to rotate (a
                # node with the key does); looked at again once the ring changes.
                return math.inf, version
            return self._clock() + self.max_sleep, version
        self._warned.pop(tenant, None)
        assert done is not None
        if done.changed:
            version = None  # this pass changed it: learn the new version next pass
        if done.rotated is not None:
            self.rotations += 1
            activate = ring.schedule()[-1].activate_at
            log.info(
                "tenant %r: published key %s, signing in %.0f s",
                tenant,
                done.rotated,
                activate - at,
            )
        for kid in done.dropped:
            log.info("tenant %r: dropped expired key %s", tenant, kid)
        if done.full:
            if tenant not in self._warned_full:
                log.warning(
                    "tenant %r: key ring holds %d keys; not rotating until one expires",
                    tenant,
                    MAX_JWKS_KEYS,
                )
                self._warned_full.add(tenant)
        else:
            self._warned_full.discard(tenant)
        return next_check(ring, at, self.policy), version

    async def run(self) -> None:
        """Pass over the store until cancelled."""
        log.info(
            "rotating the signing keys in %s every %g s (published %g s ahead)",
            self.store.where,
            self.policy.interval,
            self.policy.lead,
        )
        while True:
            try:
                wake = await self.tick()
            except Exception:  # never let one bad pass end the schedule
                log.exception("key rotation pass failed")
                wake = self._clock() + self.max_sleep
            delay = min(max(wake - self._clock(), 0.05), self.max_sleep)
            await asyncio.sleep(delay)
