"""Two real `felix up --cluster` nodes: a logical shard that leaves a node and comes back
finds none of the in-memory state it had there (felix/shard/cluster.py).

Node n0 starts alone and owns every logical shard; a stream and a cache entry of shard
``s`` get data there. Node n1 joins and ``s`` is handed off to it (it is n1's by
rendezvous), then n1 is killed and ``s`` comes back to n0: the old cache value is gone,
and the stream starts empty with its offsets continuing above what n0 issued before.
Runs on the topology the environment picks (split; FELIX_TEST_TOPOLOGY=embedded).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from felix import wire
from felix.cluster.ownership import logical_shard
from felix.cluster.placement import rendezvous_owner
from tests import pg
from tests.clusterproc import cluster_doc, owners, wait_for
from tests.nodeproc import NodeProcess
from tests.test_cluster_node import (
    GRACE,
    LEASE,
    LOGICAL_SHARDS,
    TENANT,
    _connect,
    _epochs,
    _request,
)

NS, CACHE = "ns", "c"


def _start(root: Path, dsn: str, i: int) -> NodeProcess:
    data = root / f"n{i}"
    data.mkdir(exist_ok=True)
    return NodeProcess(
        data,
        "--cluster", dsn,
        "--node-id", f"n{i}",
        "--cluster-lease", f"{LEASE:g}",
        "--logical-shards", str(LOGICAL_SHARDS),
        shards=2,
    )  # fmt: skip


@pytest.fixture
def dsn() -> Iterator[str]:
    with pg.temporary_database("felix_cluster_state") as dsn:
        yield dsn


def _names_in(shard: int) -> tuple[str, str]:
    """A stream name and a cache key whose routing keys are in logical ``shard``."""
    stream = next(
        f"s{i}"
        for i in range(100_000)
        if logical_shard(f"{TENANT}/{NS}/s{i}", LOGICAL_SHARDS) == shard
    )
    key = next(
        f"k{i}"
        for i in range(100_000)
        if logical_shard(f"{TENANT}/{NS}/{CACHE}/k{i}", LOGICAL_SHARDS) == shard
    )
    return stream, key


def _run(node: NodeProcess, *frames: bytes) -> list[Any]:
    async def go() -> list[Any]:
        peer, sid = await _connect(node)
        try:
            return [await _request(peer, sid, frame) for frame in frames]
        finally:
            peer.close()

    return asyncio.run(go())


async def _subscribe_earliest(node: NodeProcess, stream: str) -> Any:
    peer, _sid = await _connect(node)
    try:
        sub = peer.new_stream()
        peer.send(sub, wire.encode_message({"type": "auth", "tenant_id": TENANT, "token": "",
                                            "client_flags": wire.FLAGS_ALL}))  # fmt: skip
        await peer.frames_on(sub, 1)
        frame = wire.encode_subscribe(9, TENANT, NS, stream, 9, start="earliest")
        return await _request(peer, sub, frame)
    finally:
        peer.close()


def test_a_shard_that_comes_back_finds_no_stale_memory(tmp_path: Path, dsn: str) -> None:
    # The first shard that moves to n1 once it joins (handoffs go one at a time).
    shard = next(s for s in range(LOGICAL_SHARDS) if rendezvous_owner(s, ["n0", "n1"]) == "n1")
    stream, key = _names_in(shard)
    n0 = _start(tmp_path, dsn, 0)
    n1: NodeProcess | None = None
    try:
        wait_for(
            "n0 owns every shard",
            lambda: cluster_doc(n0).get("serving") and set(owners(cluster_doc(n0))) == {"n0"},
            40,
            n0.log,
        )
        replies = _run(
            n0,
            wire.encode_publish(1, TENANT, NS, stream, [b"a", b"b", b"c"]),
            wire.encode_cache_set(2, TENANT, NS, CACHE, key, b"old"),
            wire.encode_cache_get(3, TENANT, NS, CACHE, key),
        )
        assert isinstance(replies[0], wire.PublishOffsets), replies
        assert (replies[0].base_offset, replies[0].count) == (0, 3)
        assert replies[1].result and replies[2].value == b"old", replies
        first_epoch = _epochs(cluster_doc(n0))[shard]

        n1 = _start(tmp_path, dsn, 1)
        wait_for(
            "the shard moved to n1", lambda: owners(cluster_doc(n0))[shard] == "n1", 90, n0.log
        )
        (moved,) = _run(n0, wire.encode_cache_get(4, TENANT, NS, CACHE, key))
        assert isinstance(moved, wire.Redirect), moved

        # n1 dies: its shards come back to n0 once its lease (and the grace) ran out.
        n1.kill_all()
        wait_for(
            "the shard came back to n0",
            lambda: (
                owners(doc := cluster_doc(n0))[shard] == "n0"
                and doc.get("serving")
                and _epochs(doc)[shard] > first_epoch + 1
            ),
            LEASE + GRACE + 30,
            n0.log,
        )
        back = _run(
            n0,
            wire.encode_cache_get(5, TENANT, NS, CACHE, key),
            wire.encode_publish(6, TENANT, NS, stream, [b"d"]),
        )
        assert isinstance(back[0], wire.CacheValue) and back[0].value is None, back
        assert isinstance(back[1], wire.PublishOffsets) and back[1].base_offset >= 3, back
        # The stream holds only the new record: its earliest offset is above n0's old ones.
        subscribed = asyncio.run(_subscribe_earliest(n0, stream))
        assert isinstance(subscribed, wire.Subscribed), subscribed
        assert subscribed.start_offset == back[1].base_offset, (subscribed, back)
    finally:
        if n1 is not None:
            n1.stop()
        n0.stop()
