"""Three real `felix up --cluster` nodes on loopback sharing one PostgreSQL database.

The module's nodes live for all its tests, which run in order and build on each other:
they join and spread the logical shards; a request for a key owned elsewhere gets
REDIRECT naming the owner, the owner serves it; a node killed with -9 loses its shards
to the others (epochs bumped); a node paused (SIGSTOP of its whole process group) past
its lease refuses what it used to own when it wakes, then rejoins and serves and
redirects per the new map. A short lease (2 s) keeps failover quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from felix import wire
from felix.cluster.ownership import logical_shard
from felix.cluster.placement import rendezvous_owner
from felix.errors import ErrorCode
from tests import clusterproc as cp
from tests import pg
from tests.nodeproc import NodeProcess
from tests.rawquic import RawPeer, raw_connect

# serial: lease and failover bounds are timed; it runs alone, not beside another
# xdist worker.
pytestmark = pytest.mark.serial


LOGICAL_SHARDS = 256
LEASE = 2.0
#: The placer's grace and fence margin at this lease (felix/node/cluster.py lease_settings).
GRACE = LEASE / 5
TENANT = "acme"


class Cluster:
    def __init__(self, dsn: str, nodes: list[NodeProcess]) -> None:
        self.dsn = dsn
        self.nodes = nodes

    def by_id(self, node_id: str) -> NodeProcess:
        return self.nodes[int(node_id.removeprefix("n"))]


def _start(root: Path, dsn: str, i: int) -> NodeProcess:
    data = root / f"n{i}"
    data.mkdir()
    return NodeProcess(
        data,
        "--topology", "embedded",
        "--cluster", dsn,
        "--node-id", f"n{i}",
        "--cluster-lease", f"{LEASE:g}",
        "--logical-shards", str(LOGICAL_SHARDS),
        gateways=1,
        shards=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    with pg.temporary_database("felix_cluster_node") as dsn:
        nodes: list[NodeProcess | None] = [None] * 3
        errors: list[BaseException] = []

        def start(i: int) -> None:
            try:
                nodes[i] = _start(root, dsn, i)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if errors:
                raise errors[0]
            yield Cluster(dsn, [n for n in nodes if n is not None])
        finally:
            for n in nodes:
                if n is not None:
                    with _suppress_lookup():
                        os.killpg(n.proc.pid, signal.SIGCONT)
                    n.stop()


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is ProcessLookupError


def _metric(node: NodeProcess, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples with these labels (with or without a label set)."""
    total = 0.0
    for line in node.http("/metrics")[1].splitlines():
        series, _, value = line.rpartition(" ")
        if series == name or (
            series.startswith(name + "{") and all(f'{k}="{v}"' in series for k, v in labels.items())
        ):
            total += float(value)
    return total


def _epochs(doc: dict[str, Any]) -> list[int]:
    return [row[1] for row in doc["shards"]]


def _address(doc: dict[str, Any], node_id: str) -> str:
    return str(next(row[1] for row in doc["nodes"] if row[0] == node_id))


def _settled(node: NodeProcess, live: int) -> dict[str, Any] | None:
    """``node``'s /cluster once ``live`` nodes are live and every shard is with its
    desired owner (the rendezvous winner among them; no data is durable here) with no
    handoff in flight."""
    doc = cp.cluster_doc(node)
    live_ids = [row[0] for row in doc.get("nodes", []) if row[3]]
    if not doc.get("serving") or len(live_ids) != live:
        return None
    for shard, (owner, _epoch, handoff_to, _durable) in enumerate(doc["shards"]):
        if handoff_to is not None or owner != rendezvous_owner(shard, live_ids):
            return None
    return doc


def _ready(node: NodeProcess) -> Callable[[], bool]:
    return lambda: node.http("/readyz")[0] == 200


def _settled_of(node: NodeProcess, live: int) -> Callable[[], dict[str, Any] | None]:
    return lambda: _settled(node, live)


def _key_owned_by(doc: dict[str, Any], node_id: str, prefix: str = "s") -> str:
    owners = cp.owners(doc)
    for i in range(10_000):
        key = f"{TENANT}/ns/{prefix}{i}"
        if owners[logical_shard(key, doc["logical_shards"])] == node_id:
            return key
    raise AssertionError(f"no key owned by {node_id}")


async def _connect(node: NodeProcess) -> tuple[RawPeer, int]:
    peer = await raw_connect(node.host, node.port, node.ca_file)
    sid = await peer.auth(TENANT)
    return peer, sid


async def _request(peer: RawPeer, sid: int, frame: bytes, timeout: float = 10.0) -> Any:
    before = len(peer.frames[sid])
    peer.send(sid, frame)
    await peer.wait_for(lambda: len(peer.frames[sid]) > before, timeout)
    return wire.decode_ext(peer.frames[sid][before])


def _publish(key: str, request_id: int = 1) -> bytes:
    tenant, ns, stream = key.split("/")
    return wire.encode_publish(request_id, tenant, ns, stream, [b"hello"])


def _ask(node: NodeProcess, key: str) -> Any:
    async def go() -> Any:
        peer, sid = await _connect(node)
        try:
            return await _request(peer, sid, _publish(key))
        finally:
            peer.close()

    return asyncio.run(go())


def _ends(peer: RawPeer) -> list[wire.Frame]:
    """SUBSCRIPTION_END frames on the event streams (server-opened unidirectional)."""
    return [
        frame
        for stream_id, frames in peer.frames.items()
        if stream_id & 0x3 == 0x3
        for frame in frames
        if frame.flags & wire.FLAG_FELIX_EXT and frame.payload[0] == wire.OP_SUBSCRIPTION_END
    ]


# -- the tests, in order ---------------------------------------------------------------


def test_nodes_join_become_ready_and_spread_the_shards(cluster: Cluster) -> None:
    for node in cluster.nodes:
        cp.wait_for("ready", _ready(node), 30, node.log)
        assert node.info["cluster"]["node_id"] == node.data_dir.name
        assert node.info["cluster"]["address"] == node.info["quic"]
    doc = cp.wait_for(
        "shards spread", lambda: _settled(cluster.nodes[0], 3), 40, cluster.nodes[0].log
    )
    owned = doc["balance"]["owned"]
    assert sorted(owned) == ["n0", "n1", "n2"]
    # Rendezvous hashing: about a third each.
    assert all(LOGICAL_SHARDS / 3 * 0.6 <= c <= LOGICAL_SHARDS / 3 * 1.4 for c in owned.values())
    assert sum(owned.values()) == LOGICAL_SHARDS
    # Every node agrees on the owners once settled, and on which one places.
    docs = [cp.wait_for("settled", _settled_of(n, 3), 20, n.log) for n in cluster.nodes]
    assert all(cp.owners(d) == cp.owners(docs[0]) for d in docs)
    assert sum(bool(d["placer"]) for d in docs) == 1
    for node, d in zip(cluster.nodes, docs, strict=True):
        assert _metric(node, "felix_cluster_shards_owned") == owned[d["node_id"]]
        assert _metric(node, "felix_cluster_serving") == 1
        assert _metric(node, "felix_cluster_lease_renewals_total", result="ok") >= 1
    assert sum(_metric(n, "felix_cluster_placer") for n in cluster.nodes) == 1
    status = json.loads(cluster.nodes[1].http("/status")[1])
    assert status["cluster"]["node_id"] == "n1" and status["cluster"]["serving"]


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in map(int, children):
        out += [child, *_descendants(child)]
    return out


def test_no_child_process_holds_the_dsn(cluster: Cluster) -> None:
    """The cluster's DSN stays in the supervisor: not in any child's environment (its
    spec included) or command line; the control process still uses the cluster's
    database as its store (given through a pipe)."""
    node = cluster.nodes[0]
    cp.wait_for("ready", _ready(node), 30, node.log)
    database = cluster.dsn.rsplit("/", 1)[1]
    children = _descendants(node.proc.pid)
    assert len(children) >= 2  # the gateway and the control process at least
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        assert database.encode() not in environ + cmdline, pid
        assert b"FELIX_CLUSTER=" not in environ, pid

    async def control_tables() -> int:
        import asyncpg

        conn = await asyncpg.connect(cluster.dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM felix_resources"))
        finally:
            await conn.close()

    assert asyncio.run(control_tables()) >= 1  # the default namespace, from control-0


def test_cluster_status_shows_nodes_leases_placer_and_shards(cluster: Cluster) -> None:
    n0 = cluster.nodes[0]
    cp.wait_for("settled", _settled_of(n0, 3), 20, n0.log)

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
        return subprocess.run(
            [sys.executable, "-m", "felix.cli", "cluster", "status", "--http", n0.info["http"],
             *argv],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    got = cli("--json", "--shards")
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["logical_shards"] == LOGICAL_SHARDS and len(doc["shards"]) == LOGICAL_SHARDS
    assert doc["placer"] in ("n0", "n1", "n2")
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert sorted(nodes) == ["n0", "n1", "n2"]
    for node_id, node in nodes.items():
        assert node["live"] and node["answered"] and node["serving"]
        assert node["address"] == cluster.by_id(node_id).info["quic"]
        assert 0 < node["lease_seconds_left"] <= LEASE
    assert sum(n["owned"] for n in nodes.values()) == LOGICAL_SHARDS
    assert doc["balance"]["unowned"] == 0 and doc["handoffs"] == []
    human = cli("--shards")
    assert human.returncode == 0, human.stderr
    assert "placer" in human.stdout and "n2" in human.stdout and "EPOCH" in human.stdout
    # felix status shows the node's part.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
    status = subprocess.run(
        [sys.executable, "-m", "felix.cli", "status", "--http", n0.info["http"],
         "--interval", "0.1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0 and "cluster: node n0" in status.stdout, status.stdout
    # A standalone node has no cluster to show.
    alone = subprocess.run(
        [sys.executable, "-m", "felix.cli", "cluster", "status", "--http", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert alone.returncode == 1


def test_requests_are_redirected_to_the_owner_which_serves_them(cluster: Cluster) -> None:
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    doc = cp.wait_for("settled", lambda: _settled(n0, 3), 20, n0.log)
    key = _key_owned_by(doc, "n1")
    shard = logical_shard(key, LOGICAL_SHARDS)
    before = _metric(n0, "felix_cluster_redirects_total")

    reply = _ask(n0, key)
    assert isinstance(reply, wire.Redirect), reply
    assert reply.owner == _address(doc, "n1") == n1.info["quic"]
    assert (reply.shard, reply.epoch) == (shard, _epochs(doc)[shard])
    cp.wait_for(
        "redirect counted",
        lambda: _metric(n0, "felix_cluster_redirects_total") > before,
        5,
        n0.log,
    )

    served = _ask(n1, key)
    assert isinstance(served, wire.PublishOffsets), served

    async def shard_map() -> Any:
        peer, sid = await _connect(n0)
        try:
            return await _request(peer, sid, wire.encode_shard_map_request(7))
        finally:
            peer.close()

    answer = asyncio.run(shard_map())
    assert isinstance(answer, wire.ShardMap)
    assert answer.logical_shards == LOGICAL_SHARDS
    owners = cp.owners(doc)
    assert [answer.addresses[i] for i in answer.owners] == [_address(doc, str(o)) for o in owners]
    assert answer.epochs == _epochs(doc)


def test_a_node_killed_loses_its_shards_to_the_others(cluster: Cluster) -> None:
    n0, n2 = cluster.nodes[0], cluster.nodes[2]
    before = cp.wait_for("settled", lambda: _settled(n0, 3), 20, n0.log)
    lost = [i for i, o in enumerate(cp.owners(before)) if o == "n2"]
    assert lost
    killed = time.monotonic()
    n2.kill_all()
    after = cp.wait_for("n2's shards moved", lambda: _settled(n0, 2), LEASE + GRACE + 8, n0.log)
    took = time.monotonic() - killed
    owners = cp.owners(after)
    assert {owners[i] for i in lost} <= {"n0", "n1"}
    assert all(_epochs(after)[i] > _epochs(before)[i] for i in lost)
    assert took < LEASE + GRACE + 8
    # Its former keys are served by (or redirected to) the survivors.
    key = _key_owned_by(before, "n2")
    reply = _ask(n0, key)
    assert isinstance(reply, wire.PublishOffsets | wire.Redirect), reply
    if isinstance(reply, wire.Redirect):
        assert reply.owner == cluster.nodes[1].info["quic"]


def test_a_paused_node_refuses_its_old_shards_then_rejoins(cluster: Cluster) -> None:
    survivors = cluster.nodes[:2]
    before = cp.wait_for("settled", lambda: _settled(survivors[0], 2), 20, survivors[0].log)
    # Pause the placer itself: its lock's session goes idle, the server ends it after a
    # lease (idle_session_timeout) and the other node places in its stead.
    placer = [n for n in survivors if cp.cluster_doc(n)["placer"]]
    assert len(placer) == 1
    n1 = placer[0]
    n0 = next(n for n in survivors if n is not n1)
    other, paused = n0.data_dir.name, n1.data_dir.name
    key = _key_owned_by(before, paused, prefix="p")
    shard = logical_shard(key, LOGICAL_SHARDS)

    async def scenario() -> tuple[Any, list[wire.Frame]]:
        peer, sid = await _connect(n1)
        sub_sid = peer.new_stream()
        peer.send(sub_sid, wire.encode_message({"type": "auth", "tenant_id": TENANT, "token": "",
                                                "client_flags": wire.FLAGS_ALL}))  # fmt: skip
        await peer.frames_on(sub_sid, 1)
        tenant, ns, stream = key.split("/")
        subscribed = await _request(peer, sub_sid, wire.encode_subscribe(5, tenant, ns, stream, 9))
        assert isinstance(subscribed, wire.Subscribed), subscribed
        # Freeze the whole node (supervisor, gateway, control plane) past its lease.
        os.killpg(n1.proc.pid, signal.SIGSTOP)
        try:
            # n0 takes the shard meanwhile (it is the only live node left), and becomes
            # the placer to do it.
            deadline = time.monotonic() + LEASE + GRACE + 8
            while True:
                moved = cp.cluster_doc(n0)
                if cp.owners(moved)[shard] == other or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert cp.owners(moved)[shard] == other, moved["balance"]
            assert moved["placer"], moved
            assert _epochs(moved)[shard] > _epochs(before)[shard]
            # Sent while it is frozen: the first thing its gateway reads when it wakes.
            peer.send(sid, _publish(key, request_id=3))
        finally:
            os.killpg(n1.proc.pid, signal.SIGCONT)
        await peer.wait_for(lambda: len(peer.frames[sid]) > 1, 10)
        answer = wire.decode_ext(peer.frames[sid][1])
        # Its subscription to the moved stream ends ("moved"): the client re-routes.
        await peer.wait_for(lambda: bool(_ends(peer)), 15)
        ends = _ends(peer)
        peer.close()
        return answer, ends

    answer, ends = asyncio.run(scenario())
    # Stale, it served nothing: refused (its lease had run out) or, had the new map
    # already reached its gateway, redirected to the new owner.
    if isinstance(answer, wire.Redirect):
        assert answer.owner == n0.info["quic"]
    else:
        assert isinstance(answer, wire.ErrorReply), answer
        assert answer.code == ErrorCode.UNAVAILABLE.value, answer.message
    end = wire.decode_ext(ends[-1])
    assert isinstance(end, wire.ErrorReply) and "moved" in end.message, end
    assert end.code == ErrorCode.UNAVAILABLE.value

    # It rejoins (a new incarnation) and serves or redirects per the new map.
    after = cp.wait_for("n1 rejoined", lambda: _settled(n1, 2), 30, n1.log)
    assert n1.http("/readyz")[0] == 200
    rows = {row[0]: row for row in after["nodes"]}
    assert rows[paused][4] != next(r[4] for r in before["nodes"] if r[0] == paused)
    for prefix in ("a", "b"):
        owned_here = _key_owned_by(after, paused, prefix)
        assert isinstance(_ask(n1, owned_here), wire.PublishOffsets)
        elsewhere = _key_owned_by(after, other, prefix)
        reply = _ask(n1, elsewhere)
        assert isinstance(reply, wire.Redirect) and reply.owner == n0.info["quic"], reply
