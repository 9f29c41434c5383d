"""`felix up --region`: the node and its embedded control plane belong to one region
(issue #15, first slice)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from felix.errors import ConfigError
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
