"""A running node follows its embedded control plane: create, publish, change, delete."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import felix
from tests.aio import run
from tests.nodeproc import NodeProcess, control_process

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the tests that define resources through its control plane, each
    under a tenant of its own."""
    n = NodeProcess(
        tmp_path_factory.mktemp("control") / "node", "--no-auto-create", "--control", "127.0.0.1:0"
    )
    yield n
    assert n.stop() == 0


def test_streams_and_caches_defined_through_the_api_reach_the_broker(node: NodeProcess) -> None:
    api = node.info["control"]
    assert api and api.startswith("http://127.0.0.1:")
    base = f"{api}/v1/tenants"

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.post(base, json={"name": "acme"})).status_code == 201
            r = await http.post(f"{base}/acme/namespaces", json={"name": "prod"})
            assert r.status_code == 201
            streams = f"{base}/acme/namespaces/prod/streams"
            r = await http.post(streams, json={"name": "orders", "replay_max_records": 5})
            assert r.status_code == 201, r.text
            url = f"felix://{node.host}:{node.port}"
            async with felix.connect(
                url, ca=node.ca_file, tenant="acme", namespace="prod"
            ) as client:
                # Not defined: refused, because the node runs without auto-create.
                with pytest.raises(felix.NotFound):
                    await client.publish("missing", b"x")
                for i in range(10):
                    await client.publish("orders", b"%d" % i)
                async with client.subscribe("orders", start="earliest") as sub:
                    first = await sub.next(timeout=5)
                    assert first.offset == 5  # the replay ring holds the stream's 5 records
                # A settings change reaches the running stream.
                r = await http.patch(f"{streams}/orders", json={"replay_max_records": 1000})
                assert r.status_code == 200, r.text
                await asyncio.sleep(0.5)
                for i in range(10, 30):
                    await client.publish("orders", b"%d" % i)
                async with client.subscribe("orders", start="earliest") as sub:
                    assert (await sub.next(timeout=5)).offset == 5
                # A cache defined with a small value limit enforces it.
                caches = f"{base}/acme/namespaces/prod/caches"
                r = await http.post(caches, json={"name": "sessions", "max_value_bytes": 16})
                assert r.status_code == 201, r.text
                await asyncio.sleep(0.5)
                sessions = client.cache("sessions")
                assert await sessions.set("k", b"small")
                with pytest.raises(felix.TooLarge):
                    await sessions.set("k", b"x" * 17)
                # Deleting the stream ends its subscribers and refuses new publishes.
                async with client.subscribe("orders") as sub:
                    r = await http.delete(f"{streams}/orders")
                    assert r.status_code in (200, 204), r.text
                    with pytest.raises(felix.NotFound):
                        await sub.next(timeout=5)
                with pytest.raises(felix.NotFound):
                    await client.publish("orders", b"gone")

    run(main, timeout=60)
    assert node.http("/readyz")[0] == 200


def _wait_for(check: Callable[[], object], timeout: float = 15) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_queue_groups_defined_through_the_api_reach_the_stream_shard(
    node: NodeProcess,
) -> None:
    """A group goes to its stream's shard: listed under "groups" in the node's stream
    status with the control plane's settings, changed by an update, gone after delete
    (and with its stream, on a cascade)."""
    streams = f"{node.info['control']}/v1/tenants/globex/namespaces/prod/streams"
    groups = f"{streams}/orders/groups"
    status_path = "/streams/globex/prod/orders"

    def node_groups() -> dict[str, object] | None:
        status, body = node.http(status_path)
        if status != 200:
            return None
        found: dict[str, object] = json.loads(body).get("groups", {})
        return found

    with httpx.Client(timeout=10) as http:
        base = f"{node.info['control']}/v1/tenants"
        assert http.post(base, json={"name": "globex"}).status_code == 201
        assert http.post(f"{base}/globex/namespaces", json={"name": "prod"}).status_code == 201
        r = http.post(streams, json={"name": "orders", "durable": True})
        assert r.status_code == 201, r.text
        r = http.post(groups, json={"name": "workers", "lease_ms": 2000, "backoff_ms": [5]})
        assert r.status_code == 201, r.text
        spec = r.json()["spec"]
        assert _wait_for(lambda: "workers" in (node_groups() or {})), node.log()
        # Defined, not opened yet (no consumer came): the settings only.
        assert node_groups() == {"workers": {"open": False, "settings": spec}}

        r = http.patch(f"{groups}/workers", json={"max_deliveries": 9})
        assert r.status_code == 200, r.text
        assert _wait_for(
            lambda: (
                (node_groups() or {}).get("workers")
                == {"open": False, "settings": r.json()["spec"]}
            )
        )
        r = http.post(groups, json={"name": "audit", "start": "latest"})
        assert r.status_code == 201, r.text
        assert _wait_for(lambda: set(node_groups() or {}) == {"workers", "audit"})

        assert http.delete(f"{groups}/workers").status_code == 200
        assert _wait_for(lambda: set(node_groups() or {}) == {"audit"})
        r = http.delete(f"{streams}/orders", params={"cascade": "true"})
        assert r.status_code == 200, r.text
        assert _wait_for(lambda: node.http(status_path)[0] == 404)
    assert node.http("/readyz")[0] == 200
    assert "cannot apply" not in node.log()


def test_node_follows_a_separate_control_plane(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'control.db'}"
    with control_process(tmp_path / "control.log", "--store", store) as api:
        base = f"{api}/v1/tenants"
        assert httpx.post(base, json={"name": "acme"}).status_code == 201
        assert httpx.post(f"{base}/acme/namespaces", json={"name": "prod"}).status_code == 201
        node = NodeProcess(tmp_path / "node", "--no-auto-create", "--control-url", api)
        try:
            assert node.info["control"] == api
            r = httpx.post(f"{base}/acme/namespaces/prod/streams", json={"name": "events"})
            assert r.status_code == 201

            async def main() -> None:
                url = f"felix://{node.host}:{node.port}"
                async with felix.connect(
                    url, ca=node.ca_file, tenant="acme", namespace="prod"
                ) as client:
                    for _ in range(50):  # the follower long-polls: the stream appears promptly
                        try:
                            ack = await client.publish("events", b"hello")
                            break
                        except felix.NotFound:
                            await asyncio.sleep(0.1)
                    assert ack is not None and ack.offset == 0

            run(main, timeout=30)
        finally:
            node.stop()


def test_node_with_auth_serves_token_holders_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    auth_dir = tmp_path / "node" / "auth"

    def felix_cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    felix_cli("token", "keygen", "--tenant", "acme", "--dir", str(auth_dir))
    tok = felix_cli(
        "token",
        "mint",
        "--tenant",
        "acme",
        "--sub",
        "svc",
        "--dir",
        str(auth_dir),
        "--perm",
        "stream.publish:stream:acme/default/*",
        "--perm",
        "stream.subscribe:stream:acme/default/*",
    )
    node = NodeProcess(tmp_path / "node", "--auth")
    try:
        url = f"felix://{node.host}:{node.port}"

        async def main() -> None:
            async with felix.connect(url, ca=node.ca_file, tenant="acme", token=tok) as client:
                async with client.subscribe("orders", start="earliest") as sub:
                    ack = await client.publish("orders", b"hi")
                    assert ack is not None and ack.offset == 0
                    assert (await sub.next(timeout=5)).data == b"hi"
                with pytest.raises(felix.PermissionDenied):
                    await client.cache("c").get("k")
            with pytest.raises(felix.FelixError):
                anonymous = await felix.connect(
                    url, ca=node.ca_file, tenant="acme", connect_timeout=3
                )
                await anonymous.publish("orders", b"x")

        run(main, timeout=30)
    finally:
        node.stop()


def test_auth_creates_an_admin_token_the_control_api_requires(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", "--auth", gateways=1, shards=1)
    try:
        token_file = tmp_path / "node" / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 40
        api = node.info["control"]
        assert api and api.startswith("http://127.0.0.1:")
        base = f"{api}/v1/tenants"
        with httpx.Client(timeout=10) as http:
            r = http.post(base, json={"name": "acme"})
            assert r.status_code == 401, r.text
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert http.get(f"{api}/v1/system/health").status_code == 200
            r = http.post(base, json={"name": "acme"}, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 201, r.text
        # The health port's per-tenant routes want that token too; probes and metrics not.
        for path in ("/streams/acme/prod/orders", "/caches/acme/prod/sessions"):
            for wrong in (None, token + "x", "x"):
                status, body = node.http(path, token=wrong)
                assert status == 401 and "admin token is required" in body, (path, wrong)
            assert node.http(path)[0] == 404  # with the admin token: held by no shard yet
        for path in ("/livez", "/readyz", "/metrics", "/status"):
            assert node.http(path, token=None)[0] == 200, path
    finally:
        node.stop()
    # A restart reuses the token.
    node = NodeProcess(tmp_path / "node", "--auth", gateways=1, shards=1)
    try:
        assert token_file.read_text().strip() == token
    finally:
        node.stop()


def test_embedded_shards_get_the_definitions_stored_before_the_node_started(
    tmp_path: Path,
) -> None:
    """Review finding 6: with --embedded-shards the seed went to gateway-0 before it ran."""
    from felix.control.model import ResourceKind
    from felix.control.stores import open_store

    data_dir = tmp_path / "node"
    data_dir.mkdir()

    async def define() -> None:
        store = open_store(f"sqlite:///{data_dir / 'control.db'}")
        await store.open()
        await store.create(ResourceKind.TENANT, ("acme",), {})
        await store.create(ResourceKind.NAMESPACE, ("acme", "prod"), {})
        await store.create(
            ResourceKind.STREAM, ("acme", "prod", "orders"), {"replay_max_records": 5}
        )
        await store.close()

    run(define)
    n = NodeProcess(data_dir, "--embedded-shards", "--no-auto-create", gateways=1, shards=2)
    try:

        async def main() -> None:
            url = f"felix://{n.host}:{n.port}"
            async with felix.connect(url, ca=n.ca_file, tenant="acme", namespace="prod") as client:
                # Defined, though the node creates nothing on a first write.
                deadline = asyncio.get_running_loop().time() + 10
                while True:
                    try:
                        await client.publish("orders", b"0")
                        break
                    except felix.NotFound:
                        if asyncio.get_running_loop().time() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                for i in range(1, 10):
                    await client.publish("orders", b"%d" % i)
                async with client.subscribe("orders", start="earliest") as sub:
                    assert (await sub.next(timeout=5)).offset == 5  # replay_max_records

        run(main, timeout=40)
    finally:
        assert n.stop() == 0
