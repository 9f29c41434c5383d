"""A call on a connection the QUIC engine is already closing raises a felix error.

The engine knows a connection is closing (a peer's CONNECTION_CLOSE, a stateless
reset, a local close) a moment before felix hears that it ended. A call made in
that moment used to surface the engine's own exception (qh3's
QuicConnectionError); it must be felix's ConnectionLost, which the client
retries on another connection like any other loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import felix
from felix import wire
from felix.node.local import LocalNode
from tests.aio import run

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("engine", ["qh3", "aioquic"])
def test_call_on_a_closing_connection_raises_connection_lost(tmp_path: Path, engine: str) -> None:
    async def main() -> None:
        async with (
            LocalNode.start(tmp_path / "node", engine=engine) as node,
            felix.connect(
                node.url, ca=node.ca_file, engine=engine, request_timeout=2, keepalive=60
            ) as client,
        ):
            cache = client.cache("c")
            assert await cache.set("k", b"v") is True
            (conn,) = client._pool.live()
            conn.protocol.transport.close(0, "closing under the client")  # engine: closing
            assert conn.alive  # felix has not heard of it yet
            with pytest.raises(felix.FelixError) as caught:
                await conn.call(wire.encode_ping)
            assert isinstance(caught.value, felix.ConnectionLost)

    run(main)
