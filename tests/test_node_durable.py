"""Durable streams in a real `felix up` process tree with the real client: history
survives a restart and is paged from disk, the status route and metrics, and an
fsync error ends the shard (the supervisor restarts it from disk)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

import felix
from felix.errors import FelixError
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(120)

#: A small hot tail: most of the history below is served from disk.
ARGS = ("--durable-streams", "--fsync", "commit", "--replay-records", "8")


def url(node: NodeProcess) -> str:
    return f"felix://{node.host}:{node.port}"


def test_history_survives_a_restart_and_is_read_from_disk(tmp_path: Path) -> None:
    data = tmp_path / "node"
    node = NodeProcess(data, *ARGS, gateways=1, shards=2)
    offsets: list[int] = []
    marks: list[float] = []

    async def write() -> None:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            for i in range(40):
                if i == 30:  # records from here on are stamped after this time
                    await asyncio.sleep(0.01)
                    marks.append(time.time())
                    await asyncio.sleep(0.01)
                ack = await client.publish("orders", b"%d" % i, headers={"i": str(i)})
                assert ack is not None and ack.durability == "synced"
                offsets.append(ack.offset)

    try:
        run(write, timeout=60)
        assert offsets == list(range(40))
        status, body = node.http("/streams/default/default/orders")
        assert status == 200, body
        info = json.loads(body)
        assert info["durable"] is True and info["fsync"] == "commit"
        assert info["next_offset"] == 40 and info["synced_offset"] == 40
        assert info["disk_bytes"] > 40 * 28 and info["segments"] == 1
        assert node.http("/streams/default/default/nothing")[0] == 404
        assert node.http("/streams/default/bad!/x")[0] == 400
        assert node.http("/streams/default/x")[0] == 400
        time.sleep(1.2)  # shards report every second
        assert node.metric("felix_stream_disk_bytes") == info["disk_bytes"]  # the largest
        assert node.metric("felix_node_disk_bytes") == info["disk_bytes"]
        assert node.metric("felix_fsync_seconds_count") >= 1
        assert "orders" not in node.http("/metrics")[1]  # no metric names a stream
    finally:
        assert node.stop() == 0

    node = NodeProcess(data, *ARGS, gateways=1, shards=2)

    async def read_back() -> None:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            async with client.subscribe("orders", start="earliest") as sub:
                got = [await sub.next(timeout=10) for _ in range(40)]
                assert [m.offset for m in got] == list(range(40))  # exactly once, in order
                assert [m.data for m in got] == [b"%d" % i for i in range(40)]
                assert [dict(m.headers) for m in got] == [{"i": str(i)} for i in range(40)]
                # Live records follow with no duplicate; the node stopped gracefully, so
                # its offset reservations were settled: no gap after the restart.
                ack = await client.publish("orders", b"live")
                assert ack is not None and ack.offset == 40
                live = await sub.next(timeout=10)
                assert (live.offset, live.data) == (ack.offset, b"live")
            async with client.subscribe("orders", start=17) as sub:
                assert (await sub.next(timeout=10)).data == b"17"
            async with client.subscribe("orders", start={"time": marks[0]}) as sub:
                assert (await sub.next(timeout=10)).data == b"30"
            # A slow subscriber (credit 4, far more records than the hot tail of 8 while
            # it does not read) loses nothing: it reads from disk, no drop_old.
            async with client.subscribe("orders", credit=4) as slow:
                acks = [await client.publish("orders", b"s%d" % i) for i in range(60)]
                got = [await slow.next(timeout=10) for _ in range(60)]
                assert [m.offset for m in got] == [a.offset for a in acks if a is not None]
                assert slow.dropped == 0

    try:
        run(read_back, timeout=60)
        time.sleep(1.2)
        assert node.metric("felix_disk_reads_total") >= 1
    finally:
        assert node.stop() == 0


@pytest.mark.split_topology
def test_an_fsync_error_ends_the_shard_and_its_restart_recovers_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = tmp_path / "fail-fsync"
    monkeypatch.setenv("FELIX_FAULT_FSYNC_FILE", str(fault))
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=1)

    async def main() -> None:
        async with felix.connect(url(node), ca=node.ca_file, request_timeout=5) as client:
            ack = await client.publish("s", b"kept")
            assert ack is not None and ack.offset == 0
            fault.touch()
            with pytest.raises(FelixError):  # never acked: the shard exits instead
                await client.publish("s", b"unacked")
            fault.unlink()
            deadline = time.monotonic() + 30
            while node.refresh()["restarts"].get("shard-0", 0) < 1:
                assert time.monotonic() < deadline, node.log()
                time.sleep(0.1)
            while True:  # Unavailable until the replacement is ready
                try:
                    again = await client.publish("s", b"after")
                    break
                except FelixError:
                    assert time.monotonic() < deadline, node.log()
                    time.sleep(0.2)
            assert again is not None and again.offset > 0
            async with client.subscribe("s", start="earliest") as sub:
                first = await sub.next(timeout=10)
                assert (first.offset, first.data) == (0, b"kept")

    try:
        run(main, timeout=90)
        assert "fsync of stream default/default/s failed" in node.log()
    finally:
        node.stop()


def test_durable_options_from_flags_and_config_file(tmp_path: Path) -> None:
    from felix.cli import _node_config, apply_config_file, build_parser
    from felix.errors import ConfigError
    from felix.node.config import NodeConfig
    from felix.node.worker import new_shard_core

    def node(*argv: str) -> NodeConfig:
        full = ["up", "--data-dir", str(tmp_path), "--shards", "2", *argv]
        args = build_parser().parse_args(full)
        if args.config is not None:
            apply_config_file(args.parser, args, full)
        return _node_config(args)

    default = node()
    assert (default.durable_streams, default.fsync, default.disk_budget) == (False, "commit", None)
    config = node(
        "--durable-streams",
        "--fsync",
        "interval",
        "--fsync-interval-ms",
        "20",
        "--segment-bytes",
        "1MiB",
        "--disk-budget",
        "10MiB",
        "--disk-reserve",
        "0",
        "--max-durable-streams-per-shard",
        "3",
    )
    assert (config.fsync, config.fsync_interval_ms, config.segment_bytes) == (
        "interval",
        20,
        1 << 20,
    )
    core = new_shard_core(NodeConfig.from_json(config.to_json()), 1)
    assert core.disk is not None
    disk = core.disk.settings
    assert disk.budget_bytes == 5 << 20 and disk.max_streams == 3 and disk.reserve_bytes == 0
    assert disk.root == tmp_path / "streams" and disk.segment_bytes == 1 << 20
    assert disk.auto is not None and (disk.auto.fsync, disk.auto.fsync_interval_ms) == (
        "interval",
        20,
    )
    file = tmp_path / "felix.toml"
    file.write_text('durable-streams = true\nfsync = "none"\nsegment-bytes = 65536\n')
    from_file = node("--config", str(file))
    assert (from_file.durable_streams, from_file.fsync, from_file.segment_bytes) == (
        True,
        "none",
        65536,
    )
    for bad in (
        ["--fsync-interval-ms", "0"],
        ["--segment-bytes", "1000"],
        ["--disk-budget", "1MiB"],
    ):
        with pytest.raises(ConfigError):
            node(*bad)


def test_start_up_progress_keeps_the_ready_timeout_from_killing_a_long_recovery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from felix.node import messages as msg
    from felix.node import supervisor
    from felix.node.children import Child
    from felix.node.config import NodeConfig
    from felix.node.liveness import Heartbeat

    monkeypatch.setattr(supervisor, "READY_TIMEOUT", 0.4)
    monkeypatch.setattr(supervisor, "READY_POLL", 0.05)

    async def main() -> None:
        sup = supervisor.Supervisor(NodeConfig(shards=1, gateways=1))
        slow, silent = Child("shard", 0, Heartbeat(3, 10)), Child("shard", 1, Heartbeat(3, 10))
        for child in (slow, silent):
            child.started_at = time.monotonic()

        async def recover() -> None:  # 1 s of recovery, reporting every 0.1 s
            for i in range(10):
                slow._on_event(msg.Starting(f"opening durable streams: {i} of 10"))
                assert (
                    slow.status(time.monotonic())
                    == f"starting (opening durable streams: {i} of 10)"
                )
                await asyncio.sleep(0.1)
            slow._on_event(msg.Ready())

        task = asyncio.ensure_future(recover())
        await sup._wait_ready([slow])  # well past READY_TIMEOUT, never stalled
        await task
        assert slow.status(time.monotonic()) is None
        with pytest.raises(RuntimeError, match="shard-1"):
            await sup._wait_ready([silent])

    run(main, timeout=10)


def test_a_tenant_disk_quota_refuses_only_that_tenant(tmp_path: Path) -> None:
    """--tenant-disk-quota (1 MiB) bounds every tenant; a tenant's own disk_quota_bytes
    (3 MiB, control plane) replaces it for that tenant. Each is refused at its quota with
    an error naming it; what one tenant stored never counts against another."""
    import httpx

    node = NodeProcess(
        tmp_path / "node",
        "--durable-streams", "--fsync", "none", "--segment-bytes", "64KiB",
        "--tenant-disk-quota", "1MiB",
        gateways=1,
        shards=1,
    )  # fmt: skip
    record = b"." * 16_000
    try:
        with httpx.Client(base_url=node.info["control"], timeout=10) as api:
            r = api.post("/v1/tenants", json={"name": "acme", "disk_quota_bytes": 3 << 20})
            assert r.status_code == 201, r.text

        async def fill(tenant: str, limit: int) -> tuple[int, str]:
            """Publish until refused or ``limit`` bytes went in: (bytes stored, error)."""
            stored = 0
            async with felix.connect(url(node), ca=node.ca_file, tenant=tenant) as client:
                while stored < limit:
                    try:
                        await client.publish("big", record)
                    except felix.Overloaded as exc:
                        return stored, str(exc)
                    stored += len(record)
            return stored, ""

        async def main() -> None:
            # globex has the node's quota.
            stored, error = await fill("globex", 4 << 20)
            assert "tenant globex has used its disk quota on shard 0: " in error, error
            assert f"of {1 << 20} bytes" in error and stored <= 1 << 20
            # acme gets its own once the definition reached the shard (through the feed;
            # until then it has the node's): refused at 3 MiB in all, whenever that was.
            total = 0
            deadline = time.monotonic() + 20
            while True:
                stored, error = await fill("acme", 4 << 20)
                total += stored
                assert error, "acme was never refused"
                if f"of {3 << 20} bytes" in error:
                    break
                assert time.monotonic() < deadline, error
                await asyncio.sleep(0.2)
            assert (1 << 20) < total <= 3 << 20

        run(main, timeout=90)
    finally:
        assert node.stop() == 0
