"""Issue 11 items 2 and 15 in the control plane: budgets checked against the node's and
the tenant's quotas, and settings the node does not honour refused, at create and update."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from felix import audit
from felix.control.model import ResourceKind, validate_spec
from felix.control.quotas import NodeQuotas, check_resource
from felix.control.stores.memory import MemoryStore
from felix.errors import BadRequest
from felix.shard.resources import SHARD_MAX_RESOURCES, unsupported
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


@pytest.mark.parametrize(
    ("setting", "value"),
    [("durable", True), ("fsync", "always"), ("fsync", "batch"), ("retention_age_s", 60)],
)
def test_settings_the_node_does_not_honour_are_refused(setting: str, value: Any) -> None:
    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        r = await http.post(STREAMS, json={"name": "s", setting: value})
        problem(r, f"{setting}=", "not supported", "What survives a restart")
        problem(await http.patch(f"{STREAMS}/orders", json={setting: value}), setting)
        assert (await http.get(f"{STREAMS}/s")).status_code == 404

    with_api(test)


def test_stored_unhonoured_settings_are_kept_and_other_updates_still_work() -> None:
    """Compatibility: a stream stored with durable=true before it was refused."""

    async def test(http: httpx.AsyncClient, store: MemoryStore) -> None:
        await seed(http)
        await store.create(ResourceKind.STREAM, ("acme", "prod", "old"), {"durable": True})
        r = await http.patch(f"{STREAMS}/old", json={"replay_max_records": 10})
        assert r.status_code == 200, r.text
        assert r.json()["spec"]["durable"] is True  # shown as stored (the node ignores it)
        r = await http.patch(f"{STREAMS}/old", json={"durable": False})
        assert r.status_code == 200 and r.json()["spec"]["durable"] is False
        # The defaults are honoured values.
        spec = (await http.get(f"{STREAMS}/orders")).json()["spec"]
        assert (spec["durable"], spec["fsync"], spec["retention_age_s"]) == (False, "none", None)

    with_api(test)


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


def test_the_node_names_stored_settings_it_does_not_honour() -> None:
    stored = validate_spec(ResourceKind.STREAM, {})
    assert unsupported(stored) == []
    old = {**stored, "durable": True, "fsync": "batch"}
    assert [line.split("=")[0] for line in unsupported(old)] == ["durable", "fsync"]


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
            for body in ({"memory_quota_bytes": 1 << 40}, {"max_resources_per_shard": 50_000}):
                assert_problem(await http.patch(ACME, json=body, headers=own), 403)
            refused = [line for line in cap.lines() if line["action"] == "tenant.update"]
            assert [(line["result"], line["who"]) for line in refused] == [("failed", "svc")] * 2
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
