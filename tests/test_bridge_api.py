"""The bridge resource of the control plane (docs/operations.md, "Bridges"): its own
permission, validation (references to secrets only, another region), the change feed,
the OpenAPI document, every store; in process (httpx over ASGI, a MemoryStore)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from felix.auth.perms import Permission, PermissionSet
from felix.control.model import MAX_BRIDGES_PER_TENANT, ResourceKind, validate_spec
from felix.control.store import Store
from felix.control.stores.memory import MemoryStore
from felix.control.stores.postgres import PostgresStore
from felix.control.stores.sqlite import SQLiteStore
from felix.errors import BadRequest, HasChildren
from tests import pg
from tests.aio import run
from tests.test_control_api_auth import ADMIN, Keys, api, assert_problem, bearer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "auth")


BRIDGES = "/v1/tenants/acme/bridges"
JWT = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJzdmMiLCJ0aWQiOiJhY21lIn0.c2lnbmF0dXJl"
SPEC: dict[str, Any] = {
    "source_stream": "prod/orders",
    "target_url": "felix://127.0.0.1:5001",
    "target_region": "us-1",
    "target_stream": "prod/orders-eu",
    "target_token_env": "FELIX_BRIDGE_ACME_US_TOKEN",
    "target_ca": "/etc/felix/us-ca.pem",
}


def test_bridge_manage_is_its_own_permission() -> None:
    own = PermissionSet("acme", ["bridge.manage:bridge:acme/to-us"])
    assert own.allows("bridge.manage", "bridge:acme/to-us")
    assert not own.allows("bridge.manage", "bridge:acme/other")
    assert not own.allows("bridge.manage", "bridge:acme/*")
    every = PermissionSet("acme", ["bridge.manage:bridge:acme/*"])
    assert every.allows("bridge.manage", "bridge:acme/anything")
    # Nothing else implies it: data leaving the region is granted explicitly.
    admin = PermissionSet("acme", ["tenant.manage:tenant:acme", "rbac.manage:tenant:acme"])
    assert not admin.allows("bridge.manage", "bridge:acme/to-us")
    assert not every.allows("stream.subscribe", "stream:acme/prod/orders")
    for bad in (
        "bridge.manage:tenant:acme",
        "stream.publish:bridge:acme/x",
        "bridge.manage:bridge:*/x",
    ):
        with pytest.raises(BadRequest):
            Permission.parse(bad)
    assert not every.allows("bridge.manage", "bridge:globex/x")


def test_the_api_needs_bridge_manage(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys, region="eu-1") as http:
            r = await http.post(BRIDGES, json={"name": "to-us", **SPEC})
            assert_problem(r, 401)
            tenant_admin = keys.token("acme", "tenant.manage:tenant:acme", region="eu-1")
            r = await http.post(
                BRIDGES, json={"name": "to-us", **SPEC}, headers=bearer(tenant_admin)
            )
            assert_problem(r, 403)
            r = await http.get(BRIDGES, headers=bearer(tenant_admin))
            assert_problem(r, 403)
            one = keys.token("acme", "bridge.manage:bridge:acme/to-us", region="eu-1")
            # The collection needs bridge:acme/*: one bridge's permission cannot create.
            r = await http.post(BRIDGES, json={"name": "to-us", **SPEC}, headers=bearer(one))
            assert_problem(r, 403)
            every = keys.token("acme", "bridge.manage:bridge:acme/*", region="eu-1")
            r = await http.post(BRIDGES, json={"name": "to-us", **SPEC}, headers=bearer(every))
            assert r.status_code == 201, r.text
            assert r.headers["Location"] == f"{BRIDGES}/to-us"
            # The one bridge's permission reads, pauses and deletes that bridge only.
            r = await http.get(f"{BRIDGES}/to-us", headers=bearer(one))
            assert r.status_code == 200 and r.json()["spec"]["state"] == "active"
            r = await http.patch(f"{BRIDGES}/to-us", json={"state": "paused"}, headers=bearer(one))
            assert r.status_code == 200 and r.json()["spec"]["state"] == "paused"
            r = await http.post(BRIDGES, json={"name": "second", **SPEC}, headers=bearer(one))
            assert_problem(r, 403)
            # Another tenant's token, even with bridge.manage on its own tenant: 403.
            globex = keys.token("globex", "bridge.manage:bridge:globex/*", region="eu-1")
            assert_problem(await http.get(f"{BRIDGES}/to-us", headers=bearer(globex)), 403)
            r = await http.delete(f"{BRIDGES}/to-us", headers=bearer(one))
            assert r.status_code == 200
            assert r.json()["deleted"] == [{"kind": "bridge", "path": ["acme", "to-us"]}]

    run(main)


def test_secrets_are_refused_and_never_echoed(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with api(keys, region="eu-1") as http:
            h = bearer(ADMIN)
            for bad in (
                {"target_token": JWT},  # no such field: a secret has nowhere to go
                {"token": "hunter2"},
                {"target_token_env": JWT},
                {"target_token_env": "not a name"},
                {"target_token_file": f"/run/{JWT}"},
                {"target_token_file": "/run/secrets/" + "Zm9vYmFy" * 8},
                {"target_token_file": "../acme2/token"},
                {"target_token_env": "FELIX_CONTROL_TOKEN"},
                {"target_ca": "-----BEGIN CERTIFICATE-----\nMIIB..."},
                {"target_url": "felix://svc:hunter2@us.example:5000"},
                {"target_url": f"felix://us.example:5000/?token={JWT}"},
                {"description": f"token is {JWT}"},
                {"target_token_env": "FELIX_BRIDGE_ACME_A", "target_token_file": "tok"},
            ):
                r = await http.post(BRIDGES, json={"name": "b", **SPEC, **bad}, headers=h)
                assert r.status_code in (400, 422), (bad, r.text)
                assert JWT not in r.text and "hunter2" not in r.text, r.text
                assert "Zm9vYmFy" * 8 not in r.text
            assert JWT not in caplog.text and "hunter2" not in caplog.text
            assert (await http.get(BRIDGES, headers=h)).json()["items"] == []

    with caplog.at_level(logging.INFO, logger="felix.audit"):
        run(main)


def test_validation(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys, region="eu-1") as http:
            h = bearer(ADMIN)
            # A bridge within the region is refused (on create and on update).
            r = await http.post(
                BRIDGES, json={"name": "b", **SPEC, "target_region": "eu-1"}, headers=h
            )
            assert_problem(r, 400)
            assert "own region" in r.json()["detail"]
            for bad in (
                {"source_stream": "orders"},
                {"source_stream": "prod/orders/x"},
                {"target_stream": "../x"},
                {"target_url": "https://us.example"},
                {"target_region": "bad region"},
                {"state": "stopped"},
                {"filter": {"header": ""}},
                {"filter": {"header": "k", "equals": "v", "regex": ".*"}},
            ):
                r = await http.post(BRIDGES, json={"name": "b", **SPEC, **bad}, headers=h)
                assert r.status_code in (400, 422), (bad, r.text)
            r = await http.post(
                BRIDGES,
                json={"name": "b", **SPEC, "filter": {"header": "tier", "equals": "gold"}},
                headers=h,
            )
            assert r.status_code == 201, r.text
            spec = r.json()["spec"]
            assert spec["filter"] == {"header": "tier", "equals": "gold"}
            assert spec["state"] == "active" and spec["start"] == "earliest"
            assert spec["target_tenant"] is None
            r = await http.patch(f"{BRIDGES}/b", json={"target_region": "eu-1"}, headers=h)
            assert_problem(r, 400)
            r = await http.patch(f"{BRIDGES}/b", json={"filter": None}, headers=h)
            assert r.status_code == 200 and r.json()["spec"]["filter"] is None
            # The tenant must exist.
            r = await http.post("/v1/tenants/nobody/bridges", json={"name": "b", **SPEC}, headers=h)
            assert_problem(r, 404)

    run(main)


def test_bridges_per_tenant_are_bounded(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys, region="eu-1") as http:
            h = bearer(ADMIN)
            for i in range(MAX_BRIDGES_PER_TENANT):
                r = await http.post(BRIDGES, json={"name": f"b{i}", **SPEC}, headers=h)
                assert r.status_code == 201, r.text
            r = await http.post(BRIDGES, json={"name": "one-more", **SPEC}, headers=h)
            assert_problem(r, 503)
            assert f"limit {MAX_BRIDGES_PER_TENANT}" in r.json()["detail"]
            # Another tenant is not affected.
            r = await http.post("/v1/tenants/globex/bridges", json={"name": "b", **SPEC}, headers=h)
            assert r.status_code == 201

    run(main)


def test_in_the_feed_and_the_openapi_document(keys: Keys) -> None:
    async def main() -> None:
        async with api(keys, region="eu-1") as http:
            h = bearer(ADMIN)
            before = (await http.get("/v1/changes", headers=h)).json()["next"]
            await http.post(BRIDGES, json={"name": "b", **SPEC}, headers=h)
            await http.patch(f"{BRIDGES}/b", json={"state": "paused"}, headers=h)
            await http.delete(f"{BRIDGES}/b", headers=h)
            page = (await http.get(f"/v1/changes?since={before}", headers=h)).json()
            ops = [
                (c["op"], c["resource"]["kind"], c["resource"]["spec"]["state"])
                for c in page["changes"]
            ]
            assert ops == [
                ("create", "bridge", "active"),
                ("update", "bridge", "paused"),
                ("delete", "bridge", "paused"),
            ]
            doc = (await http.get("/v1/openapi.json")).json()
            assert "/v1/tenants/{tenant}/bridges/{bridge}" in doc["paths"]
            create = doc["components"]["schemas"]["BridgeCreate"]
            assert {"source_stream", "target_url", "target_region", "target_stream"} <= set(
                create["required"]
            )
            assert "target_token_env" in create["properties"]

    run(main)


def test_every_store_keeps_bridges(tmp_path: Path) -> None:
    """Memory, SQLite and a real PostgreSQL (tests/pg.py): the resource tables hold any
    kind, so bridges need no schema migration; a reopened file keeps them."""

    async def check(store: Store) -> None:
        await store.open()
        try:
            await store.create(ResourceKind.TENANT, ("acme",), {})
            res = await store.create(ResourceKind.BRIDGE, ("acme", "to-us"), SPEC)
            assert res.spec == validate_spec(ResourceKind.BRIDGE, SPEC)
            res = await store.update(ResourceKind.BRIDGE, ("acme", "to-us"), {"state": "paused"})
            assert res.version == 2 and res.spec["state"] == "paused"
            listed = await store.list_resources(ResourceKind.BRIDGE, ("acme",))
            assert [r.name for r in listed] == ["to-us"]
            _, snapshot = await store.snapshot()
            assert [r.kind for r in snapshot] == [ResourceKind.TENANT, ResourceKind.BRIDGE]
            # A tenant with a bridge is deleted only with cascade, bridge first.
            with pytest.raises(HasChildren):
                await store.delete(ResourceKind.TENANT, ("acme",))
            changes = await store.delete(ResourceKind.TENANT, ("acme",), cascade=True)
            kinds = [c.resource.kind for c in changes]
            assert kinds == [ResourceKind.BRIDGE, ResourceKind.TENANT]
        finally:
            await store.close()

    run(lambda: check(MemoryStore()))
    run(lambda: check(SQLiteStore(tmp_path / "control.db")))
    with pg.temporary_database() as dsn:
        run(lambda: check(PostgresStore(dsn)))


def test_the_secret_check_keeps_ordinary_references() -> None:
    spec = validate_spec(
        ResourceKind.BRIDGE,
        {
            **SPEC,
            "target_token_file": "/var/run/secrets/felix/us-1-bridge.token",
            "target_token_env": None,
        },
    )
    assert json.loads(json.dumps(spec))["target_token_file"].endswith("us-1-bridge.token")
