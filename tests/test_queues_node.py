"""Queue groups in a real `felix up` process tree with the real client (docs/queues.md):
competing consumers share the work, acks survive kill -9 of the shard, a consumer lost
mid-handler has its records redelivered with one failure more, a poison record reaches
the dead-letter stream with its provenance while 10k others flow, graceful close
releases without a failure, and `felix dlq` lists and replays dead letters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import felix
from felix.client import QueueMessage
from felix.errors import LeaseLost
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(180)

ARGS = ("--durable-streams", "--fsync", "commit")


def url(node: NodeProcess) -> str:
    return f"felix://{node.host}:{node.port}"


async def publish(client: felix.Client, stream: str, n: int, prefix: str = "m") -> list[int]:
    acks = await asyncio.gather(
        *(client.publish(stream, f"{prefix}{i}".encode(), headers={"i": str(i)}) for i in range(n))
    )
    return [a.offset for a in acks if a is not None]


def test_competing_consumers_share_the_work_exactly_once(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=2, shards=2)

    async def main() -> None:
        clients = [await felix.connect(url(node), ca=node.ca_file) for _ in range(4)]
        try:
            offsets = await publish(clients[0], "jobs", 400)
            seen: dict[int, list[int]] = {}
            done = asyncio.Event()

            async def worker(index: int, client: felix.Client) -> None:
                async with client.consume("jobs", "workers", prefetch=8) as jobs:
                    while not done.is_set():
                        batch = await jobs.fetch(8, timeout=0.2)
                        for job in batch:
                            seen.setdefault(job.offset, []).append(index)
                            assert job.attempts == 1 and job.failures == 0
                            assert job.data == f"m{job.headers['i']}".encode()
                            await job.ack()
                        if len(seen) == len(offsets):
                            done.set()

            await asyncio.wait_for(
                asyncio.gather(*(worker(i, c) for i, c in enumerate(clients))), 60
            )
            assert sorted(seen) == sorted(offsets)  # none skipped
            assert all(len(who) == 1 for who in seen.values())  # none handed out twice
            assert len({i for who in seen.values() for i in who}) >= 2  # shared
        finally:
            for client in clients:
                await client.close()

    try:
        run(main, timeout=90)
        status, body = node.http("/streams/default/default/jobs")
        assert status == 200, body
        group = json.loads(body)["groups"]["workers"]
        assert group["acked"] == 400 and group["leased"] == 0, group
        assert group["lag"] == 0 and group["pending"] == 0, group
    finally:
        assert node.stop() == 0


@pytest.mark.split_topology
def test_acks_survive_kill_9_of_the_shard_and_unacked_records_come_back(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=1)
    acked: set[int] = set()

    async def first() -> list[int]:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            offsets = await publish(client, "jobs", 200)
            async with client.consume("jobs", "g", prefetch=64) as jobs:
                while len(acked) < 120:
                    for job in await jobs.fetch(16, timeout=5):
                        if len(acked) < 120:
                            await job.ack()  # confirmed: fsynced in the group's state
                            acked.add(job.offset)
                # Hold the rest leased, unacked, while the shard dies.
                node.kill_child("shard-0")
                return offsets

    try:
        old = int(node.info["processes"]["shard-0"])
        offsets = run(first, timeout=60)
        node.wait_restarted("shard-0", old)

        async def second() -> None:
            async with felix.connect(url(node), ca=node.ca_file) as client:
                got: dict[int, QueueMessage] = {}
                deadline = time.monotonic() + 30
                async with client.consume("jobs", "g", prefetch=64) as jobs:
                    while len(got) < len(offsets) - len(acked):
                        assert time.monotonic() < deadline, sorted(got)
                        for job in await jobs.fetch(64, timeout=1):
                            assert job.offset not in acked, "a confirmed ack was redelivered"
                            got[job.offset] = job
                            await job.ack()
                    assert not await jobs.fetch(1, timeout=0.5)
                assert sorted(got) == sorted(set(offsets) - acked)  # every unacked back

        run(second, timeout=60)
    finally:
        assert node.stop() == 0


def test_a_lost_consumer_counts_a_failure_and_a_graceful_close_does_not(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=1)

    async def main() -> None:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            await publish(client, "jobs", 4)
            # Graceful: close releases what it holds and buffered: no failure counted.
            async with client.consume("jobs", "g", prefetch=4) as jobs:
                held = await jobs.fetch(4, timeout=5)
                assert [j.attempts for j in held] == [1, 1, 1, 1]
            async with client.consume("jobs", "g", prefetch=4) as jobs:
                again = await jobs.fetch(4, timeout=5)
                assert sorted(j.offset for j in again) == sorted(j.offset for j in held)
                assert {(j.attempts, j.failures) for j in again} == {(2, 0)}
                # Abrupt: the connection dies with the records leased (a crashed worker).
                lost = await felix.connect(url(node), ca=node.ca_file)
                other = lost.consume("jobs", "g2", prefetch=4)
                await other.start()
                taken = await other.fetch(4, timeout=5)
                assert len(taken) == 4
                await lost.close()  # a crashed worker: no STOP, nothing released
                with pytest.raises(LeaseLost):
                    await taken[0].ack()
                for job in again:
                    await job.ack()
            async with client.consume("jobs", "g2", prefetch=4) as jobs:
                back = await jobs.fetch(4, timeout=5)  # at once: not after a lease time
                assert {(j.attempts, j.failures) for j in back} == {(2, 1)}
                for job in back:
                    await job.ack()

    try:
        run(main, timeout=60)
    finally:
        assert node.stop() == 0


def test_a_poison_record_is_dead_lettered_with_provenance_while_others_flow(
    tmp_path: Path,
) -> None:
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=2)

    async def main() -> None:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            offsets = await publish(client, "orders", 100)
            for start in range(100, 10_000, 1000):  # 10k others flow meanwhile
                acks = await client.publish_batch(
                    "orders", [b"x%d" % i for i in range(start, min(start + 1000, 10_000))]
                )
                offsets += [a.offset for a in acks]
            poison = offsets[7]
            done: set[int] = set()
            poison_failures = []
            async with client.consume("orders", "billing", prefetch=256) as jobs:
                deadline = time.monotonic() + 90
                while len(done) < len(offsets) - 1:
                    assert time.monotonic() < deadline
                    batch = await jobs.fetch(256, timeout=0.5)
                    settles: list[Coroutine[Any, Any, None]] = []
                    for job in batch:
                        if job.offset == poison:
                            poison_failures.append(job.failures)
                            # nak with a short delay (the default backoff is seconds)
                            await job.nak(0.05, detail=f"ValueError: bad record {job.offset}")
                        else:
                            settles.append(job.ack())  # settled together: one ACK frame
                            done.add(job.offset)
                    await asyncio.gather(*settles)
                # The poison record comes back until its 5th failure, then never again.
                while len(poison_failures) < 5:
                    assert time.monotonic() < deadline
                    for job in await jobs.fetch(1, timeout=0.5):
                        assert job.offset == poison
                        poison_failures.append(job.failures)
                        await job.nak(0.05, detail=f"ValueError: bad record {job.offset}")
                assert not await jobs.fetch(1, timeout=1.0)
            assert poison_failures == [0, 1, 2, 3, 4]
            async with client.subscribe("orders.dlq", start="earliest") as dlq:
                letter = await dlq.next(timeout=10)
                h = letter.headers
                assert letter.data == b"m7" and h["i"] == "7"  # original payload and headers
                assert h["felix-dlq-reason"] == "max_deliveries"
                assert h["felix-dlq-detail"] == f"ValueError: bad record {poison}"
                assert h["felix-dlq-stream"] == "default/default/orders"
                assert h["felix-dlq-offset"] == str(poison)
                assert h["felix-dlq-group"] == "billing"
                assert h["felix-dlq-failures"] == "5" and h["felix-dlq-attempts"] == "5"
                assert int(h["felix-dlq-timestamp-us"]) > 0
                assert h["felix-dlq-id"] == f"billing:{poison}"
            # term: to the dead-letter stream at once, with the reason.
            # With a message id: the stream remembers it for its dedup window, and the
            # replay below must still bring the record back (under a new id).
            ack = await client.publish("orders", b"t0", headers={"i": "0"}, msg_id="order-t0")
            assert ack is not None
            extra = [ack.offset]
            async with client.consume("orders", "billing") as jobs:
                (job,) = await jobs.fetch(1, timeout=5)
                assert job.offset == extra[0]
                await job.term("cannot be billed")
            async with client.subscribe("orders.dlq", start="earliest") as dlq:
                letters = [await dlq.next(timeout=10) for _ in range(2)]
                assert letters[1].headers["felix-dlq-reason"] == "term"
                assert letters[1].headers["felix-dlq-detail"] == "cannot be billed"

    try:
        run(main, timeout=120)
        _status, body = node.http("/streams/default/default/orders")
        group = json.loads(body)["groups"]["billing"]
        assert group["dead"] == 2 and group["acked"] == 9_999, group
        # felix dlq ls lists both; replay publishes them back to the source stream.
        base = [sys.executable, "-m", "felix.cli"]
        conn = ["--url", url(node), "--ca", str(node.ca_file)]
        ls = subprocess.run(
            [*base, "dlq", "ls", "orders", *conn], capture_output=True, text=True, timeout=60
        )
        assert ls.returncode == 0, ls.stderr
        lines = ls.stdout.strip().splitlines()
        assert len(lines) == 2 and "max_deliveries" in lines[0] and "term" in lines[1]
        replay = subprocess.run(
            [*base, "dlq", "replay", "orders", *conn], capture_output=True, text=True, timeout=60
        )
        assert replay.returncode == 0, replay.stderr
        assert len(replay.stdout.strip().splitlines()) == 2

        async def replayed() -> None:
            async with (
                felix.connect(url(node), ca=node.ca_file) as client,
                client.consume("orders", "billing") as jobs,
            ):
                back = await jobs.fetch(2, timeout=5)
                back += await jobs.fetch(1, timeout=2)
                assert sorted(j.data for j in back) == [b"m7", b"t0"]
                for job in back:
                    assert job.headers["felix-replayed-from"].startswith(
                        "default/default/orders.dlq@"
                    )
                    assert not any(k.startswith("felix-dlq-") for k in job.headers)
                    assert job.headers["felix-msg-id"].startswith("replay:default/default/")
                    await job.ack()

        run(replayed, timeout=60)
        # Replayed once: the replay group on the DLQ remembers what it did.
        again = subprocess.run(
            [*base, "dlq", "replay", "orders", *conn], capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 3, again.stdout + again.stderr
    finally:
        assert node.stop() == 0


def test_a_consumer_joins_again_after_its_gateway_restarts(tmp_path: Path) -> None:
    """The client restores its consumers after a reconnect: what they held comes back by
    redelivery (a failure counted: the gateway died with the leases)."""
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=1)

    async def main() -> None:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            await publish(client, "jobs", 6)
            async with client.consume("jobs", "g", prefetch=3) as jobs:
                held = await jobs.fetch(3, timeout=5)
                assert len(held) == 3
                old = int(node.info["processes"]["gateway-0"])
                node.kill_child("gateway-0")
                node.wait_restarted("gateway-0", old)
                with pytest.raises(LeaseLost):
                    await held[0].ack()  # its lease went with the connection
                got: dict[int, QueueMessage] = {}
                deadline = time.monotonic() + 30
                while len(got) < 6:
                    assert time.monotonic() < deadline, sorted(got)
                    for job in await jobs.fetch(3, timeout=1):
                        got[job.offset] = job
                        await job.ack()
                for job in held:
                    assert got[job.offset].failures == 1  # the lost member's leases
                assert not await jobs.fetch(1, timeout=0.5)

    try:
        run(main, timeout=60)
    finally:
        assert node.stop() == 0
