"""One view of resources: what a node creates on first use shows in its control plane.

A publish to a new stream and a set in a new cache register them (and their tenant
and namespace) in the control plane the node follows, marked ``auto_created``,
with the settings they got; they come back through the feed without disturbing
their data; deleting them through the control plane ends them on the data plane;
registration survives the control plane being away, is bounded, and a restart
registers nothing twice.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import felix
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(180)


def _wait_for(check: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _get(api: str, path: str) -> dict[str, Any] | None:
    r = httpx.get(f"{api}/v1/{path}", timeout=10)
    return r.json() if r.status_code == 200 else None


def _items(api: str, path: str) -> list[dict[str, Any]]:
    body = _get(api, path)
    return [] if body is None else list(body["items"])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "node", "--control", "127.0.0.1:0")
    yield n
    n.stop()


def _client(node: NodeProcess, tenant: str = "acme", namespace: str = "prod") -> Any:
    url = f"felix://{node.host}:{node.port}"
    return felix.connect(url, ca=node.ca_file, tenant=tenant, namespace=namespace)


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "felix.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_streams_and_caches_created_on_first_use_appear_in_the_control_plane(
    node: NodeProcess,
) -> None:
    api = node.info["control"]
    stream_path = "tenants/acme/namespaces/prod/streams/orders"
    cache_path = "tenants/acme/namespaces/prod/caches/sessions"

    async def write() -> None:
        async with _client(node) as client:
            for i in range(5):
                await client.publish("orders", b"%d" % i)
            assert await client.cache("sessions").set("k", b"v")

    run(write, timeout=30)
    stream = _wait_for(lambda: _get(api, stream_path), timeout=10)
    assert stream is not None, node.log()
    cache = _wait_for(lambda: _get(api, cache_path), timeout=10)
    assert cache is not None, node.log()
    # Marked, with the settings the node gave them (its defaults).
    assert stream["spec"]["auto_created"] is True
    assert stream["spec"]["replay_max_records"] == 100_000
    assert stream["spec"]["durable"] is False
    assert stream["spec"]["region"] == "local"
    assert cache["spec"]["auto_created"] is True
    assert cache["spec"]["budget_bytes"] == 64 * 1024 * 1024
    # The tenant and namespace came with them, marked the same way.
    assert (_get(api, "tenants/acme") or {})["spec"]["auto_created"] is True
    assert (_get(api, "tenants/acme/namespaces/prod") or {})["spec"]["auto_created"] is True
    # The CLI lists them as auto-created.
    listing = _cli("stream", "ls", "--tenant", "acme", "--namespace", "prod", "--url", api)
    assert "orders" in listing and "auto" in listing, listing
    listing = _cli("cache", "ls", "--tenant", "acme", "--namespace", "prod", "--url", api)
    assert "sessions" in listing and "auto" in listing, listing

    async def unchanged() -> None:
        # Back through the feed, defined with what they had: records and entries stay.
        await asyncio.sleep(0.5)
        async with _client(node) as client:
            async with client.subscribe("orders", start="earliest") as sub:
                assert (await sub.next(timeout=5)).offset == 0
            assert await client.cache("sessions").get("k") == b"v"

    run(unchanged, timeout=30)
    assert node.metric("felix_autocreate_registered_total") >= 2
    assert "cannot apply" not in node.log()
