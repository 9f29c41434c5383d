"""Subscriptions past the QUIC stream limit on one connection, against a real node.

Each subscription has its own event stream, opened by the gateway, and the
client's QUIC engine accepts only so many at once (qh3: 103). Before the client
knew, the subscription past that limit never got a reply (the gateway's engine
refused to open its event stream). Now it is refused at once with Overloaded,
nothing hangs, every other subscriber keeps receiving, and an unsubscribe makes
room again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import felix
from felix.quic import load_engine
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(120)


def test_subscriptions_past_the_stream_limit_are_refused_cleanly(tmp_path: Path) -> None:
    limit = load_engine("qh3").peer_stream_limits[1]
    node = NodeProcess(tmp_path / "node", gateways=1, shards=1)

    async def main() -> None:
        url = f"felix://{node.host}:{node.port}"
        async with (
            felix.connect(url, ca=node.ca_file, engine="qh3") as crowded,
            felix.connect(url, ca=node.ca_file, engine="qh3") as other_client,
            other_client.subscribe("s") as other,
        ):
            async with asyncio.timeout(60):
                subs = [await crowded.subscribe("s").__aenter__() for _ in range(limit)]
            for _ in range(3):  # past the limit: refused at once, every time
                async with asyncio.timeout(5):
                    with pytest.raises(felix.Overloaded, match="event streams"):
                        await crowded.subscribe("s").__aenter__()
            await crowded.publish("s", b"one")
            assert (await other.next(timeout=10)).data == b"one"
            async with asyncio.timeout(30):
                for sub in subs:
                    assert (await sub.next()).data == b"one"
            # An unsubscribe makes room (once the gateway has closed its event stream).
            await subs.pop().close()
            async with asyncio.timeout(10):
                while True:
                    try:
                        subs.append(await crowded.subscribe("s").__aenter__())
                        break
                    except felix.Overloaded:
                        await asyncio.sleep(0.05)
            await crowded.publish("s", b"two")
            assert (await other.next(timeout=10)).data == b"two"
            assert (await subs[-1].next(timeout=10)).data == b"two"
            for sub in subs:
                await sub.close()

    try:
        run(main, timeout=100)
    finally:
        node.stop()
