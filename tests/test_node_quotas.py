"""Issue 11 item 1 against a real node: one tenant's reads cost another tenant nothing.

Tenant A's token allows only ``cache.read``. Before the fix every read of a cache
that did not exist created it, reserving a share of the shard's memory budget;
once the budget was reserved, every publish trimmed every stream to nothing, so
tenant B's live subscriber got none of its acknowledged records (and no notice),
and B could not create a cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from felix import wire
from felix.auth.files import save_ring
from tests.aio import run
from tests.nodeproc import NodeProcess
from tests.rawquic import RawPeer, raw_connect
from tests.test_tenant_isolation import RINGS, A, B, Requests, session, token

pytestmark = pytest.mark.timeout(180)

#: Reads of caches that do not exist (before the fix, 16 were enough to reserve it all).
READS = 3000
RECORDS = 200


def event_frames(peer: RawPeer) -> list[wire.Frame]:
    """Every frame on the server-opened event streams, hello included."""
    return [f for sid, fs in peer.frames.items() if sid & 0x3 == 0x3 for f in fs]


def delivered(peer: RawPeer) -> tuple[list[int], list[wire.ExtMessage]]:
    """Offsets of the records B's subscriber got, and the notices (anything else)."""
    offsets: list[int] = []
    notices: list[wire.ExtMessage] = []
    for frame in event_frames(peer):
        if frame.flags != wire.FLAG_FELIX_EXT:
            continue  # the event_stream_hello
        msg = wire.decode_ext(frame)
        if isinstance(msg, wire.Events):
            offsets.extend(range(msg.base_offset, msg.base_offset + len(msg.payloads)))
        else:
            notices.append(msg)
    return offsets, notices


def test_reads_of_missing_caches_cost_another_tenant_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    for ring in RINGS.values():
        save_ring(data_dir / "auth", ring, time.time())
    # 2 shards of 128 MiB; a cache partition's share of the default 64 MiB budget is
    # 32 MiB, so four auto-created caches per shard reserved everything before.
    n = NodeProcess(data_dir, "--auth", "--memory-budget", "256MiB", gateways=1, shards=2)
    try:

        async def attack() -> None:
            b = await raw_connect(n.host, n.port, n.ca_file)
            b_sid, reply = await session(b, token(B))
            assert reply["type"] == "auth_ok", reply
            b_req = Requests(b, b_sid)
            b_req.send(wire.encode_subscribe, B, "prod", "events", 1, credit=10_000)
            assert isinstance((await b_req.replies())[b_req.next_id], wire.Subscribed)

            a = await raw_connect(n.host, n.port, n.ca_file)
            a_sid, reply = await session(a, token(A, ["cache.read:cache:acme/prod/*"]))
            assert reply["type"] == "auth_ok", reply
            a_req = Requests(a, a_sid)
            for start in range(0, READS, 500):  # stay under the in-flight bound
                for i in range(start, start + 500):
                    a_req.send(wire.encode_cache_get, A, "prod", f"missing-{i}", "k")
                replies = await a_req.replies()
            # A may not write: nothing it can do creates a cache.
            a_req.send(wire.encode_cache_set, A, "prod", "missing-0", "k", b"v")
            denied = (await a_req.replies())[a_req.next_id]

            acked = 0
            for i in range(RECORDS):
                b_req.send(wire.encode_publish, B, "prod", "events", [b"%d" % i + b"." * 1000])
            for reply in (await b_req.replies()).values():
                if isinstance(reply, wire.PublishOffsets):
                    acked += reply.count
            assert acked == RECORDS
            await b.wait_for(lambda: len(delivered(b)[0]) >= RECORDS, timeout=20)
            offsets, notices = delivered(b)
            assert offsets == list(range(RECORDS)) and notices == []

            b_req.send(wire.encode_cache_set, B, "prod", "sessions", "k", b"v")
            stored = (await b_req.replies())[b_req.next_id]
            assert isinstance(stored, wire.CacheResult) and stored.result, stored
            # And A's reads were answered "missing", not refused for lack of memory.
            assert len(replies) == READS
            assert all(isinstance(r, wire.CacheValue) and r.value is None for r in replies.values())
            assert isinstance(denied, wire.ErrorReply) and denied.code == 3
            a.close()
            b.close()

        run(attack)
    finally:
        n.stop()
