"""A node following a remote control plane mirrors the tenants' JWK sets into DATA_DIR/auth.

How it works
------------
The gateways verify Felix tokens against ``DATA_DIR/auth/<tenant>.jwks.json``
(:class:`~felix.auth.files.JwksDirectory` re-stats each file every 2 s). A node that
embeds the control plane shares that directory with it: the rings and their public
sets are there already. A node that follows a remote one (``felix up --control-url``)
instead runs :class:`JwksSync`: for every tenant the control plane's feed names (the
:class:`~felix.node.control.ControlFollower` reports them), it fetches
``GET {control}/v1/tenants/{t}/.well-known/jwks.json`` and writes the answer to the
tenant's file atomically (only when it changed).

- Each tenant is fetched at once when it appears, then every ``period`` seconds
  (jittered down by up to 20 %, so nodes spread out; never later than ``period``).
- 404 (the control plane has no such tenant), or the tenant leaving the feed, removes
  its file: the gateways deny it from then on. At start, files of tenants the control
  plane does not know are removed too (the directory mirrors the control plane).
- Anything else (unreachable, 5xx, 503 "no signing keys yet", a malformed set) keeps
  the last known file, so tokens keep verifying, and retries with backoff (1 s
  doubling up to ``period``, jittered).
- A tenant with a local ring in DATA_DIR/auth (``felix token keygen --dir``) is left
  alone: its set is published from that ring.
- At most :data:`~felix.auth.files.MAX_TENANTS` tenants (by name), and sets within
  :data:`~felix.auth.files.MAX_JWKS_FILE_BYTES` and
  :data:`~felix.auth.tokens.MAX_JWKS_KEYS` keys.

Why polling is enough, with no refetch when a gateway meets an unknown ``kid``: keys
are published before they sign (:mod:`felix.auth.rotation`), ``lead`` seconds ahead
(300 s by default). A gateway's copy is at most ``period`` (plus one failed fetch's
backoff, at most another ``period``) plus the 2 s file rechecks old, so with ``lead``
above twice the period plus a few seconds, every gateway has a key before the first
token signed with it exists. A token with an unknown ``kid`` is then forged, or from
another cluster: fetching on it would only let anyone make the node hammer its control
plane. (Gateways are separate processes; they only read the files.)

:class:`SyncSchedule` is the sans-IO core (tenants, due times, what to do with each
answer; the clock is passed in); :class:`JwksSync` drives it with a fetch function
(:class:`HttpJwksFetcher` for the REST API) and the file helpers of
:mod:`felix.auth.files`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from felix.auth.files import (
    MAX_JWKS_FILE_BYTES,
    MAX_TENANTS,
    jwks_tenants,
    remove_jwks,
    ring_path,
    save_jwks,
)
from felix.auth.tokens import public_keys_by_kid
from felix.errors import BadRequest, ConfigError, FelixError
from felix.names import validate_name

__all__ = [
    "DEFAULT_REFRESH",
    "Action",
    "Fetched",
    "HttpJwksFetcher",
    "JwksSync",
    "Outcome",
    "SyncSchedule",
]

log = logging.getLogger("felix.node.jwks_sync")

#: Default seconds between two fetches of a tenant's set (``felix up --jwks-refresh``).
DEFAULT_REFRESH = 30.0
#: First retry delay after a failed fetch, in seconds (doubles up to the period).
RETRY_MIN = 1.0
#: Seconds one fetch may take, and fetches in flight at once.
FETCH_TIMEOUT = 10.0
CONCURRENCY = 8
#: Fraction of the period a refresh may come early (spreads nodes and tenants out).
JITTER = 0.2


class Outcome(enum.Enum):
    """What a fetch of a tenant's set found."""

    OK = "ok"  # the set
    GONE = "gone"  # the control plane has no such tenant
    FAILED = "failed"  # no answer worth acting on: try again later


@dataclass(frozen=True, slots=True)
class Fetched:
    """One fetch's result: an outcome, the set (OK) or why it failed."""

    outcome: Outcome
    jwks: dict[str, Any] | None = None
    problem: str = ""

    @classmethod
    def ok(cls, jwks: dict[str, Any]) -> Fetched:
        return cls(Outcome.OK, jwks)

    @classmethod
    def gone(cls, problem: str = "no such tenant") -> Fetched:
        return cls(Outcome.GONE, None, problem)

    @classmethod
    def failed(cls, problem: str) -> Fetched:
        return cls(Outcome.FAILED, None, problem)


class Action(enum.Enum):
    """What to do with a tenant's file after a fetch."""

    WRITE = "write"  # publish the fetched set
    REMOVE = "remove"  # remove the file: the tenant is gone
    KEEP = "keep"  # leave the last known set; a retry is scheduled
    IGNORE = "ignore"  # the tenant is no longer followed (its removal is queued)


class SyncSchedule:
    """Which tenants' sets to fetch when, and what each answer means. No I/O, no clock.

    Args:
        period: seconds between refreshes of one tenant (> 0).
        retry_min: first retry delay after a failure; doubles up to ``period``.
        max_tenants: tenants followed at most (the first by name; ``truncated`` says so).
        jitter: fraction of ``period`` (and of a retry delay) drawn off at random.
        rng: the randomness (tests pass a seeded one).

    Raises:
        ConfigError: ``period`` or ``retry_min`` is not a positive number.
    """

    def __init__(
        self,
        *,
        period: float = DEFAULT_REFRESH,
        retry_min: float = RETRY_MIN,
        max_tenants: int = MAX_TENANTS,
        jitter: float = JITTER,
        rng: random.Random | None = None,
    ) -> None:
        for name, value in (("period", period), ("retry_min", retry_min)):
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ConfigError(f"JWKS refresh {name} must be a positive number of seconds")
        self.period = float(period)
        self.retry_min = min(float(retry_min), self.period)
        self.max_tenants = max_tenants
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._due: dict[str, float] = {}  # tenant -> when to fetch it next
        self._inflight: set[str] = set()
        self._failures: dict[str, int] = {}
        self._removed: set[str] = set()
        self.seeded = False  # set_tenants was called (the feed's tenants are known)
        self.truncated = False

    @property
    def tenants(self) -> frozenset[str]:
        """The tenants followed."""
        return frozenset(self._due)

    def failures(self, tenant: str) -> int:
        """Fetches of ``tenant`` that failed in a row."""
        return self._failures.get(tenant, 0)

    def set_tenants(self, tenants: Iterable[str], now: float) -> None:
        """Follow exactly ``tenants`` (the control plane's, in full) from ``now`` on.

        New tenants are due at once; tenants no longer listed are queued for removal
        (:meth:`take_removed`). Invalid names are skipped.
        """
        wanted: list[str] = []
        for tenant in set(tenants):
            try:
                wanted.append(validate_name("tenant", tenant))
            except BadRequest:
                continue
        wanted.sort()
        self.truncated = len(wanted) > self.max_tenants
        keep = set(wanted[: self.max_tenants])
        for tenant in self._due.keys() - keep:
            del self._due[tenant]
            self._failures.pop(tenant, None)
            self._removed.add(tenant)
        for tenant in keep:
            if tenant not in self._due:
                self._due[tenant] = now
                self._removed.discard(tenant)
        self.seeded = True

    def take_removed(self) -> list[str]:
        """The tenants no longer followed since the last call: remove their files."""
        removed = sorted(self._removed)
        self._removed.clear()
        return removed

    def due(self, now: float) -> list[str]:
        """The tenants to fetch now, most overdue first; they are in flight until
        :meth:`result` is called for each."""
        ready = [
            (when, t) for t, when in self._due.items() if when <= now and t not in self._inflight
        ]
        ready.sort()
        tenants = [t for _, t in ready]
        self._inflight.update(tenants)
        return tenants

    def next_due(self) -> float | None:
        """When the next tenant is due (None: no tenant, or all in flight)."""
        waiting = [when for t, when in self._due.items() if t not in self._inflight]
        return min(waiting, default=None)

    def result(self, tenant: str, fetched: Fetched, now: float) -> Action:
        """Record the answer to a fetch of ``tenant`` at ``now``; what to do with its file."""
        self._inflight.discard(tenant)
        if tenant not in self._due:
            return Action.IGNORE
        if fetched.outcome is Outcome.FAILED:
            failures = self._failures.get(tenant, 0) + 1
            self._failures[tenant] = failures
            delay = min(self.period, self.retry_min * 2 ** min(failures - 1, 30))
            self._due[tenant] = now + delay * (1 - self.jitter * self._rng.random())
            return Action.KEEP
        self._failures.pop(tenant, None)
        self._due[tenant] = now + self.period * (1 - self.jitter * self._rng.random())
        return Action.WRITE if fetched.outcome is Outcome.OK else Action.REMOVE


Fetch = Callable[[str], Awaitable[Fetched]]


class HttpJwksFetcher:
    """Fetches ``GET {url}/v1/tenants/{t}/.well-known/jwks.json`` (a public route).

    Reaches the control plane as the feed does (:class:`~felix.node.control.HttpFeed`):
    ``token`` is sent as ``Authorization: Bearer`` (the route does not need it), ``ca``
    verifies an https control plane and ``cert`` (chain, key) is presented to one that
    requires client certificates; None: ``$FELIX_CONTROL_CA`` / ``_CERT`` / ``_KEY``,
    else the system trust store and no certificate. No redirects; at most
    :data:`~felix.auth.files.MAX_JWKS_FILE_BYTES` of body and ``timeout`` seconds per
    fetch. Call :meth:`aclose` when done.

    Raises:
        ConfigError: the TLS files cannot be loaded.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca: str | os.PathLike[str] | None = None,
        cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        timeout: float = FETCH_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        from felix.control.client import default_ca, default_cert

        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        ca = ca if ca is not None else default_ca()
        cert = cert if cert is not None else default_cert()
        verify: ssl.SSLContext | bool = True
        if ca is not None or cert is not None:
            try:
                verify = ssl.create_default_context(
                    cafile=os.fspath(ca) if ca is not None else None
                )
                if cert is not None:
                    verify.load_cert_chain(os.fspath(cert[0]), os.fspath(cert[1]))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load TLS files for the control plane: {exc}") from None
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            verify=verify,
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, tenant: str) -> Fetched:
        path = f"/v1/tenants/{validate_name('tenant', tenant)}/.well-known/jwks.json"
        body = bytearray()
        try:
            async with (
                asyncio.timeout(self.timeout),
                self._client.stream("GET", path) as response,
            ):
                if response.status_code == 404:
                    return Fetched.gone(f"GET {self.url}{path}: 404")
                if response.status_code != 200:
                    return Fetched.failed(f"GET {self.url}{path}: HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_FILE_BYTES:
                        return Fetched.failed(
                            f"GET {self.url}{path}: larger than {MAX_JWKS_FILE_BYTES} bytes"
                        )
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return Fetched.failed(f"GET {self.url}{path}: {exc or type(exc).__name__}")
        try:
            value = json.loads(body)
            public_keys_by_kid(value, strict=True)
        except (ValueError, RecursionError, BadRequest) as exc:
            return Fetched.failed(f"GET {self.url}{path}: not a usable JWK set: {exc}")
        assert isinstance(value, dict)  # public_keys_by_kid checked it
        return Fetched.ok({"keys": value["keys"]})


class JwksSync:
    """Keeps ``directory``'s ``<tenant>.jwks.json`` files equal to what ``fetch`` finds.

    Feed it the control plane's tenants with :meth:`set_tenants` (a follower
    callback); :meth:`run` fetches and writes until cancelled. ``synced`` is set once
    a pass over the tenants known at the time is done (the supervisor waits for it,
    bounded, before the gateways start). ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        directory: Path,
        fetch: Fetch,
        *,
        period: float = DEFAULT_REFRESH,
        clock: Callable[[], float] = time.monotonic,
        concurrency: int = CONCURRENCY,
        rng: random.Random | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.schedule = SyncSchedule(period=period, rng=rng)
        self._fetch = fetch
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self.synced = asyncio.Event()
        self._stale_checked = False
        self._local: set[str] = set()  # tenants with a local ring (warned about)
        self.writes = 0
        self.removals = 0
        self.failures = 0  # fetches that kept the last known set

    def set_tenants(self, tenants: Iterable[str]) -> None:
        """The control plane's tenants changed (the full list): sync new ones promptly."""
        self.schedule.set_tenants(tenants, self._clock())
        if self.schedule.truncated:
            log.warning(
                "the control plane has more than %d tenants: syncing the keys of the first "
                "%d (by name) only",
                self.schedule.max_tenants,
                self.schedule.max_tenants,
            )
        self._wake.set()

    async def run(self) -> None:
        """Sync until cancelled: whenever a tenant is due or the tenants change."""
        while True:
            self._wake.clear()
            await self.step()
            if self.schedule.seeded:
                self.synced.set()
            when = self.schedule.next_due()
            timeout = None if when is None else max(when - self._clock(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def step(self) -> None:
        """Remove the files of tenants gone, then fetch every tenant that is due."""
        removed = self.schedule.take_removed()
        if self.schedule.seeded and not self._stale_checked:
            # Files left from before this start, of tenants the control plane lacks.
            self._stale_checked = True
            try:
                present = await asyncio.to_thread(jwks_tenants, self.directory)
            except ConfigError as exc:
                log.warning("JWKS sync: %s", exc)
                present = []
            removed += [t for t in present if t not in self.schedule.tenants]
        for tenant in removed:
            await asyncio.to_thread(self._apply, tenant, Action.REMOVE, None)
        due = self.schedule.due(self._clock())
        if due:
            await asyncio.gather(*(self._sync_one(tenant) for tenant in due))

    async def _sync_one(self, tenant: str) -> None:
        try:
            async with self._limit:
                fetched = await self._fetch(tenant)
        except asyncio.CancelledError:
            self.schedule.result(tenant, Fetched.failed("cancelled"), self._clock())
            raise
        except Exception as exc:
            fetched = Fetched.failed(f"{type(exc).__name__}: {exc}")
        action = self.schedule.result(tenant, fetched, self._clock())
        if action is Action.KEEP:
            self.failures += 1
            failures = self.schedule.failures(tenant)
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(
                level,
                "cannot refresh the keys of tenant %r (%s); keeping the last known set, "
                "retrying (failure %d)",
                tenant,
                fetched.problem,
                failures,
            )
            return
        if action is not Action.IGNORE:
            await asyncio.to_thread(self._apply, tenant, action, fetched.jwks)

    def _apply(self, tenant: str, action: Action, jwks: dict[str, Any] | None) -> None:
        """Write or remove ``tenant``'s file (blocking), unless a local ring owns it."""
        if ring_path(self.directory, tenant).exists():
            if tenant not in self._local:
                self._local.add(tenant)
                log.warning(
                    "tenant %r has a key ring in %s: its JWK set is published from that "
                    "ring, not synced from the control plane",
                    tenant,
                    self.directory,
                )
            return
        try:
            if action is Action.WRITE:
                assert jwks is not None
                if save_jwks(self.directory, tenant, jwks):
                    self.writes += 1
                    kids = ", ".join(str(k.get("kid")) for k in jwks["keys"])
                    log.info("tenant %r: published keys [%s]", tenant, kids)
            elif action is Action.REMOVE and remove_jwks(self.directory, tenant):
                self.removals += 1
                log.info("tenant %r: removed its keys (unknown to the control plane)", tenant)
        except FelixError as exc:
            log.warning("JWKS sync of tenant %r: %s", tenant, exc)
