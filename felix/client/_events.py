"""Connection-state events: small dataclasses, delivered to callbacks and async iterators."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

from felix.errors import FelixError

__all__ = [
    "ClientEvent",
    "Disconnected",
    "EventFeed",
    "EventHub",
    "EventListener",
    "Reconnected",
    "SlowConsumer",
]

log = logging.getLogger("felix.client")

#: Events an :class:`EventFeed` holds for a reader that is behind; older ones are dropped.
FEED_LIMIT = 256


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Pooled connection ``connection`` (index in the pool) was lost; the client reconnects
    (unless the session's static token expired: then it gives that connection up)."""

    kind: ClassVar[str] = "disconnected"
    connection: int
    #: Why (typically ConnectionLost; Unauthenticated when the broker closed the session
    #: because its token expired).
    error: FelixError


@dataclass(frozen=True, slots=True)
class Reconnected:
    """Pooled connection ``connection`` is back (after ``attempts`` tries); subscriptions resume."""

    kind: ClassVar[str] = "reconnected"
    connection: int
    attempts: int


@dataclass(frozen=True, slots=True)
class SlowConsumer:
    """A subscription to ``stream`` lost ``dropped`` records starting at ``first_dropped``.

    Sent for SLOW_CONSUMER notices and for gaps seen in offsets (e.g. records
    that left the broker's retention while a subscription was reconnecting).
    """

    kind: ClassVar[str] = "slow_consumer"
    stream: str
    first_dropped: int
    dropped: int


ClientEvent = Disconnected | Reconnected | SlowConsumer
#: A callback for events: plain function or coroutine function.
EventListener = Callable[[ClientEvent], None] | Callable[[ClientEvent], Awaitable[None]]


class EventFeed:
    """An async iterator over a client's events from the moment it was created.

    Holds at most 256 undelivered events (older ones are dropped, counted in
    ``missed``). Iteration ends when the client closes or :meth:`close` is called.
    """

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._items: deque[ClientEvent] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        #: Events dropped because this reader fell more than 256 behind.
        self.missed = 0

    def _put(self, event: ClientEvent) -> None:
        if len(self._items) >= FEED_LIMIT:
            self._items.popleft()
            self.missed += 1
        self._items.append(event)
        self._wakeup.set()

    def close(self) -> None:
        """Stop this feed: iteration ends once the queued events are read."""
        self._closed = True
        self._hub._feeds.discard(self)
        self._wakeup.set()

    def __aiter__(self) -> EventFeed:
        return self

    async def __anext__(self) -> ClientEvent:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()


class EventHub:
    """Fans events out to listeners and feeds. Listener errors are logged, never raised."""

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []
        self._feeds: set[EventFeed] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        """Remove ``listener``; a listener that was not added is ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def feed(self) -> EventFeed:
        feed = EventFeed(self)
        self._feeds.add(feed)
        return feed

    def emit(self, event: ClientEvent) -> None:
        log.info("felix client: %s", event)
        for feed in list(self._feeds):
            feed._put(event)
        for listener in list(self._listeners):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(self._run(result))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except Exception:
                log.exception("felix client: event listener %r failed", listener)

    async def _run(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("felix client: async event listener failed")

    def close(self) -> None:
        """End every feed; listener tasks still running are left to finish."""
        for feed in list(self._feeds):
            feed.close()
