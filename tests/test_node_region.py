"""`felix up --region`: the node and its embedded control plane belong to one region
(issue #15, first slice)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.errors import BadRequest, ConfigError, Unauthenticated
from felix.gateway.auth import TokenAuthenticator
from felix.node.config import NodeConfig
from tests.nodeproc import NodeProcess


def test_the_region_is_shown_and_resources_may_name_only_it(tmp_path: Path) -> None:
    n = NodeProcess(tmp_path / "node", "--region", "eu-1", gateways=1, shards=1)
    try:
        assert n.info["region"] == "eu-1"
        api = httpx.Client(base_url=n.info["control"], timeout=10)
        assert api.get("/v1/system/info").json()["region"] == "eu-1"
        assert [r["name"] for r in api.get("/v1/regions").json()["regions"]] == ["eu-1"]
        streams = "/v1/tenants/acme/namespaces/prod/streams"
        assert api.post("/v1/tenants", json={"name": "acme"}).status_code == 201
        assert api.post("/v1/tenants/acme/namespaces", json={"name": "prod"}).status_code == 201
        refused = api.post(streams, json={"name": "s", "region": "us-east"})
        assert refused.status_code == 400 and "eu-1" in refused.text
        assert api.post(streams, json={"name": "s", "region": "eu-1"}).status_code == 201
        api.close()
    finally:
        assert n.stop() == 0


def test_a_region_must_be_a_name() -> None:
    with pytest.raises(ConfigError, match="--region"):
        NodeConfig(gateways=1, shards=1, region="eu west")
    assert NodeConfig(gateways=1, shards=1).region == "local"


# -- tokens carry the region they were issued for ------------------------------------------

ISS = AUD = "felix"
RING = TenantKeyRing.create("acme", time.time())


def _token(region: str | None) -> str:
    return RING.mint(
        time.time(),
        issuer=ISS,
        audience=AUD,
        sub="alice",
        perms=PermissionSet("acme", ["stream.publish:stream:acme/prod/*"]),
        region=region,
    )


def _authenticator(region: str | None) -> TokenAuthenticator:
    return TokenAuthenticator(
        lambda tenant, now: RING.jwks(time.time()) if tenant == "acme" else None,
        issuer=ISS,
        audience=AUD,
        region=region,
    )


def test_a_node_refuses_a_token_issued_for_another_region() -> None:
    eu = _authenticator("eu-1")
    assert eu.authenticate(_token("eu-1"), "acme").tenant == "acme"
    with pytest.raises(Unauthenticated, match="issued for region 'us-1'; this node is region"):
        eu.authenticate(_token("us-1"), "acme")
    # A token without the claim (minted before regions, or by a tool that sets none):
    # refused where the region is set, taken by the loopback dev region.
    with pytest.raises(Unauthenticated, match="no region claim: this node is region 'eu-1'"):
        eu.authenticate(_token(None), "acme")
    assert _authenticator("local").authenticate(_token(None), "acme").tenant == "acme"
    with pytest.raises(Unauthenticated, match="issued for region 'eu-1'"):
        _authenticator("local").authenticate(_token("eu-1"), "acme")
    # A node without a region setting takes any.
    assert _authenticator(None).authenticate(_token("us-1"), "acme").tenant == "acme"


def test_the_region_claim_is_checked_as_a_name() -> None:
    with pytest.raises(BadRequest):
        _token("not a region")
    claims = jwt.decode(_token("eu-1"), options={"verify_signature": False})
    assert claims["region"] == "eu-1"
    assert "region" not in jwt.decode(_token(None), options={"verify_signature": False})


def test_a_node_with_auth_refuses_a_token_of_another_region_end_to_end(tmp_path: Path) -> None:
    import subprocess
    import sys

    import felix
    from tests.aio import run

    data_dir = tmp_path / "node"
    n = NodeProcess(data_dir, "--auth", "--region", "eu-1", gateways=1, shards=1)
    try:
        admin = (data_dir / "admin-token").read_text().strip()
        r = httpx.post(
            f"{n.info['control']}/v1/tenants",
            json={"name": "acme"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=10,
        )
        assert r.status_code == 201, r.text

        token_cli = [sys.executable, "-m", "felix.cli", "token"]
        keys = ["--tenant", "acme", "--dir", str(data_dir / "auth")]
        perm = ["--perm", "cache.read:cache:acme/default/c"]
        subprocess.run([*token_cli, "keygen", *keys], capture_output=True, check=True)

        def mint(region: str) -> str:
            out = subprocess.run(
                [*token_cli, "mint", *keys, "--sub", "alice", "--region", region, *perm],
                capture_output=True,
                text=True,
                check=True,
            )
            return out.stdout.strip()

        url = f"felix://{n.host}:{n.port}"

        async def main() -> None:
            with pytest.raises(Unauthenticated, match="issued for region 'us-1'"):
                await felix.connect(
                    url, ca=n.ca_file, tenant="acme", token=mint("us-1"), connect_timeout=5
                )
            client = await felix.connect(
                url, ca=n.ca_file, tenant="acme", token=mint("eu-1"), connect_timeout=5
            )
            await client.close()

        run(main)
    finally:
        assert n.stop() == 0


# -- issue #15: --region beyond loopback, metrics, home regions, feeds ---------------------


def test_beyond_loopback_a_node_names_its_region() -> None:
    for where in ({"listen": ("0.0.0.0", 5000)}, {"control": ("10.0.0.7", 8443)}):
        with pytest.raises(ConfigError, match="--region is required beyond loopback"):
            NodeConfig(gateways=1, shards=1, auth=True, **where)  # type: ignore[arg-type]
        # 'local' is the loopback dev default, never a region beyond loopback.
        with pytest.raises(ConfigError, match="--region"):
            NodeConfig(gateways=1, shards=1, auth=True, region="local", **where)  # type: ignore[arg-type]
        assert NodeConfig(gateways=1, shards=1, auth=True, region="eu-1", **where).region == "eu-1"  # type: ignore[arg-type]
    # Following a remote control plane, the node serves no control API: only --listen counts.
    config = NodeConfig(
        gateways=1, shards=1, auth=True, control=("0.0.0.0", 0), control_url="http://c:1"
    )
    assert config.region == "local"


def test_felix_control_names_its_region_beyond_loopback(tmp_path: Path) -> None:
    from felix.cli import main

    argv = ["control", "--listen", "0.0.0.0:0", "--auth", "--store", "memory://"]
    argv += ["--admin-token-file", str(tmp_path / "admin-token")]
    with pytest.raises(ConfigError, match="--region is required beyond loopback"):
        _control_region_of(argv)
    with pytest.raises(ConfigError, match="--region"):
        _control_region_of([*argv, "--region", "local"])
    with pytest.raises(ConfigError, match="--region"):
        _control_region_of([*argv, "--region", "eu west"])
    assert _control_region_of([*argv, "--region", "eu-1"]) == "eu-1"
    assert _control_region_of(["control"]) == "local"  # loopback: the dev default
    assert main(argv) == 2  # felix control stops with the error


def _control_region_of(argv: list[str]) -> str:
    from felix.cli import _control_region, build_parser
    from felix.node.config import parse_address

    args = build_parser().parse_args(argv)
    return _control_region(args.region, parse_address(args.listen, 8443)[0])


def test_the_region_env_variable_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from felix.cli import build_parser

    monkeypatch.setenv("FELIX_REGION", "ap-2")
    assert build_parser().parse_args(["up"]).region == "ap-2"
    assert build_parser().parse_args(["up", "--region", "eu-1"]).region == "eu-1"


def test_felix_node_info_gauge_names_the_region() -> None:
    from prometheus_client import generate_latest

    from felix.node.health import HealthServer

    class Node:
        children: list[Any] = []

        def readiness(self) -> tuple[bool, list[str]]:
            return True, []

        def supervisor_counters(self) -> list[tuple[str, str, int]]:
            return []

        async def stream_status(self, key: str) -> None:
            return None

        async def cache_status(self, key: str) -> None:
            return None

        started = True

        def node_status(self) -> dict[str, Any]:
            return {}

        def cluster_status(self) -> None:
            return None

        def cluster_metrics(self) -> None:
            return None

    server = HealthServer(Node(), info={"region": "eu-1", "version": "9.9"})
    text = generate_latest(server._registry).decode()
    assert 'felix_node_info{region="eu-1",version="9.9"} 1.0' in text


def test_token_mint_defaults_to_the_nodes_region(tmp_path: Path) -> None:
    from felix.auth.cli import node_region
    from felix.cli import main

    data = tmp_path / "data"
    keys = ["--tenant", "acme", "--dir", str(data / "auth")]
    assert main(["token", "keygen", *keys]) == 0
    perm = ["--sub", "alice", "--perm", "cache.read:cache:acme/default/c"]

    def claims(*extra: str) -> dict[str, Any]:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["token", "mint", *keys, *perm, *extra]) == 0
        decoded: dict[str, Any] = jwt.decode(
            out.getvalue().strip(), options={"verify_signature": False}
        )
        return decoded

    assert "region" not in claims()  # no node.json beside the keys: no claim
    (data / "node.json").write_text('{"region": "eu-1"}')
    assert node_region(data) == "eu-1"
    assert claims()["region"] == "eu-1"
    assert claims("--region", "us-1")["region"] == "us-1"  # an explicit one wins
    for garbage in ("not json", '{"region": "../x"}', "[1]", '{"region": 7}'):
        (data / "node.json").write_text(garbage)
        assert node_region(data) is None


def test_resources_record_their_home_region_and_keep_it() -> None:
    from felix.control.model import ResourceKind, with_region
    from felix.control.stores.memory import MemoryStore
    from felix.errors import WrongRegion
    from tests.aio import run

    async def main() -> None:
        store = MemoryStore()
        await store.open()
        old = await store.create(ResourceKind.TENANT, ("acme",), {})  # stored before regions
        assert old.spec["region"] is None
        assert with_region(old, "eu-1").spec["region"] == "eu-1"  # read as the holder's
        await store.update(ResourceKind.TENANT, ("acme",), {"region": "eu-1"})
        # The store holds the line too: a recorded region never changes.
        for other in ("us-1", None):
            with pytest.raises(WrongRegion, match="cannot change"):
                await store.update(ResourceKind.TENANT, ("acme",), {"region": other})
        res = await store.update(ResourceKind.TENANT, ("acme",), {"description": "x"})
        assert res.spec["region"] == "eu-1"

    run(main)


def test_every_regional_kind_is_filled_checked_and_shown_by_the_api() -> None:
    from tests.test_control_api import CACHES, NS, STREAMS, T, assert_problem, seed, with_api

    async def test(http: httpx.AsyncClient, store: Any) -> None:
        await seed(http)
        for url in (f"{T}/acme", f"{NS}/prod", f"{STREAMS}/orders", f"{CACHES}/sessions"):
            assert (await http.get(url)).json()["spec"]["region"] == "eu-1"
            listed = (await http.get(url.rsplit("/", 1)[0])).json()["items"]
            assert {item["spec"]["region"] for item in listed} == {"eu-1"}
            for value in ("us-1", None):
                body = assert_problem(await http.patch(url, json={"region": value}), 400)
                assert "'eu-1'" in body["detail"]
        for url in (T, NS, STREAMS, CACHES):
            body = assert_problem(await http.post(url, json={"name": "x", "region": "us-1"}), 400)
            assert "'us-1'" in body["detail"] and "'eu-1'" in body["detail"]
        # The feed shows the region too (what a following node checks).
        snapshot = (await http.get("/v1/snapshot")).json()["resources"]
        assert {r["spec"]["region"] for r in snapshot if r["kind"] != "binding"} >= {"eu-1"}

    with_api(test, region="eu-1")


def test_a_follower_refuses_a_feed_of_another_region(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from felix.control.model import ResourceKind
    from felix.control.stores.memory import MemoryStore
    from felix.errors import WrongRegion
    from felix.node import control
    from felix.node.control import ControlFollower, StoreFeed
    from tests.aio import run

    monkeypatch.setattr(control, "REFUSED_RETRY", 0.05)
    lines: list[str] = []
    monkeypatch.setattr(
        "felix.audit.emit", lambda event, **kw: lines.append(f"{event} {kw['detail']}")
    )

    class Remote(StoreFeed):
        remote = "us-1"

        async def region(self) -> str | None:
            return self.remote

    async def main() -> None:
        store = MemoryStore()
        await store.open()
        await store.create(ResourceKind.TENANT, ("acme",), {"region": "eu-1"})
        await store.create(ResourceKind.NAMESPACE, ("acme", "prod"), {"region": "eu-1"})
        source = Remote(store)
        sent: list[Any] = []
        follower = ControlFollower(source, 1, sent.append, region="eu-1", describe="cp")
        with pytest.raises(WrongRegion, match="cp is region 'us-1'; this node is region 'eu-1'"):
            await follower.seed()
        assert sent == []  # nothing of it applied
        task = asyncio.create_task(follower.run())
        await asyncio.wait_for(follower.refusal.wait(), 5)
        assert not follower.seeded.is_set() and "us-1" in (follower.refused or "")
        assert lines and lines[0].startswith("auth ") and len(lines) == 1  # once per reason
        # The control plane's region matches again: the follower takes the feed up.
        source.remote = "eu-1"
        await asyncio.wait_for(follower.seeded.wait(), 5)
        assert follower.refused is None and not follower.refusal.is_set()
        # A change recording another region stops it (not applied), and so on.
        applied = follower.applied
        await store.create(ResourceKind.STREAM, ("acme", "prod", "s"), {"region": "us-1"})
        await asyncio.wait_for(follower.refusal.wait(), 5)
        assert "stream acme/prod/s of region 'us-1'" in (follower.refused or "")
        assert follower.applied == applied and ("stream", ("acme", "prod", "s")) not in {
            (k.value, p) for k, p in follower.resources
        }
        task.cancel()

    run(main)


def test_a_data_dir_keeps_the_region_its_resources_were_created_in(tmp_path: Path) -> None:
    """The embedded control plane's store records each resource's region: the node
    restarted with another --region on the same data dir refuses to follow it (exit 2)."""
    import subprocess
    import sys

    data_dir = tmp_path / "node"
    n = NodeProcess(data_dir, "--region", "eu-1", gateways=1, shards=1)
    try:
        api = httpx.Client(base_url=n.info["control"], timeout=10)
        tenant = api.get("/v1/tenants/default").json()
        assert tenant["spec"]["region"] == "eu-1"  # the default tenant is the node's too
        api.close()
    finally:
        assert n.stop() == 0
    argv = ["up", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--control"]
    argv += ["127.0.0.1:0", "--gateways", "1", "--shards", "1", "--data-dir", str(data_dir)]
    moved = subprocess.run(
        [sys.executable, "-m", "felix.cli", *argv, "--region", "us-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert moved.returncode == 2, moved.stderr
    assert "refusing to follow the embedded control plane" in moved.stderr
    assert "of region 'eu-1'; this node is region 'us-1'" in moved.stderr
    # Back in its own region, the node starts as before.
    n = NodeProcess(data_dir, "--region", "eu-1", gateways=1, shards=1)
    assert n.stop() == 0
