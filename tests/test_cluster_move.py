"""A durable logical shard moved deliberately between two real `felix up --cluster` nodes
(felix cluster export-shard / import-shard / move), through the real CLI and felix's
client, on a fresh PostgreSQL database.

n0 and n1 run with their own dev region keys (so the import re-encrypts with
``--source-region-key``). A durable stream on a shard of n0 gets 300 records (every
fourth with headers) and a queue group with part of them acked; then: n0 stops, its
shard is exported; n1 stops, the archive is imported into its data dir; n1 starts and
the shard is moved to it. Through a client: every record at its offset with its body
and headers, the group redelivers exactly the records not acked, a new publish gets an
offset above the old ones. n0 restarted serves nothing of the shard (it is pinned to n1:
requests through it land on n1) and says its copy is stale.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import felix
from felix.cluster.ownership import logical_shard
from tests import clusterproc as cp
from tests import pg
from tests.aio import run

pytestmark = pytest.mark.timeout(120)

LEASE = 2.0
RECORDS = 300
GROUP = "g"


def felix_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca = cp.make_ca(tmp_path)
    with pg.temporary_database("felix_cluster_move") as dsn:
        nodes = cp.start_nodes(tmp_path, ca, dsn, ["n0", "n1"], LEASE)
        state: dict[str, Any] = {"root": tmp_path, "ca": ca, "dsn": dsn, "nodes": nodes}
        try:
            yield state
        finally:
            for node in state["nodes"]:
                node.stop()


def _headers(i: int) -> dict[str, str] | None:
    return {"seq": str(i), "kind": "moved"} if i % 4 == 0 else None


def test_a_durable_shard_moves_with_its_data(cluster: dict[str, Any]) -> None:
    root, ca, dsn = cluster["root"], cluster["ca"], cluster["dsn"]
    n0, n1 = cluster["nodes"]
    owners = cp.owners(cp.wait_settled([n0, n1]))
    name = next(
        f"orders{i}"
        for i in range(10_000)
        if owners[logical_shard(f"{cp.TENANT}/{cp.NAMESPACE}/orders{i}", cp.LOGICAL_SHARDS)] == "n0"
    )
    shard = logical_shard(f"{cp.TENANT}/{cp.NAMESPACE}/{name}", cp.LOGICAL_SHARDS)
    cp.define(n0, durable=[name], memory=[], groups=[(name, GROUP)])
    sent: dict[int, tuple[bytes, dict[str, str] | None]] = {}
    acked: set[int] = set()

    async def fill() -> None:
        async with await cp.connect(n0, ca) as client:
            async with asyncio.timeout(15):  # the definition reaches the node's shards
                while True:
                    try:
                        ack = await client.publish(name, b"r0", headers=_headers(0))
                        break
                    except felix.NotFound:
                        await asyncio.sleep(0.1)
            assert ack is not None
            sent[ack.offset] = (b"r0", _headers(0))
            for i in range(1, RECORDS):
                ack = await client.publish(name, f"r{i}".encode(), headers=_headers(i))
                assert ack is not None and ack.durability == "synced"
                sent[ack.offset] = (f"r{i}".encode(), _headers(i))
            # The group takes the first 150 and acks two in three of them; the rest of
            # those stay leased until n0 stops (released then, not acked).
            async with client.consume(name, GROUP, prefetch=200) as consumer:
                for _ in range(150):
                    message = await consumer.next(timeout=5)
                    if message.offset % 3:
                        await message.ack()
                        acked.add(message.offset)

    run(fill, timeout=60)
    assert len(sent) == RECORDS and 90 <= len(acked) <= 110
    assert n0.stop() == 0
    archive = root / f"shard-{shard}.tar"
    done = felix_cli("cluster", "export-shard", str(shard), "--data-dir", str(n0.data_dir),
                     "--out", str(archive))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"1 stream(s), {RECORDS} records, 1 group file(s)" in done.stdout, done.stdout

    # The target must be stopped: the import refuses while n1 runs.
    args = ["cluster", "import-shard", str(archive), "--data-dir", str(n1.data_dir)]
    refused = felix_cli(*args)
    assert refused.returncode == 1 and "stop" in refused.stderr, refused.stderr
    assert n1.stop() == 0
    refused = felix_cli(*args)  # n1's own region key is not n0's
    assert refused.returncode == 1 and "--source-region-key" in refused.stderr, refused.stderr
    started = time.monotonic()
    done = felix_cli(*args, "--source-region-key", str(n0.data_dir / "keys" / "region.key"))
    assert done.returncode == 0, done.stderr
    assert f"{RECORDS} records ({RECORDS} re-encrypted" in done.stdout, done.stdout
    # Where the data came from, recorded in n1's data dir (n0 ran in the dev region).
    record = json.loads((n1.data_dir / "cluster-imports" / f"{shard}.json").read_text())
    assert (record["source_node_id"], record["region"]) == ("n0", "local"), record
    assert f"from node n0 (data id {record['source_data_id']}) of region local" in done.stdout
    print(f"\n{done.stdout.strip()} ({time.monotonic() - started:.2f}s with the CLI's start)")

    # Moving before n1 is back is refused, naming why.
    refused = felix_cli("cluster", "move", str(shard), "--to", "n1", "--cluster", dsn, "--yes")
    assert refused.returncode == 1 and "n1 is not live" in refused.stderr, refused.stderr
    n1 = cp.start_node(root, ca, dsn, "n1", LEASE)
    cluster["nodes"] = [n1]

    def reports_shard() -> bool:
        doc = cp.cluster_doc(n1) if n1.http("/readyz")[0] == 200 else {}
        return shard in doc.get("durable_shards", [])

    cp.wait_for("n1 reports the imported shard", reports_shard, 20, n1.log)

    def moved() -> bool:
        done = felix_cli("cluster", "move", str(shard), "--to", "n1", "--cluster", dsn, "--yes")
        assert done.returncode == 0 or "does not report" in done.stderr, done.stderr
        return done.returncode == 0  # n1's lease row carries the shard after a renewal

    cp.wait_for("the move", moved, 10)
    last = max(sent)
    unacked = set(sent) - acked

    async def check() -> None:
        async with await cp.connect(n1, ca) as client:
            got: dict[int, tuple[bytes, dict[str, str] | None]] = {}
            async with asyncio.timeout(20):
                while True:  # Unavailable until the map with the move reaches n1's shards
                    try:
                        async with client.subscribe(name, start="earliest") as sub:
                            while len(got) < RECORDS:
                                m = await sub.next(timeout=5)
                                got[m.offset] = (m.data, dict(m.headers) or None)
                        break
                    except felix.Unavailable:
                        await asyncio.sleep(0.2)
            assert got == sent
            redelivered: set[int] = set()
            async with client.consume(name, GROUP) as consumer:
                while len(redelivered) < len(unacked):
                    message = await consumer.next(timeout=5)
                    assert message.data == sent[message.offset][0]
                    redelivered.add(message.offset)
                    await message.ack()
                with pytest.raises(felix.FelixTimeoutError):
                    await consumer.next(timeout=1.0)  # nothing more: the acked stay acked
            assert redelivered == unacked
            ack = await client.publish(name, b"after the move")
            assert ack is not None and ack.offset > last

    run(check, timeout=60)

    # n0 comes back: the shard is pinned to n1, so n0 serves none of it (a client given
    # n0 only is redirected to n1), and it says that its copy is stale.
    n0 = cp.start_node(root, ca, dsn, "n0", LEASE)
    cluster["nodes"] = [n1, n0]
    cp.wait_settled([n1, n0])
    row = cp.cluster_doc(n0)["shards"][shard]
    assert (row[0], row[3]) == ("n1", "n1")
    cp.wait_for("n0's warning", lambda: "this copy is stale" in n0.log(), 10, n0.log)

    async def through_n0() -> None:
        async with await cp.connect(n0, ca) as client:
            ack = await client.publish(name, b"via n0")
            assert ack is not None and ack.offset > last + 1
            assert client.redirects >= 1
            async with client.subscribe(name, start=ack.offset) as sub:
                m = await sub.next(timeout=5)
                assert (m.offset, m.data) == (ack.offset, b"via n0")

    run(through_n0, timeout=30)
    status = json.loads(n0.http("/cluster")[1])
    assert shard in status["durable_shards"]  # its stale copy is still on its disk
