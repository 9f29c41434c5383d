"""JWKS through the control plane: the sync core, its runner, the fetcher, end to end."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import felix
from felix.auth.files import (
    AUDIENCE,
    ISSUER,
    JwksDirectory,
    load_ring,
    remove_jwks,
    save_jwks,
    save_ring,
)
from felix.auth.keys import TenantKeyRing
from felix.auth.perms import PermissionSet
from felix.auth.tokens import verify_felix_token
from felix.control.api import create_app
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.errors import BadRequest
from felix.gateway.auth import TokenAuthenticator
from felix.node.control import ControlFollower, StoreFeed
from felix.node.jwks_sync import (
    Action,
    Fetched,
    HttpJwksFetcher,
    JwksSync,
    Outcome,
    SyncSchedule,
)
from tests.aio import run
from tests.nodeproc import NodeProcess, control_process

PERIOD = 30.0
PERMS = PermissionSet("acme", ["stream.publish:stream:acme/default/*"])


def ring(tenant: str = "acme") -> TenantKeyRing:
    return TenantKeyRing.create(tenant, time.time())


# -- the sans-IO core -----------------------------------------------------------------------


def schedule(**kw: Any) -> SyncSchedule:
    return SyncSchedule(period=PERIOD, rng=random.Random(7), **kw)


def test_new_tenants_are_due_at_once_then_every_period_jittered() -> None:
    s = schedule()
    assert s.next_due() is None and s.due(0.0) == []
    s.set_tenants(["b", "a"], now=100.0)
    assert s.tenants == {"a", "b"} and s.seeded
    assert s.next_due() == 100.0
    assert s.due(100.0) == ["a", "b"]
    # In flight: not due again until answered.
    assert s.due(1000.0) == [] and s.next_due() is None
    assert s.result("a", Fetched.ok({"keys": []}), 101.0) is Action.WRITE
    assert s.result("b", Fetched.gone(), 101.0) is Action.REMOVE
    when = s.next_due()
    assert when is not None and 101.0 + 0.8 * PERIOD <= when <= 101.0 + PERIOD
    assert s.due(101.0 + 0.8 * PERIOD - 0.001) == []
    assert s.due(101.0 + PERIOD) == ["a", "b"]  # never later than the period
    # A tenant added later is due at once, the others keep their time.
    s2 = schedule()
    s2.set_tenants(["a"], 0.0)
    s2.due(0.0)
    s2.result("a", Fetched.ok({"keys": []}), 0.0)
    s2.set_tenants(["a", "c"], 5.0)
    assert s2.due(5.0) == ["c"]


def test_failures_keep_the_file_and_back_off_up_to_the_period() -> None:
    s = schedule()
    s.set_tenants(["acme"], 0.0)
    now = 0.0
    delays = []
    for _ in range(8):
        assert s.due(now) == ["acme"]
        assert s.result("acme", Fetched.failed("unreachable"), now) is Action.KEEP
        when = s.next_due()
        assert when is not None
        delays.append(when - now)
        now = when
    assert s.failures("acme") == 8
    expected = [1, 2, 4, 8, 16, 30, 30, 30]
    for delay, top in zip(delays, expected, strict=True):
        assert 0.8 * top <= delay <= top
    # Success resets the backoff.
    s.due(now)
    assert s.result("acme", Fetched.ok({"keys": []}), now) is Action.WRITE
    assert s.failures("acme") == 0


def test_tenants_that_leave_are_removed_and_late_answers_ignored() -> None:
    s = schedule()
    s.set_tenants(["acme", "gone"], 0.0)
    assert s.due(0.0) == ["acme", "gone"]
    s.set_tenants(["acme"], 1.0)
    assert s.take_removed() == ["gone"]
    assert s.take_removed() == []
    # The fetch that was in flight answers after the tenant left: nothing to write.
    assert s.result("gone", Fetched.ok({"keys": []}), 2.0) is Action.IGNORE
    # Back again before its removal was taken: not removed, due at once.
    s.set_tenants(["acme", "x"], 3.0)
    s.set_tenants(["acme"], 3.0)
    s.set_tenants(["acme", "x"], 3.0)
    assert s.take_removed() == []
    assert "x" in s.due(3.0)


def test_tenants_are_bounded_and_checked() -> None:
    s = schedule(max_tenants=2)
    s.set_tenants(["c", "a", "b", "../etc", "Bad Name"], 0.0)
    assert s.tenants == {"a", "b"} and s.truncated
    s.set_tenants(["a"], 0.0)
    assert not s.truncated


# -- the runner over a directory ------------------------------------------------------------


class FakeControl:
    """What the control plane answers per tenant (default: no such tenant)."""

    def __init__(self) -> None:
        self.answers: dict[str, Fetched] = {}
        self.calls: list[str] = []

    async def fetch(self, tenant: str) -> Fetched:
        self.calls.append(tenant)
        return self.answers.get(tenant, Fetched.gone())


def test_sync_writes_keeps_and_removes_the_files(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    acme = ring()
    other = ring("other")
    # Left from an earlier run: a tenant the control plane no longer has.
    save_jwks(keys, "stale", other.jwks(time.time()))
    # A tenant with a local ring (felix token keygen --dir DATA_DIR/auth): left alone.
    local = ring("local")
    save_ring(keys, local, time.time())

    async def main() -> None:
        control = FakeControl()
        control.answers["acme"] = Fetched.ok(acme.jwks(time.time()))
        control.answers["local"] = Fetched.ok(other.jwks(time.time()))
        now = [0.0]
        sync = JwksSync(keys, control.fetch, period=PERIOD, clock=lambda: now[0])
        sync.set_tenants({"acme", "local", "old"})
        await sync.step()
        path = keys / "acme.jwks.json"
        assert json.loads(path.read_text()) == acme.jwks(time.time())
        assert path.stat().st_mode & 0o777 == 0o644
        assert not (keys / "stale.jwks.json").exists()
        assert not (keys / "old.jwks.json").exists()
        assert json.loads((keys / "local.jwks.json").read_text()) == local.jwks(time.time())
        assert sorted(control.calls) == ["acme", "local", "old"]

        # The gateway's view accepts it and verifies a token signed by the ring.
        view = JwksDirectory(keys, recheck=0)
        auth = TokenAuthenticator(view.jwks, issuer=ISSUER, audience=AUDIENCE)
        token = acme.mint(time.time(), issuer=ISSUER, audience=AUDIENCE, sub="svc", perms=PERMS)
        assert auth.authenticate(token, "acme").tenant == "acme"

        # Nothing due before the period; an unchanged set is not rewritten.
        control.calls.clear()
        await sync.step()
        assert control.calls == []
        inode = path.stat().st_ino
        now[0] = PERIOD
        await sync.step()
        assert "acme" in control.calls and path.stat().st_ino == inode

        # The control plane is unreachable: the last set stays.
        control.answers["acme"] = Fetched.failed("connection refused")
        now[0] = 2 * PERIOD
        await sync.step()
        assert json.loads(path.read_text()) == acme.jwks(time.time())
        assert sync.schedule.failures("acme") == 1
        # A rotation reaches the file at the next (retry) fetch.
        acme.rotate(time.time())
        control.answers["acme"] = Fetched.ok(acme.jwks(time.time()))
        now[0] = 3 * PERIOD
        await sync.step()
        assert len(json.loads(path.read_text())["keys"]) == 2
        # 404: removed.
        control.answers["acme"] = Fetched.gone()
        now[0] = 4 * PERIOD
        await sync.step()
        assert not path.exists()
        assert view.jwks("acme", time.monotonic()) is None

    run(main)


def test_sync_removes_a_tenant_that_leaves_the_feed(tmp_path: Path) -> None:
    keys = tmp_path / "auth"

    async def main() -> None:
        control = FakeControl()
        acme = ring()
        control.answers["acme"] = Fetched.ok(acme.jwks(time.time()))
        control.answers["beta"] = Fetched.ok(ring("beta").jwks(time.time()))
        sync = JwksSync(keys, control.fetch, period=PERIOD)
        task = asyncio.create_task(sync.run())
        sync.set_tenants({"acme", "beta"})
        await asyncio.wait_for(sync.synced.wait(), 5)
        assert (keys / "beta.jwks.json").exists()
        sync.set_tenants({"acme"})  # run() wakes at once, not after the period
        async with asyncio.timeout(5):
            while (keys / "beta.jwks.json").exists():
                await asyncio.sleep(0.01)
        # And a new tenant is fetched promptly.
        control.answers["gamma"] = Fetched.ok(ring("gamma").jwks(time.time()))
        sync.set_tenants({"acme", "gamma"})
        async with asyncio.timeout(5):
            while not (keys / "gamma.jwks.json").exists():
                await asyncio.sleep(0.01)
        assert (keys / "acme.jwks.json").exists()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)


def test_save_jwks_refuses_what_the_gateways_would_not_read(tmp_path: Path) -> None:
    with pytest.raises(BadRequest):
        save_jwks(tmp_path, "acme", {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]})
    with pytest.raises(BadRequest):
        save_jwks(tmp_path, "../x", {"keys": []})
    assert not list(tmp_path.iterdir())
    assert save_jwks(tmp_path, "acme", {"keys": []})
    assert not save_jwks(tmp_path, "acme", {"keys": []})  # unchanged: not rewritten
    assert remove_jwks(tmp_path, "acme") and not remove_jwks(tmp_path, "acme")


# -- the fetcher, against the real API -------------------------------------------------------


def test_fetcher_against_the_control_api(tmp_path: Path) -> None:
    keys = tmp_path / "auth"
    acme = ring()
    save_ring(keys, acme, time.time())

    async def main() -> None:
        store = MemoryStore()
        await store.open()
        for tenant in ("acme", "nokeys"):
            await store.create(ResourceKind.TENANT, (tenant,), {})
        app = create_app(store, keys_dir=keys, admin_token="admin", require_auth=True)
        fetch = HttpJwksFetcher(
            "http://control", token="admin", transport=httpx.ASGITransport(app=app)
        )
        try:
            got = await fetch("acme")
            assert got.outcome is Outcome.OK and got.jwks == acme.jwks(time.time())
            assert (await fetch("missing")).outcome is Outcome.GONE  # 404
            nokeys = await fetch("nokeys")  # 503: no ring yet
            assert nokeys.outcome is Outcome.FAILED and "503" in nokeys.problem
        finally:
            await fetch.aclose()
            await store.close()

        def answer(body: bytes, status: int = 200) -> HttpJwksFetcher:
            return HttpJwksFetcher(
                "http://control",
                transport=httpx.MockTransport(lambda _: httpx.Response(status, content=body)),
            )

        private = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA", "kid": "k"}]}
        for body in (b"[]", b"not json", json.dumps(private).encode(), b"x" * (2 << 20)):
            fetcher = answer(body)
            assert (await fetcher("acme")).outcome is Outcome.FAILED
            await fetcher.aclose()

        def refuse(_: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused")

        down = HttpJwksFetcher("http://control", transport=httpx.MockTransport(refuse))
        result = await down("acme")
        assert result.outcome is Outcome.FAILED and "refused" in result.problem
        await down.aclose()

    run(main)


# -- the follower reports the tenants -------------------------------------------------------


def test_follower_reports_tenants_from_the_snapshot_and_the_feed() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.open()
        await store.create(ResourceKind.TENANT, ("acme",), {})
        await store.create(ResourceKind.NAMESPACE, ("acme", "prod"), {})
        seen: list[frozenset[str]] = []
        follower = ControlFollower(StoreFeed(store), 1, lambda m: None, on_tenants=seen.append)
        task = asyncio.create_task(follower.run())
        await follower.seeded.wait()
        assert seen == [{"acme"}]
        await store.create(ResourceKind.TENANT, ("beta",), {})
        await store.update(ResourceKind.TENANT, ("beta",), {})
        await store.create(ResourceKind.NAMESPACE, ("beta", "x"), {})
        await store.delete(ResourceKind.TENANT, ("acme",), cascade=True)
        async with asyncio.timeout(5):
            while seen[-1] != {"beta"}:
                await asyncio.sleep(0.01)
        assert seen == [{"acme"}, {"acme", "beta"}, {"beta"}]  # only real changes
        task.cancel()
        await store.close()

    run(main)


# -- end to end: felix control + felix up --control-url, own data dirs -----------------------


def _felix(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _kid(token: str) -> str:
    header = token.split(".")[0]
    kid: str = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]
    return kid


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """``felix control --auth`` with its own data dir, rotating every 10 s (8 s ahead)."""
    data = tmp_path / "control"
    data.mkdir()
    with control_process(
        tmp_path / "control.log",
        "--auth",
        "--store",
        f"sqlite:///{data / 'control.db'}",
        "--keys-dir",
        str(data / "auth"),
        "--admin-token-file",
        str(data / "admin-token"),
        "--key-rotation-interval",
        "10",
        "--key-publish-lead",
        "8",
    ) as api:
        yield api, data, (data / "admin-token").read_text().strip()


@pytest.mark.timeout(120)
def test_node_verifies_tokens_with_keys_from_the_control_plane_across_rotations(
    tmp_path: Path, control: tuple[str, Path, str]
) -> None:
    api, data, admin = control
    ctl_keys = data / "auth"
    headers = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=api, headers=headers, timeout=10) as http:
        for tenant in ("acme", "gone"):
            assert http.post("/v1/tenants", json={"name": tenant}).status_code == 201
            r = http.post(f"/v1/tenants/{tenant}/namespaces", json={"name": "default"})
            assert r.status_code == 201
    _felix("token", "keygen", "--tenant", "acme", "--dir", str(ctl_keys), "--max-ttl", "60")
    _felix("token", "keygen", "--tenant", "gone", "--dir", str(ctl_keys))
    first = load_ring(ctl_keys, "acme").signer(time.time()).kid

    def mint() -> str:
        return _felix(
            "token",
            "mint",
            "--tenant",
            "acme",
            "--sub",
            "svc",
            "--dir",
            str(ctl_keys),
            "--perm",
            "stream.publish:stream:acme/default/*",
        )

    node = NodeProcess(
        tmp_path / "node",
        "--auth",
        "--control-url",
        api,
        "--control-token",
        admin,
        "--jwks-refresh",
        "0.5",
        gateways=1,
        shards=1,
    )
    try:
        node_keys = tmp_path / "node" / "auth"
        # The node has the sets (and no ring): they came through the control plane.
        assert (node_keys / "acme.jwks.json").exists()
        assert (node_keys / "gone.jwks.json").exists()
        assert not list(node_keys.glob("*.ring.json"))
        assert node.metric("felix_jwks_sync_writes_total") >= 2
        url = f"felix://{node.host}:{node.port}"

        async def publish(token: str, data: bytes) -> None:
            async with felix.connect(url, ca=node.ca_file, tenant="acme", token=token) as client:
                ack = await client.publish("orders", data)
                assert ack is not None

        token = mint()
        assert _kid(token) == first
        run(lambda: publish(token, b"first key"), timeout=30)

        # The control plane rotates on its own: wait until the next key signs there.
        deadline = time.monotonic() + 30
        while load_ring(ctl_keys, "acme").signer(time.time()).kid == first:
            assert time.monotonic() < deadline, "the control plane did not rotate"
            time.sleep(0.1)
        token2 = mint()
        second = _kid(token2)
        assert second != first
        # Published 8 s before it signed, synced every 0.5 s: the node knows it already.
        run(lambda: publish(token2, b"second key"), timeout=30)
        published = [
            k["kid"] for k in json.loads((node_keys / "acme.jwks.json").read_text())["keys"]
        ]
        assert first in published and second in published  # the old key is kept
        # Tokens of the retired key still verify until they expire.
        run(lambda: publish(token, b"first key again"), timeout=30)
        jwks = json.loads((node_keys / "acme.jwks.json").read_text())
        verify_felix_token(
            token2, jwks, issuer=ISSUER, audience=AUDIENCE, now=time.time(), leeway=5
        )

        # A tenant deleted on the control plane loses its keys on the node.
        r = httpx.delete(f"{api}/v1/tenants/gone?cascade=true", headers=headers, timeout=10)
        assert r.status_code in (200, 204), r.text
        deadline = time.monotonic() + 10
        while (node_keys / "gone.jwks.json").exists():
            assert time.monotonic() < deadline, "the node kept a deleted tenant's keys"
            time.sleep(0.1)
    finally:
        node.stop()
