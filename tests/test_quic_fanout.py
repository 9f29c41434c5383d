"""Fanout over real QUIC connections with the gateway's datagram batching on and off.

Every subscriber has its own connection (its own client socket); the gateway's
connections share its one socket, and with batching on their datagrams of a loop
tick leave in sendmmsg calls (felix/quic/batch.py). Every subscriber must get
every record, in order, either way; with batching on, the socket's batch must
have sent them in fewer system calls than datagrams.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

import felix
from felix._udpbatch import gso_supported
from felix.node.local import LocalNode
from felix.quic.batch import DatagramBatch
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(120)

RECORDS = 300


async def _fanout(url: str, ca: Path, subscribers: int, records: int) -> None:
    """Publish ``records`` records to ``subscribers`` subscriber connections; all arrive."""
    clients = await asyncio.gather(*(felix.connect(url, ca=ca) for _ in range(subscribers + 1)))
    publisher, readers = clients[0], clients[1:]
    try:
        subs = [r.subscribe("fan", credit=1024) for r in readers]
        for sub in subs:
            await sub.__aenter__()
        for i in range(records):
            # Unacknowledged: records come in bursts, so ticks carry many datagrams each.
            await publisher.publish("fan", b"%06d" % i + b"x" * 58, ack=False)

        async def read_all(sub: felix.Subscription) -> list[bytes]:
            return [(await sub.next(timeout=20)).data[:6] for _ in range(records)]

        got = await asyncio.gather(*(read_all(sub) for sub in subs))
        expected = [b"%06d" % i for i in range(records)]
        for received in got:
            assert received == expected
        for sub in subs:
            assert sub.dropped == 0
            await sub.__aexit__(None, None, None)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


@pytest.mark.parametrize("batching", ["on", "nogso", "off"])
def test_fanout_32_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batching: str
) -> None:
    monkeypatch.setenv("FELIX_UDP_BATCH", "0" if batching == "off" else "1")
    monkeypatch.setenv("FELIX_UDP_GSO", "0" if batching == "nogso" else "1")

    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            batch: DatagramBatch | None = node._server.batch  # (the node keeps its server private)
            assert (batch is not None) == (batching != "off")
            await _fanout(node.url, node.ca_file, 32, RECORDS)
            if batch is not None:
                assert batch.dropped == 0 and batch.failed == 0
                # Many connections' datagrams per call: far fewer calls than datagrams
                # (records share datagrams too: the gateway packs a burst into one EVENTS).
                assert batch.sent >= 32 * 3
                assert batch.syscalls * 4 < batch.sent, (batch.syscalls, batch.sent)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    kernel_gso = gso_supported(probe.fileno())
                assert batch.gso == (batching == "on" and kernel_gso)
                if batch.gso:
                    assert batch.gso_sent > 0  # the bursts to one subscriber were merged

    run(main, timeout=90)


@pytest.mark.parametrize(
    "env",
    [
        {"FELIX_UDP_BATCH": "1"},
        {"FELIX_UDP_BATCH": "1", "FELIX_UDP_GSO": "0"},
        {"FELIX_UDP_BATCH": "0"},
    ],
    ids=["on", "nogso", "off"],
)
def test_fanout_16_on_a_node_process(tmp_path: Path, env: dict[str, str]) -> None:
    """A real ``felix up`` (gateway and shard processes), batching on and off."""
    node = NodeProcess(tmp_path / "node", gateways=1, shards=1, env=env)
    try:
        url = f"felix://{node.host}:{node.port}"
        run(lambda: _fanout(url, node.ca_file, 16, RECORDS), timeout=90)
        assert "Traceback" not in node.log()
    finally:
        node.stop()
