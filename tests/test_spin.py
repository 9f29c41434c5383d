"""felix/quic/spin.py: a server that keeps polling its socket after traffic, and `--spin-us`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

import felix
from felix.errors import ConfigError
from felix.node.config import NodeConfig
from felix.quic.spin import SpinningProtocol
from tests.aio import run
from tests.nodeproc import NodeProcess


class Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.made = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


def test_every_datagram_arrives_once_and_the_spin_catches_the_ones_sent_meanwhile() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        inner = Recorder()
        spinner = SpinningProtocol(inner, server, 0.05)
        transport, _ = await loop.create_datagram_endpoint(lambda: spinner, sock=server)
        assert inner.made
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        addr = server.getsockname()
        sent = []
        for i in range(200):  # one every ~0.5 ms: each lands inside the 50 ms spin window
            payload = b"d%d" % i
            client.sendto(payload, addr)
            sent.append(payload)
            await asyncio.sleep(0.0005)
        while len(inner.got) < len(sent):
            await asyncio.sleep(0.01)
        assert sorted(inner.got) == sorted(sent)  # each exactly once, by either path
        assert spinner.spun_datagrams > 0  # the spin read some of them
        # The window closes: 50 ms after the last datagram no slice runs any more.
        await asyncio.sleep(0.1)
        slices = spinner.slices
        await asyncio.sleep(0.05)
        assert spinner.slices == slices
        transport.close()
        await asyncio.sleep(0)
        assert inner.lost
        client.close()

    run(main)


def test_a_spin_is_bounded_to_its_window_per_datagram() -> None:
    """With a fake clock: the slices stop once the window passed without traffic."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        now = [100.0]

        def clock() -> float:
            now[0] += 1e-6  # every poll costs a microsecond
            return now[0]

        inner = Recorder()
        spinner = SpinningProtocol(inner, server, 200e-6, clock=clock)
        transport, _ = await loop.create_datagram_endpoint(lambda: spinner, sock=server)
        spinner.datagram_received(b"x", ("127.0.0.1", 1))
        for _ in range(50):
            await asyncio.sleep(0)
        # 200 us of window at 1 us per poll, slices of 25 us: about 8 slices, then none.
        assert 4 <= spinner.slices <= 12, spinner.slices
        assert spinner.empty_slices == spinner.slices
        transport.close()

    run(main)


def test_spin_must_be_positive_and_bounded() -> None:
    with pytest.raises(ValueError):
        SpinningProtocol(Recorder(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 0)
    with pytest.raises(ConfigError, match="--spin-us"):
        NodeConfig(gateways=1, shards=1, spin_us=20_000)


@pytest.mark.parametrize("topology", ["split", "embedded"])
def test_a_node_with_spin_serves(tmp_path: Path, topology: str) -> None:
    node = NodeProcess(
        tmp_path / "node",
        "--spin-us",
        "200",
        "--topology",
        topology,
        gateways=1,
        shards=1,
    )

    async def main() -> None:
        url = f"felix://{node.host}:{node.port}"
        async with felix.connect(url, ca=node.ca_file) as client:
            cache = client.cache("c")
            for i in range(200):
                await cache.set(f"k{i}", b"v%d" % i)
            got = await asyncio.gather(*(cache.get(f"k{i}") for i in range(200)))
            assert got == [b"v%d" % i for i in range(200)]
            async with client.subscribe("s") as sub:
                for i in range(50):
                    await client.publish("s", b"m%d" % i)
                assert [(await sub.next(timeout=5)).data for _ in range(50)] == [
                    b"m%d" % i for i in range(50)
                ]

    try:
        run(main)
    finally:
        assert node.stop() == 0
