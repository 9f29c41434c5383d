"""The connection pool: slots that each hold one live connection or are reconnecting.

How it works: ``size`` slots are opened at start (all must succeed). A caller
asks :meth:`Pool.connection` for a live connection, round-robin, or by key (the
same key gets the same connection while it lives, which keeps one stream's
publishes in order); with none live it waits until one is back. When a
connection ends its slot emits Disconnected and reconnects with exponential
backoff and full jitter on every attempt (docs/reliability.md, R5 and R6); once back it
emits Reconnected and resumes the subscriptions attached to it. A keepalive
PING after ``keepalive`` seconds of silence keeps idle connections open (QUIC
drops them after its idle timeout) and detects a peer that went silent.

Tokens: every new connection asks ``settings.token`` (the token_provider, if
any) for its token. With a provider, a connection whose token is a JWT with an
``exp`` (read unverified) gets a fresh token before it expires: when 80% of the
lifetime has passed, or 30 s before ``exp`` if that is earlier but no earlier
than half the lifetime, minus up to 10% jitter (:func:`refresh_delay`). The
fresh token (it must expire later than the current one) is presented with
REAUTH on every control stream of that connection; a provider or REAUTH
failure is retried with backoff, at most ``REFRESH_ATTEMPTS`` times per token.
If that fails, the broker closes the connection when the token expires
(plus its leeway): the connection's subscriptions end with ``Unauthenticated``
(they are not resumed silently) and the slot reconnects, asking the provider
again. With a static token nothing can be refreshed: once the broker closes a
connection for expiry, or refuses a reconnect with an expired token, the slot
gives up and calls fail with ``Unauthenticated`` at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from felix import wire
from felix.client._backoff import Backoff
from felix.client._connection import Connection, QuietBatch, expect_reply
from felix.client._convert import Endpoint, ShmEndpoint
from felix.client._events import ClientEvent, Disconnected, Reconnected
from felix.errors import ConnectionLost, FelixError, FelixTimeoutError, Unauthenticated
from felix.quic import QuicConfiguration, QuicEngine
from felix.unverified_jwt import read_unverified_claims

if TYPE_CHECKING:
    from felix.client._links import PooledMember

__all__ = ["Pool", "PoolSettings", "refresh_delay", "token_times"]

log = logging.getLogger("felix.client")

#: Refresh a token once this share of its lifetime has passed...
REFRESH_AT = 0.8
#: ...or this many seconds before it expires if that comes first (but not before half
#: of the lifetime has passed).
REFRESH_MARGIN = 30.0
#: The refresh delay is shortened by a random share up to this (many clients, one IdP).
REFRESH_JITTER = 0.1
#: Never wait less than this before a refresh (tokens that are (nearly) expired).
MIN_REFRESH_DELAY = 0.5
#: Attempts to get and present a fresh token before giving up on the current one.
REFRESH_ATTEMPTS = 5
#: Backoff between refresh attempts: (base, cap) seconds, full jitter.
REFRESH_BACKOFF = (0.5, 10.0)


def token_times(token: str) -> tuple[float | None, float] | None:
    """``(iat, exp)`` of a JWT, read without verifying it (``iat`` None if absent);
    None for an opaque token or one without a numeric ``exp``: nothing to schedule."""
    try:
        claims = read_unverified_claims(token)
    except FelixError:
        return None

    def number(name: str) -> float | None:
        value = claims.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) if math.isfinite(value) else None
        return None

    exp = number("exp")
    return None if exp is None else (number("iat"), exp)


def refresh_delay(iat: float | None, exp: float, now: float, random: float) -> float:
    """Seconds from ``now`` until a token issued at ``iat`` and expiring at ``exp``
    should be replaced; ``random`` in [0, 1) draws the jitter (see the module doc)."""
    remaining = exp - now
    lifetime = exp - iat if iat is not None and exp > iat else remaining
    margin = max((1.0 - REFRESH_AT) * lifetime, min(REFRESH_MARGIN, lifetime / 2))
    delay = (remaining - margin) * (1.0 - REFRESH_JITTER * random)
    return max(delay, MIN_REFRESH_DELAY)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    engine: QuicEngine
    endpoint: Endpoint | ShmEndpoint
    #: None for a shared-memory endpoint (no QUIC, no TLS).
    configuration: QuicConfiguration | None
    tenant: str
    #: Returns the token for a new connection (asked again for every one).
    token: Callable[[], Awaitable[str]]
    #: True when ``token`` can return a fresher token (a token_provider): refresh
    #: tokens before they expire. False: a static token, an expired one is final.
    refreshable: bool
    size: int
    control_streams: int
    connect_timeout: float
    #: How long a keepalive PING may take before the connection is given up.
    ping_timeout: float
    keepalive: float
    backoff_base: float
    backoff_cap: float
    random: Callable[[], float]
    #: The ``connection`` number of this pool's first slot in Disconnected/Reconnected
    #: events (a client's pools for other nodes of a cluster number theirs after it).
    index_base: int = 0
    #: Given each ERROR or REDIRECT answering an ack=False publish, with the batch when
    #: it was kept (``Connection.on_stray_reply``).
    on_stray_reply: Callable[[wire.ExtMessage, Connection, QuietBatch | None], None] | None = None
    #: Asked for each subscription or consumer whose connection was lost: True when
    #: the client took it over (it subscribes again through another connection, so
    #: the pool forgets it); False: the pool resumes it after its reconnect.
    on_member_lost: Callable[[PooledMember], bool] | None = None


@dataclass(eq=False, slots=True)
class _Slot:
    index: int
    conn: Connection | None = None
    reconnecting: asyncio.Task[None] | None = None
    refreshing: asyncio.Task[None] | None = None
    subscriptions: set[PooledMember] = field(default_factory=set)
    #: Set when the slot gave up (a static token expired): what calls fail with.
    failed: FelixError | None = None


class Pool:
    """The client's connections (see the module doc)."""

    def __init__(self, settings: PoolSettings, emit: Callable[[ClientEvent], None]) -> None:
        self.settings = settings
        self._emit = emit
        self._slots = [_Slot(settings.index_base + i) for i in range(settings.size)]
        self._round_robin = 0
        self._changed = asyncio.Event()  # replaced on every change: a broadcast
        self._keepalive_task: asyncio.Task[None] | None = None
        self._pings: set[asyncio.Task[None]] = set()
        #: Connections a PING is checking after a silent timeout (``_probe``).
        self._probing: set[Connection] = set()
        self.closed = False

    @property
    def connected(self) -> int:
        """How many slots hold a live connection."""
        return sum(1 for slot in self._slots if slot.conn is not None)

    def live(self) -> list[Connection]:
        return [slot.conn for slot in self._slots if slot.conn is not None]

    @property
    def members(self) -> int:
        """Subscriptions and consumers attached to this pool's connections."""
        return sum(len(slot.subscriptions) for slot in self._slots)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open every slot's connection; if one fails, stop the others and raise its error
        (the connections that did open stay in their slots for :meth:`close`)."""

        async def open_slot(slot: _Slot) -> None:
            slot.conn = await self._open(slot)

        tasks = [asyncio.ensure_future(open_slot(slot)) for slot in self._slots]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self._keepalive_task = asyncio.create_task(self._keep_alive())

    async def _open(self, slot: _Slot) -> Connection:
        s = self.settings
        token = await s.token()
        conn = await Connection.open(
            s.engine,
            s.endpoint,
            s.configuration,
            tenant=s.tenant,
            token=token,
            control_streams=s.control_streams,
            timeout=s.connect_timeout,
        )
        conn.on_lost = lambda error: self._on_lost(slot, conn, error)
        conn.on_stray_reply = s.on_stray_reply
        conn.on_silent = self._probe
        if conn.lost is not None or self.closed:
            conn.close()
            raise ConnectionLost(str(conn.lost or "the client is closed"))
        if s.refreshable:
            times = token_times(token)
            if times is not None:
                slot.refreshing = asyncio.create_task(self._refresh(conn, times))
        return conn

    async def close(self, wait: float) -> None:
        """Stop reconnecting, end subscriptions, close connections; wait up to ``wait`` s."""
        self.closed = True
        self._notify()
        pending = (
            self._keepalive_task,
            *self._pings,
            *(s.reconnecting for s in self._slots),
            *(s.refreshing for s in self._slots),
        )
        tasks = [task for task in pending if task is not None]
        for task in tasks:
            task.cancel()
        for slot in self._slots:
            for sub in list(slot.subscriptions):
                sub._on_client_closed()
            slot.subscriptions.clear()
        conns = self.live()
        for conn in conns:
            conn.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(conn.wait_closed(wait) for conn in conns))

    # -- picking a connection ------------------------------------------------------------

    async def connection(self, key: object | None = None) -> Connection:
        """A live connection (for ``key``: the same one while it lives); waits for one.

        Raises ConnectionLost once the pool is closed, Unauthenticated once every
        slot gave up because its static token expired.
        """
        while True:
            if self.closed:
                raise ConnectionLost("the client is closed")
            conn = self.ready(key)
            if conn is not None:
                return conn
            if all(slot.failed is not None for slot in self._slots):
                failed = self._slots[0].failed
                raise Unauthenticated(str(failed))
            await self._changed.wait()

    def ready(self, key: object | None = None) -> Connection | None:
        """The live connection :meth:`connection` would give now, or None (none is live,
        or the pool is closed): the calls' fast path, without a coroutine."""
        if self.closed:
            return None
        slots = self._slots
        if key is not None:
            slot = slots[hash(key) % len(slots)]
            if slot.conn is not None:
                return slot.conn
        live = [slot for slot in slots if slot.conn is not None]
        if not live:
            return None
        if key is None:
            self._round_robin += 1
            return live[self._round_robin % len(live)].conn
        return live[hash(key) % len(live)].conn

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- subscriptions -------------------------------------------------------------------

    def attach(self, sub: PooledMember, conn: Connection) -> None:
        """``sub`` lives on ``conn``: resume it there after that slot reconnects."""
        for slot in self._slots:
            if slot.conn is conn:
                slot.subscriptions.add(sub)

    def detach(self, sub: PooledMember) -> None:
        for slot in self._slots:
            slot.subscriptions.discard(sub)

    # -- loss and reconnects ---------------------------------------------------------------

    def _on_lost(self, slot: _Slot, conn: Connection, error: FelixError) -> None:
        # Runs inside the QUIC engine's event callback: only update state and spawn.
        if slot.conn is not conn:
            return
        slot.conn = None
        if slot.refreshing is not None:
            slot.refreshing.cancel()
            slot.refreshing = None
        self._notify()
        if self.closed:
            return
        self._emit(Disconnected(slot.index, error))
        if isinstance(error, Unauthenticated):
            # The session's token expired (it could not be refreshed): what ran on it
            # ends with that error rather than resuming silently later.
            for sub in list(slot.subscriptions):
                sub._on_end(error)
            slot.subscriptions.clear()
            if not self.settings.refreshable:
                self._give_up(slot, error)  # a static token stays expired
                return
        else:
            for sub in slot.subscriptions:
                sub._on_disconnected()
            taken = self.settings.on_member_lost
            if taken is not None:
                slot.subscriptions = {sub for sub in slot.subscriptions if not taken(sub)}
        slot.reconnecting = asyncio.get_running_loop().create_task(self._reconnect(slot))

    def _give_up(self, slot: _Slot, error: FelixError) -> None:
        """Stop using ``slot`` for good: its subscriptions end and calls fail with ``error``."""
        log.warning("felix client: giving up connection %d: %s", slot.index, error)
        slot.failed = error
        slot.reconnecting = None
        for sub in list(slot.subscriptions):
            sub._on_end(error)
        slot.subscriptions.clear()
        self._notify()

    async def _reconnect(self, slot: _Slot) -> None:
        s = self.settings
        backoff = Backoff(base=s.backoff_base, cap=s.backoff_cap, random=s.random)
        while not self.closed:
            await asyncio.sleep(backoff.next_delay())
            try:
                conn = await self._open(slot)
            except Unauthenticated as exc:
                if not s.refreshable and _expired(await s.token()):
                    # A static token stays expired: trying again cannot help.
                    self._give_up(slot, Unauthenticated(f"{exc} (the token has expired)"))
                    return
                # A token_provider may have a fresh token next time.
                log.info("felix client: reconnect attempt %d failed: %s", backoff.attempts, exc)
                continue
            except (FelixError, OSError) as exc:
                log.info("felix client: reconnect attempt %d failed: %s", backoff.attempts, exc)
                continue
            slot.conn = conn
            slot.reconnecting = None
            self._notify()
            self._emit(Reconnected(slot.index, backoff.attempts))
            for sub in list(slot.subscriptions):
                sub._resume(conn)
            return

    # -- token refresh ---------------------------------------------------------------------

    async def _refresh(self, conn: Connection, times: tuple[float | None, float]) -> None:
        """Keep ``conn`` authenticated: REAUTH with a fresh token before each one expires."""
        s = self.settings
        while conn.alive and not self.closed:
            iat, exp = times
            await asyncio.sleep(refresh_delay(iat, exp, time.time(), s.random()))
            if not conn.alive or self.closed:
                return
            backoff = Backoff(base=REFRESH_BACKOFF[0], cap=REFRESH_BACKOFF[1], random=s.random)
            for attempt in range(1, REFRESH_ATTEMPTS + 1):
                try:
                    token, fresh = await self._fresh_token(exp)
                    async with asyncio.timeout(s.ping_timeout):
                        await conn.reauth(token)
                except ConnectionLost:
                    return  # the pool reconnects with a token from the provider
                except (FelixError, TimeoutError) as exc:
                    if not conn.alive:
                        return
                    error = (
                        exc
                        if isinstance(exc, FelixError)
                        else FelixTimeoutError(f"REAUTH unanswered within {s.ping_timeout} s")
                    )
                    conn.refresh_error = error
                    log.warning(
                        "felix client: token refresh %d/%d failed: %s",
                        attempt,
                        REFRESH_ATTEMPTS,
                        error,
                    )
                    if attempt < REFRESH_ATTEMPTS:
                        await asyncio.sleep(backoff.next_delay())
                    continue
                conn.refresh_error = None
                if fresh is None:  # an opaque token: nothing more to schedule
                    return
                times = fresh
                break
            else:
                log.warning(
                    "felix client: could not refresh the token of the connection to %s; "
                    "the broker will close it when the token expires",
                    conn.endpoint,
                )
                return

    async def _fresh_token(self, exp: float) -> tuple[str, tuple[float | None, float] | None]:
        """A token from the provider that expires after ``exp`` and after now, and its times."""
        s = self.settings
        try:
            async with asyncio.timeout(s.connect_timeout):
                token = await s.token()
        except TimeoutError as exc:
            if isinstance(exc, FelixError):
                raise
            raise FelixTimeoutError(
                f"token_provider did not answer within {s.connect_timeout} s"
            ) from None
        times = token_times(token)
        if times is not None:
            if times[1] <= time.time():
                raise Unauthenticated("token_provider returned an expired token")
            if times[1] <= exp:
                raise Unauthenticated(
                    "token_provider returned a token that expires no later than the current one"
                )
        return token, times

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.keepalive
        while not self.closed:
            await asyncio.sleep(interval / 2)
            for conn in self.live():
                if loop.time() - conn.last_received >= interval:
                    task = asyncio.create_task(self._ping(conn))
                    self._pings.add(task)
                    task.add_done_callback(self._pings.discard)

    def _probe(self, conn: Connection) -> None:
        """A call on ``conn`` timed out and nothing came back since it was sent: PING it now
        (as the keepalive would after ``keepalive`` seconds of silence); unanswered, the
        connection is given up, so calls stop waiting on a node that is gone and a cluster
        client routes them through another node."""
        if self.closed or conn in self._probing:
            return
        self._probing.add(conn)
        task = asyncio.create_task(self._ping(conn))
        self._pings.add(task)
        task.add_done_callback(self._pings.discard)
        task.add_done_callback(lambda _t: self._probing.discard(conn))

    async def _ping(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(self.settings.ping_timeout):
                expect_reply(await conn.call(wire.encode_ping), wire.ExtMessage, wire.OP_OK)
        except TimeoutError:
            conn.fail(FelixTimeoutError(f"keepalive PING to {conn.endpoint} unanswered"))
        except FelixError as exc:
            log.debug("felix client: keepalive ping failed: %s", exc)


def _expired(token: str) -> bool:
    """True if ``token`` is a JWT whose ``exp`` has passed (by this host's clock)."""
    times = token_times(token)
    return times is not None and times[1] <= time.time()
