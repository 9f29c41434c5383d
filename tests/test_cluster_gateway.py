"""A gateway in cluster mode (in-process node, real QUIC): every request checked against
the shard map (serve, REDIRECT, Unavailable), SHARD_MAP answered from it, moved shards'
subscriptions ended; and the node-side pieces that need no database: the up flags,
the supervisor<->gateway messages, the scan of durable shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from felix import wire
from felix.cli import _node_config, build_parser
from felix.cluster.ownership import (
    ClusterNode,
    OwnershipMap,
    ShardState,
    cluster_clock,
    logical_shard,
)
from felix.errors import ConfigError, ErrorCode, RemoteProtocolError
from felix.gateway.cluster import JOINING, NO_OWNER, ClusterGate
from felix.node import messages as msg
from felix.node.cluster import DurableShards, lease_settings
from felix.node.config import NodeConfig
from felix.node.local import LocalNode
from tests.aio import run
from tests.rawquic import RawPeer, raw_connect

pytestmark = pytest.mark.timeout(60)
T, NS = "acme", "prod"
L = 8
OTHER = "10.0.0.2:5000"


def owner_addresses(parts: object) -> list[str | None]:
    """A SHARD_MAP answer's owner per shard, as addresses (None: no owner to go to)."""
    assert isinstance(parts, wire.ShardMap)
    return [None if o == NO_OWNER else parts.addresses[o] for o in parts.owners]


def cluster_map(
    version: int,
    owners: list[str | None],
    *,
    serve_for: float = 100.0,
    handoff: dict[int, str] | None = None,
) -> OwnershipMap:
    nodes = (
        ClusterNode("me", "127.0.0.1:5000", "http://127.0.0.1:8080", True, 1, 0.0),
        ClusterNode("other", OTHER, "http://10.0.0.2:8080", True, 1, 0.0),
        ClusterNode("dead", "10.0.0.3:5000", "http://10.0.0.3:8080", False, 1, 0.0),
    )
    handoff = handoff or {}
    shards = tuple(ShardState(o, 10 + i, handoff.get(i)) for i, o in enumerate(owners))
    return OwnershipMap(version, "me", L, cluster_clock() + serve_for, nodes, shards)


#: Shard i's owner: even shards here, odd ones elsewhere, 7 on a dead node, 5 nobody's.
OWNERS: list[str | None] = ["me", "other", "me", "other", "me", None, "me", "dead"]


def key_in(shard: int, prefix: str = "s") -> str:
    for i in range(10_000):
        if logical_shard(f"{T}/{NS}/{prefix}{i}", L) == shard:
            return f"{prefix}{i}"
    raise AssertionError(shard)


async def ask(peer: RawPeer, sid: int, frame: bytes) -> wire.ExtMessage:
    before = len(peer.frames[sid])
    peer.send(sid, frame)
    await peer.wait_for(lambda: len(peer.frames[sid]) > before)
    return wire.decode_ext(peer.frames[sid][before])


def publish(rid: int, stream: str) -> bytes:
    return wire.encode_publish(rid, T, NS, stream, [b"x"])


def test_a_shard_map_answer_lists_owners_only_whatever_the_rows_of_gone_nodes() -> None:
    """Node rows stay until `felix cluster forget`: 2000 of gone nodes must not push the
    answer past its 1024-node bound (it would fail every SHARD_MAP request)."""
    base = cluster_map(1, OWNERS)
    gone = tuple(
        ClusterNode(f"gone{i}", f"10.1.{i // 256}.{i % 256}:5000", "", False, 1, 0.0)
        for i in range(2000)
    )
    m = OwnershipMap(1, "me", L, 2000.0, base.nodes + gone, base.shards)
    gate = ClusterGate(clock=lambda: 1000.0)
    gate.apply(m)
    parts = wire.decode_ext(wire.decode_frame(gate.shard_map(1), extensions=True))
    assert sorted(parts.addresses) == sorted(["127.0.0.1:5000", OTHER])  # type: ignore[attr-defined]


def test_gate_verdicts_lost_shards_and_shard_map_parts() -> None:
    now = [1000.0]
    gate = ClusterGate(clock=lambda: now[0])
    refused = gate.verdict("acme/prod/s")
    assert refused.reason == JOINING  # type: ignore[union-attr]
    m1 = cluster_map(1, OWNERS)
    m1 = OwnershipMap(m1.version, "me", L, 1010.0, m1.nodes, m1.shards)
    assert gate.apply(m1) == set()
    assert gate.apply(m1) is None  # not newer
    parts = wire.decode_ext(wire.decode_frame(gate.shard_map(3), extensions=True))
    assert isinstance(parts, wire.ShardMap)
    # Only nodes owning a shard are listed: the dead node's row is not.
    assert sorted(parts.addresses) == sorted(["127.0.0.1:5000", OTHER])
    here = "127.0.0.1:5000"
    assert owner_addresses(parts) == [here, OTHER, here, OTHER, here, None, here, None]
    assert parts.epochs == [10 + i for i in range(L)]
    # Shard 2 moves to "other", shard 4 starts a handoff: both leave this node.
    moved = ["me", "other", "other", "other", "me", None, "me", "dead"]
    m2 = cluster_map(2, moved, handoff={4: "other"})
    m2 = OwnershipMap(2, "me", L, 1010.0, m2.nodes, m2.shards)
    assert gate.apply(m2) == {2, 4}
    parts = wire.decode_ext(wire.decode_frame(gate.shard_map(4), extensions=True))
    assert owner_addresses(parts)[2] == OTHER and owner_addresses(parts)[4] is None
    # Past serve_until nothing is this node's to serve (or to advertise).
    now[0] = 1010.0
    assert not gate.serving()
    parts = wire.decode_ext(wire.decode_frame(gate.shard_map(5), extensions=True))
    assert owner_addresses(parts)[:2] == [None, OTHER]


def test_requests_are_served_redirected_or_refused_per_the_map(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            peer = await raw_connect(node.host, node.port, node.ca_file)
            sid = await peer.auth()
            # Standalone: SHARD_MAP says so.
            alone = await ask(peer, sid, wire.encode_shard_map_request(1))
            assert isinstance(alone, wire.ShardMap) and alone.logical_shards == 0
            gateway = node.gateway
            gateway.cluster = ClusterGate()  # cluster mode, no map yet: nothing served
            joining = await ask(peer, sid, publish(2, key_in(0)))
            assert isinstance(joining, wire.ErrorReply) and joining.message == JOINING
            assert joining.code == ErrorCode.UNAVAILABLE
            gateway.apply_ownership(cluster_map(1, OWNERS))

            served = await ask(peer, sid, publish(3, key_in(0)))
            assert isinstance(served, wire.PublishOffsets), served
            redirect = await ask(peer, sid, publish(4, key_in(1)))
            assert isinstance(redirect, wire.Redirect), redirect
            assert (redirect.request_id, redirect.shard, redirect.epoch, redirect.owner) == (
                4, 1, 11, OTHER,
            )  # fmt: skip
            for shard, why in ((5, "no owner"), (7, "is down")):
                refused = await ask(peer, sid, publish(5, key_in(shard)))
                assert isinstance(refused, wire.ErrorReply) and why in refused.message
                assert refused.code == ErrorCode.UNAVAILABLE
            # Cache requests and subscriptions too.
            cached = await ask(peer, sid, wire.encode_cache_get(6, T, NS, "c", "k"))
            cache_shard = logical_shard(f"{T}/{NS}/c/k", L)
            if OWNERS[cache_shard] == "other":
                assert isinstance(cached, wire.Redirect)
            sub = await ask(peer, sid, wire.encode_subscribe(8, T, NS, key_in(3), 1))
            assert isinstance(sub, wire.Redirect) and sub.shard == 3
            assert gateway.cluster is not None and gateway.cluster.redirects >= 2
            # v1 clients cannot follow a redirect: an error naming the owner.
            v1 = peer.new_stream()
            peer.send(v1, wire.encode_message({"type": "auth", "tenant_id": T, "token": ""}))
            await peer.frames_on(v1, 1)
            peer.send(
                v1,
                wire.encode_message(
                    {"type": "publish", "tenant_id": T, "namespace": NS,
                     "stream": key_in(1), "payload": b"x", "request_id": 1}
                ),
            )  # fmt: skip
            await peer.frames_on(v1, 2)
            answer = wire.decode_message(peer.frames[v1][1])
            assert answer["type"] == "error" and OTHER in answer["message"]
            # The map's lease ran out: this node serves nothing, not even its own shards.
            gateway.apply_ownership(cluster_map(2, OWNERS, serve_for=-1))
            stale = await ask(peer, sid, publish(9, key_in(0)))
            assert isinstance(stale, wire.ErrorReply) and "lease" in stale.message
            mapped = await ask(peer, sid, wire.encode_shard_map_request(10))
            assert isinstance(mapped, wire.ShardMap) and mapped.version == 2
            assert owner_addresses(mapped)[:2] == [None, OTHER]
            peer.close()

    run(main)


def test_a_map_that_moves_a_shard_ends_its_subscriptions(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalNode.start(tmp_path) as node:
            gateway = node.gateway
            gateway.cluster = ClusterGate()
            gateway.apply_ownership(cluster_map(1, OWNERS))
            peer = await raw_connect(node.host, node.port, node.ca_file)
            sid = await peer.auth()
            kept, moving = key_in(2), key_in(4)
            for sub_id, stream in ((1, kept), (2, moving)):
                ok = await ask(peer, sid, wire.encode_subscribe(sub_id, T, NS, stream, sub_id))
                assert isinstance(ok, wire.Subscribed)
            moved = list(OWNERS)
            moved[4] = "other"
            assert gateway.apply_ownership(cluster_map(2, moved)) == {4}
            assert gateway.in_flight_for({4}) == 0

            def ends() -> list[wire.ExtMessage]:
                return [
                    wire.decode_ext(f)
                    for s, frames in peer.frames.items()
                    if s % 4 == 3
                    for f in frames[1:]
                    if f.payload[0] == wire.OP_SUBSCRIPTION_END
                ]

            await peer.wait_for(lambda: bool(ends()))
            (end,) = ends()
            assert isinstance(end, wire.ErrorReply) and end.request_id == 2
            assert end.code == ErrorCode.UNAVAILABLE and "moved" in end.message
            # An older map changes nothing.
            assert gateway.apply_ownership(cluster_map(1, OWNERS)) is None
            peer.close()

    run(main)


def test_ownership_messages_round_trip() -> None:
    m = cluster_map(3, OWNERS)
    line = msg.encode(msg.Ownership(m.to_dict()))
    decoded = msg.decode(line)
    assert isinstance(decoded, msg.Ownership)
    assert OwnershipMap.from_dict(decoded.map) == m
    assert msg.decode(msg.encode(msg.OwnershipAck(3))) == msg.OwnershipAck(3)
    assert msg.decode(msg.encode(msg.PinWanted([0, 7]))) == msg.PinWanted([0, 7])
    for bad in (["1"], [-1], [True], [70000], [1.5]):
        with pytest.raises(RemoteProtocolError, match="logical shard numbers"):
            msg.decode(msg.encode(msg.PinWanted(bad)))  # type: ignore[arg-type]


def test_durable_shards_are_the_streams_with_records(tmp_path: Path) -> None:
    root = tmp_path / "streams"
    for name, size in (("a", 200), ("b", 10), ("c", 0)):
        d = root / T / NS / name
        d.mkdir(parents=True)
        if size:
            (d / f"{0:020d}.seg").write_bytes(b"\0" * size)
    (root / T / NS / ".deleted.0000000000000000.d").mkdir()
    now = [0.0]
    scan = DurableShards(root, 64, clock=lambda: now[0], rescan=5.0)
    want = {logical_shard(f"{T}/{NS}/a", 64)}
    assert set(scan()) == want  # b's segment holds only (part of) a header
    (root / T / NS / "c" / f"{0:020d}.seg").write_bytes(b"\0" * 300)
    assert set(scan()) == want  # cached
    now[0] = 5.0
    assert set(scan()) == want | {logical_shard(f"{T}/{NS}/c", 64)}
    # A shard core's report of a first durable write counts at once, until the next scan.
    scan.add([9])
    assert 9 in scan()
    now[0] = 10.0
    assert 9 not in scan()
    # A scan that fails (not a stream being deleted: an I/O error) keeps the last good
    # answer: an empty one would tell the cluster the copies are gone.
    good = set(scan())
    moved = tmp_path / "moved"
    root.rename(moved)
    root.symlink_to(root)  # ELOOP on every look
    now[0] = 20.0
    assert set(scan()) == good
    root.unlink()
    moved.rename(root)


def _config(*argv: str, env: dict[str, str] | None = None) -> NodeConfig:
    old = dict(os.environ)
    try:
        os.environ.pop("FELIX_CLUSTER", None)
        os.environ.update(env or {})
        return _node_config(build_parser().parse_args(["up", *argv]))
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_up_flags(tmp_path: Path) -> None:
    dsn = "postgresql://felix:secret@db:5432/felix"
    data = ["--data-dir", str(tmp_path / "d")]
    config = _config("--cluster", dsn, "--node-id", "felix-0", *data)
    assert config.clustered and config.node_id == "felix-0"
    assert config.control_store == dsn  # one control plane for the whole cluster
    assert (config.logical_shards, config.cluster_lease, config.advertise) == (256, 10.0, None)
    assert (config.cluster_settle, config.cluster_node_expiry) == (2.0, 24 * 3600.0)
    child = NodeConfig.from_json(config.to_json())
    # The children know the node is clustered; none gets the DSN (the control process is
    # given its store through a pipe: tests/test_dsn.py).
    assert child.clustered and child.cluster != dsn and child.control_store != dsn
    assert "secret" not in config.to_json()
    config = _config(*data, env={"FELIX_CLUSTER": dsn, "HOSTNAME": "pod-7"})
    assert config.cluster == dsn and config.node_id == "pod-7"
    config = _config(
        "--cluster", dsn, "--control-store", "memory://", "--advertise", "felix-0.peers:5000",
        "--logical-shards", "4096", "--cluster-lease", "3s", "--cluster-settle", "0",
        "--cluster-node-expiry", "7d", *data,
    )  # fmt: skip
    assert config.control_store == "memory://" and config.advertise == ("felix-0.peers", 5000)
    assert (config.logical_shards, config.cluster_lease) == (4096, 3.0)
    assert (config.cluster_settle, config.cluster_node_expiry) == (0.0, 7 * 86400.0)
    assert _config("--cluster", dsn, "--cluster-node-expiry", "0", *data).cluster_node_expiry == 0
    for bad in (
        ["--logical-shards", "0"],
        ["--logical-shards", "4097"],
        ["--node-id", "a/b"],
        ["--cluster-settle", "61s"],
        ["--cluster-node-expiry", "30s"],  # 0 (never) or at least a minute
        ["--cluster-node-expiry", "3651d"],
        ["--cluster-node-expiry", "-1"],
    ):
        with pytest.raises(ConfigError):
            _config("--cluster", dsn, "--node-id", "n", *bad, *data)
    assert not _config(*data).clustered
    # Short leases scale the fence margin and the placer's grace.
    assert lease_settings(2.0).fence_margin == pytest.approx(0.4)
    assert lease_settings(10.0).placer_grace == 2.0


def test_wildcard_listen_needs_advertise_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
    base = [
        sys.executable, "-m", "felix.cli", "up", "--cluster", "postgresql://db/felix",
        "--listen", "0.0.0.0:5000", "--insecure", "--region", "eu-1",
        "--data-dir", str(tmp_path / "d"),
    ]  # fmt: skip
    got = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 2 and "--advertise" in got.stderr, got.stderr
    shown = subprocess.run(
        [*base[:3], "config", "show", *base[4:], "--advertise", "n1.peers:5000", "--json"],
        env={**env, "FELIX_CLUSTER": "postgresql://u:pw@db/felix"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows["cluster"]["value"] == "postgresql://db/felix"  # the flag wins
    assert rows["advertise"]["value"] == "n1.peers:5000"
    assert rows["logical-shards"]["value"] == 256
    assert rows["cluster-settle"] == {"value": "2s", "source": "default"}
    assert rows["cluster-node-expiry"] == {"value": "24h", "source": "default"}
    toml = tmp_path / "felix.toml"
    toml.write_text('cluster-node-expiry = "48h"\ncluster-settle = 0\n')
    from_file = subprocess.run(
        [*base[:3], "config", "show", *base[4:], "--advertise", "n1:5000", "--json",
         "--config", str(toml)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert from_file.returncode == 0, from_file.stderr
    rows = json.loads(from_file.stdout)
    assert rows["cluster-node-expiry"] == {"value": "48h", "source": f"file {toml}"}
    assert rows["cluster-settle"] == {"value": 0, "source": f"file {toml}"}
    from_env = subprocess.run(
        [*base[:3], "config", "show", *base[6:], "--advertise", "n1:5000", "--json"],
        env={**env, "FELIX_CLUSTER": "postgresql://u:pw@db/felix"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    rows = json.loads(from_env.stdout)
    assert rows["cluster"] == {
        "value": "postgresql://u:***@db/felix",
        "source": "environment $FELIX_CLUSTER",
    }
    assert rows["control-store"]["value"] == "postgresql://u:***@db/felix"
    assert "pw" not in from_env.stdout


class _FakeGateway:
    """What OwnershipFollower uses of a Gateway: the gate, and requests in flight."""

    index = 0

    def __init__(self) -> None:
        self.cluster: ClusterGate | None = None
        self.in_flight: dict[int, int] = {}

    def apply_ownership(self, new: OwnershipMap) -> set[int] | None:
        if self.cluster is None:
            self.cluster = ClusterGate()
        return self.cluster.apply(new)

    def in_flight_for(self, shards: set[int]) -> int:
        return sum(n for s, n in self.in_flight.items() if s in shards)


class _FakeControl:
    def __init__(self) -> None:
        self.sent: list[msg.Event] = []

    def send(self, message: msg.Event) -> bool:
        self.sent.append(message)
        return True

    def acks(self) -> list[int]:
        return [m.version for m in self.sent if isinstance(m, msg.OwnershipAck)]


def test_a_gateway_acknowledges_a_map_only_with_nothing_in_flight_for_what_it_refuses() -> None:
    import asyncio

    from felix.node.worker import OwnershipFollower

    async def main() -> None:
        gateway, control = _FakeGateway(), _FakeControl()
        follower = OwnershipFollower(gateway, control, log_every=0.05)  # type: ignore[arg-type]
        follower.apply(cluster_map(1, OWNERS).to_dict())
        assert control.acks() == [1]  # the first map: nothing to drain
        # Requests in flight for shards 4 (being handed off) and 2 (kept).
        gateway.in_flight = {4: 2, 2: 5}
        follower.apply(cluster_map(2, OWNERS, handoff={4: "other"}).to_dict())
        assert follower.draining == {4}
        await asyncio.sleep(0.3)  # far past any timeout: still no acknowledgement
        assert control.acks() == [1]
        # A newer map while draining: acknowledged with it, once drained.
        follower.apply(cluster_map(3, OWNERS, handoff={4: "other"}).to_dict())
        gateway.in_flight = {4: 1, 2: 5}
        await asyncio.sleep(0.05)
        assert control.acks() == [1]
        gateway.in_flight = {2: 5}  # requests for kept shards do not hold it back
        await asyncio.sleep(0.05)
        assert control.acks() == [1, 3]
        assert follower.draining == set()
        # A map that gives the shard back before it drained: nothing left to wait for.
        gateway.in_flight = {6: 1}
        follower.apply(cluster_map(4, OWNERS, handoff={6: "other"}).to_dict())
        assert control.acks() == [1, 3]
        follower.apply(cluster_map(5, OWNERS).to_dict())
        await asyncio.sleep(0.05)
        assert control.acks() == [1, 3, 5]

    run(main)


class _FakeChild:
    def __init__(self, name: str, acked: int = 0, running: bool = True) -> None:
        self.name = name
        self.ownership_acked = acked
        self._running = running
        self.sent: list[msg.Command] = []

    def send(self, message: msg.Command) -> bool:
        self.sent.append(message)
        return True

    def running(self) -> bool:
        return self._running


def _node_cluster(tmp_path: Path, **kw: Any) -> Any:
    """A NodeCluster for node "me" (its agent is not started: no database is reached)."""
    from felix.node.cluster import NodeCluster

    settings: dict[str, Any] = {
        "dsn": "postgresql://u@localhost/db",
        "node_id": "me",
        "address": "127.0.0.1:5000",
        "health_url": "http://127.0.0.1:8080",
        "region": "",
        "logical_shards": L,
        "lease": 10.0,
        "data_dir": tmp_path,
        "gateways": list,
    }
    return NodeCluster(**{**settings, **kw})


def test_handoff_drained_raises_unless_every_running_gateway_acknowledged(tmp_path: Path) -> None:
    import asyncio

    gateways = [_FakeChild("gateway-0", 7), _FakeChild("gateway-1", 6), _FakeChild("x", 0, False)]
    node = _node_cluster(tmp_path, gateways=lambda: gateways, drain_timeout=0.1)

    async def main() -> None:
        with pytest.raises(TimeoutError, match="gateway-1"):
            await node.handoff_drained(7)
        await node.handoff_drained(6)  # a stopped gateway is not waited for
        # A gateway that restarted acknowledges the map it gets at start.
        gateways[1].ownership_acked = 0
        node.on_gateway_started(gateways[1])  # no map yet: nothing sent

        async def ack_later() -> None:
            await asyncio.sleep(0.03)
            gateways[1].ownership_acked = 8

        task = asyncio.ensure_future(ack_later())
        await node.handoff_drained(7)
        await task

    run(main)


def test_serve_until_is_on_boottime_everywhere(tmp_path: Path) -> None:
    """CLOCK_BOOTTIME counts a suspended host's sleep (time.monotonic() does not): the
    supervisor's agent and every gateway compare serve_until on it."""
    import time

    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    now = cluster_clock()
    assert before <= now <= time.clock_gettime(time.CLOCK_BOOTTIME)
    assert ClusterGate()._clock is cluster_clock
    node = _node_cluster(tmp_path)
    assert node._clock is cluster_clock and node.agent._clock is cluster_clock


def test_client_and_node_logical_shards_agree_and_dead_letters_colocate() -> None:
    import random

    from felix.client._cluster import logical_shard as client_logical_shard

    rng = random.Random(16)
    names = ["orders", "a.dlq", "x.dlq.dlq", ".dlq", "dlq", "orders.dlqx", "o.DLQ"]
    names += ["".join(rng.choices("abcxyz._-dlq", k=rng.randint(1, 24))) for _ in range(3000)]
    for count in (1, 7, 256, 4096):
        for name in names:
            for key in (f"{T}/{NS}/{name}", f"{T}/{NS}/cache/{name}", f"{T}/{NS}/c/k/{name}"):
                assert logical_shard(key, count) == client_logical_shard(key, count), key
    for name in names:
        source = f"{T}/{NS}/{name}"
        # <stream>.dlq (the default dead-letter stream) lives on its source's shard.
        assert logical_shard(f"{source}.dlq", 4096) == logical_shard(source, 4096)
        assert logical_shard(f"{source}.dlq.dlq", 4096) == logical_shard(source, 4096)
    # Only stream keys: a cache key (three slashes) hashes as it is.
    import zlib

    cache_key = f"{T}/{NS}/cache/k.dlq"
    assert logical_shard(cache_key, 4096) == zlib.crc32(cache_key.encode()) % 4096


class _Links:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def send(self, shard: int, record: bytes) -> bool:
        self.sent.append((shard, record))
        return True


def test_a_dead_letter_relay_passes_the_cluster_gate(caplog: pytest.LogCaptureFixture) -> None:
    from felix import ipc
    from felix.gateway.queues import QueueRouter
    from felix.ipc import RecordType

    links = _Links()
    router = QueueRouter(links, lambda key: 1, iter(range(100, 1000)).__next__)  # type: ignore[arg-type]
    gate = ClusterGate()
    gate.apply(cluster_map(1, OWNERS))
    frame = publish(0, "whatever")

    def relay(stream: str, relay_id: int) -> None:
        body = ipc.encode_key(f"{T}/{NS}/{stream}") + frame
        router.on_relay(0, relay_id, body, [True, True], gate)

    # Served here (shard 2 is "me"): forwarded to the local shard as a dead-letter append.
    relay(key_in(2) + ".dlq", 7)
    ((target, record),) = links.sent
    kind, token, aux = ipc.decode_header(record)
    assert target == 1 and kind == RecordType.REQUEST and aux == ipc.AUX_DEAD_LETTER
    # In flight for logical shard 2 until answered: a handoff of shard 2 waits for it.
    assert router.relays_in_flight({2}) == 1 and router.relays_in_flight({4}) == 0
    assert router.on_reply(token, b"reply")
    assert router.relays_in_flight({2}) == 0
    relay(key_in(2) + ".dlq", 7)
    router.shard_down(1)  # its target went down: no answer will come
    assert router.relays_in_flight({2}) == 0
    links.sent.clear()
    # Elsewhere (shard 1 is "other's"), or nobody's (5): refused back to the source shard.
    links.sent.clear()
    for i, stream in enumerate((key_in(1), key_in(1), key_in(5, "t")), start=8):
        relay(stream, i)
    assert [shard for shard, _ in links.sent] == [0, 0, 0]
    for (_, record), relay_id in zip(links.sent, (8, 9, 10), strict=True):
        kind, token, _aux = ipc.decode_header(record)
        assert kind == RecordType.RELAY_REPLY and token == relay_id
        error = wire.decode_ext(wire.decode_frame(record[ipc.HEADER_SIZE :], extensions=True))
        assert isinstance(error, wire.ErrorReply) and error.code == ErrorCode.UNAVAILABLE
        assert "not served by this node" in error.message
    assert router.relays_refused == 3
    # One log line per dead-letter stream.
    logged = [r for r in caplog.records if "dead letters stay pending" in r.getMessage()]
    assert len(logged) == 2
    # A standalone gateway (no gate) relays everything.
    links.sent.clear()
    router.on_relay(0, 11, ipc.encode_key(f"{T}/{NS}/{key_in(1)}") + frame, [True, True])
    assert links.sent[0][0] == 1


def test_a_loopback_advertise_needs_a_loopback_listen_exit_2(tmp_path: Path) -> None:
    dsn = "postgresql://felix@db/felix"
    data = ["--data-dir", str(tmp_path / "d"), "--node-id", "n1", "--cluster", dsn]
    data += ["--region", "eu-1", "--insecure"]
    for listen, advertise in (
        ("0.0.0.0:5000", "127.0.0.1:5000"),
        ("[::]:5000", "[::1]:5000"),
        ("10.0.0.7:5000", "localhost:5000"),
    ):
        with pytest.raises(ConfigError, match="loopback"):
            _config("--listen", listen, "--advertise", advertise, *data)
    # Everything on one host's loopback (as the tests run clusters): fine.
    config = _config("--listen", "127.0.0.1:5001", "--advertise", "127.0.0.1:5001", *data)
    assert config.advertise == ("127.0.0.1", 5001)
    assert _config("--listen", "127.0.0.1:5001", *data).advertise is None
    assert _config("--listen", "0.0.0.0:5000", "--advertise", "n1.peers:5000", *data).advertise
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
    got = subprocess.run(
        [sys.executable, "-m", "felix.cli", "up", "--listen", "0.0.0.0:5000",
         "--advertise", "127.0.0.1:5000", *data],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 2 and "loopback" in got.stderr, got.stderr


class _SlowJoinAgent:
    """A cluster agent whose join uses up the whole join timeout and ends placed (a
    cluster placed before: the map read at the join has every shard owned)."""

    def __init__(self, clock: list[float]) -> None:
        import asyncio

        self.clock = clock
        self._placed = asyncio.Event()
        self.stopped = asyncio.Event()

    @property
    def is_placed(self) -> bool:
        return self._placed.is_set()

    async def start(self, timeout: float) -> None:
        self.clock[0] += timeout + 1.0
        self._placed.set()

    async def placed(self) -> None:
        await self._placed.wait()

    async def run(self) -> None:
        await self.stopped.wait()

    async def stop(self, leave: bool) -> None:
        self.stopped.set()


def test_a_node_placed_when_its_join_ends_is_ready_without_waiting_or_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A join that ends at (or past) the join timeout, already placed: no 0 s wait (which
    times out even when placed), no "not placed yet" warning."""

    now = [1000.0]
    node = _node_cluster(tmp_path, clock=lambda: now[0])
    agent = _SlowJoinAgent(now)
    node.agent = agent

    async def main() -> None:
        await node.start(timeout=5.0)
        await node.stop()

    run(main)
    assert agent.stopped.is_set()
    assert "not placed yet" not in caplog.text


def test_imported_shards_are_read_from_the_import_records(tmp_path: Path) -> None:
    """What a node reports of the shards an operator imported (felix cluster move checks
    the copy came from the pinned node's data dir): the good records only."""
    from felix.node.cluster import imported_shards

    d = tmp_path / "cluster-imports"
    d.mkdir()
    good = {"shard": 7, "source_node_id": "n0", "source_data_id": "ab" * 16}
    (d / "7.json").write_text(json.dumps(good))
    (d / "8.json").write_text(json.dumps({**good, "shard": 9}))  # names another shard
    (d / "9.json").write_text("{not json")
    (d / "99.json").write_text(json.dumps({**good, "shard": 99}))  # beyond L
    (d / ".7.json.import").write_text(json.dumps(good))  # a staged one
    assert imported_shards(d, L) == {7: ("n0", "ab" * 16)}
    assert imported_shards(tmp_path / "none", L) == {}
    scan = DurableShards(tmp_path / "streams", L, imports_dir=d)
    scan()
    assert scan.imports == {7: ("n0", "ab" * 16)}


def test_cluster_status_shows_stale_copies() -> None:
    """felix cluster status names the nodes holding a stale copy of a shard (moved or
    unpinned away from them), which are never given it until the copy is removed."""
    from felix.cluster_cli import gather, render

    doc = {
        "node_id": "n1",
        "logical_shards": 4,
        "version": 3,
        "serving": True,
        "nodes": [["n1", "a:1", "", True, 1, 0.0]],
        "shards": [
            ["n1", 1, None, None],
            ["n1", 1, None, "n1"],
            [None, 2, None, None],
            ["n1", 1, None, None],
        ],
        "stale": {"2": ["n9"], "x": ["bad"], "3": "bad"},
    }
    cluster = gather(doc, 1.0)
    assert cluster["stale"] == {2: ["n9"]}
    shown = render(cluster, shards=True)
    assert "stale copies: 1 shard(s) on n9" in shown
    [row] = [line for line in shown.splitlines() if line.strip().startswith("2 ")]
    assert "stale copy on n9" in row
    assert "stale" not in render(gather({**doc, "stale": {}}, 1.0), shards=True)
