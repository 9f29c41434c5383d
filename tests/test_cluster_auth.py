"""Two real `felix up --cluster --auth jwt` nodes on loopback sharing one PostgreSQL
database, and so one set of tenant key rings (felix/auth/pgrings.py, mirrored into each
node's DATA_DIR/auth by felix/node/ring_mirror.py).

A token minted on node A (from the ring mirrored onto A's disk) is accepted by node B
for a subscribe and by A for the publish; the nodes' scheduled rotation (a short
interval) publishes a new key through the database, and a token signed with it, minted
with `felix token mint --cluster`, is accepted by both; the rotations of the two nodes'
rotators add up to the ring's keys (none doubled, none lost); a token signed with
another tenant's key is refused. The rings are sealed with the nodes' shared region key.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import felix
from felix.auth.files import AUDIENCE, ISSUER, load_ring
from felix.auth.perms import PermissionSet
from felix.auth.pgrings import PostgresRingStore
from felix.cluster.store import ClusterStore
from felix.keys.kek import FileKeyEncryptionKey
from felix.regions import DEV_REGION
from tests import clusterproc as cp
from tests import pg
from tests.aio import run
from tests.nodeproc import NodeProcess

# About 12 s; the timed margins are wide (a key is published LEAD = 12 x REFRESH before
# it signs), so it runs beside another xdist worker.
pytestmark = pytest.mark.timeout(180)

TENANT = "acme"
PERMS = ["stream.publish:stream:acme/default/*", "stream.subscribe:stream:acme/default/*"]
#: The nodes rotate every INTERVAL s, each key published LEAD s before it signs; they
#: mirror the database every REFRESH s (LEAD >= 2 x REFRESH + 5: no warning).
INTERVAL, LEAD, REFRESH = 9.0, 6.0, 0.5


@dataclass
class Cluster:
    dsn: str
    region_key: Path
    nodes: list[NodeProcess]


def cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
    out = subprocess.run(
        [sys.executable, "-m", "felix.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def kid_of(token: str) -> str:
    head = token.split(".")[0]
    value: str = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]
    return value


def start(root: Path, ca: Path, dsn: str, region_key: Path, node_id: str) -> NodeProcess:
    data = root / node_id
    (data / "tls").mkdir(parents=True)
    for name in ("ca-cert.pem", "ca-key.pem"):
        (data / "tls" / name).write_bytes((ca / name).read_bytes())
    return NodeProcess(
        data,
        "--topology", "embedded",
        "--cluster", dsn,
        "--node-id", node_id,
        "--cluster-lease", "2",
        "--logical-shards", str(cp.LOGICAL_SHARDS),
        "--auth", "jwt",
        "--region-key", str(region_key),
        "--jwks-refresh", f"{REFRESH:g}",
        "--key-rotation-interval", f"{INTERVAL:g}",
        "--key-publish-lead", f"{LEAD:g}",
        gateways=1,
        shards=2,
        log_path=root / f"{node_id}.log",
    )  # fmt: skip


async def make_cluster_database(dsn: str) -> None:
    """The cluster's tables, as the nodes' first start makes them (region "local")."""
    store = await ClusterStore.open(dsn, logical_shards=cp.LOGICAL_SHARDS, region=DEV_REGION)
    await store.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster-auth")
    ca = cp.make_ca(root)
    region_key = root / "region.key"
    region_key.write_text(os.urandom(32).hex())
    region_key.chmod(0o600)
    with pg.temporary_database("felix_cluster_auth") as dsn:
        # The rings exist before the nodes (made from anywhere with the database), in a
        # cluster's database: felix token refuses one that is not (a mistyped DSN).
        run(lambda: make_cluster_database(dsn))
        for tenant in (TENANT, "other"):
            cli("token", "keygen", "--tenant", tenant, "--max-ttl", "60",
                "--cluster", dsn, "--region-key", str(region_key))  # fmt: skip
        nodes: list[NodeProcess] = []
        try:
            with ThreadPoolExecutor(2) as pool:  # they join while the other does
                futures = [pool.submit(start, root, ca, dsn, region_key, i) for i in ("n0", "n1")]
            nodes = [f.result() for f in futures if f.exception() is None]
            for f in futures:
                if (exc := f.exception()) is not None:
                    raise exc
            cp.wait_settled(nodes)
            yield Cluster(dsn, region_key, nodes)
        finally:
            for node in nodes:
                node.stop()


def mint_on_node(node: NodeProcess) -> str:
    """A token minted on ``node``: from the ring its mirror keeps in DATA_DIR/auth."""
    perms = [arg for p in PERMS for arg in ("--perm", p)]
    return cli("token", "mint", "--tenant", TENANT, "--sub", "svc",
               "--dir", str(node.data_dir / "auth"), *perms)  # fmt: skip


async def connect(node: NodeProcess, token: str, tenant: str = TENANT) -> Any:
    return await felix.connect(
        cp.url(node), ca=str(node.ca_file), tenant=tenant, token=token, request_timeout=5.0
    )


async def pub_sub(subscriber: NodeProcess, publisher: NodeProcess, token: str, data: bytes) -> None:
    """Subscribe through ``subscriber`` and publish through ``publisher``, one token."""
    async with (
        await connect(subscriber, token) as sub_client,
        await connect(publisher, token) as pub_client,
        sub_client.subscribe("orders") as sub,
    ):
        ack = await pub_client.publish("orders", data)
        assert ack is not None
        got = await sub.next(timeout=10)
        assert got.data == data


def test_a_token_minted_on_one_node_is_accepted_by_the_other(cluster: Cluster) -> None:
    a, b = cluster.nodes
    token = mint_on_node(a)
    run(lambda: pub_sub(b, a, token, b"from a"), timeout=60)
    token = mint_on_node(b)
    run(lambda: pub_sub(a, b, token, b"from b"), timeout=60)


def test_a_rotation_is_seen_by_every_node_before_its_key_signs(cluster: Cluster) -> None:
    a, b = cluster.nodes

    def active(node: NodeProcess) -> str:
        return load_ring(node.data_dir / "auth", TENANT).signer(time.time()).kid

    first = active(a)
    deadline = time.monotonic() + INTERVAL + LEAD + 10
    while active(b) == first:
        assert time.monotonic() < deadline, f"no rotation reached n1:\n{b.log()[-3000:]}"
        time.sleep(0.2)
    # Minted from the database itself (as an operator would, from anywhere).
    perms = [arg for p in PERMS for arg in ("--perm", p)]
    token = cli("token", "mint", "--tenant", TENANT, "--sub", "svc", "--cluster", cluster.dsn,
                "--region-key", str(cluster.region_key), *perms)  # fmt: skip
    assert kid_of(token) != first
    run(lambda: pub_sub(a, b, token, b"rotated 1"), timeout=60)
    run(lambda: pub_sub(b, a, token, b"rotated 2"), timeout=60)

    # Both nodes run a rotator; the ring's row lock lets one act at a time, so their
    # rotations add up to the rings' keys after the first (none doubled, none lost), and
    # keys activate one interval apart.
    async def activations() -> dict[str, list[float]]:
        store = PostgresRingStore(cluster.dsn, kek=FileKeyEncryptionKey.load(cluster.region_key))
        try:
            rings = [await store.load(t) for t in (TENANT, "other")]
        finally:
            await store.close()
        return {r.tenant: [k.activate_at for k in r.schedule()] for r in rings}

    def rotations() -> float:
        return sum(n.metric("felix_key_rotations_total") for n in cluster.nodes)

    for _ in range(10):
        before = rotations()
        rings = run(activations)
        if rotations() == before:
            break
    assert before == sum(len(times) - 1 for times in rings.values()), (before, rings)
    for times in rings.values():
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= INTERVAL - 0.01 for gap in gaps[1:]), gaps


def test_a_token_signed_with_another_tenants_key_is_refused(cluster: Cluster) -> None:
    a, b = cluster.nodes
    other = load_ring(a.data_dir / "auth", "other")
    # The other tenant's own tokens are good (for its own streams) ...
    own = other.mint(
        time.time(),
        issuer=ISSUER,
        audience=AUDIENCE,
        sub="svc",
        perms=PermissionSet("other", ["stream.publish:stream:other/default/*"]),
    )

    async def publish_as_other() -> None:
        async with await connect(b, own, tenant="other") as client:
            assert await client.publish("orders", b"x") is not None

    run(publish_as_other, timeout=60)
    # ... but one naming acme, signed with other's key, verifies on no node.
    forged = other.signer(time.time()).mint(
        issuer=ISSUER,
        audience=AUDIENCE,
        sub="svc",
        perms=PermissionSet(TENANT, PERMS),
        now=time.time(),
        ttl=60,
    )

    async def refused(node: NodeProcess) -> None:
        with pytest.raises(felix.Unauthenticated):
            async with await connect(node, forged) as client:
                await client.publish("orders", b"x")

    for node in (a, b):
        run(lambda node=node: refused(node), timeout=60)  # type: ignore[misc]
