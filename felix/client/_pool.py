"""The connection pool: slots that each hold one live connection or are reconnecting.

How it works: ``size`` slots are opened at start (all must succeed). A caller
asks :meth:`Pool.connection` for a live connection, round-robin, or by key (the
same key gets the same connection while it lives, which keeps one stream's
publishes in order); with none live it waits until one is back. When a
connection ends its slot emits Disconnected and reconnects with exponential
backoff and full jitter on every attempt (reliability.md R5/R6); once back it
emits Reconnected and resumes the subscriptions attached to it. A keepalive
PING after ``keepalive`` seconds of silence keeps idle connections open (QUIC
drops them after its idle timeout) and detects a peer that went silent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from felix import wire
from felix.client._backoff import Backoff
from felix.client._connection import Connection, expect_reply
from felix.client._convert import Endpoint
from felix.client._events import ClientEvent, Disconnected, Reconnected
from felix.errors import ConnectionLost, FelixError, FelixTimeoutError
from felix.quic import QuicConfiguration, QuicEngine

if TYPE_CHECKING:
    from felix.client._subscription import Subscription

__all__ = ["Pool", "PoolSettings"]

log = logging.getLogger("felix.client")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    engine: QuicEngine
    endpoint: Endpoint
    configuration: QuicConfiguration
    tenant: str
    #: Returns the token for a new connection (asked again for every one).
    token: Callable[[], Awaitable[str]]
    size: int
    control_streams: int
    connect_timeout: float
    #: How long a keepalive PING may take before the connection is given up.
    ping_timeout: float
    keepalive: float
    backoff_base: float
    backoff_cap: float
    random: Callable[[], float]


@dataclass(eq=False, slots=True)
class _Slot:
    index: int
    conn: Connection | None = None
    reconnecting: asyncio.Task[None] | None = None
    subscriptions: set[Subscription] = field(default_factory=set)


class Pool:
    """The client's connections (see the module doc)."""

    def __init__(self, settings: PoolSettings, emit: Callable[[ClientEvent], None]) -> None:
        self.settings = settings
        self._emit = emit
        self._slots = [_Slot(i) for i in range(settings.size)]
        self._round_robin = 0
        self._changed = asyncio.Event()  # replaced on every change: a broadcast
        self._keepalive_task: asyncio.Task[None] | None = None
        self._pings: set[asyncio.Task[None]] = set()
        self.closed = False

    @property
    def connected(self) -> int:
        """How many slots hold a live connection."""
        return sum(1 for slot in self._slots if slot.conn is not None)

    def live(self) -> list[Connection]:
        return [slot.conn for slot in self._slots if slot.conn is not None]

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
        conn = await Connection.open(
            s.engine,
            s.endpoint,
            s.configuration,
            tenant=s.tenant,
            token=await s.token(),
            control_streams=s.control_streams,
            timeout=s.connect_timeout,
        )
        conn.on_lost = lambda error: self._on_lost(slot, conn, error)
        if conn.lost is not None or self.closed:
            conn.close()
            raise ConnectionLost(str(conn.lost or "the client is closed"))
        return conn

    async def close(self, wait: float) -> None:
        """Stop reconnecting, end subscriptions, close connections; wait up to ``wait`` s."""
        self.closed = True
        self._notify()
        pending = (self._keepalive_task, *self._pings, *(s.reconnecting for s in self._slots))
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

        Raises ConnectionLost once the pool is closed.
        """
        while True:
            if self.closed:
                raise ConnectionLost("the client is closed")
            live = [slot for slot in self._slots if slot.conn is not None]
            if live:
                if key is None:
                    self._round_robin += 1
                    slot = live[self._round_robin % len(live)]
                else:
                    slot = self._slots[hash(key) % len(self._slots)]
                    if slot.conn is None:
                        slot = live[hash(key) % len(live)]
                assert slot.conn is not None
                return slot.conn
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- subscriptions -------------------------------------------------------------------

    def attach(self, sub: Subscription, conn: Connection) -> None:
        """``sub`` lives on ``conn``: resume it there after that slot reconnects."""
        for slot in self._slots:
            if slot.conn is conn:
                slot.subscriptions.add(sub)

    def detach(self, sub: Subscription) -> None:
        for slot in self._slots:
            slot.subscriptions.discard(sub)

    # -- loss and reconnects ---------------------------------------------------------------

    def _on_lost(self, slot: _Slot, conn: Connection, error: FelixError) -> None:
        # Runs inside the QUIC engine's event callback: only update state and spawn.
        if slot.conn is not conn:
            return
        slot.conn = None
        self._notify()
        if self.closed:
            return
        self._emit(Disconnected(slot.index, error))
        for sub in slot.subscriptions:
            sub._on_disconnected()
        slot.reconnecting = asyncio.get_running_loop().create_task(self._reconnect(slot))

    async def _reconnect(self, slot: _Slot) -> None:
        s = self.settings
        backoff = Backoff(base=s.backoff_base, cap=s.backoff_cap, random=s.random)
        while not self.closed:
            await asyncio.sleep(backoff.next_delay())
            try:
                conn = await self._open(slot)
            except (FelixError, OSError) as exc:
                # Unauthenticated too: a token_provider may have a fresh token next time.
                log.info("felix client: reconnect attempt %d failed: %s", backoff.attempts, exc)
                continue
            slot.conn = conn
            slot.reconnecting = None
            self._notify()
            self._emit(Reconnected(slot.index, backoff.attempts))
            for sub in list(slot.subscriptions):
                sub._resume(conn)
            return

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

    async def _ping(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(self.settings.ping_timeout):
                expect_reply(await conn.call(wire.encode_ping), wire.OP_OK)
        except TimeoutError:
            conn.fail(FelixTimeoutError(f"keepalive PING to {conn.endpoint} unanswered"))
        except FelixError as exc:
            log.debug("felix client: keepalive ping failed: %s", exc)
