"""Issue #15, end to end: two nodes of different regions on loopback (each with its own
control plane and data dir, with --auth) refuse each other's tokens, resources and feed,
and audit every refusal.

The two regions share tenant acme *and its signing keys* (the ring is copied), so a
token of one region verifies at the other: only its region claim refuses it there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

import felix
from felix.errors import Unauthenticated
from tests.aio import run
from tests.nodeproc import NodeProcess

CLI = [sys.executable, "-m", "felix.cli"]
STREAM = "/v1/tenants/acme/namespaces/prod/streams"
PERMS = [
    "stream.publish:stream:acme/prod/orders",
    "stream.subscribe:stream:acme/prod/orders",
    "stream.manage:stream:acme/prod/*",
    "tenant.manage:tenant:acme",
]


def _felix(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, check=check, timeout=60)


def _mint(auth_dir: Path) -> str:
    """`felix token mint` from a key directory (no --region: the node's, if any)."""
    perms = [arg for perm in PERMS for arg in ("--perm", perm)]
    out = _felix(
        "token", "mint", "--tenant", "acme", "--dir", str(auth_dir), "--sub", "ann", *perms
    )
    return out.stdout.strip()


def _claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def _audit(path: Path, want: Any, timeout: float = 10) -> list[dict[str, Any]]:
    """The audit lines of ``path`` once ``want(lines)`` holds (or the last seen)."""
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        if want(lines):
            break
        time.sleep(0.2)
    return lines


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _setup(node: NodeProcess) -> str:
    """Tenant acme, namespace prod and stream orders on ``node``'s control plane (as its
    admin); its admin token."""
    admin = (node.data_dir / "admin-token").read_text().strip()
    for url, name in (
        ("/v1/tenants", "acme"),
        ("/v1/tenants/acme/namespaces", "prod"),
        (STREAM, "orders"),
    ):
        r = httpx.post(
            node.info["control"] + url, json={"name": name}, headers=_bearer(admin), timeout=10
        )
        assert r.status_code == 201, r.text
    return admin


async def _pub_sub(node: NodeProcess, token: str) -> None:
    """Publish to and subscribe from acme/prod/orders on ``node`` with ``token``."""
    async with await felix.connect(
        f"felix://{node.host}:{node.port}",
        ca=node.ca_file,
        tenant="acme",
        namespace="prod",
        token=token,
        connect_timeout=5,
    ) as client:
        first = await client.publish("orders", b"hello")
        assert first is not None
        async with client.subscribe("orders", start=first.offset) as sub:
            assert (await sub.next(timeout=5)).data == b"hello"


def test_two_regions_refuse_each_others_tokens_resources_and_feed(tmp_path: Path) -> None:
    eu_dir, us_dir = tmp_path / "eu", tmp_path / "us"
    eu_audit, us_audit = tmp_path / "eu-audit.log", tmp_path / "us-audit.log"
    eu = NodeProcess(
        eu_dir, "--auth", "--region", "eu-1", "--audit-log", str(eu_audit), gateways=1, shards=1
    )
    us = None
    try:
        us = NodeProcess(
            us_dir, "--auth", "--region", "us-1", "--audit-log", str(us_audit), gateways=1, shards=1
        )
        eu_admin = _setup(eu)
        us_admin = _setup(us)
        # Every resource records its home region, shown by the API and `felix tenant info`.
        r = httpx.get(f"{us.info['control']}{STREAM}/orders", headers=_bearer(us_admin))
        assert r.json()["spec"]["region"] == "us-1"
        info = _felix(
            "tenant", "info", "acme", "--url", eu.info["control"], f"--token={eu_admin}"
        ).stdout
        assert any(line.split() == ["region", "eu-1"] for line in info.splitlines())
        # Metrics name the region too.
        assert eu.metric("felix_node_info", region="eu-1") == 1
        assert us.metric("felix_node_info", region="us-1") == 1

        # One key ring for tenant acme in both regions: signatures verify everywhere.
        for data_dir in (eu_dir, us_dir):
            _felix("token", "keygen", "--tenant", "acme", "--dir", str(data_dir / "auth"))
        for name in ("acme.ring.json", "acme.jwks.json"):
            shutil.copy2(eu_dir / "auth" / name, us_dir / "auth" / name)
        # `felix token mint` reads the region from the node's data dir (node.json).
        eu_token, us_token = _mint(eu_dir / "auth"), _mint(us_dir / "auth")
        assert _claims(eu_token)["region"] == "eu-1" and _claims(us_token)["region"] == "us-1"
        # A key directory without a node beside it mints tokens without a region claim.
        bare = tmp_path / "bare" / "auth"
        shutil.copytree(eu_dir / "auth", bare)
        claimless = _mint(bare)
        assert "region" not in _claims(claimless)

        # Each region's own token publishes and subscribes there.
        run(lambda: _pub_sub(eu, eu_token))
        run(lambda: _pub_sub(us, us_token))

        # The gateway of us-1 refuses eu-1's token, for publishing and for subscribing,
        # and refuses a token without a region claim.
        url = f"felix://{us.host}:{us.port}"
        common = ["--url", url, "--ca", str(us.ca_file), "--tenant", "acme"]
        common += ["--namespace", "prod", "--timeout", "5"]
        pub = _felix("pub", "orders", "from-eu", *common, f"--token={eu_token}", check=False)
        sub = _felix("sub", "orders", "--count", "1", *common, f"--token={eu_token}", check=False)
        for refused in (pub, sub):
            assert refused.returncode == 1, refused
            assert "issued for region 'eu-1'; this node is region 'us-1'" in refused.stderr

        async def claimless_refused() -> None:
            with pytest.raises(Unauthenticated, match="no region claim: this node is region"):
                await _pub_sub(us, claimless)

        run(claimless_refused)

        # The control plane of us-1 refuses eu-1's token for management calls (and a
        # token without a claim), even though tenant and signature match.
        api = us.info["control"]
        calls = [
            ("GET", "/v1/tenants/acme", None),
            ("POST", STREAM, {"name": "from-eu"}),
            ("PATCH", f"{STREAM}/orders", {"replay_max_records": 10}),
            ("DELETE", f"{STREAM}/orders", None),
        ]
        for method, path, body in calls:
            r = httpx.request(method, api + path, json=body, headers=_bearer(eu_token))
            assert r.status_code == 401, r.text
            assert "issued for region 'eu-1'" in r.json()["detail"]
            r = httpx.request(method, api + path, json=body, headers=_bearer(claimless))
            assert r.status_code == 401 and "no region claim" in r.json()["detail"], r.text
        # The right region's token manages it (the refusals were about the region).
        r = httpx.get(api + f"{STREAM}/orders", headers=_bearer(us_token))
        assert r.status_code == 200, r.text
        # A resource for another region, or moved to one, is refused, even to the admin.
        r = httpx.post(
            api + STREAM, json={"name": "eu-data", "region": "eu-1"}, headers=_bearer(us_admin)
        )
        assert r.status_code == 400 and "'eu-1'" in r.text and "'us-1'" in r.text
        r = httpx.patch(
            api + f"{STREAM}/orders", json={"region": "eu-1"}, headers=_bearer(us_admin)
        )
        assert r.status_code == 400 and "cannot change" in r.text

        # Every refusal is audited on us-1: the gateway's, the API's, the resources'.
        def complete(lines: list[dict[str, Any]]) -> bool:
            gateway = [x for x in lines if x["action"] == "session.auth"]
            return len(gateway) >= 3 and any(x["action"] == "stream.update" for x in lines)

        lines = _audit(us_audit, complete)
        gateway = [x for x in lines if x["action"] == "session.auth"]
        assert all(x["result"] == "denied" and x["tenant"] == "acme" for x in gateway)
        assert sum("issued for region 'eu-1'" in x.get("detail", "") for x in gateway) >= 2
        assert any("no region claim" in x.get("detail", "") for x in gateway)
        api_refusals = [
            x for x in lines if x["event"] == "auth" and x["action"].startswith(("GET", "POST"))
        ]
        assert any("issued for region 'eu-1'" in x.get("detail", "") for x in api_refusals)
        assert {x["action"] for x in lines if x["event"] == "auth"} >= {
            "GET /v1/tenants/{tenant}",
            "POST /v1/tenants/{tenant}/namespaces/{ns}/streams",
            "PATCH /v1/tenants/{tenant}/namespaces/{ns}/streams/{stream}",
            "DELETE /v1/tenants/{tenant}/namespaces/{ns}/streams/{stream}",
        }
        changes = {(x["action"], x["result"]) for x in lines if x["event"] == "management"}
        assert {("stream.create", "failed"), ("stream.update", "failed")} <= changes
        text = us_audit.read_text()
        assert eu_token not in text and claimless not in text and us_admin not in text

        # A node of us-1 refuses to follow eu-1's control plane: it stops at start with
        # the reason (exit 2), and audits the refusal.
        follower_audit = tmp_path / "follower-audit.log"
        follower = subprocess.run(
            [
                *CLI,
                "up",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--gateways",
                "1",
                "--shards",
                "1",
                "--data-dir",
                str(tmp_path / "follower"),
                "--region",
                "us-1",
                "--control-url",
                eu.info["control"],
                f"--control-token={eu_admin}",
                "--audit-log",
                str(follower_audit),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert follower.returncode == 2, follower.stderr
        assert (
            f"refusing to follow the control plane at {eu.info['control']}: the control plane at"
        ) in follower.stderr
        assert "is region 'eu-1'; this node is region 'us-1'" in follower.stderr
        [line] = [x for x in _audit(follower_audit, bool) if x["action"] == "control.follow"]
        assert line["result"] == "denied" and line["reason"] == "wrong-region"
        assert eu_admin not in follower_audit.read_text()
    finally:
        if us is not None:
            assert us.stop() == 0
        assert eu.stop() == 0
