"""Duplicate suppression by felix-msg-id in a real `felix up` process tree over QUIC
with the real client: a resent id stores nothing and acks the original offset, a
subscriber sees each record once, the window ends, batches with duplicates, bad ids
refused, the metric and status; a durable stream keeps suppressing the ids it
stored before a kill -9 of the whole node."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

import felix
from felix.errors import BadRequest, FelixTimeoutError
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(120)


def url(node: NodeProcess) -> str:
    return f"felix://{node.host}:{node.port}"


async def drain(sub: felix.Subscription, until: bytes) -> list[tuple[int, bytes]]:
    """Every record up to and including the one whose data is ``until``."""
    got: list[tuple[int, bytes]] = []
    while True:
        msg = await sub.next(timeout=10)
        got.append((msg.offset, msg.data))
        if msg.data == until:
            return got


def test_a_resent_id_is_stored_and_delivered_once(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", "--dedup-window", "2s", gateways=1, shards=2)

    async def main() -> None:
        async with (
            felix.connect(url(node), ca=node.ca_file) as client,
            client.subscribe("orders") as sub,
        ):
            first = await client.publish("orders", b"one", msg_id="m-1")
            again = await client.publish("orders", b"one, resent", msg_id="m-1")
            assert first is not None and again is not None
            assert again.offset == first.offset == 0
            other = await client.publish("orders", b"two", msg_id="m-2")
            assert other is not None and other.offset == 1
            # Batches: a retried batch gets its original offsets back ...
            batch = await client.publish_batch("orders", [b"b1", b"b2"], msg_ids=["b-1", "b-2"])
            retry = await client.publish_batch("orders", [b"b1", b"b2"], msg_ids=["b-1", "b-2"])
            assert [a.offset for a in batch] == [a.offset for a in retry] == [2, 3]
            # ... a retry that carries newer records too is still one run ...
            more = await client.publish_batch("orders", [b"b2", b"b3"], msg_ids=["b-2", "b-3"])
            assert [a.offset for a in more] == [3, 4]
            # ... and a batch whose duplicates are not one run with the new records
            # is refused by the shard and published one by one by the client.
            mixed = await client.publish_batch(
                "orders", [b"n1", b"one", b"n2"], msg_ids=["n-1", "m-1", "n-2"]
            )
            assert [a.offset for a in mixed] == [5, 0, 6]
            await client.publish("orders", b"end")
            got = await drain(sub, b"end")
            assert got == [
                (0, b"one"),
                (1, b"two"),
                (2, b"b1"),
                (3, b"b2"),
                (4, b"b3"),
                (5, b"n1"),
                (6, b"n2"),
                (7, b"end"),
            ]
            # Bad ids are refused with a clear error, on a stream that is fine.
            with pytest.raises(BadRequest, match=r"felix-msg-id .* 1 to 512 bytes"):
                await client.publish("orders", b"x", msg_id="x" * 513)
            with pytest.raises(BadRequest, match="felix-msg-id"):
                await client.publish("orders", b"x", headers={"felix-msg-id": ""})
            # After the window (2 s) the id is forgotten: stored again.
            await asyncio.sleep(2.2)
            later = await client.publish("orders", b"one, later", msg_id="m-1")
            assert later is not None and later.offset == 8
            assert (await sub.next(timeout=10)).data == b"one, later"
            with pytest.raises(FelixTimeoutError):
                await sub.next(timeout=0.3)  # and nothing else

    try:
        run(main, timeout=60)
        time.sleep(1.2)  # shards report every second
        # m-1 once, the batch retry twice, b-2 once, m-1 once more (one by one).
        assert node.metric("felix_publish_duplicates_total") == 5
        status, body = node.http("/streams/default/default/orders")
        assert status == 200, body
        dedup = json.loads(body)["dedup"]
        assert dedup["window_s"] == 2.0 and dedup["max_entries"] == 100_000
        assert dedup["entries"] >= 1 and dedup["bytes"] > 0
    finally:
        assert node.stop() == 0


def test_the_control_plane_sets_the_window(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", gateways=1, shards=1)
    streams = f"{node.info['control']}/v1/tenants/acme/namespaces/prod/streams"
    try:
        with httpx.Client(timeout=10) as http:
            base = f"{node.info['control']}/v1/tenants"
            assert http.post(base, json={"name": "acme"}).status_code == 201
            assert http.post(f"{base}/acme/namespaces", json={"name": "prod"}).status_code == 201
            bad = http.post(streams, json={"name": "s", "dedup_window_s": -1})
            assert bad.status_code in (400, 422), bad.text
            r = http.post(streams, json={"name": "s", "dedup_window_s": 0})
            assert r.status_code == 201, r.text
            assert r.json()["spec"]["dedup_window_s"] == 0
            r = http.post(streams, json={"name": "t", "dedup_max_entries": 1})
            assert r.status_code == 201, r.text

        def dedup(name: str) -> dict[str, object] | None:
            status, body = node.http(f"/streams/acme/prod/{name}")
            return json.loads(body)["dedup"] if status == 200 else None

        deadline = time.monotonic() + 20
        while dedup("s") is None or dedup("t") is None:
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.05)
        assert dedup("s") == {"window_s": 0, "entries": 0}
        assert dedup("t")["max_entries"] == 1  # type: ignore[index]

        async def main() -> None:
            async with felix.connect(
                url(node), ca=node.ca_file, tenant="acme", namespace="prod"
            ) as client:
                offs = [(await client.publish("s", b"x", msg_id="a")).offset for _ in range(2)]  # type: ignore[union-attr]
                assert offs == [0, 1]  # off: nothing suppressed
                t = [
                    (await client.publish("t", b"x", msg_id=m)).offset  # type: ignore[union-attr]
                    for m in ("a", "b", "b", "a")
                ]
                assert t == [0, 1, 1, 2]  # one id remembered: "a" was forgotten

        run(main, timeout=30)
    finally:
        assert node.stop() == 0


def test_a_durable_stream_keeps_suppressing_ids_from_before_a_kill(tmp_path: Path) -> None:
    data = tmp_path / "node"
    args = ("--durable-streams", "--fsync", "commit")
    node = NodeProcess(data, *args, gateways=1, shards=2)

    async def write() -> list[int]:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            acks = await client.publish_batch(
                "orders", [b"a", b"b", b"c"], msg_ids=["id-a", "id-b", "id-c"]
            )
            return [a.offset for a in acks]

    try:
        assert run(write, timeout=30) == [0, 1, 2]
    finally:
        node.kill_all()  # no graceful stop: the ids come back from the log alone

    node = NodeProcess(data, *args, gateways=1, shards=2)

    async def resend() -> None:
        async with (
            felix.connect(url(node), ca=node.ca_file) as client,
            client.subscribe("orders", start="earliest") as sub,
        ):
            again = await client.publish("orders", b"b", msg_id="id-b")
            assert again is not None and again.offset == 1
            assert again.durability == "synced"
            retry = await client.publish_batch(
                "orders", [b"a", b"b", b"c"], msg_ids=["id-a", "id-b", "id-c"]
            )
            assert [a.offset for a in retry] == [0, 1, 2]
            new = await client.publish("orders", b"d", msg_id="id-d")
            assert new is not None and new.offset > 2  # above the restart's gap
            got = await drain(sub, b"d")
            assert [d for _, d in got] == [b"a", b"b", b"c", b"d"]  # each once

    try:
        run(resend, timeout=60)
        time.sleep(1.2)
        assert node.metric("felix_publish_duplicates_total") == 4
    finally:
        assert node.stop() == 0
