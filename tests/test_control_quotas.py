"""Issue 11 items 2 and 15 in the control plane: budgets checked against the node's and
the tenant's quotas; durable stream settings (issue 12) accepted, contradictions refused."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from felix import audit
from felix.control.api import create_app
from felix.control.client import error_from_response
from felix.control.model import ResourceKind, validate_spec
from felix.control.quotas import NodeQuotas, check_resource
from felix.control.stores.memory import MemoryStore
from felix.errors import BadRequest, SettingConflict
from felix.shard.resources import SHARD_MAX_RESOURCES
from tests.aio import run
from tests.nodeproc import control_process
from tests.test_audit import Captured
from tests.test_control_api import CACHES, NS, STREAMS, T, seed, with_api
from tests.test_control_api_auth import ACME, ADMIN, Keys, api, assert_problem, bearer

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
#: A node of 256 MiB over 2 shards, tenants capped at 128 MiB unless they say.
NODE = NodeQuotas(memory_budget=256 * MIB, shards=2, tenant_memory=128 * MIB)


def problem(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "/v1/problems/bad-request"
    for word in words:
        assert word in body["detail"], body["detail"]


def test_budgets_above_the_node_or_the_tenant_quota_are_refused() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        # A stream lives on one shard: at most min(node, tenant quota) / shards.
        r = await http.post(STREAMS, json={"name": "big", "replay_max_bytes": 1 << 40})
        problem(r, "stream acme/prod/big", "64 MiB", "2 shards")
        ok = await http.post(STREAMS, json={"name": "fits", "replay_max_bytes": 64 * MIB})
        assert ok.status_code == 201, ok.text
        problem(await http.patch(f"{STREAMS}/fits", json={"replay_max_bytes": 65 * MIB}), "64 MiB")
        # retention_bytes caps the ring: a big ring under a small retention fits.
        r = await http.patch(
            f"{STREAMS}/fits", json={"replay_max_bytes": 1 << 40, "retention_bytes": MIB}
        )
        assert r.status_code == 200, r.text
        # A cache is spread over the shards: at most min(node, tenant quota).
        problem(await http.post(CACHES, json={"name": "c", "budget_bytes": 1 << 40}), "128 MiB")
        problem(await http.patch(f"{CACHES}/sessions", json={"budget_bytes": 129 * MIB}), "128 MiB")
        assert (await http.get(f"{CACHES}/sessions")).json()["version"] == 1

    with_api(test, quotas=NODE)


def test_tenant_quotas_are_checked_against_the_node_and_what_the_tenant_has() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        problem(
            await http.post(T, json={"name": "big", "memory_quota_bytes": 1 << 40}),
            "above the node's memory budget",
        )
        r = await http.post(T, json={"name": "acme", "memory_quota_bytes": 256 * MIB})
        assert r.status_code == 201, r.text
        await http.post(NS, json={"name": "prod"})
        # The tenant's own quota (256 MiB) allows 128 MiB per shard...
        r = await http.post(STREAMS, json={"name": "s", "replay_max_bytes": 100 * MIB})
        assert r.status_code == 201, r.text
        # ...so lowering it below what that stream may use is refused, naming it.
        r = await http.patch(f"{T}/acme", json={"memory_quota_bytes": 64 * MIB})
        problem(r, "acme/prod/s", "lower that first")
        r = await http.patch(f"{T}/acme", json={"memory_quota_bytes": 200 * MIB})
        assert r.status_code == 200 and r.json()["spec"]["memory_quota_bytes"] == 200 * MIB

    with_api(test, quotas=NODE)


def test_durable_settings_are_accepted_and_fsync_follows_durable() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        r = await http.post(STREAMS, json={"name": "d", "durable": True})
        assert r.status_code == 201, r.text
        spec = r.json()["spec"]
        # durable=true without fsync: commit (acks after fsync), the safe default.
        assert (spec["durable"], spec["fsync"], spec["fsync_interval_ms"]) == (True, "commit", 100)
        body = {"name": "i", "durable": True, "fsync": "interval", "fsync_interval_ms": 250}
        r = await http.post(STREAMS, json={**body, "retention_age_s": 60, "retention_bytes": MIB})
        assert r.status_code == 201, r.text
        spec = r.json()["spec"]
        assert (spec["fsync"], spec["fsync_interval_ms"], spec["retention_age_s"]) == (
            "interval",
            250,
            60,
        )
        r = await http.post(STREAMS, json={"name": "w", "durable": True, "fsync": "none"})
        assert r.status_code == 201 and r.json()["spec"]["fsync"] == "none"
        # Turning durability off (or on) without naming fsync derives it anew.
        r = await http.patch(f"{STREAMS}/d", json={"durable": False})
        assert r.status_code == 200, r.text
        assert (r.json()["spec"]["durable"], r.json()["spec"]["fsync"]) == (False, "none")
        r = await http.patch(f"{STREAMS}/orders", json={"durable": True})
        assert r.status_code == 200 and r.json()["spec"]["fsync"] == "commit"
        # An explicit null asks for the default again.
        r = await http.patch(f"{STREAMS}/i", json={"fsync": None})
        assert r.status_code == 200 and r.json()["spec"]["fsync"] == "commit"
        # In-memory streams keep their defaults.
        r = await http.post(STREAMS, json={"name": "m"})
        spec = r.json()["spec"]
        assert (spec["durable"], spec["fsync"], spec["retention_age_s"]) == (False, "none", None)

    with_api(test)


def conflict(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["type"] == "/v1/problems/setting-conflict", body
    for word in words:
        assert word in body["detail"], body["detail"]


def test_fsync_on_a_stream_that_is_not_durable_is_a_setting_conflict() -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        for fsync in ("interval", "commit"):
            r = await http.post(STREAMS, json={"name": "s", "fsync": fsync})
            conflict(r, f"fsync='{fsync}'", "durable=true")
            r = await http.post(STREAMS, json={"name": "s", "durable": False, "fsync": fsync})
            conflict(r, "durable=true")
        assert (await http.get(f"{STREAMS}/s")).status_code == 404
        conflict(await http.patch(f"{STREAMS}/orders", json={"fsync": "commit"}), "fsync")
        assert (await http.get(f"{STREAMS}/orders")).json()["version"] == 1
        r = await http.post(STREAMS, json={"name": "d", "durable": True})
        assert r.status_code == 201
        r = await http.patch(f"{STREAMS}/d", json={"durable": False, "fsync": "commit"})
        conflict(r, "durable=true")
        # The schema bounds the interval; the old names are gone from it.
        for bad in (
            {"fsync_interval_ms": 0},
            {"fsync_interval_ms": 60_001},
            {"fsync": "batch"},
            {"retention_age_s": 0},
            {"retention_age_s": 100 * 365 * 86_400 + 1},
        ):
            r = await http.post(STREAMS, json={"name": "x", "durable": True, **bad})
            assert r.status_code == 422, r.text
        # Infinity is no retention (a JSON extension Python's parser accepts).
        raw = b'{"name": "x", "durable": true, "retention_age_s": Infinity}'
        r = await http.post(STREAMS, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422), r.text
        assert (await http.get(f"{STREAMS}/x")).status_code == 404

    with_api(test)


def test_old_fsync_names_are_refused_with_their_new_names() -> None:
    for old, new in (("batch", "interval"), ("always", "commit")):
        with pytest.raises(BadRequest, match=f"now called '{new}'"):
            validate_spec(ResourceKind.STREAM, {"durable": True, "fsync": old})
    with pytest.raises(SettingConflict):
        validate_spec(ResourceKind.STREAM, {"fsync": "interval"})


def test_the_client_raises_setting_conflict() -> None:
    request = httpx.Request("POST", "http://control/v1/tenants/acme/namespaces/prod/streams")
    body = {
        "type": "/v1/problems/setting-conflict",
        "title": "Settings conflict",
        "status": 409,
        "detail": "fsync='commit' needs durable=true",
    }
    err = error_from_response(httpx.Response(409, json=body, request=request))
    assert type(err) is SettingConflict and isinstance(err, BadRequest)
    assert str(err) == "fsync='commit' needs durable=true"


def test_check_resource_uses_the_node_default_tenant_quota() -> None:
    path = ("acme", "prod", "s")
    spec = {"replay_max_bytes": 64 * MIB, "retention_bytes": None}
    check_resource(ResourceKind.STREAM, path, spec, {}, NODE)
    with pytest.raises(BadRequest, match="32 MiB"):
        check_resource(ResourceKind.STREAM, path, spec, {"memory_quota_bytes": 64 * MIB}, NODE)


def test_a_standalone_control_plane_checks_against_the_nodes_it_is_told_of(
    tmp_path: Path,
) -> None:
    args = ["--store", "memory://", "--node-memory-budget", "64MiB", "--node-shards", "2"]
    args += ["--node-max-streams-per-shard", "1000"]
    with (
        control_process(tmp_path / "control.log", *args) as url,
        httpx.Client(base_url=url) as http,
    ):
        r = http.post(T, json={"name": "acme", "max_resources_per_shard": 1001})
        problem(r, "max_resources_per_shard 1001", "--max-streams-per-shard, 1000")
        r = http.post(T, json={"name": "acme", "max_resources_per_shard": 1000})
        assert r.status_code == 201, r.text
        assert http.post(NS, json={"name": "prod"}).status_code == 201
        problem(http.post(STREAMS, json={"name": "s", "replay_max_bytes": 33 * MIB}), "32 MiB")
        assert (
            http.post(STREAMS, json={"name": "s", "replay_max_bytes": 32 * MIB}).status_code == 201
        )


def test_only_the_admin_token_sets_a_tenants_quotas(tmp_path: Path) -> None:
    """Review finding 3: tenant.manage on its own tenant (which the tenant's RBAC admin
    may grant itself) does not let a tenant raise its quotas."""
    keys = Keys(tmp_path / "auth")
    cap = Captured()
    handler = logging.StreamHandler(cap.stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(audit.LOGGER_NAME)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    audit._budget = audit._Budget(audit.MAX_LINES_PER_SECOND)

    async def main() -> None:
        async with api(keys) as http:
            own = bearer(keys.token("acme", "tenant.manage:tenant:acme"))
            for body in (
                {"memory_quota_bytes": 1 << 40},
                {"max_resources_per_shard": 50_000},
                {"disk_quota_bytes": 1 << 40},
            ):
                assert_problem(await http.patch(ACME, json=body, headers=own), 403)
            refused = [line for line in cap.lines() if line["action"] == "tenant.update"]
            assert [(line["result"], line["who"]) for line in refused] == [("failed", "svc")] * 3
            assert (await http.get(ACME, headers=own)).json()["spec"]["memory_quota_bytes"] is None
            # Other settings, and the stored quotas sent back unchanged, are the tenant's.
            r = await http.patch(
                ACME, json={"description": "ours", "memory_quota_bytes": None}, headers=own
            )
            assert r.status_code == 200, r.text
            # The admin token may; within what a shard holds (--max-streams-per-shard).
            admin = bearer(ADMIN)
            r = await http.patch(ACME, json={"max_resources_per_shard": 65_537}, headers=admin)
            problem(r, "65537", "--max-streams-per-shard, 65536")
            body = {"memory_quota_bytes": 64 * MIB, "max_resources_per_shard": 50_000}
            r = await http.patch(ACME, json=body, headers=admin)
            assert r.status_code == 200, r.text
            r = await http.patch(ACME, json={"max_resources_per_shard": 50_000}, headers=own)
            assert r.status_code == 200, r.text  # unchanged
            assert_problem(
                await http.patch(ACME, json={"max_resources_per_shard": 1}, headers=own), 403
            )

    try:
        run(main)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_tenant_cannot_be_given_more_resources_than_a_shard_holds() -> None:
    node = NodeQuotas(max_streams_per_shard=1 << 20)
    assert node.max_resources_per_shard == SHARD_MAX_RESOURCES

    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        body = {"name": "big", "max_resources_per_shard": SHARD_MAX_RESOURCES + 1}
        problem(await http.post(T, json=body), "shard-wide bound, 100000")
        body["max_resources_per_shard"] = SHARD_MAX_RESOURCES
        assert (await http.post(T, json=body)).status_code == 201

    with_api(test, quotas=node)


def test_openapi_documents_the_durable_settings() -> None:
    doc = create_app(MemoryStore()).openapi()
    schemas = doc["components"]["schemas"]
    fsync = schemas["StreamCreate"]["properties"]["fsync"]
    enums = [s.get("enum") for s in fsync.get("anyOf", [fsync])]
    assert ["none", "interval", "commit"] in enums
    interval = schemas["StreamCreate"]["properties"]["fsync_interval_ms"]
    assert (interval["minimum"], interval["maximum"], interval["default"]) == (1, 60_000, 100)
    stream_item = "/v1/tenants/{tenant}/namespaces/{ns}/streams/{stream}"
    assert "409" in doc["paths"][stream_item]["patch"]["responses"]
    assert "409" not in doc["paths"]["/v1/tenants/{tenant}"]["patch"]["responses"]
