"""felix.client._events: listeners and bounded async feeds of connection events."""

from __future__ import annotations

import asyncio
import logging

import pytest
import uvloop

from felix.client._events import FEED_LIMIT, ClientEvent, EventHub, Reconnected, SlowConsumer

pytestmark = pytest.mark.timeout(30)


def run_loop(coro: object) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)  # type: ignore[arg-type]


def test_feed_sees_events_from_its_creation_and_ends_on_close() -> None:
    async def main() -> None:
        hub = EventHub()
        hub.emit(Reconnected(0, 1))  # before the feed: not seen
        feed = hub.feed()
        hub.emit(Reconnected(0, 2))
        hub.emit(SlowConsumer("s", 5, 3))
        hub.close()
        assert [e async for e in feed] == [Reconnected(0, 2), SlowConsumer("s", 5, 3)]

    run_loop(main())


def test_feed_waits_for_events() -> None:
    async def main() -> None:
        hub = EventHub()
        feed = hub.feed()
        waiter = asyncio.create_task(anext(feed))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        hub.emit(Reconnected(1, 1))
        assert await waiter == Reconnected(1, 1)

    run_loop(main())


def test_a_slow_feed_drops_its_oldest_events() -> None:
    async def main() -> None:
        hub = EventHub()
        feed = hub.feed()
        for i in range(FEED_LIMIT + 10):
            hub.emit(Reconnected(0, i))
        feed.close()
        got = [e async for e in feed]
        assert len(got) == FEED_LIMIT
        assert got[0] == Reconnected(0, 10)
        assert feed.missed == 10

    run_loop(main())


def test_listeners_sync_and_async_and_failing(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        hub = EventHub()
        seen: list[ClientEvent] = []
        done = asyncio.Event()

        def broken(event: ClientEvent) -> None:
            raise RuntimeError("listener bug")

        async def later(event: ClientEvent) -> None:
            await asyncio.sleep(0)
            seen.append(event)
            done.set()

        hub.add_listener(broken)
        hub.add_listener(seen.append)
        hub.add_listener(later)
        with caplog.at_level(logging.ERROR, logger="felix.client"):
            hub.emit(Reconnected(0, 1))  # the broken listener does not stop the others
        await done.wait()
        assert seen == [Reconnected(0, 1), Reconnected(0, 1)]
        assert "listener bug" in caplog.text
        hub.remove_listener(seen.append)
        hub.remove_listener(seen.append)  # not added any more: ignored
        hub.remove_listener(broken)
        hub.remove_listener(later)
        hub.emit(Reconnected(0, 2))
        assert len(seen) == 2
        assert Reconnected.kind == "reconnected" and SlowConsumer.kind == "slow_consumer"

    run_loop(main())
