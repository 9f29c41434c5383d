"""`felix up` as real processes: 2 gateways x 2 shards, faults, drain, health."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from felix import wire
from felix.node.datadir import ring_prefix
from tests.aio import run
from tests.nodeproc import NodeProcess
from tests.rawquic import RawPeer, raw_connect
from tests.test_gateway import NS, T, events_on, ext, subscribe

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node of its own, for the tests that kill, restart or stop it."""
    n = NodeProcess(tmp_path / "node")
    yield n
    n.stop()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(ring_prefix(n.data_dir))]


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the tests that leave its processes alone (each on streams and caches
    of its own); test_hostile_peers_never_crash_a_process checks nothing restarted."""
    n = NodeProcess(tmp_path_factory.mktemp("shared") / "node")
    yield n
    assert n.stop() == 0
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(ring_prefix(n.data_dir))]


@pytest.mark.split_topology
def test_health_endpoints_and_node_json(shared_node: NodeProcess) -> None:
    node = shared_node
    assert node.http("/livez") == (200, "ok\n")
    assert node.http("/readyz") == (200, "ready\n")
    assert node.http("/startupz") == (200, "started\n")
    assert set(node.info["processes"]) == {
        "gateway-0",
        "gateway-1",
        "shard-0",
        "shard-1",
        "control-0",
    }
    assert node.http("/nope")[0] == 404
    time.sleep(1.2)  # children report every second
    assert "felix_connections" in node.http("/metrics")[1]


async def _connect(node: NodeProcess) -> tuple[RawPeer, int]:
    peer = await raw_connect(node.host, node.port, node.ca_file)
    return peer, await peer.auth()


@pytest.mark.split_topology
def test_ten_thousand_messages_in_order_to_16_subscribers_on_both_gateways(
    shared_node: NodeProcess,
) -> None:
    node = shared_node

    async def main() -> None:
        subs = []
        for _ in range(16):
            peer, sid = await _connect(node)
            subs.append((peer, await subscribe(peer, sid, 1, 1, credit=60000)))
        pub, psid = await _connect(node)
        n = 0
        for batch in range(100):  # 100 acked batches of 100 = 10,000 messages
            pub.send(
                psid, wire.encode_publish(batch, T, NS, "s", [b"%d" % i for i in range(n, n + 100)])
            )
            n += 100
            if batch % 10 == 9:
                await pub.frames_on(psid, 1 + batch + 1, timeout=20)
        await pub.frames_on(psid, 101, timeout=20)
        for peer, stream in subs:
            await peer.wait_for(lambda p=peer, s=stream: len(events_on(p, s)) >= 10_000, 60)
            got = events_on(peer, stream)
            assert [o for o, _ in got] == list(range(10_000))
            assert [int(d) for _, d in got] == list(range(10_000))
        # The subscribers' connections landed on both gateways (SO_REUSEPORT spread them).
        await asyncio.sleep(1.2)
        per_gateway = [
            node.metric("felix_connections", role="gateway", index=str(g)) for g in (0, 1)
        ]
        assert all(c > 0 for c in per_gateway), per_gateway
        for peer, _ in [*subs, (pub, 0)]:
            peer.close()

    run(main, timeout=100)


@pytest.mark.split_topology
def test_kill_9_shard_fails_fast_then_serves_again(node: NodeProcess) -> None:
    async def main() -> None:
        peer, sid = await _connect(node)
        old = node.kill_child("shard-0")
        node.wait_restarted("shard-0", old)
        codes: list[int] = []
        # Keys on every shard: each request either succeeds or fails with a retryable
        # Unavailable; within a few seconds all succeed again.
        deadline = time.monotonic() + 20
        rid = 0
        while time.monotonic() < deadline:
            start = len(peer.frames[sid])
            for k in range(20):
                rid += 1
                peer.send(sid, wire.encode_cache_set(rid, T, NS, "c", f"k{k}", b"v"))
            frames = await peer.frames_on(sid, start + 20, timeout=10)
            replies = [ext(f) for f in frames[start:]]
            codes += [r.code for r in replies if isinstance(r, wire.ErrorReply)]
            if all(isinstance(r, wire.CacheResult) and r.result for r in replies):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"shard never came back: {codes}")
        assert set(codes) <= {6}, codes  # only Unavailable, never anything else
        assert node.refresh()["restarts"]["shard-0"] == 1
        peer.close()

    run(main, timeout=60)


@pytest.mark.split_topology
def test_kill_9_gateway_other_connections_survive_and_new_ones_work(node: NodeProcess) -> None:
    async def main() -> None:
        peers = [await _connect(node) for _ in range(8)]
        old = node.kill_child("gateway-0")
        node.wait_restarted("gateway-0", old)
        # Connections on the surviving gateway still answer; the others are gone.
        alive = 0
        for i, (peer, sid) in enumerate(peers):
            peer.send(sid, wire.encode_cache_get(100 + i, T, NS, "c", "k"))
        await asyncio.sleep(2)
        for peer, sid in peers:
            if len(peer.frames[sid]) >= 2:
                alive += 1
        assert alive >= 1
        # New connections (landing on either gateway, the restarted one included) work.
        for _ in range(6):
            fresh, fsid = await _connect(node)
            fresh.send(fsid, wire.encode_cache_get(1, T, NS, "c", "k"))
            assert isinstance(ext((await fresh.frames_on(fsid, 2))[1]), wire.CacheValue)
            fresh.close()
        for peer, _ in peers:
            peer.close()

    run(main, timeout=60)


def test_sigterm_drain_under_load_loses_no_acked_publish(node: NodeProcess) -> None:
    async def main() -> tuple[set[int], list[int]]:
        sub_peer, ssid = await _connect(node)
        stream = await subscribe(sub_peer, ssid, 1, 1, credit=60000)
        pub, psid = await _connect(node)
        acked: set[int] = set()
        stopped = False
        rid = 0
        while not stopped and pub.close_reason is None:
            rid += 1
            try:
                pub.send(psid, wire.encode_publish(rid, T, NS, "s", [b"%d" % rid]))
            except Exception:  # the engine already knows the node closed the connection
                break
            if rid == 200:
                node.proc.send_signal(signal.SIGTERM)
            if rid % 20 == 0:
                try:
                    await pub.wait_for(lambda r=rid: len(pub.frames[psid]) > r - 5, timeout=2)
                except TimeoutError:
                    stopped = True
            stopped = stopped or rid > 5000
        for f in pub.frames[psid][1:]:
            m = ext(f)
            if isinstance(m, wire.PublishOffsets):
                acked.add(m.request_id)
        await sub_peer.wait_for(lambda: sub_peer.close_reason is not None, timeout=15)
        delivered = [int(d) for _, d in events_on(sub_peer, stream)]
        return acked, delivered

    acked, delivered = run(main, timeout=60)
    assert node.proc.wait(20) == 0
    assert acked, "nothing was acked before the drain"
    missing = acked - set(delivered)
    assert not missing, f"{len(missing)} acked publishes never reached the subscriber"
    assert delivered == sorted(delivered)


def test_client_reconnects_and_resubscribes_after_kill_9_of_its_gateway(
    node: NodeProcess,
) -> None:
    import felix

    async def main() -> None:
        url = f"felix://{node.host}:{node.port}"
        async with felix.connect(
            url, ca=node.ca_file, reconnect_backoff=(0.05, 0.5), keepalive=0.5, request_timeout=2
        ) as pub:
            clients = [
                await felix.connect(
                    url, ca=node.ca_file, reconnect_backoff=(0.05, 0.5), keepalive=0.5
                )
                for _ in range(4)
            ]
            subs = [await c.subscribe("s", start="earliest").__aenter__() for c in clients]
            for i in range(10):
                await pub.publish("s", b"%d" % i)
            for sub in subs:
                assert [(await sub.next(timeout=5)).offset for _ in range(10)] == list(range(10))
            old = node.kill_child("gateway-0")
            node.wait_restarted("gateway-0", old)
            for i in range(10, 20):
                while True:  # the publisher may itself have been on the killed gateway
                    try:
                        await pub.publish("s", b"%d" % i)
                        break
                    except (felix.ConnectionLost, felix.FelixTimeoutError):
                        await asyncio.sleep(0.1)
            for sub in subs:
                got = [int((await sub.next(timeout=15)).data) for _ in range(10)]
                assert got == list(range(10, 20))
            for sub, c in zip(subs, clients, strict=True):
                await sub.__aexit__(None, None, None)
                await c.close()

    run(main, timeout=90)


def test_hostile_peers_never_crash_a_process(shared_node: NodeProcess) -> None:
    node = shared_node

    async def main() -> None:
        payloads = [
            b"\xff" * 100,
            b"FLX1\x00\x01\x00\x00\xff\xff\xff\xff",
            wire.encode_ping(1),
            wire.encode_message({"type": "ok"}) * 3,
        ]
        for payload in payloads:
            for _ in range(3):
                bad = await raw_connect(node.host, node.port, node.ca_file)
                sid = bad.new_stream()
                bad.send(sid, payload)
                await bad.wait_for(lambda b=bad, s=sid: s in b.ended)
                bad.close()
        peer, sid = await _connect(node)
        peer.send(sid, wire.encode_cache_get(1, T, NS, "c", "k"))
        assert isinstance(ext((await peer.frames_on(sid, 2))[1]), wire.CacheValue)
        peer.close()

    before = dict(node.info["processes"])
    run(main, timeout=60)
    assert node.refresh()["processes"] == before
    assert node.refresh()["restarts"] == {name: 0 for name in before}


def test_embedded_shards_knob_serves_without_shard_processes(tmp_path: Path) -> None:
    import felix

    n = NodeProcess(tmp_path / "node", "--embedded-shards", gateways=1, shards=2)
    try:
        assert set(n.info["processes"]) == {"gateway-0", "control-0"}

        async def main() -> None:
            url = f"felix://{n.host}:{n.port}"
            async with felix.connect(url, ca=n.ca_file) as client:
                await client.cache("c").set("k", b"v", ttl=60)
                assert await client.cache("c").get("k") == b"v"
                async with client.subscribe("s", start="earliest") as sub:
                    acks = [await client.publish("s", b"%d" % i) for i in range(20)]
                    assert [a.offset for a in acks if a is not None] == list(range(20))
                    got = [(await sub.next(timeout=5)).data for _ in range(20)]
                    assert got == [b"%d" % i for i in range(20)]

        run(main, timeout=30)
    finally:
        assert n.stop() == 0


def test_config_file_supplies_defaults_and_flags_win(tmp_path: Path) -> None:
    from felix.cli import _node_config, apply_config_file, build_parser
    from felix.errors import ConfigError

    cfg = tmp_path / "felix.toml"
    cfg.write_text(
        'shards = 3\nreplay-bytes = "8MiB"\nslow-subscriber = "disconnect"\n'
        f'data-dir = "{tmp_path / "d"}"\n'
    )
    argv = ["up", "--config", str(cfg), "--gateways", "1", "--shards=2"]
    args = build_parser().parse_args(argv)
    apply_config_file(args.parser, args, argv)
    config = _node_config(args)
    assert (config.shards, config.gateways) == (2, 1)  # flags win over the file
    assert config.stream_defaults.replay_max_bytes == 8 * 1024 * 1024
    assert config.stream_defaults.slow_subscriber_policy == "disconnect"
    assert config.data_dir == tmp_path / "d"
    cfg.write_text("shardz = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'shardz'"):
        apply_config_file(args.parser, build_parser().parse_args(argv), argv)
